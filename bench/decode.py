"""Plain decode step vs the memory-bandwidth floor, and the quantized drafter's step cost c.

A decode step (``T = 1`` token per sequence) must read every weight once and the live
part of the KV cache once, so its floor on one device is

    floor = (weight bytes + live KV bytes) / copy bandwidth

with the copy bandwidth measured in the same run (a large device ``x + 1``: bytes read +
written over time). Each cell times a jitted loop of ``--steps`` greedy decode steps
(``specrl.model.forward`` with a KV cache, argmax, next position) started from position
``prompt + new / 2`` of a cache of ``prompt + new`` slots -- the average step of a
``new``-token rollout after a ``prompt``-token prefill -- and reports per-step time over
the floor. Weights are random (bf16 for the real shapes), the cache holds random values.

Drafter variants are the quantized self-drafter (:mod:`specrl.quant`) on the same cells:
``int8`` (per-channel, 'jnp' backend: dequantize then dot), ``int8-pallas`` (the Pallas
weight-only kernel, :mod:`specrl.kernels.weight_only_matmul`) and ``int4`` (groups of 128,
'jnp'). ``c`` = drafter step / plain step at the same batch size: speculation with k
drafts and acceptance alpha pays only if c is well below alpha.

``--check`` first compares the kernel (natively compiled) with its jnp reference on the
decode shapes; ``--matmul`` times single matmuls (bf16 dot, int8 jnp, int8 Pallas).

  python bench/decode.py --quick          # tiny shapes on CPU (Pallas in interpret mode)
  python bench/decode.py                  # Qwen2.5-1.5B / 0.5B shapes, B 1,16,64,256

Prints tables, then, as its last line, one JSON object with the headline figures.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from bench import common  # noqa: E402
from specrl import model as model_lib  # noqa: E402
from specrl import quant  # noqa: E402
from specrl.kernels import weight_only_matmul as wom  # noqa: E402
from specrl.kernels.weight_only_matmul_reference import weight_only_matmul_reference  # noqa: E402

# A CPU-sized model whose dims are multiples of 16, so every matmul takes the kernel path.
TINY = dict(vocab_size=512, d_model=128, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=32, d_ff=256)
VARIANTS = {  # name -> QuantConfig (None: the plain bf16 policy)
  'plain': None,
  'int8': quant.QuantConfig(bits=8, backend='jnp'),
  'int8-pallas': quant.QuantConfig(bits=8, backend='pallas'),
  'int4': quant.QuantConfig(bits=4, backend='jnp'),
}
FULL = dict(
  models='qwen2.5-1.5b,qwen2.5-0.5b',
  batches='1,64,256,16',
  variants='plain,int8,int8-pallas,int4',
  prompt=64,
  new=256,
  steps=16,
  reps=5,
  copy_mib=2048,
)
QUICK = dict(
  models='tiny',
  batches='1,4',
  variants='plain,int8,int8-pallas,int4',
  prompt=16,
  new=32,
  steps=4,
  reps=3,
  copy_mib=64,
)


def model_config(name: str) -> model_lib.ModelConfig:
  return model_lib.ModelConfig(**TINY) if name == 'tiny' else model_lib.preset_config(name)


# ----------------------------------------------------------------------------- decode


@functools.partial(jax.jit, static_argnames=('cfg', 'steps'), donate_argnames=('cache',))
def decode_steps(params, cfg: model_lib.ModelConfig, cache, tokens, positions, steps: int):
  """``steps`` greedy decode steps from ``positions [B]``; returns (cache, last tokens)."""

  def body(_, carry):
    cache, tok, pos = carry
    logits, cache = model_lib.forward(params, cfg, tok[:, None], pos[:, None], cache)
    return cache, jnp.argmax(logits[:, 0], axis=-1).astype(jnp.int32), pos + 1

  cache, tok, _ = jax.lax.fori_loop(0, steps, body, (cache, tokens, positions))
  return cache, tok


@functools.partial(jax.jit, static_argnames=('cfg', 'batch', 'length'))
def random_cache(cfg: model_lib.ModelConfig, batch: int, length: int, key):
  """A KV cache full of random values (never zeros: they can time faster than real data)."""
  shape = (cfg.n_layers, batch, cfg.n_kv_heads, length, cfg.head_dim)  # [L, B, K, S, Dh]
  kk, kv = jax.random.split(key)
  return {
    'k': jax.random.normal(kk, shape, cfg.cdtype),
    'v': jax.random.normal(kv, shape, cfg.cdtype),
  }


def kv_bytes(cfg: model_lib.ModelConfig, batch: int, live: float) -> float:
  """Bytes of the live KV prefix (k and v) read by one decode step."""
  item = jnp.dtype(cfg.cdtype).itemsize
  return 2.0 * cfg.n_layers * batch * live * cfg.n_kv_heads * cfg.head_dim * item


def time_decode(params, cfg, batch: int, args) -> float:
  """Median ms per decode step at ``batch`` (see the module docstring)."""
  length = args.prompt + args.new
  start = args.prompt + args.new // 2
  cache = random_cache(cfg, batch, length, jax.random.key(batch))
  tokens = jax.random.randint(jax.random.key(2), (batch,), 0, cfg.vocab_size, jnp.int32)
  positions = jnp.full((batch,), start, jnp.int32)
  state = {'cache': cache}

  def call():
    state['cache'], tok = decode_steps(params, cfg, state['cache'], tokens, positions, args.steps)
    return tok

  return common.median_ms(call, iters=args.reps) / args.steps


# ----------------------------------------------------------------------------- kernel


def kernel_check(cfg: model_lib.ModelConfig, batches, interpret: bool) -> list[dict]:
  """Kernel vs reference on this model's matmul shapes (fresh random inputs each)."""
  d, f, v = cfg.d_model, cfg.d_ff, cfg.vocab_size
  hq = cfg.n_heads * cfg.head_dim
  shapes = [(d, hq, 1, False), (hq, d, 1, False), (d, f, 1, False), (f, d, 1, False)]
  shapes += [(d, v, 1, True), (d, f, d // 128 if d % 128 == 0 else 1, False)]
  rows = []
  rng = np.random.default_rng(0)
  for k, n, g, tr in shapes:
    for m in batches:
      x = jnp.asarray(rng.standard_normal((m, k)), jnp.bfloat16)
      q = jnp.asarray(rng.integers(-127, 128, (n, k) if tr else (k, n)), jnp.int8)
      s = jnp.asarray(0.001 + 0.01 * rng.random((g, n)), jnp.float32)
      row = dict(m=m, k=k, n=n, groups=g, transposed=tr)
      try:
        got = wom.weight_only_matmul(x, q, s, transposed=tr, interpret=interpret)
        want = weight_only_matmul_reference(x, q, s, transposed=tr)
        got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
        err = float(np.linalg.norm(got - want) / np.linalg.norm(want))
        row.update(rel_err=err, ok=bool(np.all(np.isfinite(got)) and err < 1e-3))
      except Exception as e:  # pylint: disable=broad-except  # one shot on a device: go on
        print(f'kernel check {row} failed: {type(e).__name__}: {str(e)[:2000]}', flush=True)
        row.update(rel_err=float('nan'), ok=False)
      rows.append(row)
  return rows


def _scan_matmuls(x, stack, matmul):
  """``matmul(x, w)`` for every weight of a stacked pytree, in one jitted loop.

  The carry is each result (overwritten), so no iteration is dead code and no reduction
  over the output is added; the per-call host dispatch is paid once for the whole stack.
  """

  def body(_, w):
    return matmul(x, w), None

  out0 = jax.eval_shape(matmul, x, jax.tree.map(lambda a: a[0], stack))
  out, _ = jax.lax.scan(body, jnp.zeros(out0.shape, out0.dtype), stack)
  return out


def matmul_bench(cfg, batches, reps: int, rotate_mib: int, min_copies: int = 8) -> list[dict]:
  """One matmul per shape: bf16 dot vs int8 'jnp' vs int8 'pallas'; GB/s of weight bytes.

  Each timed call runs the matmul over a stack of >= ``min_copies`` distinct weights (and
  >= ``rotate_mib`` of bf16, so consecutive matmuls do not find theirs in L2, 60 MB on an
  H200) inside one jitted ``lax.scan``; the per-matmul time is the call over the copies.
  """
  d, f, v = cfg.d_model, cfg.d_ff, cfg.vocab_size
  shapes = [('gate', d, f, True), ('down', f, d, True), ('head', d, v, False)]
  rows = []
  for name, k, n, first in shapes:
    shape = (k, n) if first else (n, k)
    copies = max(min_copies, -(-rotate_mib * 2**20 // (2 * k * n)))
    ws = 0.02 * jax.random.normal(jax.random.key(n), (copies,) + shape, jnp.bfloat16)
    eq = 'mk,kn->mn' if first else 'mk,nk->mn'
    stacks = {'bf16': ws}
    for key, backend in (('int8', 'jnp'), ('int8-pallas', 'pallas')):
      qcfg = quant.QuantConfig(bits=8, backend=backend)
      stacks[key] = quant.quantize_weight(ws, qcfg, rank=2, n_contract=1, contract_first=first)
    mms = {
      'bf16': lambda x, w, eq=eq: jnp.einsum(eq, x, w),
      'int8': lambda x, q, eq=eq: q.qeinsum(eq, x),
      'int8-pallas': lambda x, q, eq=eq: q.qeinsum(eq, x),
    }
    for m in batches:
      x = jax.random.normal(jax.random.key(m), (m, k), jnp.bfloat16)
      row = dict(matmul=name, m=m, k=k, n=n)
      for key, stack in stacks.items():
        fn = jax.jit(functools.partial(_scan_matmuls, matmul=mms[key]))
        try:
          ms = common.median_ms(lambda fn=fn, x=x, stack=stack: fn(x, stack), iters=reps) / copies
        except Exception as e:  # pylint: disable=broad-except
          print(f'matmul {name} M={m} {key} failed: {type(e).__name__}: {str(e)[:500]}')
          continue
        wbytes = k * n * (2 if key == 'bf16' else 1)
        row[key + '_us'] = 1e3 * ms
        row[key + '_GBps'] = wbytes / (ms * 1e-3) / 1e9
      rows.append(row)
  return rows


SWEEP = {  # kernel tiling variants timed by --sweep (defaults: choose_tiling, 3 stages)
  'auto': {},
  'stages4': dict(num_stages=4),
  'bn64': dict(block_n=64),
  'nosplit': dict(splits=1),
  'gemv': dict(gemv=True),  # M <= 8 only
}


def kernel_sweep(cfg, batches, reps: int, rotate_mib: int, min_copies: int = 8) -> list[dict]:
  """The kernel alone under a few tilings (data for tuning), timed like :func:`matmul_bench`."""
  d, f, v = cfg.d_model, cfg.d_ff, cfg.vocab_size
  rows = []
  for name, k, n, tr in [('gate', d, f, False), ('down', f, d, False), ('head', d, v, True)]:
    copies = max(min_copies, -(-rotate_mib * 2**20 // (k * n)))
    shape = (copies,) + ((n, k) if tr else (k, n))
    qs = jax.random.randint(jax.random.key(n), shape, -127, 128, jnp.int32).astype(jnp.int8)
    s = 0.001 + 0.01 * jax.random.uniform(jax.random.key(k), (1, n), jnp.float32)
    for m in batches:
      x = jax.random.normal(jax.random.key(m), (m, k), jnp.bfloat16)
      row = dict(matmul=name, m=m, k=k, n=n)
      for label, kw in SWEEP.items():
        if kw.get('gemv') and m > 8:
          continue
        mm = lambda x, q, kw=kw, s=s, tr=tr: wom.weight_only_matmul(x, q, s, transposed=tr, **kw)
        fn = jax.jit(functools.partial(_scan_matmuls, matmul=mm))
        try:
          ms = common.median_ms(lambda fn=fn, x=x, qs=qs: fn(x, qs), iters=reps) / copies
        except Exception as e:  # pylint: disable=broad-except
          print(f'sweep {name} M={m} {label} failed: {type(e).__name__}: {str(e)[:300]}')
          continue
        row[label + '_us'] = 1e3 * ms
        row[label + '_GBps'] = k * n / (ms * 1e-3) / 1e9
      rows.append(row)
  return rows


# ----------------------------------------------------------------------------- main


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
  ap.add_argument('--quick', action='store_true', help='tiny shapes on CPU (about a minute)')
  ap.add_argument(
    '--models', default=None, help=f'comma list of tiny,{",".join(model_lib.PRESETS)}'
  )
  ap.add_argument('--batches', default=None, help='comma list of batch sizes')
  ap.add_argument('--variants', default=None, help=f'comma list of {",".join(VARIANTS)}')
  ap.add_argument('--prompt', type=int, default=None, help='prompt tokens before decoding')
  ap.add_argument('--new', type=int, default=None, help='new tokens of the rollout')
  ap.add_argument('--steps', type=int, default=None, help='decode steps per timed call')
  ap.add_argument('--reps', type=int, default=None, help='timed calls per cell (median)')
  ap.add_argument('--copy_mib', type=int, default=None, help='copy-bandwidth array size')
  ap.add_argument('--check', action='store_true', help='kernel vs reference (first model)')
  ap.add_argument('--matmul', action='store_true', help='single-matmul timings (first model)')
  ap.add_argument('--sweep', default='', help='batch sizes for a kernel tiling sweep')
  ap.add_argument('--rotate_mib', type=int, default=256, help='--matmul weight copies')
  ap.add_argument('--time_budget', type=float, default=0.0, help='seconds; 0 = none')
  common.add_compile_cache_flag(ap)
  args = ap.parse_args(argv)
  for key, val in (QUICK if args.quick else FULL).items():
    if getattr(args, key) is None:
      setattr(args, key, val)
  common.enable_compile_cache(args.compile_cache)
  t_start = time.perf_counter()
  over = lambda: args.time_budget and time.perf_counter() - t_start > args.time_budget
  interpret = jax.default_backend() == 'cpu'
  info = common.device_info()
  batches = common.ints(args.batches)
  models = [m for m in args.models.split(',') if m]
  variants = [v for v in args.variants.split(',') if v]
  bad = [v for v in variants if v not in VARIANTS]
  if bad:
    ap.error(f'unknown variants {bad}; known: {sorted(VARIANTS)}')
  print(f'{info}, pallas interpret={interpret}, steps/call {args.steps}, median of {args.reps}')

  bw = common.copy_bandwidth(args.copy_mib << 20, iters=max(args.reps, 5))
  print(f'copy bandwidth (x + 1, {args.copy_mib} MiB, read + write): {bw / 1e9:.0f} GB/s')
  summary = dict(info, copy_GBps=bw / 1e9, skipped=[])

  checks = []
  if args.check:  # the first model's shapes
    checks = [
      dict(r, model=models[0]) for r in kernel_check(model_config(models[0]), batches, interpret)
    ]
    common.print_table(
      [('model', ''), ('m', 'd'), ('k', 'd'), ('n', 'd'), ('groups', 'd'), ('transposed', '')]
      + [('rel_err', '.2e'), ('ok', '')],
      checks,
    )
    summary['kernel_check_ok'] = all(r['ok'] for r in checks)
    summary['kernel_check_max_err'] = max(r['rel_err'] for r in checks)
    summary['kernel_check_seconds'] = time.perf_counter() - t_start

  mm = []
  if args.matmul:
    mm = [
      dict(r, model=models[0])
      for r in matmul_bench(model_config(models[0]), batches, max(args.reps, 5), args.rotate_mib)
    ]
    print()
    cols = [('model', ''), ('matmul', ''), ('m', 'd'), ('k', 'd'), ('n', 'd')]
    for key in ('bf16', 'int8', 'int8-pallas'):
      cols += [(key + '_us', '.1f'), (key + '_GBps', '.0f')]
    common.print_table(cols, mm)
  sw = []
  if args.sweep:
    sw = kernel_sweep(model_config(models[0]), common.ints(args.sweep), 5, args.rotate_mib)
    print()
    cols = [('matmul', ''), ('m', 'd'), ('k', 'd'), ('n', 'd')]
    for key in SWEEP:
      cols += [(key + '_us', '.1f'), (key + '_GBps', '.0f')]
    common.print_table(cols, sw)
    summary['sweep_us'] = {
      f'{r["matmul"]}/M{r["m"]}': {key: r.get(key + '_us') for key in SWEEP} for r in sw
    }
  summary['prep_seconds'] = time.perf_counter() - t_start

  rows = []
  live = args.prompt + args.new // 2 + args.steps / 2
  for name in models:
    cfg = model_config(name)
    params = model_lib.init_params(cfg, jax.random.key(0))
    wbytes = {'plain': quant.param_bytes(params)}
    vparams = {'plain': params}
    stored = {}  # variants differing only in backend share one quantized copy
    for v in variants:
      if VARIANTS[v] is not None:
        qcfg = VARIANTS[v]
        key = dataclasses.replace(qcfg, backend='jnp')
        if key not in stored:
          stored[key] = jax.jit(quant.quantize_params, static_argnums=1)(params, key)
        vparams[v] = quant.with_backend(stored[key], qcfg.backend)
        wbytes[v] = quant.param_bytes(vparams[v])
    print(
      f'{name}: {model_lib.count_params(params) / 1e6:.0f}M params, {wbytes["plain"] / 1e9:.2f} GB'
    )
    for b in batches:
      plain_ms = None
      for v in variants:
        if over():
          summary['skipped'].append(f'{name}/B{b}/{v}')
          continue
        try:
          ms = time_decode(vparams[v], cfg, b, args)
        except Exception as e:  # pylint: disable=broad-except  # one shot on a device: go on
          print(f'{name}/B{b}/{v} failed: {type(e).__name__}: {str(e)[:2000]}', flush=True)
          summary['skipped'].append(f'{name}/B{b}/{v} (error)')
          continue
        nbytes = wbytes[v] + kv_bytes(cfg, b, live)
        floor_ms = 1e3 * nbytes / bw
        plain_ms = ms if v == 'plain' else plain_ms
        row = dict(model=name, B=b, variant=v, ms=ms, floor_ms=floor_ms, x_floor=ms / floor_ms)
        row['GBps'] = nbytes / (ms * 1e-3) / 1e9
        row['weight_GB'] = wbytes[v] / 1e9
        row['c'] = ms / plain_ms if plain_ms and v != 'plain' else None
        rows.append(row)
        print(
          f'  B={b:4d} {v:12s} {ms:8.3f} ms/step  floor {floor_ms:7.3f}  c {row["c"]}', flush=True
        )
    del params, vparams, stored

  print()
  common.print_table(
    [('model', ''), ('B', 'd'), ('variant', ''), ('ms', '.3f'), ('floor_ms', '.3f')]
    + [('x_floor', '.2f'), ('GBps', '.0f'), ('weight_GB', '.2f'), ('c', '.3f')],
    rows,
  )
  summary['x_floor'] = {f'{r["model"]}/B{r["B"]}/{r["variant"]}': r['x_floor'] for r in rows}
  summary['ms'] = {f'{r["model"]}/B{r["B"]}/{r["variant"]}': r['ms'] for r in rows}
  summary['c'] = {f'{r["model"]}/B{r["B"]}/{r["variant"]}': r['c'] for r in rows if r['c']}
  if mm:
    summary['matmul_us'] = {
      f'{r["model"]}/{r["matmul"]}/M{r["m"]}': [
        r.get(f'{v}_us') for v in ('bf16', 'int8', 'int8-pallas')
      ]
      for r in mm
    }
  summary['seconds'] = time.perf_counter() - t_start
  common.emit_json(summary)


if __name__ == '__main__':
  main()
