"""The device suite (issue 32): every GPU measurement the project needs, in one lease.

Sections run in priority order; each has its own time budget (seconds), and the whole run
a global one. The budgets are checked before every *cell* (one measurement): a cell is
not started, but recorded as ``{"skipped": "budget"}``, once a cell as long as its
section's previous one would end past its section's or the global budget; the suite goes on
to the next section (which then skips too if the global budget is gone). A cell that
raises is recorded as ``{"error": "<one line>"}`` and the suite goes on. Results are
written after every cell, so a run killed at its time limit keeps what it measured.

Sections (device grid; ``--cpu_smoke`` swaps in tiny shapes):

a. ``decode``: the engine's plain decode step -- :func:`specrl.decoding.steps.decode` with
   ``k = 0``, i.e. the rollout engines' own ``while_loop`` of plain steps (prefill, sample,
   commit; greedy), run in chunks of ``steps`` steps as the adaptive engine runs it, the
   state donated, timed around the middle of the rollout (:func:`skip_ahead`), each cell
   with the per-layer matmuls separate (``ms``, comparable with earlier runs) and fused
   (``ms_fused``, ``fused_speedup``: ``rollout.fuse_matmuls``), chunks interleaved -- vs the
   bandwidth floor ``(weight bytes + live KV bytes) / copy bandwidth`` (live KV: the
   prompt plus half the budget, the average step of a rollout).
   ``floor_buffer_ms`` counts the whole KV buffer instead (what attention over every slot
   reads today). Qwen2.5-1.5B / 0.5B shapes (random bf16 weights), B = 1, 64, 256, 16, a
   short (256) and an 8k budget. The first cell of each model also runs
   :class:`specrl.rollout.RolloutEngine` greedily and checks the timed path commits the
   same tokens (``greedy_match``).
b. ``drafter_cost``: the drafter cost ``c = propose(k) / (k * plain step)`` from the engine's
   step-cost profiler (:func:`specrl.decoding.profile.measure_profile`, both measured in
   the same call, so against the same build's plain step) for ``eagle`` (reduced vocabulary
   of 4096 ids, a fresh one-layer head), ``suffix`` (siblings only) and the int8 quantized
   self-drafter ('jnp' and 'pallas' backends), k = 4.
c. ``verify_cost``: ``v(k) = forward(T = k + 1) / forward(T = 1)`` for chains k = 2, 4, 8
   (the profiler's own cache-extending loop, over a random-valued KV cache); tree cells
   (first model, first two batches, N = 8, 16, 32, 64 nodes, a breadth-first top-4 tree):
   ``v_tree(N)`` of the tree verify pass beside ``v_chain`` of a chain pass of N tokens.
d. ``long_tail``: :mod:`bench.long_tail` on the 215M ``gpu`` preset: static, compaction,
   and the adaptive engine with each cheap drafter (int8, suffix, hybrid), B = 64, 256.
e. ``verify_kernel``: the verify kernels' bandwidth (the general one,
   :mod:`specrl.kernels.verify`, and the token-only one, :mod:`specrl.kernels.verify_tokens`)
   vs their jnp references, as logit bytes / time and as a fraction of copy bandwidth.
f. ``train_attention``: the GRPO loss forward's attention (``rl.attention_impl`` full,
   blocked, xla = cuDNN, pallas = jax's flash kernels), forward + backward at the SmolLM2
   head shape, 4 rows, S = 2048 and 8192 (:mod:`bench.attention_kernels`).

Output: at most four JSON files under ``--out`` (default ``$OUT``): ``suite_decode.json``
(a), ``suite_costs.json`` (b, c), ``suite_rollouts.json`` (d), ``suite_kernels.json`` (e, f).
Each holds ``env`` (device, versions, copy bandwidth), ``grid`` and ``sections.<letter>``
with the section's budget, time spent, counts and ``cells`` (cell key -> record). The last
line of stdout is one JSON object with the counts (the benches' convention).

Resume: ``--resume_from PATH`` (a results folder or file; repeatable) reads an earlier
run's files; cells recorded there with a result are copied (marked ``"resumed": true``)
and not run again; skipped or failed cells run. A section not selected by ``--sections``
is copied whole. On the device ``$OUT`` is emptied before each call, so bring the files
back into the repository (an ignored folder, carried):

  python bench/device_suite.py --cpu_smoke --out /tmp/suite   # CPU, tiny shapes, < 1 min
  python bench/device_suite.py --sections a,b --budget_s 300  # the device grid

On a lent GPU (docs/benchmarks.md, "Device suite (issue 32)"). Device calls send the
session's own checkout: run these in it. Once, here: ``python bench/device_pack.py wheels``
(``ml_collections`` and ``gguf``, missing from the device image, into the ignored
``.device/wheels``). Then one call; the wrapper installs the wheels, prints the GPU and runs
this driver with a global budget of 420 s under ``timeout 480`` (8 minutes):

  run(command='bash bench/device_suite.sh', carry=['.device/wheels'], timeout_s=540)

If cells were skipped and device time is left, copy the returned ``suite_*.json`` into
``.device/resume/`` and resume (a call within 30 s finds the machine warm, with the
wrapper's JAX compile cache in the ignored ``.device/jax_cache``):

  run(command='SUITE_BUDGET=150 SUITE_TIMEOUT=200 bash bench/device_suite.sh '
      '--resume_from .device/resume --sections a,b',
      carry=['.device/wheels', '.device/resume'], timeout_s=260)

The SmolLM2 GGUF (98 MB; a call carries 64 MiB) travels in two halves over two consecutive
calls, the second within 30 s of the first (``python bench/device_pack.py pack``; the
first call carries ``.device/gguf1``, e.g. this suite's call, the second ``.device/gguf2``
and joins them: ``python3 bench/device_pack.py join --out /tmp/smollm2.gguf``; see
:mod:`bench.device_pack`).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import functools
import gc
import io
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterator

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from bench import common  # noqa: E402
from specrl import model as model_lib  # noqa: E402
from specrl import quant  # noqa: E402
from specrl.decoding import profile as profile_lib  # noqa: E402
from specrl.decoding import steps as steps_lib  # noqa: E402
from specrl.decoding.state import RolloutConfig  # noqa: E402
from specrl.sampling import SamplingParams  # noqa: E402

clock = time.monotonic  # the budget clock (tests replace it)

SECTIONS = {  # letter -> (name, results file)
  'a': ('decode', 'suite_decode.json'),
  'b': ('drafter_cost', 'suite_costs.json'),
  'c': ('verify_cost', 'suite_costs.json'),
  'd': ('long_tail', 'suite_rollouts.json'),
  'e': ('verify_kernel', 'suite_kernels.json'),
  'f': ('train_attention', 'suite_kernels.json'),
}
RESULT_FILES = tuple(sorted({f for _, f in SECTIONS.values()}))
TINY = dict(vocab_size=512, d_model=64, n_layers=1, n_heads=4, n_kv_heads=2, head_dim=16, d_ff=128)


@dataclasses.dataclass(frozen=True)
class Grid:
  """Every shape and budget of one suite run (:data:`DEVICE` or :data:`SMOKE`)."""

  name: str
  budgets: dict  # section letter -> seconds
  models: tuple[str, ...]  # model presets ('tiny': TINY)
  batches: tuple[int, ...]  # (a), in priority order
  cost_batches: tuple[int, ...]  # (b, c)
  new_tokens: tuple[int, ...]  # rollout budgets: short, long
  prompt: int
  steps: int  # (a) decode steps per timed call
  reps: int  # (a) timed calls per cell (median)
  copy_mib: int
  drafters: tuple[str, ...]  # (b)
  draft_k: int  # (b)
  reduced_vocab: int  # (b) eagle
  prof_reps: int  # (b, c) steps per timed profiler call
  prof_iters: int  # (b, c) timed profiler calls (median)
  verify_ks: tuple[int, ...]  # (c) chains
  tree_nodes: tuple[int, ...]  # (c) trees
  long_tail_model: str  # (d)
  long_tail_batches: tuple[int, ...]
  long_tail_variants: str
  long_tail_args: tuple[str, ...]
  kernel_cells: tuple[tuple[str, int, int, int], ...]  # (e) (kernel, B, k, V)
  kernel_iters: int
  attention_seqs: tuple[int, ...]  # (f) loss-forward attention, fwd + bwd
  attention_rows: int


DEVICE = Grid(
  name='device',
  budgets=dict(a=130, b=85, c=50, d=95, e=35, f=25),
  models=('qwen2.5-1.5b', 'qwen2.5-0.5b'),
  batches=(1, 64, 256, 16),
  cost_batches=(1, 64, 256, 16),
  new_tokens=(256, 8192),
  prompt=64,
  steps=16,
  reps=5,
  copy_mib=2048,
  drafters=('eagle', 'suffix', 'int8', 'int8_pallas'),
  draft_k=4,
  reduced_vocab=4096,
  prof_reps=4,
  prof_iters=3,
  verify_ks=(2, 4, 8),
  tree_nodes=(8, 16, 32, 64),
  long_tail_model='gpu',
  long_tail_batches=(64, 256),
  long_tail_variants='static,compact,adaptive,suffix,hybrid',
  long_tail_args=('--iters', '3', '--buckets', '256,64,16,4,1'),
  kernel_cells=tuple(
    (kern, b, k, 152064) for b in (64, 256) for k in (8, 4) for kern in ('general', 'tokens')
  )
  + (('general', 1, 8, 152064), ('general', 16, 8, 152064)),
  kernel_iters=10,
  attention_seqs=(2048, 8192),
  attention_rows=4,
)
SMOKE = Grid(  # every section's code path on CPU in well under a minute (compiles dominate)
  name='cpu_smoke',
  budgets=dict(a=60, b=60, c=60, d=60, e=60, f=60),
  models=('tiny',),
  batches=(1,),
  cost_batches=(2,),
  new_tokens=(12, 40),
  prompt=4,
  steps=2,
  reps=2,
  copy_mib=8,
  drafters=('eagle', 'suffix', 'int8', 'int8_pallas'),
  draft_k=1,
  reduced_vocab=64,
  prof_reps=1,
  prof_iters=1,
  verify_ks=(2,),
  tree_nodes=(8, 40),  # the bit-set mask (<= 32 nodes) and the gather one
  long_tail_model='tiny',
  long_tail_batches=(4,),
  long_tail_variants='static',
  long_tail_args=('--iters', '1', '--median', '2', '--tail_ratio', '3'),
  kernel_cells=(('general', 1, 2, 256), ('tokens', 2, 2, 256)),
  kernel_iters=1,
  attention_seqs=(64,),
  attention_rows=1,
)


class Skip(Exception):  # noqa: N818  (a cell outcome, not an error)
  """Raised by a cell that is not run, with the reason recorded as ``skipped``."""


@dataclasses.dataclass
class Cell:
  key: str
  fn: Callable[[], dict] | None  # None: never run (``skip`` says why)
  skip: str = ''


def one_line(e: BaseException, limit: int = 300) -> str:
  msg = ' '.join(str(e).split())
  return f'{type(e).__name__}: {msg}'[:limit]


def is_done(rec) -> bool:
  """A cell record with a result (not skipped, not failed)."""
  return isinstance(rec, dict) and 'skipped' not in rec and 'error' not in rec


# ----------------------------------------------------------------------------- context


class Context:
  """What cells share: the grid, model params (built once per model), copy bandwidth."""

  def __init__(self, grid: Grid):
    self.grid = grid
    self._params: dict = {}
    self._copy = None

  def cfg(self, name: str) -> model_lib.ModelConfig:
    if name == 'tiny':
      return model_lib.ModelConfig(**TINY)
    return model_lib.preset_config(name)

  def params(self, name: str):
    if name not in self._params:
      if len(self._params) >= 2:  # keep device memory for the caches
        self._params.pop(next(iter(self._params)))
      self._params[name] = model_lib.init_params(self.cfg(name), jax.random.key(0))
    return self._params[name]

  def copy_bandwidth(self) -> float:
    """Bytes/s of a large ``x + 1`` (read + written), measured once per run."""
    if self._copy is None:
      self._copy = common.copy_bandwidth(self.grid.copy_mib << 20, iters=5)
    return self._copy


def random_cache(cfg, batch: int, length: int, seed: int):
  """A KV cache of random values (never zeros: they can time faster than real data)."""
  from bench import decode as decode_bench

  return decode_bench.random_cache(cfg, batch, length, jax.random.key(seed))


def kv_bytes(cfg, batch: int, slots: float) -> float:
  """Bytes of ``slots`` KV positions (k and v, every layer) of ``batch`` rows."""
  item = jnp.dtype(cfg.cdtype).itemsize
  return 2.0 * cfg.n_layers * batch * slots * cfg.n_kv_heads * cfg.head_dim * item


def prompts(cfg, batch: int, length: int, seed: int):
  rng = np.random.default_rng(seed)
  toks = rng.integers(3, cfg.vocab_size, (batch, length)).astype(np.int32)
  return toks, np.full((batch,), length, np.int32)


# ----------------------------------------------------------------------------- (a) decode


@functools.partial(jax.jit, static_argnums=1, donate_argnums=0)
def skip_ahead(state, n: int):
  """``state`` moved ``n`` positions on without decoding them, its KV cache refilled with
  random values (what a real rollout's slots would hold; never zeros, which can time faster),
  in place (donated): the timed steps then run at the rollout's average position."""
  keys = jax.random.split(jax.random.key(n), len(state.cache))
  cache = {
    name: jax.random.normal(key, c.shape, c.dtype)
    for (name, c), key in zip(sorted(state.cache.items()), keys, strict=True)
  }
  return state.replace(pos=state.pos + n, num_generated=state.num_generated + n, cache=cache)


def decode_cell(ctx: Context, model: str, batch: int, new: int, check: bool) -> dict:
  """ms per plain decode step of the engine's loop (see the module docstring, (a)), with the
  per-layer matmuls separate (``ms``: what earlier runs measured) and fused (``ms_fused``;
  ``rollout.fuse_matmuls``, :func:`specrl.decoding.steps.loop_params`).

  Prefill, one untimed chunk of ``steps`` steps per variant (compiles; their tokens are the
  greedy check's), :func:`skip_ahead` so the timed window is centred on the middle of the
  ``new``-token rollout, then ``reps`` timed chunks per variant, interleaved (unfused,
  fused, unfused, ...) on the one rollout state (medians)."""
  g = ctx.grid
  cfg, params = ctx.cfg(model), ctx.params(model)
  calls = 2 * (g.reps + 1)  # per variant: one compiling chunk and reps timed ones
  steps = min(g.steps, (new - 2) // calls)  # no row may finish while timed
  if steps < 1:
    raise ValueError(f'budget {new} is too short for {calls} calls of >= 1 step')
  ahead = max(new // 2 - 1 - 2 * steps - g.reps * steps, 0)
  greedy = SamplingParams(temperature=0.0)
  rcfg = RolloutConfig(max_new_tokens=new, max_prompt_len=g.prompt, sampling=greedy, eos_id=-1)
  toks, plen = prompts(cfg, batch, g.prompt, seed=batch)
  pre = jax.jit(functools.partial(steps_lib.prefill, cfg=cfg, rcfg=rcfg))
  variants = {'unfused': False, 'fused': True}
  chunks, lps = {}, {}
  for name, fuse in variants.items():
    vr = dataclasses.replace(rcfg, fuse_matmuls='on' if fuse else 'off')

    def chunk_fn(lp, state, vr=vr):
      return steps_lib.decode(lp, state, 0, cfg=cfg, rcfg=vr, max_steps=steps)[0]

    chunks[name] = jax.jit(chunk_fn, donate_argnums=1)
    # the loop's layer layout, sliced (and fused) once
    lps[name] = steps_lib.loop_params_jit(params, None, fuse)
  t0 = clock()
  state = jax.block_until_ready(pre(params, toks, plen, jax.random.key(0)))
  for name in variants:  # compiles
    state = jax.block_until_ready(chunks[name](lps[name], state))
  compile_s = clock() - t0
  first = np.asarray(state.tokens[:, g.prompt : g.prompt + 2 * steps + 1])
  state = skip_ahead(state, ahead)
  start = int(np.asarray(state.pos).max())
  times = {name: [] for name in variants}
  for _ in range(g.reps):
    for name in variants:
      t0 = time.perf_counter()
      state = jax.block_until_ready(chunks[name](lps[name], state))
      times[name].append(time.perf_counter() - t0)
  gen = np.asarray(state.num_generated)
  ms = 1e3 * statistics.median(times['unfused']) / steps
  ms_fused = 1e3 * statistics.median(times['fused']) / steps
  bw = ctx.copy_bandwidth()
  wbytes = quant.param_bytes(params)
  live = g.prompt + new / 2
  floor_ms = 1e3 * (wbytes + kv_bytes(cfg, batch, live)) / bw
  rec = dict(
    model=model,
    B=batch,
    new_tokens=new,
    prompt=g.prompt,
    buffer=rcfg.buffer_len,
    timed_positions=[start, start + 2 * g.reps * steps],
    steps_per_call=steps,
    calls=g.reps,
    ms=ms,
    ms_fused=ms_fused,
    fused_speedup=ms / ms_fused,
    floor_ms=floor_ms,
    x_floor=ms / floor_ms,
    x_floor_fused=ms_fused / floor_ms,
    floor_buffer_ms=1e3 * (wbytes + kv_bytes(cfg, batch, rcfg.buffer_len)) / bw,
    GBps=(wbytes + kv_bytes(cfg, batch, live)) / (ms * 1e-3) / 1e9,
    weight_GB=wbytes / 1e9,
    kv_live_GB=kv_bytes(cfg, batch, live) / 1e9,
    compile_s=compile_s,
    steps_ok=bool((gen == 1 + ahead + steps * calls).all()),
  )
  del state, lps
  if check:  # the timed path (an unfused chunk, then a fused one) commits what the engine does
    from specrl import rollout as rollout_lib

    n = 2 * steps + 1
    ck = dataclasses.replace(rcfg, max_new_tokens=n, cache_len=rcfg.seq_len)
    out, _ = rollout_lib.RolloutEngine(cfg, ck).generate(params, toks, plen, jax.random.key(0))
    rec['greedy_match'] = bool(np.array_equal(np.asarray(out.response)[:, :n], first))
  return rec


def section_a(ctx: Context) -> Iterator[Cell]:
  g = ctx.grid
  checked = set()
  for new in g.new_tokens:
    for model in g.models:
      for b in g.batches:
        check = model not in checked
        checked.add(model)
        yield Cell(
          f'a/{model}/N{new}/B{b}', functools.partial(decode_cell, ctx, model, b, new, check)
        )


# ----------------------------------------------------------------------------- (b) drafter cost


def make_drafter(ctx: Context, name: str, model: str):
  """(drafter, draft params) of the drafter ``name`` for ``model``'s policy."""
  cfg, params = ctx.cfg(model), ctx.params(model)
  if name == 'eagle':
    from specrl.drafters import eagle

    ecfg = eagle.EagleConfig(reduced_vocab=ctx.grid.reduced_vocab)
    d = eagle.EagleDrafter(cfg, ecfg, eagle.init_head(cfg, ecfg.n_layers, jax.random.key(1)))
    return d, d.params_from_policy(params)
  if name == 'suffix':
    from specrl.drafters.suffix import SuffixDrafter

    d = SuffixDrafter(cfg.vocab_size)
    return d, d.params_from_policy(params)
  if name in ('int8', 'int8_pallas'):
    import ml_collections

    from specrl.drafters import quantized

    backend = 'pallas' if name == 'int8_pallas' else 'jnp'
    sec = ml_collections.ConfigDict(dict(bits=8, backend=backend, share_kv=False))
    d = quantized.make_quantized_drafter(sec, cfg)
    return d, jax.jit(d.params_from_policy)(params)
  raise ValueError(f'unknown drafter {name!r}')


def drafter_cell(ctx: Context, model: str, batch: int, name: str) -> dict:
  g = ctx.grid
  cfg, params = ctx.cfg(model), ctx.params(model)
  k = g.draft_k
  drafter, dp = make_drafter(ctx, name, model)
  prof = profile_lib.measure_profile(
    cfg,
    params,
    drafter,
    dp,
    batch=batch,
    buffer_len=g.prompt + g.new_tokens[0] + k + 1,
    k_ref=k,
    k_prop=k,
    sp=SamplingParams(),
    max_prompt_len=g.prompt,
    reps=g.prof_reps,
    iters=g.prof_iters,
  )
  extra = {'reduced_vocab': g.reduced_vocab} if name == 'eagle' else {}
  return dict(
    model=model,
    B=batch,
    drafter=name,
    k=k,
    **extra,
    fwd1_ms=1e3 * prof.fwd1,
    propose1_ms=1e3 * prof.prop1,
    propose_k_ms=1e3 * prof.propose(k),
    verify_k_ms=1e3 * prof.verify(k),
    c=prof.propose(k) / (k * prof.fwd1),
    c1=prof.prop1 / prof.fwd1,
    v=prof.verify(k) / prof.fwd1,
  )


def section_b(ctx: Context) -> Iterator[Cell]:
  g = ctx.grid
  for model in g.models:
    for b in g.cost_batches:
      for name in g.drafters:
        yield Cell(f'b/{model}/B{b}/{name}', functools.partial(drafter_cell, ctx, model, b, name))


# ----------------------------------------------------------------------------- (c) verify cost


def verify_cost_cell(ctx: Context, model: str, batch: int, new: int) -> dict:
  """Forward time at T = 1 and T = k + 1 (chains), the profiler's loop, random KV."""
  g = ctx.grid
  cfg, params = ctx.cfg(model), ctx.params(model)
  buffer = g.prompt + new + max(g.verify_ks) + 1
  pos0 = g.prompt + new // 2
  fwd_params = steps_lib.loop_params_jit(params, None)
  secs = {}
  for t in (1,) + tuple(k + 1 for k in g.verify_ks):
    fn = profile_lib.forward_loop(cfg, batch, t, pos0, g.prof_reps)
    timer = profile_lib.LoopTimer(
      fn, (fwd_params,), (random_cache(cfg, batch, buffer, t),), g.prof_reps
    )
    secs[t] = profile_lib.median_seconds(timer, iters=g.prof_iters) / g.prof_reps
    del timer
  rec = dict(model=model, B=batch, new_tokens=new, buffer=buffer, fwd1_ms=1e3 * secs[1])
  for k in g.verify_ks:
    rec[f'fwd_T{k + 1}_ms'] = 1e3 * secs[k + 1]
    rec[f'v{k}'] = secs[k + 1] / secs[1]
  return rec


def section_c(ctx: Context) -> Iterator[Cell]:
  """Chains at every (budget, model, batch); trees (first model, the first two batches)
  right after the first budget's chains, so a tight budget still records some of each."""
  g = ctx.grid
  for i, new in enumerate(g.new_tokens):
    for model in g.models:
      for b in g.cost_batches:
        yield Cell(
          f'c/{model}/N{new}/B{b}', functools.partial(verify_cost_cell, ctx, model, b, new)
        )
    if i == 0:
      for b in g.cost_batches[:2]:
        for n in g.tree_nodes:
          yield Cell(
            f'c/tree/{g.models[0]}/B{b}/N{n}',
            functools.partial(tree_verify_cell, ctx, g.models[0], b, n),
          )


def tlt_parents(n: int, branch: int = 4) -> np.ndarray:
  """int32 [N]: a breadth-first tree of ``branch`` children per node (node 0 the root) --
  the bushy shape of TLT's top-4 arms; depth ~ log_branch(N)."""
  return np.asarray([-1] + [(u - 1) // branch for u in range(1, n)], np.int32)


def tree_verify_cell(ctx: Context, model: str, batch: int, n: int) -> dict:
  """v(N) of a tree verify pass (tree mask, node positions, scratch K/V) of N nodes beside
  the chain pass of the same N tokens, both over T = 1, in one call (random KV)."""
  g = ctx.grid
  cfg, params = ctx.cfg(model), ctx.params(model)
  new = g.new_tokens[0]
  buffer = g.prompt + new + n + 1
  pos0 = g.prompt + new // 2
  fwd_params = steps_lib.loop_params_jit(params, None)
  parents = np.broadcast_to(tlt_parents(n), (batch, n))
  fns = {
    'fwd1': profile_lib.forward_loop(cfg, batch, 1, pos0, g.prof_reps),
    'chain': profile_lib.forward_loop(cfg, batch, n, pos0, g.prof_reps),
    'tree': profile_lib.tree_forward_loop(cfg, parents, pos0, g.prof_reps),
  }
  secs = {}
  for name, fn in fns.items():
    t = 1 if name == 'fwd1' else n
    timer = profile_lib.LoopTimer(
      fn, (fwd_params,), (random_cache(cfg, batch, buffer, t),), g.prof_reps
    )
    secs[name] = profile_lib.median_seconds(timer, iters=g.prof_iters) / g.prof_reps
    del timer
  return dict(
    model=model, B=batch, nodes=n, new_tokens=new, fwd1_ms=1e3 * secs['fwd1'],
    tree_ms=1e3 * secs['tree'], chain_ms=1e3 * secs['chain'],
    v_tree=secs['tree'] / secs['fwd1'], v_chain=secs['chain'] / secs['fwd1'],
    tree_over_chain=secs['tree'] / secs['chain'],
  )  # fmt: skip


# ----------------------------------------------------------------------------- (d) long tail


class _Tee(io.TextIOBase):
  """Writes to stdout and keeps a copy (a bench's last line is its JSON summary)."""

  def __init__(self, out):
    self.out, self.buf = out, io.StringIO()

  def write(self, s):
    self.out.write(s)
    return self.buf.write(s)

  def flush(self):
    self.out.flush()


def run_bench(main: Callable, argv: list[str]) -> dict:
  """``main(argv)`` of a bench whose stdout ends with one JSON line; that object."""
  tee = _Tee(sys.stdout)
  with contextlib.redirect_stdout(tee):
    main(argv)
  lines = [ln for ln in tee.buf.getvalue().splitlines() if ln.strip()]
  return json.loads(lines[-1])


def long_tail_cell(ctx: Context, batch: int, compile_cache: str) -> dict:
  from bench import long_tail

  g = ctx.grid
  argv = ['--model', g.long_tail_model, '--batch_sizes', str(batch), '--plot', '']
  argv += ['--variants', g.long_tail_variants, '--compile_cache', compile_cache]
  argv += list(g.long_tail_args)
  s = run_bench(long_tail.main, argv)
  return dict(
    model=g.long_tail_model,
    B=batch,
    median=s['median'],
    longest=s['longest'],
    results=s['results'][str(batch)],
  )


def section_d(ctx: Context, compile_cache: str) -> Iterator[Cell]:
  for b in ctx.grid.long_tail_batches:
    yield Cell(
      f'd/{ctx.grid.long_tail_model}/B{b}', functools.partial(long_tail_cell, ctx, b, compile_cache)
    )


# ----------------------------------------------------------------------------- (e) kernels


def kernel_cell(ctx: Context, kernel: str, batch: int, k: int, vocab: int) -> dict:
  """Kernel vs jnp reference: median ms, logical logit bytes / time, agreement."""
  from bench import verify_kernel as vk
  from specrl.kernels import verify as kernel_lib
  from specrl.kernels import verify_reference as ref_lib
  from specrl.kernels import verify_tokens as tokens_lib

  interpret = jax.default_backend() == 'cpu'
  sp = SamplingParams()
  target, draft, tokens, seeds = vk.make_inputs(batch, k, vocab, jnp.float32, jax.random.key(k))
  if kernel == 'general':
    ref = jax.jit(ref_lib.verify_reference, static_argnums=4)
    fns = {
      'ref': lambda: ref(target, draft, tokens, seeds, sp),
      'kernel': lambda: kernel_lib.verify_pallas(
        target, draft, tokens, seeds, sp, interpret=interpret
      ),
    }
    nbytes = (batch * (k + 1) * vocab + batch * k * vocab) * 4
  elif kernel == 'tokens':
    ref = jax.jit(ref_lib.verify_tokens_reference, static_argnums=3)
    fns = {
      'ref': lambda: ref(target, tokens, seeds, sp),
      'kernel': lambda: tokens_lib.verify_tokens_pallas(
        target, tokens, seeds, sp, interpret=interpret
      ),
    }
    nbytes = batch * (k + 1) * vocab * 4
  else:
    raise ValueError(f'unknown kernel {kernel!r}')
  secs = common.interleaved_medians(fns, warmup=1, iters=ctx.grid.kernel_iters)
  want, got = fns['ref'](), fns['kernel']()
  match = bool(
    np.array_equal(np.asarray(want.tokens), np.asarray(got.tokens))
    and np.array_equal(np.asarray(want.num_accepted), np.asarray(got.num_accepted))
  )
  bw = ctx.copy_bandwidth()
  return dict(
    kernel=kernel,
    B=batch,
    k=k,
    V=vocab,
    interpret=interpret,
    MiB=nbytes / 2**20,
    ref_ms=1e3 * secs['ref'],
    kernel_ms=1e3 * secs['kernel'],
    ref_GBps=nbytes / secs['ref'] / 1e9,
    kernel_GBps=nbytes / secs['kernel'] / 1e9,
    kernel_frac_of_copy=nbytes / secs['kernel'] / bw,
    match=match,
  )


def section_e(ctx: Context) -> Iterator[Cell]:
  for kernel, b, k, v in ctx.grid.kernel_cells:
    yield Cell(f'e/{kernel}/B{b}/k{k}/V{v}', functools.partial(kernel_cell, ctx, kernel, b, k, v))


# ----------------------------------------------------------------------------- (f) attention


def attention_cell(ctx: Context, seq: int) -> dict:
  """The GRPO loss forward's attention implementations (full / blocked / xla / pallas),
  forward + backward at the SmolLM2 head shape: ``bench/attention_kernels.py``."""
  from bench import attention_kernels

  g = ctx.grid
  argv = ['--seqs', str(seq), '--rows', str(g.attention_rows), '--full_max', '2048']
  s = run_bench(attention_kernels.main, argv)
  return dict(seq=seq, rows=g.attention_rows, results=s['results'])


def section_f(ctx: Context) -> Iterator[Cell]:
  for seq in ctx.grid.attention_seqs:
    yield Cell(f'f/S{seq}', functools.partial(attention_cell, ctx, seq))


# ----------------------------------------------------------------------------- the runner

SECTION_CELLS = {
  'a': lambda ctx, args: section_a(ctx),
  'b': lambda ctx, args: section_b(ctx),
  'c': lambda ctx, args: section_c(ctx),
  'd': lambda ctx, args: section_d(ctx, args.compile_cache),
  'e': lambda ctx, args: section_e(ctx),
  'f': lambda ctx, args: section_f(ctx),
}
TABLES = {  # letter -> columns of the printed summary (a cell's record keys)
  'a': [('model', ''), ('B', 'd'), ('new_tokens', 'd'), ('ms', '.3f'), ('floor_ms', '.3f')]
  + [('x_floor', '.2f'), ('floor_buffer_ms', '.3f'), ('GBps', '.0f'), ('greedy_match', '')],
  'b': [('model', ''), ('B', 'd'), ('drafter', ''), ('fwd1_ms', '.3f'), ('propose_k_ms', '.3f')]
  + [('c', '.3f'), ('c1', '.3f'), ('v', '.3f')],
  'c': [('model', ''), ('B', 'd'), ('new_tokens', 'd'), ('fwd1_ms', '.3f'), ('v2', '.3f')]
  + [('v4', '.3f'), ('v8', '.3f')],
  'd': [('B', 'd'), ('variant', ''), ('time_s', '.3f'), ('speedup_vs_static', '.2f'), ('k', '')],
  'e': [('kernel', ''), ('B', 'd'), ('k', 'd'), ('V', 'd'), ('ref_ms', '.3f')]
  + [('kernel_ms', '.3f'), ('kernel_GBps', '.0f'), ('kernel_frac_of_copy', '.2f'), ('match', '')],
  'f': [('seq', 'd'), ('impl', ''), ('fwd_bwd_ms', '.2f'), ('x_full', '.2f')]
  + [('x_blocked_all', '.2f')],
}


def load_previous(paths) -> dict:
  """letter -> section dict from earlier results (files, or folders of ``suite_*.json``);
  a later path wins for a cell recorded with a result in both."""
  out: dict = {}
  for path in paths:
    files = (
      [os.path.join(path, f) for f in sorted(os.listdir(path)) if f in RESULT_FILES]
      if os.path.isdir(path)
      else [path]
    )
    if not files:
      raise SystemExit(f'--resume_from {path}: no suite results ({", ".join(RESULT_FILES)}) there')
    for f in files:
      with open(f) as fh:
        data = json.load(fh)
      for letter, sec in data.get('sections', {}).items():
        have = out.setdefault(letter, dict(sec, cells={}))
        for key, rec in sec.get('cells', {}).items():
          if is_done(rec) or key not in have['cells']:
            have['cells'][key] = rec
  return out


def counts(cells: dict) -> dict:
  c = dict(ran=0, resumed=0, skipped=0, error=0)
  for rec in cells.values():
    if 'error' in rec:
      c['error'] += 1
    elif 'skipped' in rec:
      c['skipped'] += 1
    elif rec.get('resumed'):
      c['resumed'] += 1
    else:
      c['ran'] += 1
  return c


def write_json(path: str, data: dict) -> None:
  tmp = path + '.tmp'
  with open(tmp, 'w') as f:
    json.dump(common.rounded(data, 5), f, indent=1, sort_keys=False)
  os.replace(tmp, path)


def environment(grid: Grid) -> dict:
  env = dict(common.device_info(), jax=jax.__version__, python=platform.python_version())
  env['grid'] = grid.name
  env['started_utc'] = time.strftime('%Y-%m-%dT%H:%M:%SZ', time.gmtime())
  try:
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    head = subprocess.run(
      ['git', '-C', root, 'rev-parse', '--short', 'HEAD'], capture_output=True, text=True, timeout=5
    )
    env['commit'] = head.stdout.strip() or None
  except (OSError, subprocess.SubprocessError):
    env['commit'] = None
  return env


def table_rows(letter: str, cells: dict) -> list[dict]:
  rows = []
  for rec in cells.values():
    if not is_done(rec):
      continue
    if letter == 'd':
      for v, r in rec.get('results', {}).items():
        rows.append(dict(B=rec['B'], variant=v, **r))
    elif letter == 'f':
      rows.extend(rec.get('results', []))
    else:
      rows.append(rec)
  return rows


class Suite:
  """Runs the selected sections in order under their budgets; writes the results files."""

  def __init__(self, args, grid: Grid, budgets: dict):
    self.args, self.grid, self.budgets = args, grid, budgets
    self.start = clock()
    self.deadline = self.start + args.budget_s
    self.prev = load_previous(args.resume_from)
    self.ctx = Context(grid)
    self.env = None
    self.files: dict = {}  # file name -> {'sections': {letter: section}}

  def _file(self, letter: str) -> dict:
    name = SECTIONS[letter][1]
    if name not in self.files:
      grid = dataclasses.asdict(self.grid)
      self.files[name] = dict(suite='device_suite', file=name, env=self.env, grid=grid, sections={})
    return self.files[name]

  def _write(self, letter: str) -> None:
    f = self._file(letter)
    f['env']['copy_GBps'] = None if self.ctx._copy is None else self.ctx._copy / 1e9
    write_json(os.path.join(self.args.out, f['file']), f)

  def run(self, letters: list[str]) -> dict:
    self.env = environment(self.grid)
    for letter, sec in self.prev.items():  # sections not run now keep their earlier results
      if letter not in letters and letter in SECTIONS:
        self._file(letter)['sections'][letter] = dict(sec, counts=counts(sec['cells']))
        self._write(letter)
    for letter in SECTIONS:
      if letter in letters:
        self.run_section(letter)
    return {k: counts(v['cells']) for f in self.files.values() for k, v in f['sections'].items()}

  def run_section(self, letter: str) -> None:
    name = SECTIONS[letter][0]
    budget = float(self.budgets[letter])
    t_sec = clock()
    s_deadline = min(t_sec + budget, self.deadline)
    old = self.prev.get(letter, {}).get('cells', {})
    sec = dict(name=name, budget_s=budget, spent_s=0.0, counts={}, cells={})
    self._file(letter)['sections'][letter] = sec
    left = max(self.deadline - t_sec, 0)
    print(f'\n## ({letter}) {name}: budget {budget:.0f} s, {left:.0f} s left overall', flush=True)
    last = 0.0  # seconds of the section's last cell run: the next one's estimate
    try:
      for cell in SECTION_CELLS[letter](self.ctx, self.args):
        sec['cells'][cell.key] = rec = self.run_cell(cell, old.get(cell.key), s_deadline, last)
        if 'seconds' in rec:
          last = rec['seconds']
        sec['spent_s'] = clock() - t_sec
        sec['counts'] = counts(sec['cells'])
        self._write(letter)
        status = (
          rec.get('skipped') or rec.get('error') or ('resumed' if rec.get('resumed') else 'ok')
        )
        if 'budget' != rec.get('skipped'):
          print(f'  {cell.key}: {status} ({rec.get("seconds", 0):.1f} s)', flush=True)
    except Exception as e:  # pylint: disable=broad-except  # listing the cells failed
      sec['error'] = one_line(e)
      print(f'  section {letter} failed: {sec["error"]}', flush=True)
    sec['spent_s'] = clock() - t_sec
    sec['counts'] = counts(sec['cells'])
    self._write(letter)
    rows = table_rows(letter, sec['cells'])
    if rows:
      common.print_table(TABLES[letter], rows)
    print(f'  ({letter}) {sec["counts"]}, {sec["spent_s"]:.1f} s', flush=True)

  def run_cell(self, cell: Cell, old, deadline: float, estimate: float) -> dict:
    """One cell's record: copied from ``old`` if that has a result; skipped when the
    budget is spent or would be by a cell as long as the section's last (``estimate``)."""
    if cell.fn is None:
      return {'skipped': cell.skip}
    if is_done(old):
      return dict(old, resumed=True)
    if clock() + estimate >= deadline:
      return {'skipped': 'budget'}
    t0 = clock()
    try:
      rec = dict(cell.fn())
    except Skip as e:
      rec = {'skipped': str(e)}
    except Exception as e:  # pylint: disable=broad-except  # one shot on a device: go on
      import traceback

      traceback.print_exc(limit=4, file=sys.stdout)
      rec = {'error': one_line(e)}
    rec['seconds'] = clock() - t0
    gc.collect()
    return rec


def parse_budgets(spec: str, grid: Grid) -> dict:
  budgets = dict(grid.budgets)
  for item in filter(None, (s.strip() for s in spec.split(','))):
    letter, _, sec = item.partition('=')
    if letter not in SECTIONS or not sec:
      raise SystemExit(
        f'--section_budgets: {item!r} is not <letter>=<seconds> ({"".join(SECTIONS)})'
      )
    budgets[letter] = float(sec)
  return budgets


def main(argv=None) -> int:
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
  ap.add_argument('--cpu_smoke', action='store_true', help='tiny shapes: the whole suite on CPU')
  ap.add_argument('--sections', default=','.join(SECTIONS), help='comma list of a,b,c,d,e,f')
  ap.add_argument('--budget_s', type=float, default=420.0, help='global budget, seconds')
  ap.add_argument('--section_budgets', default='', help='e.g. a=120,d=60 (defaults: the grid)')
  ap.add_argument('--out', default=os.environ.get('OUT') or 'device_out', help='results folder')
  ap.add_argument(
    '--resume_from', action='append', default=[], help='earlier results (folder or file)'
  )
  common.add_compile_cache_flag(ap)
  args = ap.parse_args(argv)
  letters = [s.strip() for s in args.sections.split(',') if s.strip()]
  bad = [s for s in letters if s not in SECTIONS]
  if bad:
    ap.error(f'--sections: unknown {bad}; known: {",".join(SECTIONS)}')
  grid = SMOKE if args.cpu_smoke else DEVICE
  budgets = parse_budgets(args.section_budgets, grid)
  if not args.cpu_smoke and jax.default_backend() == 'cpu':
    print('warning: the device grid on a CPU backend (use --cpu_smoke for tiny shapes)')
  os.makedirs(args.out, exist_ok=True)
  common.enable_compile_cache(args.compile_cache)
  suite = Suite(args, grid, budgets)
  print(
    f'# device suite ({grid.name}): sections {",".join(letters)}, budget {args.budget_s:.0f} s '
    f'({", ".join(f"{k}={budgets[k]:.0f}" for k in letters)}), out {args.out}',
    flush=True,
  )
  result = suite.run(letters)
  print(f'\n# {json.dumps(suite.env)}')
  common.emit_json(
    dict(
      suite='device_suite',
      grid=grid.name,
      seconds=clock() - suite.start,
      files=sorted(suite.files),
      sections=result,
    )
  )
  return 0


if __name__ == '__main__':
  sys.exit(main())
