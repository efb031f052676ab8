"""Plain rollout: finish rules, sampling filters, logprob agreement with training."""

from types import SimpleNamespace

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from specrl import model as model_lib
from specrl import rl as rl_lib
from specrl import rollout as rollout_lib
from specrl import tasks
from specrl.sampling import SamplingParams

CFG = model_lib.ModelConfig(
  vocab_size=16, d_model=32, n_layers=1, n_heads=4, n_kv_heads=2, head_dim=8, d_ff=64
)
PARAMS = None


def params():
  global PARAMS
  if PARAMS is None:
    PARAMS = model_lib.init_params(CFG, jax.random.key(0))
  return PARAMS


def prompts(b=5, p=6, seed=0):
  rng = np.random.default_rng(seed)
  lens = rng.integers(1, p + 1, size=b).astype(np.int32)
  toks = rng.integers(3, CFG.vocab_size, size=(b, p)).astype(np.int32)
  toks[np.arange(p)[None, :] >= lens[:, None]] = 0
  return toks, lens


_ENGINES = {}


def run(rcfg, toks, lens, seed=0, p=None):
  eng = _ENGINES.setdefault(rcfg, rollout_lib.RolloutEngine(CFG, rcfg))
  out, m = eng.generate(params() if p is None else p, toks, lens, jax.random.key(seed))
  return jax.device_get(out), m


def greedy_reference(toks, lens, n):
  """Token-by-token greedy by re-running the full sequence (no cache)."""
  out = []
  fwd = jax.jit(model_lib.forward, static_argnums=1)
  for b in range(len(lens)):
    seq = list(toks[b, : lens[b]])
    for _ in range(n):
      x = np.asarray(seq, np.int32)[None]
      lg, _ = fwd(params(), CFG, x, np.arange(len(seq))[None])
      seq.append(int(np.argmax(lg[0, -1])))
    out.append(seq[lens[b] :])
  return np.array(out)


def test_greedy_matches_uncached_reference_and_lengths():
  toks, lens = prompts()
  rcfg = rollout_lib.RolloutConfig(
    max_new_tokens=7, max_prompt_len=6, eos_id=-1, sampling=SamplingParams(temperature=0.0)
  )
  out, m = run(rcfg, toks, lens)
  np.testing.assert_array_equal(out.response, greedy_reference(toks, lens, 7))
  assert (out.length == 7).all() and (out.finish == rollout_lib.FINISH_LENGTH).all()
  assert m['rollout/tokens'] == 35


def test_eos_stops_sequence_and_pads():
  toks, lens = prompts()
  ref = greedy_reference(toks, lens, 7)
  eos = int(ref[0, 3])  # a token greedy decoding emits at step 3 of sequence 0
  rcfg = rollout_lib.RolloutConfig(
    max_new_tokens=7, max_prompt_len=6, eos_id=eos, sampling=SamplingParams(temperature=0.0)
  )
  out, _ = run(rcfg, toks, lens)
  for b in range(len(lens)):
    hits = np.nonzero(ref[b] == eos)[0]
    n = hits[0] + 1 if len(hits) else 7
    assert out.length[b] == n
    np.testing.assert_array_equal(out.response[b, :n], ref[b, :n])
    assert (out.response[b, n:] == 0).all()
    assert out.finish[b] == (rollout_lib.FINISH_EOS if len(hits) else rollout_lib.FINISH_LENGTH)
  assert out.finish[0] == rollout_lib.FINISH_EOS and out.length[0] <= 4


def test_top_k_one_equals_greedy():
  toks, lens = prompts()
  g, _ = run(
    rollout_lib.RolloutConfig(
      max_new_tokens=6, max_prompt_len=6, eos_id=-1, sampling=SamplingParams(temperature=0.0)
    ),
    toks,
    lens,
  )
  k1, _ = run(
    rollout_lib.RolloutConfig(
      max_new_tokens=6, max_prompt_len=6, eos_id=-1, sampling=SamplingParams(1.0, top_k=1)
    ),
    toks,
    lens,
    3,
  )
  np.testing.assert_array_equal(g.response, k1.response)


def test_top_k_and_top_p_restrict_support():
  toks, lens = prompts(b=64, seed=1)
  toks[:] = toks[0]
  lens[:] = lens[0]
  sp = SamplingParams(1.0, top_k=3)
  out, _ = run(
    rollout_lib.RolloutConfig(max_new_tokens=1, max_prompt_len=6, eos_id=-1, sampling=sp),
    toks,
    lens,
    5,
  )
  lg, _ = model_lib.forward(params(), CFG, toks[:1, : lens[0]], np.arange(lens[0])[None])
  top3 = set(np.argsort(-np.asarray(lg[0, -1]))[:3].tolist())
  assert set(out.response[:, 0].tolist()) <= top3
  assert len(set(out.response[:, 0].tolist())) > 1  # it does sample
  sp = SamplingParams(1.0, top_p=1e-6)  # nucleus of one token == greedy
  out, _ = run(
    rollout_lib.RolloutConfig(max_new_tokens=1, max_prompt_len=6, eos_id=-1, sampling=sp),
    toks,
    lens,
    6,
  )
  assert set(out.response[:, 0].tolist()) == {int(np.argmax(lg[0, -1]))}


@pytest.mark.parametrize('temperature', [1.0, 0.7])
def test_rollout_logprobs_equal_train_logprobs(temperature):
  toks, lens = prompts(b=6, seed=2)
  rcfg = rollout_lib.RolloutConfig(
    max_new_tokens=6, max_prompt_len=6, eos_id=-1, sampling=SamplingParams(temperature, top_k=8)
  )
  out, _ = run(rcfg, toks, lens, 4)
  lp = rl_lib.sequence_logprobs(params(), CFG, jnp.asarray(out.tokens), temperature)
  for b in range(6):
    sl = slice(lens[b], lens[b] + out.length[b])
    np.testing.assert_allclose(out.logprobs[b, sl], lp[b, sl], atol=1e-5, rtol=1e-5)
    np.testing.assert_allclose(
      out.response_logprobs[b, : out.length[b]], lp[b, sl], atol=1e-5, rtol=1e-5
    )


def test_cache_end_finishes_sequences():
  toks, lens = prompts()
  rcfg = rollout_lib.RolloutConfig(
    max_new_tokens=20,
    max_prompt_len=6,
    cache_len=9,
    eos_id=-1,
    sampling=SamplingParams(temperature=0.0),
  )
  out, _ = run(rcfg, toks, lens)
  np.testing.assert_array_equal(out.length, 9 - lens)  # positions 0..8 hold everything
  assert (out.finish == rollout_lib.FINISH_CACHE).all()


def test_prompt_longer_than_cache_is_refused():
  toks, lens = prompts()
  rcfg = rollout_lib.RolloutConfig(max_new_tokens=4, max_prompt_len=4, eos_id=-1)
  with pytest.raises(ValueError, match='max_prompt_len'):
    run(rcfg, toks, lens)
  with pytest.raises(ValueError, match='cache_len'):
    rollout_lib.RolloutConfig(max_new_tokens=4, max_prompt_len=6, cache_len=6)
  # a length beyond the prompt tokens given would read past them (NaN logprobs): refused
  rcfg = rollout_lib.RolloutConfig(max_new_tokens=4, max_prompt_len=8, eos_id=-1)
  with pytest.raises(ValueError, match='prompt_len'):
    run(rcfg, toks, np.full_like(lens, 7))
  # a token id outside the vocabulary would embed as NaN: refused, naming row and position
  bad = np.array(toks)
  bad[1, 0] = 10_000
  with pytest.raises(ValueError, match=r'prompt row 1 has token id 10000 at position 0'):
    run(rcfg, bad, lens)
  bad[1, 0], bad[1, -1] = toks[1, 0], 10_000  # past the row's length: padding, not read
  if lens[1] < bad.shape[1]:
    run(rcfg, bad, lens)


def test_bad_rollout_config_values():
  with pytest.raises(ValueError, match='max_new_tokens'):
    rollout_lib.RolloutConfig(max_new_tokens=0)
  with pytest.raises(ValueError, match='verify_impl'):
    rollout_lib.RolloutConfig(verify_impl='cuda')
  with pytest.raises(ValueError, match='top_p'):
    SamplingParams(top_p=0.0)


def test_extra_eos_ids_end_a_response():
  """Every id of the tokenizer's EOS set ends a response (Qwen: <|im_end|>, <|endoftext|>),
  not only ``eos_id``: a greedy row stops at the first token that is any of them."""
  toks, lens = prompts()
  base = dict(max_new_tokens=7, max_prompt_len=6, sampling=SamplingParams(temperature=0.0))
  free, _ = run(rollout_lib.RolloutConfig(eos_id=-1, **base), toks, lens)
  stop = int(free.response[0, 2])  # row 0's third greedy token
  out, _ = run(rollout_lib.RolloutConfig(eos_id=-1, extra_eos_ids=(-5, stop), **base), toks, lens)
  for b in range(len(lens)):
    resp = free.response[b].tolist()
    want = resp.index(stop) + 1 if stop in resp else 7
    assert int(out.length[b]) == want, (b, resp, stop)
    assert out.response[b, :want].tolist() == resp[:want]
  assert int(out.length[0]) <= 3


def test_extra_eos_ids_from_tokenizer():
  tok = SimpleNamespace(eos_id=7, eos_ids=(9, 7, 8, None))
  assert tasks.extra_eos_ids(tok) == (8, 9)
  assert tasks.extra_eos_ids(SimpleNamespace(eos_id=7)) == ()
