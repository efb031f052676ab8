"""A drafter's own KV cache holds every committed token whenever it drafts (issue 24a).

Fixed schedules, no timing and no policy: speculate -> plain -> speculate ... for the model
drafters (``small_model`` in the adaptive engine, with a scripted ``_decide``, lazy drafter
prefill and compaction; ``quantized`` without ``share_kv`` on the decoding core's chunks, as
the engine runs them), k = 4 -> k = 2 -> ... for the hybrid suffix drafter's fallback. Every
proposal records the drafter cache it leaves behind; at every committed slot (``<= pos``) it
must equal a drafter prefill over the same tokens. Before the catch-up, plain chunks (and a
hybrid window shrinking with k) left holes there: acceptance dropped silently, never the
outputs (greedy parity with plain decoding through these paths: ``test_adaptive.py``,
``test_hybrid_drafter.py``). Kept small: every function compiled costs seconds on a CPU.
"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from configs import default
from specrl import adaptive, drafters
from specrl import model as model_lib
from specrl import rollout as rollout_lib
from specrl.decoding import steps as steps_lib
from specrl.drafters import ModelDrafter
from specrl.drafters.hybrid import HybridSuffixDrafter
from specrl.drafters.suffix import SuffixDrafter
from specrl.sampling import SamplingParams
from tests.test_adaptive import init_params

GREEDY = SamplingParams(temperature=0.0)
CFG = model_lib.ModelConfig(
  vocab_size=16, d_model=32, n_layers=1, n_heads=4, n_kv_heads=2, head_dim=8, d_ff=64
)
DCFG = dataclasses.replace(CFG, d_model=16, n_heads=2, n_kv_heads=1, d_ff=32)
PARAMS = init_params(CFG, 3)
CACHE = 20
LENGTHS = np.array([8, 3, 18, 5, 9, 4, 7, 6])  # generated tokens per row: ragged
RCFG = rollout_lib.RolloutConfig(
  max_new_tokens=18, max_prompt_len=17, cache_len=CACHE, eos_id=-1, sampling=GREEDY
)


class Scripted(adaptive.AdaptiveRolloutEngine):
  """Chunks of ``(strategy, max_steps)`` from ``script``, cycled (chunks also end at bucket
  boundaries, where the batch compacts): a fixed schedule instead of the policy."""

  script: tuple = ()

  def generate(self, *args, **kw):
    self.calls = 0
    return super().generate(*args, **kw)

  def _decide(self, obs, b, n_active, current, params, dparams_fn, report, lengths=None):
    strategy, steps = self.script[self.calls % len(self.script)]
    self.calls += 1
    return strategy, steps, {}


def recording(drafter):
  """``drafter`` whose ``propose`` also records (cache k, cache v, tokens, pos) of every
  round: the drafter's cache as the proposal leaves it (the fallback's for the hybrid)."""
  records = []
  propose = drafter.propose

  def record(cache, tokens, pos):
    records.append((np.asarray(cache['k']), np.asarray(cache['v']), tokens, pos))

  def wrapped(*args, **kw):
    out = propose(*args, **kw)
    jax.debug.callback(record, out[2]['cache'], args[2], args[3])
    return out

  drafter.propose = wrapped
  return drafter, records


def check_records(records, prefill, seq_len):
  """Every record's cache at every committed slot equals ``prefill`` over its tokens."""
  assert records
  fns = {}
  for ck, cv, tokens, pos in records:
    f = fns.setdefault(tokens.shape, jax.jit(prefill, static_argnums=2))
    want = f(jnp.asarray(tokens[:, :seq_len]), jnp.asarray(pos + 1), tokens.shape[1])
    for name, got in (('k', ck), ('v', cv)):
      ref = np.asarray(want[name])
      for b in range(len(pos)):
        np.testing.assert_allclose(
          got[:, b, :, : pos[b] + 1],
          ref[:, b, :, : pos[b] + 1],
          atol=1e-5,
          err_msg=f'{name} row {b}',
        )


def prompts():
  plen = (CACHE - LENGTHS).astype(np.int32)
  rng = np.random.default_rng(0)
  toks = rng.integers(3, CFG.vocab_size, size=(len(plen), RCFG.max_prompt_len)).astype(np.int32)
  toks[np.arange(RCFG.max_prompt_len)[None, :] >= plen[:, None]] = 0
  return toks, plen


def run_schedule(drafter, dp, params, cfg, toks, plen, schedule, groups=None):
  """The decoding core on a fixed schedule of chunks ``(k, steps)`` (cycled; k = 0: plain),
  as the adaptive engine runs them, without its compaction and compiles: the drafter's
  state built at the prefill, then :func:`specrl.decoding.steps.decode` per chunk. Returns
  the strategies of the chunks run."""
  rcfg = dataclasses.replace(RCFG, max_draft=max(k for k, _ in schedule))
  kw = dict(cfg=cfg, rcfg=rcfg, drafter=drafter)
  st = jax.jit(
    lambda p, dp, t, n, g: steps_lib.prefill(
      p, t, n, jax.random.key(0), draft_params=dp, group_ids=g, **kw
    )
  )(params, dp, toks, plen, groups)
  dec = jax.jit(
    lambda p, dp, s, k, n: steps_lib.decode(p, s, k, draft_params=dp, max_steps=n, **kw)[0],
    static_argnums=(3, 4),
  )
  ran = []
  while not np.asarray(st.done).all():
    k, n = schedule[len(ran) % len(schedule)]
    st = dec(params, dp, st, k, n)
    ran.append(k)
  np.testing.assert_array_equal(np.asarray(st.num_generated), LENGTHS)
  return ran


def test_small_model_cache_is_complete_after_plain_chunks_in_the_adaptive_engine():
  """k=2 -> plain -> k=2 -> plain ... in the adaptive engine (the drafter's state built
  lazily at the first speculative chunk, the batch compacting 8 -> 2 on the way)."""
  # catch-up passes of 2 positions: a plain chunk's tokens take several
  d = ModelDrafter('small_model', DCFG, own_params=init_params(DCFG, 9), catchup_chunk=2)
  d, records = recording(d)
  acfg = adaptive.AdaptiveConfig(policy='cost_model', buckets=(8, 2), arms=(2,))
  eng = Scripted(CFG, RCFG, acfg, drafter=d)
  eng.script = ((2, 2), (0, 3))
  toks, plen = prompts()
  out, m = eng.generate(PARAMS, toks, plen, jax.random.key(0))
  strategies = [s for _, _, _, s in eng.last_report.trace[::2]]
  assert strategies[:3] == [2, 0, 2] and m['adaptive/compactions'] == 1, strategies
  assert m['spec/accepted'] > 0
  np.testing.assert_array_equal(jax.device_get(out.length), LENGTHS)
  dp = d.own_params
  check_records(records, lambda t, n, s: d.prefill(dp, t, n, s)['cache'], RCFG.seq_len)


def test_quantized_cache_is_complete_after_plain_chunks():
  """The quantized self-drafter with its own cache (``share_kv=False``): k=2 -> plain -> ..."""
  c = default.get_config('smoke')
  c.rollout.drafter = 'quantized'
  c.drafter.quantized.update(share_kv=False)
  d, records = recording(drafters.make_drafter(c, CFG))
  dp = jax.jit(d.params_from_policy)(PARAMS)
  toks, plen = prompts()
  ran = run_schedule(d, dp, PARAMS, CFG, toks, plen, ((2, 2), (0, 3)))
  assert ran[:3] == [2, 0, 2]
  check_records(records, lambda t, n, s: d.prefill(dp, t, n, s)['cache'], RCFG.seq_len)


def test_hybrid_fallback_cache_is_complete_when_k_shrinks():
  """k = 4 -> k = 2 -> k = 4 ... chunks of the hybrid suffix drafter (a fallback with its own
  cache that often disagrees with the policy): a k = 4 round on a suffix-matched row commits
  up to 5 tokens the fallback did not draft, more than the k = 2 round's 3-token window
  re-feeds."""
  hcfg = dataclasses.replace(DCFG, vocab_size=4)  # a tiny vocabulary: long suffix matches
  policy, other = init_params(hcfg, 0), init_params(hcfg, 7)
  fallback = ModelDrafter('other', hcfg, own_params=other)
  d, records = recording(HybridSuffixDrafter(SuffixDrafter(4, n_min=2, n_max=4), fallback))
  toks, plen = prompts()
  toks = np.where(toks > 0, toks % 3 + 1, 0).astype(np.int32)  # in the vocabulary
  groups = np.arange(8, dtype=np.int32) // 4
  dp = d.params_from_policy(policy)
  ran = run_schedule(d, dp, policy, hcfg, toks, plen, ((4, 1), (2, 1)), groups)
  assert ran[:3] == [4, 2, 4]
  check_records(records, lambda t, n, s: fallback.prefill(other, t, n, s)['cache'], RCFG.seq_len)
