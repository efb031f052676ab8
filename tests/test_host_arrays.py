"""Host-state arrays checkpointed as arrays (issue 26, item 3): the ``host_arrays`` orbax
item beside the JSON ``host`` item, old checkpoints with JSON-list arrays, and broken
array items quarantined with a message naming the host object and key."""

import gc
import glob
import json
import logging
import os
import sys

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import orbax.checkpoint as ocp
import pytest

from specrl import checkpointing
from specrl import rl as rl_lib


def _state(seed=0):
  params = {'w': jnp.arange(6, dtype=jnp.float32).reshape(2, 3) + seed}
  opt = rl_lib.make_optimizer(1e-3, 0.0, 1.0)
  return rl_lib.init_train_state(params, opt, jax.random.key(seed), False)


def _arrays():
  rng = np.random.default_rng(0)
  f32 = rng.standard_normal((3, 5)).astype(np.float32)
  f32[0, 0], f32[0, 1] = np.nan, -0.0
  return {
    'tokens': rng.integers(0, 50_000, (4, 33)).astype(np.int32),
    'logprobs': f32,
    'mask': rng.random((4, 33)) < 0.5,
    'big': rng.integers(-(2**62), 2**62, (7,), dtype=np.int64),
    'u8': rng.integers(0, 255, (2, 2, 2), dtype=np.uint8),
    'f64': rng.standard_normal(9),
    'bf16': rng.standard_normal((2, 4)).astype(ml_dtypes.bfloat16),
    'f16': rng.standard_normal(3).astype(np.float16),
    'scalar': np.array(2.5, np.float32),
  }


class _Host:
  """A HostState with arrays of several dtypes, nested in dicts and lists, plus the inline
  cases (empty and string arrays) and plain JSON values."""

  def __init__(self, d=None):
    self.d = d

  def host_state(self):
    return self.d

  def load_host_state(self, d):
    self.d = d


def _host_dict():
  a = _arrays()
  return {
    'queue': {'6': {'version': 5, 'batch': a, 'metrics': {'reward': 0.25}}},
    'list': [a['tokens'][:1], {'x': a['f64'][:2]}],
    'empty': np.zeros((0, 4), np.float32),
    'names': np.array(['ab', 'c']),
    'n': np.int64(3),
  }


def _assert_same(got, want, path=''):
  if isinstance(want, dict):
    assert isinstance(got, dict) and set(got) == set(want), path
    for k in want:
      _assert_same(got[k], want[k], f'{path}/{k}')
  elif isinstance(want, list | tuple):
    assert len(got) == len(want), path
    for i, (g, w) in enumerate(zip(got, want, strict=True)):
      _assert_same(g, w, f'{path}/{i}')
  elif isinstance(want, np.ndarray):
    assert isinstance(got, np.ndarray), path
    assert got.dtype == want.dtype and got.shape == want.shape, (path, got.dtype, want.dtype)
    assert got.tobytes() == want.tobytes(), path  # bit-identical (NaN, -0.0 included)
  else:
    assert got == want, path


def _host_json(workdir, step):
  path = os.path.join(workdir, 'checkpoints', str(step), checkpointing.HOST, 'metadata')
  with open(path) as f:
    return json.load(f)


def _lists_of_numbers(x, path=''):
  """Paths of JSON lists holding more than a handful of numbers (array data as text)."""
  out = []
  if isinstance(x, dict):
    for k, v in x.items():
      out += _lists_of_numbers(v, f'{path}/{k}')
  elif isinstance(x, list):
    if len(x) > 4 and all(isinstance(v, int | float) for v in x):
      out.append(path)
    for i, v in enumerate(x):
      out += _lists_of_numbers(v, f'{path}/{i}')
  return out


def _save(workdir, step, d, state=None):
  ck = checkpointing.Checkpointer(workdir)
  ck.register('engine', _Host(d))
  ck.save(step, state if state is not None else _state())
  ck.close()


def _restore(workdir, step=None):
  ck = checkpointing.Checkpointer(workdir)
  h = _Host()
  ck.register('engine', h)
  try:
    restored = ck.restore(_state(1), step)
  finally:
    ck.close()
  return h.d, restored


def test_host_arrays_round_trip_bit_identical_with_no_array_lists_in_the_json(tmp_path):
  d = _host_dict()
  _save(str(tmp_path), 3, d)
  stored = _host_json(str(tmp_path), 3)
  assert _lists_of_numbers(stored) == []
  ref = stored['engine']['queue']['6']['batch']['tokens']
  assert ref == {'__host_array__': ref['__host_array__'], 'dtype': 'int32', 'shape': [4, 33]}
  assert stored['engine']['empty']['__ndarray__'] == []  # empty arrays stay inline
  assert stored['engine']['names']['__ndarray__'] == ['ab', 'c']  # so do strings
  assert os.path.isdir(os.path.join(tmp_path, 'checkpoints', '3', checkpointing.HOST_ARRAYS))
  got, restored = _restore(str(tmp_path))
  _assert_same(got, {**d, 'n': 3})
  np.testing.assert_array_equal(restored.params['w'], _state().params['w'])


def test_no_host_arrays_item_without_arrays(tmp_path):
  _save(str(tmp_path), 1, {'a': 1, 'b': [np.float32(2.0)]})
  assert not os.path.exists(os.path.join(tmp_path, 'checkpoints', '1', checkpointing.HOST_ARRAYS))
  got, _ = _restore(str(tmp_path))
  assert got == {'a': 1, 'b': [2.0]}


def test_old_checkpoint_with_tagged_json_arrays_restores(tmp_path):
  """A checkpoint as written before the host_arrays item: every array a JSON list."""
  d = _host_dict()
  state = _state()
  mgr = ocp.CheckpointManager(
    str(tmp_path / 'checkpoints'),
    options=ocp.CheckpointManagerOptions(create=True, enable_async_checkpointing=False),
    item_names=('state', 'host'),
  )
  host = {'engine': checkpointing._to_json(d), '_checkpointer': {'kept': [2]}}
  assert _lists_of_numbers(host)  # the old format: array data as JSON lists
  mgr.save(
    2,
    args=ocp.args.Composite(
      state=ocp.args.StandardSave(checkpointing._to_saveable(state)),
      host=ocp.args.JsonSave(host),
    ),
  )
  mgr.wait_until_finished()
  mgr.close()
  got, _ = _restore(str(tmp_path))
  _assert_same(got, {**d, 'n': 3})


def _corrupt(workdir, step, how):
  item = os.path.join(workdir, 'checkpoints', str(step), checkpointing.HOST_ARRAYS)
  if how == 'truncated':
    files = glob.glob(os.path.join(item, '**', 'd', '*'), recursive=True)
    assert files
    for f in files:
      with open(f, 'r+b') as fh:
        fh.truncate(os.path.getsize(f) // 3)
  elif how == 'item_missing':
    import shutil

    shutil.rmtree(item)
  else:  # the JSON records another shape than the stored array
    path = os.path.join(workdir, 'checkpoints', str(step), checkpointing.HOST, 'metadata')
    with open(path) as f:
      host = json.load(f)
    host['engine']['queue']['6']['batch']['tokens']['shape'] = [33, 4]
    with open(path, 'w') as f:
      json.dump(host, f)


@pytest.mark.parametrize('how', ['truncated', 'item_missing', 'shape_differs'])
def test_broken_host_arrays_are_quarantined_naming_object_and_key(tmp_path, how, caplog):
  w = str(tmp_path)
  d5 = _host_dict()
  _save(w, 5, d5)
  d6 = _host_dict()
  d6['queue']['6']['version'] = 6
  _save(w, 6, d6)
  _corrupt(w, 6, how)
  # an explicit step: the error as is, naming the host object (and the key where known);
  # orbax's leftovers of the failed read never reach the hook (no tracebacks printed)
  reported = []
  hook, sys.unraisablehook = sys.unraisablehook, reported.append
  try:
    with pytest.raises(checkpointing.HostArrayError) as e:
      _restore(w, 6)
    gc.collect()
  finally:
    sys.unraisablehook = hook
  assert not [u for u in reported if checkpointing._is_failed_read_leftover(u)], reported
  msg = str(e.value)
  assert f'checkpoint {w}/checkpoints/6' in msg and "host state 'engine'" in msg
  if how != 'truncated':
    assert "key 'queue/6/batch/tokens'" in msg, msg
  assert not isinstance(e.value, checkpointing.CheckpointMismatch)
  # the newest restorable: 6 is quarantined with one warning line, 5 restores
  caplog.set_level(logging.WARNING)
  got, _ = _restore(w)
  _assert_same(got, {**d5, 'n': 3})
  warnings = [r.getMessage() for r in caplog.records if 'cannot be restored' in r.getMessage()]
  assert len(warnings) == 1 and '\n' not in warnings[0] and "'engine'" in warnings[0]
  assert os.path.isdir(os.path.join(w, 'checkpoints', checkpointing.QUARANTINE, '6'))


def test_after_arrays_fault_point_passes_once_every_array_item_is_written(tmp_path, monkeypatch):
  seen = []

  def fault_point(kind, step, phase):
    if phase == 'after_arrays':
      tmp = glob.glob(os.path.join(tmp_path, 'checkpoints', f'{step}.orbax-checkpoint-tmp*'))
      assert len(tmp) == 1
      items = sorted(os.listdir(tmp[0]))
      seen.append((phase, [i for i in items if i.startswith(('state', checkpointing.HOST_ARRAYS))]))
    else:
      seen.append((phase, None))

  monkeypatch.setattr(checkpointing.faults, 'fault_point', fault_point)
  _save(str(tmp_path), 2, _host_dict())
  phases = [p for p, _ in seen]
  assert phases == ['before', 'after_arrays', 'after_commit']
  items = dict(seen)['after_arrays']
  assert any(i.startswith('state') for i in items)
  assert any(i.startswith(checkpointing.HOST_ARRAYS) for i in items)
