"""The eagle head's ``spot`` mode (TLT): the GRPO step only fills a ring buffer with its own
hidden states (policy update bit-identical to the plain step); head updates run in the
adaptive engine's tail (bucket <= spot_bucket, capped) or right after a static rollout,
land in the NEXT rollout's head, lower the head's loss and resume exactly."""

import dataclasses
import functools
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import default
from specrl import rl as rl_lib
from specrl import train
from specrl.adaptive import engine as engine_lib
from specrl.drafters import eagle
from specrl.drafters import eagle_spot as es
from specrl.drafters import eagle_train as et
from tests import test_adaptive as ta
from tests import test_eagle as te
from tests.test_eagle import compile_cache  # noqa: F401 - fixture


def leaves_equal(a, b):
  la, lb = jax.tree.leaves(a), jax.tree.leaves(b)
  return len(la) == len(lb) and all(
    np.array_equal(np.asarray(x), np.asarray(y)) for x, y in zip(la, lb, strict=True)
  )


@pytest.mark.parametrize(
  'bad',
  [
    dict(spot_buffer_steps=0),
    dict(spot_bucket=0),
    dict(spot_budget_s=0.0),
    dict(spot_max_updates=-1),
    dict(spot_minibatch=-2),
    dict(spot_max_len=1),
    dict(spot_max_len=-4),
  ],
)
def test_bad_spot_options_are_refused(bad):
  with pytest.raises(ValueError, match='spot_'):
    eagle.EagleConfig(mode='spot', **bad)


def test_a_long_budget_does_not_grow_the_ring():
  """``spot_max_len`` caps the ring's positions per row whatever the token budget; a batch
  longer than that keeps its first positions, a shorter one is zero-padded (mask 0)."""
  assert es.buffer_len(32_800, 2048) == 2048 and es.buffer_len(300, 2048) == 300
  assert es.buffer_len(32_800, 0) == 32_800
  buf = es.init_buffer(2, 2, 4, 3, jnp.float32)
  long_tok = jnp.arange(2 * 9, dtype=jnp.int32).reshape(2, 9)
  hid = jnp.arange(2 * 8 * 3, dtype=jnp.float32).reshape(2, 8, 3)
  buf = es.push(buf, hid, long_tok, jnp.ones((2, 9)))
  np.testing.assert_array_equal(np.asarray(buf.tokens[0]), np.asarray(long_tok[:, :4]))
  np.testing.assert_array_equal(np.asarray(buf.hidden[0]), np.asarray(hid[:, :3]))
  buf = es.push(buf, hid[:, :1], long_tok[:, :2], jnp.ones((2, 2)))
  np.testing.assert_array_equal(np.asarray(buf.mask[1]), [[1, 1, 0, 0]] * 2)


def test_buffer_is_a_ring_of_the_last_steps_and_samples_one_filled_slot():
  buf = es.init_buffer(3, 4, 6, 2, jnp.float32)
  assert es.buffer_bytes(buf) == 4 * (3 * 4 * 5 * 2 + 2 * 3 * 4 * 6 + 1)
  for i in range(5):  # steps 0..4 -> slots 0 1 2 0 1: slot 0 = step 3, 1 = 4, 2 = 2
    tok = jnp.full((4, 6), i, jnp.int32)
    buf = jax.jit(es.push)(buf, jnp.full((4, 5, 2), i, jnp.float32), tok, tok.astype(float))
  assert int(buf.pushes) == 5
  np.testing.assert_array_equal(np.asarray(buf.tokens)[:, 0, 0], [3, 4, 2])
  one = es.push(es.init_buffer(3, 4, 6, 2, jnp.float32), jnp.ones((4, 5, 2)),
                jnp.arange(24, dtype=jnp.int32).reshape(4, 6), jnp.ones((4, 6)))  # fmt: skip
  for k in range(8):  # one step pushed: every minibatch comes from slot 0, rows distinct
    toks, hid, mask = es.sample(one, jax.random.key(k), 3)
    rows = np.asarray(toks)[:, 0] // 6
    assert len(set(rows.tolist())) == 3 and np.asarray(hid).min() == 1.0
    np.testing.assert_array_equal(np.asarray(toks), np.asarray(one.tokens[0])[rows])


def test_spot_step_leaves_the_policy_update_unchanged_and_fills_the_buffer():
  """The GRPO step of mode spot = the plain (frozen) step for the policy (to float
  rounding: :func:`tests.test_eagle.assert_same_policy_update`); the head is untouched (bit
  for bit) and the loss forward's hidden states land in the buffer."""
  cfg, d = te.GCFG, te.make(te.GCFG)
  opt = rl_lib.make_optimizer(1e-3, 0.0, 1.0)
  batch = te._grpo_batch(cfg)
  b, s = batch['tokens'].shape
  hs = et.init_head_state(d.head_params, et.make_optimizer(d.ecfg))
  hs = hs.replace(buffer=es.init_buffer(2, b, s, cfg.d_model, jnp.float32))
  state = rl_lib.init_train_state(te.GPARAMS, opt, jax.random.key(0), False).replace(drafter=hs)
  step_fn = functools.partial(
    rl_lib.train_step, cfg=cfg, rl=rl_lib.RLConfig(num_generations=2), optimizer=opt
  )
  plain, pm = jax.jit(step_fn)(state, batch)
  spot, sm = jax.jit(functools.partial(es.spot_step, step_fn=step_fn))(state, batch)
  te.assert_same_policy_update(state, plain, spot)
  assert float(sm['loss']) == pytest.approx(float(pm['loss']), rel=1e-6)
  assert leaves_equal(spot.drafter.params, hs.params) and int(spot.drafter.step) == 0
  assert int(spot.drafter.buffer.pushes) == 1
  ref = et.policy_hidden(te.GPARAMS, cfg, batch['tokens'])
  np.testing.assert_allclose(np.asarray(spot.drafter.buffer.hidden[0]), ref, atol=2e-5)
  np.testing.assert_array_equal(spot.drafter.buffer.tokens[0], batch['tokens'])


class _Trainer:  # what SpotScheduler reads of a HeadTrainer
  def __init__(self, drafter, hstate):
    self.drafter, self.hstate = drafter, hstate


def test_tail_hook_updates_only_in_small_buckets_up_to_the_cap_and_not_the_rollouts_head():
  """The adaptive engine calls the hook before every chunk; updates happen only at buckets
  <= spot_bucket, stop at spot_max_updates, never while disarmed (evaluation), and go to
  the pending head: the rollout in flight speculates with the head it started with (same
  acceptance as without the hook)."""
  d = eagle.EagleDrafter(
    ta.CFG,
    eagle.EagleConfig(mode='spot', spot_bucket=4, spot_max_updates=2, spot_budget_s=100.0),
    eagle.init_head(ta.CFG, 1, jax.random.key(1)),
  )
  toks = jnp.asarray(np.random.default_rng(0).integers(0, 16, (4, 12)), jnp.int32)
  buf = es.init_buffer(2, 4, 12, ta.CFG.d_model, jnp.float32)
  buf = es.push(buf, et.policy_hidden(ta.PARAMS, ta.CFG, toks), toks, jnp.ones((4, 12)))
  opt = et.make_optimizer(d.ecfg)
  tr = _Trainer(d, et.init_head_state(d.head_params, opt).replace(buffer=buf))
  upd = functools.partial(et.head_update, cfg=ta.CFG, hcfg=d.hcfg, ecfg=d.ecfg, optimizer=opt)
  sched = es.SpotScheduler(tr, upd, jax.random.key(5), rows=3)
  calls = []

  def hook(params, bucket):
    before = sched.updates
    sched.tail_hook(params, bucket)
    calls.append((bucket, sched.updates - before))

  acfg = dataclasses.replace(ta.BASE, policy='always')
  eng = engine_lib.AdaptiveRolloutEngine(ta.CFG, ta.RCFG, acfg, drafter=d)
  _, ref = ta.generate(eng)  # no hook
  head0 = d.head_params
  eng.tail_hook = hook
  _, m = ta.generate(eng)  # disarmed: an evaluation rollout
  assert calls and sum(n for _, n in calls) == 0 and sched.pending is None
  calls.clear()
  sched.arm()
  _, m = ta.generate(eng)
  assert {b for b, _ in calls} >= {8, 4} and all(n == 0 for b, n in calls if b > 4)
  assert sum(n for _, n in calls) == 2  # the cap
  assert m['adaptive/tail_hook_s'] > 0
  for k in ('spec/alpha', 'spec/verify_passes'):
    assert m[k] == ref[k], k  # the rollout kept its head
  assert d.head_params is head0
  assert not leaves_equal(sched.pending.params, head0) and int(sched.pending.step) == 2
  core, sm = sched.consume()
  assert sm['head/spot_updates'] == 2 and np.isfinite(sm['head/loss'])
  assert sm['head/spot_buffer_bytes'] == es.buffer_bytes(buf)
  assert core is not None and sched.pending is None and not sched.armed


def test_spot_run_trains_the_next_rollouts_head_and_resumes_exactly(tmp_path, compile_cache):  # noqa: F811
  """The loop with mode spot on the adaptive engine (smoke config, 3 GRPO steps, 2 head
  updates per step): rollout r speculates with the head after rollout r-1's tail updates
  (never its own), the head's loss on a buffered batch drops, and a run resumed from the
  checkpoint after step 2 ends with the uninterrupted run's policy, head and buffer."""
  c = default.get_config('smoke')
  c.sft.steps, c.rl.steps, c.checkpoint_every, c.log_every = 0, 3, 2, 100
  c.rollout.drafter = 'eagle'
  c.drafter.eagle.update(mode='spot', spot_max_updates=2, spot_budget_s=1e4, spot_bucket=4)
  c.adaptive.update(enabled=True, policy='always', arms=(2,))
  c.eval.prompts = 0
  seen = []  # per rollout: (head at its start, head at its end, pending head at its end)
  generate = engine_lib.AdaptiveRolloutEngine.generate

  def recording(self, *a, **kw):
    h0 = jax.device_get(self.drafter.head_params)
    out = generate(self, *a, **kw)
    pend = self.drafter._trainer.spot.pending
    seen.append((h0, jax.device_get(self.drafter.head_params), jax.device_get(pend)))
    return out

  with pytest.MonkeyPatch.context() as mp:
    mp.setattr(engine_lib.AdaptiveRolloutEngine, 'generate', recording)
    full, hist = train.train_and_evaluate(c, str(tmp_path / 'a'))
  assert [h['train/head/spot_updates'] for h in hist] == [0, 2, 2]  # empty buffer at r = 0
  assert seen[0][2] is None and seen[1][2] is not None
  for r in range(3):
    assert leaves_equal(seen[r][0], seen[r][1])  # the rollout in flight keeps its head
  for r in (1, 2):
    assert not leaves_equal(seen[r][2].params, seen[r][0])  # its tail trained a new one
  assert leaves_equal(seen[2][0], seen[1][2].params)  # ... which the next rollout uses
  assert leaves_equal(full.drafter.params, seen[2][2].params) and int(full.drafter.step) == 4
  assert int(full.drafter.buffer.pushes) == 3

  buf = full.drafter.buffer
  exp = train.build_experiment(c)  # its drafter holds the initial head (same seed)
  d = exp.drafter
  loss = lambda hp: float(  # noqa: E731
    et.head_loss(hp, full.params, None, buf.tokens[2], buf.hidden[2], buf.mask[2],
                 cfg=d.model_cfg, hcfg=d.hcfg, ecfg=d.ecfg)[0]
  )  # fmt: skip
  assert loss(full.drafter.params) < loss(d.head_params)

  assert sorted(os.listdir(tmp_path / 'a' / 'checkpoints')) == ['2', '3']
  shutil.copytree(tmp_path / 'a' / 'checkpoints', tmp_path / 'b' / 'checkpoints')
  shutil.rmtree(tmp_path / 'b' / 'checkpoints' / '3')
  resumed, hist_b = train.train_and_evaluate(c, str(tmp_path / 'b'))
  assert [m['step'] for m in hist_b] == [2]
  arrays = lambda st: jax.tree.leaves((st.params, st.opt_state, st.drafter))  # noqa: E731
  for a, b in zip(arrays(full), arrays(resumed), strict=True):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  assert hist_b[-1]['train/head/loss'] == hist[-1]['train/head/loss']


def test_spot_with_the_static_engine_updates_right_after_the_rollout(tmp_path):
  """No buckets: the updates run in the GRPO function, before the step (2 per step)."""
  c = default.get_config('smoke')
  c.sft.steps, c.rl.steps, c.log_every = 0, 2, 100
  c.rollout.drafter = 'eagle'
  c.drafter.eagle.update(mode='spot', spot_max_updates=2, spot_budget_s=1e4, spot_minibatch=3)
  c.eval.prompts = 0
  state, hist = train.train_and_evaluate(c, str(tmp_path))
  assert [h['train/head/spot_updates'] for h in hist] == [0, 2]
  assert hist[1]['train/time/head_spot_s'] > 0 and int(state.drafter.step) == 2
  c.rl.async_staleness = 1
  with pytest.raises(ValueError, match='async_staleness'):
    train.train_and_evaluate(c, str(tmp_path / 'async'))
