"""Speculative verification: Pallas kernel vs the jnp reference, as achieved bandwidth.

Verification is memory-bound: it must read the target logits ``[B, k+1, V]`` and the
draft logits ``[B, k, V]`` once, and does O(1) arithmetic per element. So each cell
reports the time of both implementations (jit, warm-up, median of N, block_until_ready)
and ``logit bytes / time`` in GB/s, next to the device's copy bandwidth measured with a
large ``x + 1`` (read + write), for the achieved fraction. The kernel's own logit traffic
is a little higher (``(2k+3)/(2k+1)`` of that: its second pass re-reads the two rows at
the rejection point); the GB/s column uses the logical bytes so both implementations are
judged on the same work. Every cell also checks that the two agree (identical tokens).

On CPU the kernel runs in Pallas interpret mode (marked in the table): its times say
nothing about GPU/TPU performance, only that the harness works.

  python bench/verify_kernel.py --quick    # tiny sizes, interpret mode on CPU, < 1 min
  python bench/verify_kernel.py            # B {1,16,64,256} x k {4,8} x V {32000,152064}

Prints a table, then, as its last line, one JSON object with the headline figures.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from bench import common  # noqa: E402
from specrl.kernels import verify as kernel_lib  # noqa: E402
from specrl.kernels import verify_reference as verify_lib  # noqa: E402
from specrl.sampling import SamplingParams  # noqa: E402

FULL = dict(batches='1,16,64,256', ks='4,8', vocabs='32000,152064')
QUICK = dict(batches='1,8', ks='4', vocabs='2048,8192')


@functools.partial(jax.jit, static_argnums=(0, 1, 2, 3))
def make_inputs(batch, k, vocab, dtype, key):
  """Random logits; drafts = draft argmax (near the target's, so some are accepted)."""
  k1, k2, k3 = jax.random.split(key, 3)
  target = 3.0 * jax.random.normal(k1, (batch, k + 1, vocab), jnp.float32)
  draft = target[:, :k] + jax.random.normal(k2, (batch, k, vocab), jnp.float32)
  tokens = jnp.argmax(draft, axis=-1).astype(jnp.int32)
  seeds = jax.random.bits(k3, (batch,), jnp.uint32)
  return target.astype(dtype), draft.astype(dtype), tokens, seeds


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument('--quick', action='store_true', help='tiny sizes (interpret mode on CPU)')
  ap.add_argument('--batches', default=None, help='comma list (default: full or quick grid)')
  ap.add_argument('--ks', default=None, help='comma list of draft lengths k')
  ap.add_argument('--vocabs', default=None, help='comma list of vocabulary sizes V')
  ap.add_argument('--dtype', default='float32', choices=['float32', 'bfloat16'])
  ap.add_argument('--temperature', type=float, default=1.0)
  ap.add_argument('--top_k', type=int, default=0)
  ap.add_argument('--top_p', type=float, default=1.0)
  ap.add_argument('--layout', default=None, choices=['gpu', 'tpu'], help='default: backend')
  ap.add_argument('--iters', type=int, default=0, help='timed calls per cell (0: auto)')
  ap.add_argument('--warmup', type=int, default=2)
  ap.add_argument('--copy_mib', type=int, default=0, help='copy-bandwidth array (0: auto)')
  ap.add_argument(
    '--allow_cpu_full', action='store_true', help='run the full grid on CPU (interpret mode: hours)'
  )
  args = ap.parse_args(argv)

  backend = jax.default_backend()
  interpret = backend == 'cpu'
  if interpret and not args.quick and not args.allow_cpu_full and args.vocabs is None:
    ap.error(
      'CPU backend: the kernel runs in interpret mode; use --quick '
      '(or --allow_cpu_full to insist on the full grid)'
    )
  grid = QUICK if args.quick else FULL
  batches = common.ints(args.batches or grid['batches'])
  ks = common.ints(args.ks or grid['ks'])
  vocabs = common.ints(args.vocabs or grid['vocabs'])
  iters = args.iters or (3 if args.quick else 20)
  dtype = jnp.dtype(args.dtype)
  sp = SamplingParams(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p)
  layout = args.layout or kernel_lib.default_layout()
  device = jax.devices()[0]
  copy_mib = args.copy_mib or (64 if args.quick or interpret else 2048)
  copy_gbps = common.copy_bandwidth(copy_mib << 20, iters, args.warmup) / 1e9

  ref_fn = jax.jit(verify_lib.verify_reference, static_argnums=4)
  ker_fn = functools.partial(kernel_lib.verify_pallas, sp=sp, interpret=interpret, layout=layout)

  mode = 'interpret (CPU: times are not kernel performance)' if interpret else 'compiled'
  print(f'device: {device.device_kind} ({backend}), kernel layout {layout}, {mode}')
  print(f'sampling: {sp}, logits {dtype.name}, median of {iters} after {args.warmup} warm-up')
  print(f'copy bandwidth (x + 1 on {copy_mib} MiB): {copy_gbps:.1f} GB/s')
  hdr = (
    f'{"B":>4} {"k":>2} {"V":>7} {"MiB":>8} {"ref ms":>9} {"kernel ms":>10} '
    f'{"speedup":>7} {"ref GB/s":>9} {"ker GB/s":>9} {"ker/copy":>8} {"mean n":>6} match'
  )
  print(hdr)
  print('-' * len(hdr))
  cells = []
  key = jax.random.key(0)
  for vocab in vocabs:
    for k in ks:
      for batch in batches:
        key, sub = jax.random.split(key)
        inputs = make_inputs(batch, k, vocab, dtype, sub)
        ref_ms = common.median_ms(
          lambda *a: ref_fn(*a, sp), *inputs, warmup=args.warmup, iters=iters
        )
        ker_ms = common.median_ms(lambda *a: ker_fn(*a), *inputs, warmup=args.warmup, iters=iters)
        want, got = ref_fn(*inputs, sp), ker_fn(*inputs)
        match = bool(
          np.array_equal(np.asarray(want.tokens), np.asarray(got.tokens))
          and np.array_equal(np.asarray(want.num_accepted), np.asarray(got.num_accepted))
        )
        nbytes = (batch * (k + 1) * vocab + batch * k * vocab) * dtype.itemsize
        ref_gbps = nbytes / (ref_ms * 1e-3) / 1e9
        ker_gbps = nbytes / (ker_ms * 1e-3) / 1e9
        mean_n = float(np.mean(np.asarray(got.num_accepted)))
        cells.append(
          dict(
            batch=batch,
            k=k,
            vocab=vocab,
            ref_ms=ref_ms,
            kernel_ms=ker_ms,
            ref_gbps=ref_gbps,
            kernel_gbps=ker_gbps,
            match=match,
          )
        )
        print(
          f'{batch:>4} {k:>2} {vocab:>7} {nbytes / 2**20:>8.1f} {ref_ms:>9.3f} '
          f'{ker_ms:>10.3f} {ref_ms / ker_ms:>6.2f}x {ref_gbps:>9.1f} {ker_gbps:>9.1f} '
          f'{ker_gbps / copy_gbps:>7.0%} {mean_n:>6.2f} {"yes" if match else "NO"}'
        )
        del inputs, want, got

  speedups = [c['ref_ms'] / c['kernel_ms'] for c in cells]
  largest = max(cells, key=lambda c: c['batch'] * c['k'] * c['vocab'])
  summary = dict(
    bench='verify_kernel',
    device=device.device_kind,
    backend=backend,
    layout=layout,
    interpret=interpret,
    dtype=dtype.name,
    temperature=sp.temperature,
    top_k=sp.top_k,
    top_p=sp.top_p,
    copy_gbps=round(copy_gbps, 2),
    kernel_gbps_max=round(max(c['kernel_gbps'] for c in cells), 2),
    kernel_frac_of_copy_max=round(max(c['kernel_gbps'] for c in cells) / copy_gbps, 4),
    speedup_geomean=round(float(np.exp(np.mean(np.log(speedups)))), 3),
    largest=dict(
      batch=largest['batch'],
      k=largest['k'],
      vocab=largest['vocab'],
      ref_ms=round(largest['ref_ms'], 4),
      kernel_ms=round(largest['kernel_ms'], 4),
      kernel_gbps=round(largest['kernel_gbps'], 2),
    ),
    all_match=all(c['match'] for c in cells),
    cells=len(cells),
  )
  print(json.dumps(summary))
  return summary


if __name__ == '__main__':
  main()
