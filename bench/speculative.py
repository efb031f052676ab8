"""Speculative vs plain rollout throughput, against the Leviathan et al. ideal speedup.

For every batch size B and draft length k this runs :class:`specrl.rollout.RolloutEngine`
plain (``num_draft = 0``) and speculative on the same fixed prompts, with ``eos_id = -1``
so every sequence generates exactly ``max_new_tokens`` (both do the same work), and
reports (one row per drafter, B, k):

- ``plain_tok_s``, ``spec_tok_s``, ``ratio``: tokens/s from the engine's own
  ``rollout/time_s`` (prefill included; median of ``--iters`` ``generate()`` calls after
  compiling ones) and their ratio, the speedup an RL step sees;
- ``alpha``: committed accepted drafts / drafts proposed (``spec/alpha``,
  :mod:`specrl.decoding.spec_math`), ``tau`` the measured tokens per verify pass
  (``spec/tokens_per_pass``; 1 + k alpha when every pass drafts k);
- ``c = t_draft / t_1``: ``t_1`` is one target decode step (a T = 1 cache-extending
  forward + sampling, on the layer layout the decode loop gives the policy:
  :func:`specrl.decoding.steps.loop_params`, unstacked on CPU), ``t_draft`` one drafter
  step (the same on the drafter's model and params as its ``propose`` runs them: stacked
  layers; for the model-free n-gram drafter, its ``propose`` time / k); ``v = t_verify /
  t_1``, the target forward over T = k + 1 tokens (not 1 on a CPU, where extra tokens are
  not free);
- ``ideal = tau / (k c + 1)`` (Leviathan et al. 2023, with the measured tokens per round
  in place of the i.i.d. model's ``(1 - a^(k+1)) / (1 - a)``; :func:`ideal_columns`) and the
  cost-aware ``ca_ideal`` with ``k c + v`` in the denominator; ``eff`` / ``ca_eff`` are
  ``ratio`` over each. (Feeding ``alpha`` into the i.i.d. formula instead, as this bench
  did for a while, understates the ideal: by up to ~35% at k = 4.) ``dec_ratio`` is the
  ratio of decode times alone (time - prefill; a model drafter also prefills its own
  cache) and ``dec_eff = dec_ratio / ca_ideal``: the decode loop's efficiency;
- where a round's time goes: ``round_ms`` is the measured decode time per loop iteration,
  ``prop_ms`` the drafter's whole ``propose`` (k tokens), ``ver_ms`` the verify forward,
  ``ovh_ms = round - prop - ver`` the rest (rejection sampling, commit, loop carry,
  per-call dispatch); ``sync`` = mean rounds per sequence / loop iterations, below 1 at
  B > 1 because the batched loop runs until its slowest sequence is done.

Unit costs (``t_1``, drafter steps, verify forwards, proposals, prefills) are jitted on
their own, each timed call running ``--unit_reps`` steps in a ``fori_loop`` with the cache
donated and carried (no per-call dispatch, as inside the rollout's ``while_loop``). All
rollouts and unit costs of one batch size are timed round-robin, so background load on a
shared machine hits them alike. Compiled executables persist in ``--compile_cache``.

Drafters (``--drafter``, a comma list; each gets its own rows):

- ``noisy_policy``: a copy of the policy with Gaussian noise of ``noise`` x (each weight
  tensor's std) added to every weight (via the tied embedding / LM head, noise on the
  draft logits); ``--noise`` (a comma list) sets alpha. ``c >= 1`` (1 on a device where
  the policy's decode layout is the stacked one), so these rows measure the engine's
  overhead at a known alpha, not a useful speedup;
- ``small_model``: a separate smaller transformer (the preset's drafter, randomly
  initialised: alpha is whatever two random models agree on), ``c < 1``;
- ``early_exit``: the policy's first ``--exit_layers`` layers + its head (self-speculative
  layer skipping), ``c ~= exit_layers / n_layers``;
- ``quantized``: the int8 (per-channel, jnp) copy of the policy, as ``rollout.drafter =
  quantized`` builds it;
- ``ngram``: model-free prompt lookup (``c`` ~ 0; alpha low on random models);
- ``self``: the policy drafting for itself (alpha = 1, tau = k + 1; c = 1 and ideal
  speedup 1.0 exactly where the drafter and the decode loop run the same layout, so
  ``eff`` is the engine's own efficiency).

``--share_kv``: the drafters with the policy's architecture (noisy_policy, self,
quantized) read the policy's KV cache instead of prefilling and keeping their own.

Random-init models have flat next-token distributions; ``--temperature < 1`` sharpens them
(and lowers alpha for a given noise). Timings on a shared CPU are noisy.

  python bench/speculative.py --quick                 # B {1,4} x k {2,4}, 64 tokens, CPU
  python bench/speculative.py                         # B {1,4,16,64} x k {2,4,8}
  python bench/speculative.py --model mid --quick     # 21M params: past the CPU's L3
  python bench/speculative.py --model gpu             # ~215M-param bf16 policy (GPU)
  python bench/speculative.py --quick --drafter noisy_policy,self --noise 0.05,0.2,0.5

Prints a plain-decoding table, the speculative table, then, as the last line, one JSON
object with the headline figures.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import os
import statistics
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from bench import common  # noqa: E402
from specrl import model as model_lib  # noqa: E402
from specrl import rollout as rollout_lib  # noqa: E402
from specrl import sampling  # noqa: E402
from specrl.decoding import profile as profile_lib  # noqa: E402
from specrl.decoding import spec_math, steps  # noqa: E402
from specrl.drafters import ModelDrafter, NgramDrafter  # noqa: E402

DRAFTERS = ('noisy_policy', 'small_model', 'early_exit', 'quantized', 'ngram', 'self')

# name -> (policy dims, small_model drafter dims (vocab shared), dtype, prompt_len, new tokens)
PRESETS = {
  'tiny': (  # ~3.3M params (13 MB: fits a CPU's L3, so a CPU step is compute-bound)
    dict(vocab_size=512, d_model=256, n_layers=4, n_heads=4, n_kv_heads=2, head_dim=64, d_ff=768),
    dict(d_model=128, n_layers=1, n_heads=2, n_kv_heads=1, head_dim=64, d_ff=384),
    'float32',
    16,
    64,
  ),
  'mid': (  # ~21M params (84 MB in f32: past a typical CPU L3, so decoding is memory-bound)
    dict(vocab_size=4096, d_model=512, n_layers=6, n_heads=8, n_kv_heads=4, head_dim=64, d_ff=1536),
    dict(d_model=256, n_layers=1, n_heads=4, n_kv_heads=2, head_dim=64, d_ff=768),
    'float32',
    32,
    64,
  ),
  'gpu': (  # ~215M params
    dict(
      vocab_size=32000, d_model=1024, n_layers=12, n_heads=16, n_kv_heads=4, head_dim=64, d_ff=4096
    ),
    dict(d_model=512, n_layers=2, n_heads=8, n_kv_heads=2, head_dim=64, d_ff=1536),
    'bfloat16',
    64,
    128,
  ),
}
FULL = dict(
  batch_sizes='1,4,16,64', ks='2,4,8', drafter='noisy_policy,small_model', iters=5, step_iters=30
)
QUICK = dict(
  batch_sizes='1,4', ks='2,4', drafter='noisy_policy', iters=5, step_iters=20, max_new_tokens=64
)


# ----------------------------------------------------------------------------- drafters


@functools.partial(jax.jit, static_argnums=1)
def noisy_params(params, noise: float, key):
  """``w + noise * std(w) * N(0, 1)`` for every weight tensor (norm scales, with std 0,
  stay as they are): a same-size drafter whose disagreement with the policy grows with
  ``noise``. Through the tied embedding / LM head this is noise on the draft logits."""
  leaves, treedef = jax.tree.flatten(params)
  keys = jax.random.split(key, len(leaves))
  out = [
    (w + noise * jnp.std(w.astype(jnp.float32)) * jax.random.normal(kk, w.shape)).astype(w.dtype)
    for w, kk in zip(leaves, keys, strict=True)
  ]
  return jax.tree.unflatten(treedef, out)


def make_drafters(
  names, noises, cfg, dcfg, params, exit_layers: int, seed: int, share_kv: bool = False
):
  """[(label, drafter)] for the requested drafter names. ``share_kv``: drafters with the
  policy's architecture (noisy_policy, self, quantized) read the policy's KV cache instead
  of prefilling and keeping their own (``ModelDrafter(share_kv=True)``)."""
  out = []
  kv = dict(share_kv=True) if share_kv else {}
  tag = '+kv' if share_kv else ''
  for name in names:
    if name == 'noisy_policy':
      for i, s in enumerate(noises):
        dp = noisy_params(params, s, jax.random.key(seed + 100 + i))
        out.append((f'noisy({s:g}){tag}', ModelDrafter('noisy_policy', cfg, own_params=dp, **kv)))
    elif name == 'self':
      out.append((f'self{tag}', ModelDrafter('self', cfg, derive=lambda p: p, **kv)))
    elif name == 'small_model':
      dparams = model_lib.init_params(dcfg, jax.random.key(seed + 1))
      out.append(('small', ModelDrafter('small_model', dcfg, own_params=dparams)))
    elif name == 'early_exit':
      m = exit_layers
      ecfg = dataclasses.replace(cfg, n_layers=m)
      derive = lambda p, m=m: {**p, 'layers': jax.tree.map(lambda x: x[:m], p['layers'])}
      out.append((f'exit{m}', ModelDrafter('early_exit', ecfg, derive=derive)))
    elif name == 'quantized':
      import ml_collections

      from specrl.drafters import quantized

      dc = ml_collections.ConfigDict(dict(bits=8, backend='jnp', share_kv=share_kv))
      out.append((f'int8{tag}', quantized.make_quantized_drafter(dc, cfg)))
    elif name == 'ngram':
      out.append(('ngram', NgramDrafter(cfg.vocab_size, 2)))
    else:
      raise ValueError(f'--drafter: unknown {name!r} (known: {", ".join(DRAFTERS)})')
  return out


# ----------------------------------------------------------------------------- unit costs
# Timed with specrl.decoding.profile (the profiler the engines use): ``reps`` steps per
# jitted fori_loop call, caches carried and donated.


def cache_step(
  params, cfg, batch: int, t: int, cache_len: int, pos: int, sp=None, reps=8, policy=True
):
  """``reps`` cache-extending forwards over T tokens (with ``sp``: sampling fed back). The
  ``policy``'s run on the layer layout the rollout's decode loop gives it
  (:func:`steps.loop_params`: unstacked on CPU, where stacked layers cost ~1.4-3x more per
  T = 1 step); a drafter's model on its params as they are, as its ``propose`` runs them."""
  if policy:
    params = steps.loop_params_jit(params, None)
  fn = profile_lib.forward_loop(cfg, batch, t, pos, reps, sp=sp)
  return profile_lib.LoopTimer(fn, (params,), (model_lib.init_cache(cfg, batch, cache_len),), reps)


def propose_step(drafter, dparams, state: rollout_lib.RolloutState, k, sp, reps: int = 8):
  """``reps`` whole drafter ``propose`` calls (k tokens each) from a state after prefill."""
  fn = profile_lib.propose_loop(drafter, k, sp, reps)
  return profile_lib.LoopTimer(
    fn, (dparams, state.tokens, state.pos), (state.draft, state.cache), reps
  )


# ----------------------------------------------------------------------------- one batch


def ideal_columns(accepted: int, drafted: int, rounds: int, k: int, c: float, v: float) -> dict:
  """A row's acceptance and ideal speedups from the rollout counters (all timed calls):
  ``alpha`` (committed accepted / drafted), ``tau`` (tokens per verify pass) and the ideals
  ``tau / (k c + 1)`` and ``tau / (k c + v)`` (:func:`spec_math.ideal_speedup`)."""
  alpha, _ = spec_math.acceptance(accepted, drafted)
  tau = spec_math.tokens_per_pass(accepted, rounds)
  return dict(
    alpha=alpha,
    tau=tau,
    ideal=spec_math.ideal_speedup(tau, k, c),
    ca_ideal=spec_math.ideal_speedup(tau, k, c, v),
  )


class GenerateCall:
  """``engine.generate`` on fixed prompts with a fresh rng per call; keeps the outputs'
  statistics (all but the first ``skip`` calls, i.e. the compiling warm-up)."""

  def __init__(self, engine, params, dparams, prompts, lens, seed: int, skip: int):
    self.engine, self.params, self.dparams = engine, params, dparams
    self.prompts, self.lens, self.seed, self.skip = prompts, lens, seed, skip
    self.calls, self.times, self.iterations = 0, [], []
    self.accepted = self.rounds = self.drafted = 0

  def __call__(self):
    out, m = self.engine.generate(
      self.params,
      self.prompts,
      self.lens,
      jax.random.key(self.seed + self.calls),
      draft_params=self.dparams,
    )
    self.calls += 1
    n = self.engine.rcfg.max_new_tokens
    length = np.asarray(out.length)
    if not (length == n).all():
      raise RuntimeError(f'expected {n} tokens per sequence (eos off), got {length.tolist()}')
    if self.calls > self.skip:
      r = np.asarray(out.num_rounds)
      self.times.append(m['rollout/time_s'])
      self.accepted += int(np.asarray(out.num_accepted).sum())
      self.drafted += int(np.asarray(out.num_drafted).sum())
      self.rounds += int(r.sum())
      self.iterations.append(int(r.max()) if self.engine.rcfg.num_draft else n - 1)
    return out.length


def bench_batch(b, cfg, params, drafters, ks, base_rcfg, sp, iters, step_iters, reps, seed, rng):
  """Every engine and unit cost at batch ``b``, all timed round-robin (so background load
  hits them alike). Returns (plain row, speculative rows)."""
  plen, nnew = base_rcfg.max_prompt_len, base_rcfg.max_new_tokens
  prompts = rng.integers(3, cfg.vocab_size, (b, plen)).astype(np.int32)
  lens = np.full((b,), plen, np.int32)
  warmup = 2
  engines = {'plain': (rollout_lib.RolloutEngine(cfg, base_rcfg), None, None)}
  for label, drafter in drafters:
    dparams = drafter.params_from_policy(params)
    for k in ks:
      rcfg = dataclasses.replace(base_rcfg, num_draft=k)
      engines[label, k] = (rollout_lib.RolloutEngine(cfg, rcfg, drafter=drafter), drafter, dparams)

  # Whole rollouts (`iters` timed calls each) and unit costs (`step_iters`): prefill of every
  # engine, the target's T=1 step, drafter T=1 steps, verify forwards (T = k + 1), whole
  # drafter proposals.
  mid = plen + nnew // 2
  key0 = jax.random.key(0)
  units = {
    ('gen', name): GenerateCall(eng, params, dparams, prompts, lens, seed, warmup)
    for name, (eng, _, dparams) in engines.items()
  }
  units['t1'] = cache_step(params, cfg, b, 1, base_rcfg.buffer_len, mid, sp, reps=reps)
  ids = (np.arange(b, dtype=np.int32), np.full((b,), -1, np.int32))  # group / prompt ids
  for name, (eng, drafter, dparams) in engines.items():
    units['gen', name]()  # compiles the engine's prefill / decode / finalize
    prefill_j = eng._compiled(b, params, dparams)[0]
    units['prefill', name] = lambda f=prefill_j, dp=dparams: f(
      params, dp, prompts, lens, key0, *ids
    )
    if drafter is None:
      continue
    label, k = name
    state = prefill_j(params, dparams, prompts, lens, key0, *ids)
    units['prop', label, k] = propose_step(drafter, dparams, state, k, sp, reps)
    if ('ver', k) not in units:
      units['ver', k] = cache_step(params, cfg, b, k + 1, eng.rcfg.buffer_len, mid, reps=reps)
    if isinstance(drafter, ModelDrafter) and ('draft', label) not in units:
      units['draft', label] = cache_step(
        dparams, drafter.cfg, b, 1, base_rcfg.buffer_len, mid, sp, reps, policy=False
      )
  counts = {n: iters if n[0] == 'gen' else step_iters for n in units}
  med = common.interleaved_medians(units, warmup=warmup - 1, iters=counts)
  med = {n: t / getattr(units[n], 'reps', 1) for n, t in med.items()}

  t1 = med['t1']
  gens = {name: units['gen', name] for name in engines}
  plain_t = statistics.median(gens['plain'].times)
  p_step = (plain_t - med['prefill', 'plain']) / (nnew - 1)
  plain_row = dict(
    B=b,
    tok_s=b * nnew / plain_t,
    prefill_ms=1e3 * med['prefill', 'plain'],
    step_ms=1e3 * p_step,
    fwd_ms=1e3 * t1,
    ovh_ms=1e3 * (p_step - t1),
    ovh_pct=100 * (p_step - t1) / p_step,
  )
  rows = []
  for name, (_, drafter, _) in engines.items():
    if drafter is None:
      continue
    label, k = name
    g = gens[name]
    spec_t = statistics.median(g.times)
    t_prop, t_ver = med['prop', label, k], med['ver', k]
    if isinstance(drafter, ModelDrafter):
      t_draft = med['draft', label]
    else:  # model-free: no per-token forward; its per-token share of a proposal
      t_draft = t_prop / k
    c, v = t_draft / t1, t_ver / t1
    acc = ideal_columns(g.accepted, g.drafted, g.rounds, k, c, v)
    ratio = plain_t / spec_t
    ideal, ca_ideal = acc['ideal'], acc['ca_ideal']
    n_iter = statistics.mean(g.iterations)
    round_s = (spec_t - med['prefill', name]) / n_iter
    dec_ratio = (plain_t - med['prefill', 'plain']) / (spec_t - med['prefill', name])
    rows.append(
      dict(
        drafter=label,
        B=b,
        k=k,
        plain_tok_s=b * nnew / plain_t,
        spec_tok_s=b * nnew / spec_t,
        ratio=ratio,
        alpha=acc['alpha'],
        tau=acc['tau'],
        c=c,
        v=v,
        ideal=ideal,
        eff=ratio / ideal,
        ca_ideal=ca_ideal,
        ca_eff=ratio / ca_ideal,
        dec_ratio=dec_ratio,
        dec_eff=dec_ratio / ca_ideal,
        sync=g.rounds / len(g.times) / b / n_iter,
        round_ms=1e3 * round_s,
        prop_ms=1e3 * t_prop,
        ver_ms=1e3 * t_ver,
        ovh_ms=1e3 * (round_s - t_prop - t_ver),
        prefill_ms=1e3 * med['prefill', name],
      )
    )
  return plain_row, rows


# ----------------------------------------------------------------------------- main


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument('--quick', action='store_true', help='B {1,4} x k {2,4}, 64 tokens (CPU)')
  ap.add_argument('--model', default='tiny', choices=sorted(PRESETS), help='size preset')
  ap.add_argument('--batch_sizes', default=None, help='comma list (default 1,4,16,64)')
  ap.add_argument('--ks', default=None, help='comma list of draft lengths (default 2,4,8)')
  ap.add_argument('--max_new_tokens', type=int, default=0, help='0: preset / quick default')
  ap.add_argument('--prompt_len', type=int, default=0, help='0: preset default')
  ap.add_argument(
    '--drafter',
    default=None,
    help=f'comma list of {"|".join(DRAFTERS)} (default noisy_policy,small_model)',
  )
  ap.add_argument(
    '--noise',
    default='0.2',
    help="noisy_policy weight noise in units of each tensor's std (comma list; "
    'tiny, T=1, k=2: 0.2 -> alpha (accepted / drafted) ~0.65)',
  )
  ap.add_argument('--exit_layers', type=int, default=1, help='early_exit drafter depth')
  ap.add_argument(
    '--share_kv',
    action='store_true',
    help='noisy_policy / self / quantized drafters read the policy KV cache',
  )
  ap.add_argument('--temperature', type=float, default=1.0)
  ap.add_argument('--iters', type=int, default=0, help='timed generate() calls (0: auto)')
  ap.add_argument('--step_iters', type=int, default=0, help='timed unit-cost calls (0: auto)')
  ap.add_argument(
    '--unit_reps',
    type=int,
    default=8,
    help='unit-cost steps per timed call (one jitted loop: no dispatch cost)',
  )
  ap.add_argument('--seed', type=int, default=0)
  common.add_compile_cache_flag(ap)
  args = ap.parse_args(argv)

  grid = QUICK if args.quick else FULL
  batches = common.ints(args.batch_sizes or grid['batch_sizes'])
  ks = common.ints(args.ks or grid['ks'])
  names = [s.strip() for s in (args.drafter or grid['drafter']).split(',') if s.strip()]
  if not names or not batches or not ks or min(ks) < 1:
    ap.error('need at least one drafter, batch size and draft length k >= 1')
  noises = common.floats(args.noise)
  iters = args.iters or grid['iters']
  step_iters = args.step_iters or grid['step_iters']
  pdims, ddims, dtype, plen, nnew = PRESETS[args.model]
  plen = args.prompt_len or plen
  nnew = args.max_new_tokens or grid.get('max_new_tokens', nnew)
  if nnew < 2:
    ap.error('--max_new_tokens must be >= 2')
  if not 1 <= args.exit_layers < pdims['n_layers']:
    ap.error(f'--exit_layers must be in [1, {pdims["n_layers"]})')
  common.enable_compile_cache(args.compile_cache)
  sp = sampling.SamplingParams(temperature=args.temperature)

  cfg = model_lib.ModelConfig(**pdims, param_dtype=dtype, compute_dtype=dtype)
  dcfg = dataclasses.replace(cfg, **ddims)
  params = model_lib.init_params(cfg, jax.random.key(args.seed))
  drafters = make_drafters(
    names, noises, cfg, dcfg, params, args.exit_layers, args.seed, args.share_kv
  )
  info = common.device_info()
  dsize = sum(
    int(np.prod(s))
    for s in jax.tree.leaves(model_lib.param_shapes(dcfg), is_leaf=lambda x: isinstance(x, tuple))
  )
  print(
    f'device: {info["device"]} ({info["backend"]}); model {args.model}: '
    f'{model_lib.count_params(params) / 1e6:.2f}M params {dtype} '
    f'(small_model drafter {dsize / 1e6:.2f}M)'
  )
  print(
    f'prompt {plen} + {nnew} new tokens (eos off), temperature {sp.temperature}; '
    f'median of {iters} generate() calls and of {step_iters} unit-cost calls (x '
    f'{args.unit_reps} steps) after warm-up, timed round-robin per batch size',
    flush=True,
  )

  base_rcfg = rollout_lib.RolloutConfig(
    max_new_tokens=nnew, max_prompt_len=plen, sampling=sp, eos_id=-1
  )
  rng = np.random.default_rng(args.seed)
  plain_rows, rows = [], []
  for b in batches:
    plain_row, spec_rows = bench_batch(
      b, cfg, params, drafters, ks, base_rcfg, sp, iters, step_iters, args.unit_reps, args.seed, rng
    )
    plain_rows.append(plain_row)
    rows += spec_rows
    print(
      f'  B={b} done: best ratio {max(r["ratio"] for r in spec_rows):.2f}',
      file=sys.stderr,
      flush=True,
    )

  print('\nplain decoding (step = (time - prefill) / (N - 1); fwd = T=1 forward + sample):')
  common.print_table(
    [
      ('B', 'd'),
      ('tok_s', '.0f'),
      ('prefill_ms', '.2f'),
      ('step_ms', '.3f'),
      ('fwd_ms', '.3f'),
      ('ovh_ms', '.3f'),
      ('ovh_pct', '.0f'),
    ],
    plain_rows,
  )
  print('\nspeculative decoding (per-round times in ms; see the module docstring):')
  common.print_table(
    [
      ('drafter', ''),
      ('B', 'd'),
      ('k', 'd'),
      ('plain_tok_s', '.0f'),
      ('spec_tok_s', '.0f'),
      ('ratio', '.2f'),
      ('alpha', '.2f'),
      ('tau', '.2f'),
      ('c', '.2f'),
      ('v', '.2f'),
      ('ideal', '.2f'),
      ('eff', '.0%'),
      ('ca_ideal', '.2f'),
      ('ca_eff', '.0%'),
      ('dec_ratio', '.2f'),
      ('dec_eff', '.0%'),
      ('sync', '.2f'),
      ('round_ms', '.2f'),
      ('prop_ms', '.2f'),
      ('ver_ms', '.2f'),
      ('ovh_ms', '.2f'),
    ],
    rows,
  )

  small = [r for r in rows if r['B'] <= 4]
  best = max(rows, key=lambda r: r['ratio']) if rows else None
  summary = dict(
    bench='speculative',
    **info,
    model=args.model,
    params=model_lib.count_params(params),
    dtype=dtype,
    temperature=sp.temperature,
    prompt_len=plen,
    max_new_tokens=nnew,
    iters=iters,
    step_iters=step_iters,
    unit_reps=args.unit_reps,
    drafters=[d for d, _ in drafters],
    plain=plain_rows,
    rows=rows,
    best_ratio=best and best['ratio'],
    best=best and dict(drafter=best['drafter'], B=best['B'], k=best['k']),
    mean_efficiency_b1_4=statistics.mean(r['eff'] for r in small) if small else None,
    mean_ca_efficiency_b1_4=statistics.mean(r['ca_eff'] for r in small) if small else None,
    mean_dec_efficiency_b1_4=statistics.mean(r['dec_eff'] for r in small) if small else None,
  )
  common.emit_json(summary)
  return summary


if __name__ == '__main__':
  main()
