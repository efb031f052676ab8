"""Memory of the GRPO train step vs sequence length (issue 27), before / after.

For each sequence length S this compiles ``rl.train_step`` for the SmolLM2-135M shape
(float32, random weights: nothing is allocated, the state and batch are abstract) and reads
XLA's compiled memory analysis: ``temp`` (the step's scratch buffers: activations, attention
scores, logits chunks, gradients) and ``args`` (train state + batch, donated). These are
compile-time numbers for the CPU backend, not measured RSS (RSS adds the runtime's own
overhead; a rollout engine is not included). Two settings:

  before  rl defaults: full attention over [B, H, S, S], whole batch per forward, no remat
  after   rl.attention_impl='blocked' (block 512), rl.remat=True, rl.micro_batch=M

plus the fit check's estimate (``train_fit.estimate_train_bytes``) of each, and optionally
(``--time_rows``) the measured step time of both on a few rows at the shortest lengths.

  python bench/train_memory.py --quick    # S = 128, 512, 2048, 8192; minutes on 2 cores
  python bench/train_memory.py            # S = 128, 512, 1024, 2048, 4096, 8192
"""

from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from bench import common  # noqa: E402
from specrl import model as model_lib  # noqa: E402
from specrl import rl as rl_lib  # noqa: E402
from specrl import train_fit  # noqa: E402

SMOLLM2 = dict(
  vocab_size=49152, d_model=576, n_layers=30, n_heads=9, n_kv_heads=3, head_dim=64, d_ff=1536
)
GB = 2**30


def abstract_inputs(cfg, rl, optimizer, rows: int, seq: int):
  """(state, batch) as ShapeDtypeStructs: compiling allocates no weights."""

  def init():
    params = model_lib.init_params(cfg, jax.random.key(0))
    return rl_lib.init_train_state(params, optimizer, jax.random.key(1), rl.kl_coef > 0)

  state = jax.eval_shape(init)
  sds = jax.ShapeDtypeStruct
  batch = {
    'tokens': sds((rows, seq), jnp.int32),
    'response_mask': sds((rows, seq), jnp.float32),
    'old_logprobs': sds((rows, seq), jnp.float32),
    'advantages': sds((rows,), jnp.float32),
  }
  return state, batch


def compiled_step(cfg, rl, optimizer, rows: int, seq: int):
  fn = jax.jit(
    lambda s, b: rl_lib.train_step(s, b, cfg=cfg, rl=rl, optimizer=optimizer),
    donate_argnums=(0,),
  )
  t0 = time.perf_counter()
  compiled = fn.lower(*abstract_inputs(cfg, rl, optimizer, rows, seq)).compile()
  return compiled, time.perf_counter() - t0


def step_time(compiled, cfg, rl, optimizer, rows, seq, iters: int) -> float:
  params = model_lib.init_params(cfg, jax.random.key(0))
  rng = np.random.default_rng(0)
  batch = {
    'tokens': jnp.asarray(rng.integers(0, cfg.vocab_size, (rows, seq)), jnp.int32),
    'response_mask': jnp.ones((rows, seq), jnp.float32).at[:, : seq // 4].set(0.0),
    'old_logprobs': jnp.full((rows, seq), -10.0, jnp.float32),
    'advantages': jnp.asarray(rng.normal(size=rows), jnp.float32),
  }
  times = []
  state = rl_lib.init_train_state(params, optimizer, jax.random.key(1), False)
  for _ in range(iters + 1):
    t0 = time.perf_counter()
    state, m = compiled(state, batch)
    jax.block_until_ready(m)
    times.append(time.perf_counter() - t0)
  return float(np.median(times[1:]))


def main():
  ap = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  ap.add_argument('--quick', action='store_true')
  ap.add_argument('--seqs', type=common.ints, default=None)
  ap.add_argument('--rows', type=int, default=16, help='sequences per GRPO batch')
  ap.add_argument('--micro_batch', type=int, default=2)
  ap.add_argument('--block', type=int, default=512)
  ap.add_argument('--skip_before_above', type=int, default=8192, help='largest S compiled before')
  ap.add_argument('--time_rows', type=int, default=0, help='rows of the timed step; 0 = off')
  ap.add_argument('--time_max_seq', type=int, default=512)
  args = ap.parse_args()
  seqs = args.seqs or ([128, 512, 2048, 8192] if args.quick else [128, 512, 1024, 2048, 4096, 8192])
  cfg = model_lib.ModelConfig(**SMOLLM2)
  n_params = model_lib.count_params(
    jax.eval_shape(lambda: model_lib.init_params(cfg, jax.random.key(0)))
  )
  opt = rl_lib.make_optimizer(1e-6, 0.0, 1.0)
  settings = {
    'before': rl_lib.RLConfig(),
    'after': rl_lib.RLConfig(
      attention_impl='blocked',
      attention_block=args.block,
      remat=True,
      micro_batch=args.micro_batch,
    ),
  }
  print(common.device_info(), f'cpu={os.cpu_count()} cores', f'rows={args.rows}', flush=True)
  rows = []
  for s in seqs:
    for name, rl in settings.items():
      if name == 'before' and s > args.skip_before_above:
        continue
      compiled, ctime = compiled_step(cfg, rl, opt, args.rows, s)
      ma = compiled.memory_analysis()
      est = sum(train_fit.estimate_train_bytes(cfg, rl, args.rows, s, n_params).values())
      row = {
        'seq': s,
        'setting': name,
        'temp_gb': ma.temp_size_in_bytes / GB,
        'args_gb': ma.argument_size_in_bytes / GB,
        'peak_gb': (ma.temp_size_in_bytes + ma.argument_size_in_bytes) / GB,
        'estimate_gb': est / GB,
        'compile_s': ctime,
      }
      if args.time_rows and s <= args.time_max_seq:
        compiled_t, _ = compiled_step(cfg, rl, opt, args.time_rows, s)
        row['step_s'] = step_time(compiled_t, cfg, rl, opt, args.time_rows, s, 2)
      rows.append(row)
      common.print_table(
        [(k, f) for k, f in (('seq', 'd'), ('setting', ''), ('temp_gb', '.2f'),
         ('args_gb', '.2f'), ('peak_gb', '.2f'), ('estimate_gb', '.2f'),
         ('compile_s', '.1f'), ('step_s', '.2f'))],
        rows[-1:],
      )  # fmt: skip
  print()
  common.print_table(
    [('seq', 'd'), ('setting', ''), ('temp_gb', '.2f'), ('args_gb', '.2f'), ('peak_gb', '.2f'),
     ('estimate_gb', '.2f'), ('compile_s', '.1f'), ('step_s', '.2f')],
    rows,
  )  # fmt: skip
  after = [r for r in rows if r['setting'] == 'after']
  growth = None  # MB of temp per 1k tokens between the two longest: linear if ~constant
  if len(after) >= 2:
    a, b = after[-2], after[-1]
    growth = (b['temp_gb'] - a['temp_gb']) * 1024 / (b['seq'] - a['seq']) * 1024
  common.emit_json(
    {
      'bench': 'train_memory',
      'measure': 'xla_compiled_memory_analysis_cpu',
      'rows': args.rows,
      'micro_batch': args.micro_batch,
      **common.device_info(),
      'results': rows,
      'after_temp_mb_per_1k_tokens': growth,
    }
  )


if __name__ == '__main__':
  main()
