"""Draft trees on a (2, 2, 2) mesh of 8 fake CPU devices emit plain decoding's tokens (1
device):

- suffix trees in the adaptive engine (compaction 8 -> 2, below the 4-way batch sharding);
- eagle trees (``EagleDrafter.propose_tree``) in the static engine, from a head trained
  here on the plain run's own tokens (a few seconds on 1 device). Besides the tokens: the
  head's KV cache (its 2 kv heads over ``tensor``) and the hidden history keep their
  layouts, and the head's KV below ``fed`` equals what feeding the committed tokens
  teacher-forced writes (1 device), so no tree scratch is left in a committed slot.

- sampled eagle trees (recursive rejection sampling) in the static engine: the same tokens
  on 8 devices as on 1 (every draw is keyed by sequence and position), not plain's.

Not here (CI time: ~4 s more): eagle trees in the adaptive engine on 8 devices; they run
on 1 device with compaction (tests/test_eagle_tree.py), and the adaptive engine's tree
rounds are the same ``decode_step`` as the static engine's. Prints one JSON line. Executed
in a subprocess by tests/test_tree.py (the device count is fixed when JAX starts)."""

import dataclasses
import json
import os
import sys

os.environ['XLA_FLAGS'] = (
  os.environ.get('XLA_FLAGS', '') + ' --xla_force_host_platform_device_count=8'
)
os.environ['JAX_PLATFORMS'] = 'cpu'
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from specrl import adaptive  # noqa: E402
from specrl import model as model_lib  # noqa: E402
from specrl import rollout as rollout_lib  # noqa: E402
from specrl import sharding as shd  # noqa: E402
from specrl.drafters import eagle  # noqa: E402
from specrl.drafters import eagle_train as et  # noqa: E402
from specrl.drafters.suffix import SuffixDrafter  # noqa: E402
from specrl.sampling import SamplingParams  # noqa: E402


def trained_head(cfg, params, plain, seq_len):
  """An eagle drafter (trees of branch 2) with a head trained on ``plain``'s rows: the
  policy's own generations, which the eagle run then reproduces token for token."""
  ecfg = eagle.EagleConfig(lr=3e-3, target_topk=0, tree_branch=2)
  d = eagle.EagleDrafter(cfg, ecfg, eagle.init_head(cfg, ecfg.n_layers, jax.random.key(1)))
  opt = et.make_optimizer(ecfg)
  toks = jnp.asarray(np.asarray(plain.tokens)[:, :seq_len])
  mask = jnp.asarray(et.response_mask(plain, seq_len))
  hs = et.init_head_state(d.head_params, opt)
  et.warmup(d, hs, params, lambda i: (toks, mask), steps=30, budget_s=60, optimizer=opt)
  return d


def head_kv_diff(cfg, params, d, st):
  """Max |head KV - teacher-forced head KV| over the slots below ``fed`` of every row of
  ``st`` (a rollout state; the reference computed on 1 device) and the largest ``pos -
  fed`` (positions not fed yet: after a tree round at most its accepted drafts + 1)."""
  st = jax.device_get(st)

  @jax.jit
  def teacher_forced(params, dp, toks):
    pos = jnp.broadcast_to(jnp.arange(toks.shape[1]), toks.shape)
    _, _, h = model_lib.forward(params, cfg, toks, pos, return_hidden=True)
    x = eagle.head_input(dp, cfg, h[:, :-1], toks[:, 1:])
    cache = model_lib.init_cache(d.hcfg, toks.shape[0], toks.shape[1])
    return eagle.head_layers(dp['head']['layers'], d.hcfg, x, pos[:, :-1], cache)[1]

  ref = jax.device_get(teacher_forced(params, d.params_from_policy(params), st.tokens))
  fed, diff = np.asarray(st.draft['fed']), 0.0
  for name in ('k', 'v'):
    for r, f in enumerate(fed):
      got = np.asarray(st.draft['cache'][name])[:, r, :, :f]
      diff = max(diff, float(np.abs(got - ref[name][:, r, :, :f]).max()))
  return diff, int((np.asarray(st.pos) - fed).max())


def recording(eng):
  """``eng`` (the static engine) keeping its decoded state, before the finalize drops the
  drafter's state, in ``eng.last_state``."""
  decode = eng._decode

  def run(*args):
    state, visited, usage = decode(*args)
    eng.last_state = state
    return state, visited, usage

  eng._decode = run
  return eng


def main():
  cfg = model_lib.ModelConfig(
    vocab_size=16, d_model=32, n_layers=1, n_heads=4, n_kv_heads=2, head_dim=8, d_ff=64
  )
  params = model_lib.init_params(cfg, jax.random.key(0))
  p, g = 6, 4
  toks = np.asarray(jax.random.randint(jax.random.key(1), (2, p), 1, 16)).repeat(g, 0)
  lens = np.full(2 * g, p, np.int32)
  groups = np.arange(2 * g, dtype=np.int32) // g
  base = rollout_lib.RolloutConfig(
    max_new_tokens=16, max_prompt_len=p, sampling=SamplingParams(0.7, top_k=5), eos_id=3,
    attend_bucket=0,
  )  # fmt: skip
  one = shd.make_mesh((1, 1, 1), jax.devices()[:1])
  eight = shd.make_mesh((2, 2, 2))
  plain, _ = rollout_lib.RolloutEngine(cfg, base, one).generate(
    params, toks, lens, jax.random.key(2), group_ids=groups
  )
  trcfg = dataclasses.replace(base, tree_nodes=6, tree_depth=3)
  acfg = adaptive.AdaptiveConfig(policy='always', buckets=(8, 2), arms=(5,), chunk_steps=4)
  adapt = adaptive.AdaptiveRolloutEngine(cfg, trcfg, acfg, SuffixDrafter(16, 1, 4), eight)
  d = trained_head(cfg, params, plain, base.seq_len)
  eag = recording(rollout_lib.RolloutEngine(cfg, dataclasses.replace(trcfg, num_draft=5), eight, d))
  res = {}
  for name, eng in (('adaptive', adapt), ('eagle', eag)):
    out, m = eng.generate(params, toks, lens, jax.random.key(2), group_ids=groups)
    nodes, non_first, leaf = (int(x) for x in np.asarray(out.tree_stats).sum(0))
    res[name] = dict(
      equal=bool(np.array_equal(np.asarray(out.response), np.asarray(plain.response))),
      lp_diff=float(np.abs(np.asarray(out.response_logprobs) - plain.response_logprobs).max()),
      accepted=int(np.asarray(out.num_accepted).sum()),
      rounds=int(np.asarray(out.num_rounds).sum()),
      nodes=nodes,
      non_first=non_first,
      leaf=leaf,
      compactions=int(m.get('adaptive/compactions', 0)),
    )
  # sampled eagle trees (recursive rejection sampling): not plain's tokens, but every draw
  # is keyed by (seed, sequence, position), so 8 devices give the 1-device run's tokens
  sd = eagle.EagleDrafter(cfg, dataclasses.replace(d.ecfg, tree_children='sampled'), d.head_params)
  srcfg = dataclasses.replace(trcfg, num_draft=5)
  outs = [
    rollout_lib.RolloutEngine(cfg, srcfg, mesh, sd).generate(
      params, toks, lens, jax.random.key(2), group_ids=groups
    )[0]
    for mesh in (eight, one)
  ]
  res['sampled'] = dict(
    equal=bool(np.array_equal(np.asarray(outs[0].response), np.asarray(outs[1].response))),
    differs_from_plain=bool(np.any(np.asarray(outs[0].response) != np.asarray(plain.response))),
    accepted=int(np.asarray(outs[0].num_accepted).sum()),
    non_first=int(np.asarray(outs[0].tree_stats)[:, 1].sum()),
  )
  st = eag.last_state
  res['eagle']['layouts'] = [list(x.sharding.spec) for x in (st.draft['cache']['k'], st.hidden)]
  res['eagle']['head_kv_diff'], res['eagle']['unfed'] = head_kv_diff(cfg, params, d, st)
  print(json.dumps(res))


if __name__ == '__main__':
  main()
