"""Several processes, one run: the helpers every host-side path uses under ``jax.distributed``.

JAX's multi-controller runtime runs one process per host (or, for tests, several local CPU
processes, :mod:`specrl.launch`); all of them run the same program on one global mesh.
What that asks of host code, and where it lives:

- **Start-up** (:func:`initialize`): ``jax.distributed.initialize`` from the environment
  (``JAX_COORDINATOR_ADDRESS``, ``JAX_NUM_PROCESSES``, ``JAX_PROCESS_ID``, or
  ``SPECRL_DISTRIBUTED=auto``: JAX detects a TPU slice / SLURM), gloo collectives on CPU,
  and a heartbeat timeout (``SPECRL_HEARTBEAT_S``) after which the survivors of a dead
  process stop; :func:`exit_on_failure` ends a failed process at once.
- **Rows** (:func:`process_rows`, :func:`global_rows`, :func:`local_rows`): a batch's rows
  are split into contiguous blocks, process p owning block p (``rows / process_count``
  rows, a multiple of G so GRPO groups stay on one process). A process builds and scores
  only its block; its numpy rows become a global ``jax.Array`` with
  ``jax.make_array_from_process_local_data`` and it reads back only its own block of a
  batch-sharded output (:func:`local_rows`, the addressable shards). The metrics are over
  every block (per-row numbers all-gathered: :func:`allgather_rows`).
- **Other devices** (:func:`copy_to_devices`): arrays copied between meshes shard by shard
  inside each process (async RL's rollout / train split).
- **Host reads of whole arrays** (:func:`to_host`): ``jax.device_get`` when every shard is
  local (one process, or a replicated array), else ``multihost_utils.process_allgather``;
  every process then holds the same numpy value.
- **Decisions made once** (:func:`broadcast`, :func:`decide`, :func:`check_agree`): a host
  decision taken from measured wall-clock time (the adaptive engine's cost model, the eagle
  head's warm-up and spot budgets) comes from process 0; one computed from replicated data
  (the compaction plan, a fixed adaptive policy's strategy and k) is checked to be equal
  everywhere before it is used, and a disagreement raises :class:`ProcessesDisagree` on
  every process, naming what differed (never a hang: all processes take part in the same
  all-gather; ``SPECRL_TEST_DISAGREE`` injects one for the tests).
- **Writes** (:func:`is_primary`): only process 0 writes TensorBoard, ``metrics.jsonl``,
  the report and the progress line; every process takes part in orbax saves / restores.

With one process every helper is the single-process code path (no collective runs).
"""

from __future__ import annotations

import contextlib
import os
import sys
import traceback
from collections.abc import Sequence

import jax
import numpy as np

COORDINATOR_ENV = 'JAX_COORDINATOR_ADDRESS'  # host:port of process 0's coordinator
NUM_PROCESSES_ENV = 'JAX_NUM_PROCESSES'
PROCESS_ID_ENV = 'JAX_PROCESS_ID'
HEARTBEAT_ENV = 'SPECRL_HEARTBEAT_S'  # jax.distributed heartbeat timeout (seconds)
DEFAULT_HEARTBEAT_S = 100  # jax.distributed's own default
DISAGREE_ENV = 'SPECRL_TEST_DISAGREE'  # test-only: '<process>:<text>' (see check_agree)


class ProcessesDisagree(RuntimeError):
  """Processes of one run computed different values for something that must agree."""


def process_count() -> int:
  return jax.process_count()


def process_index() -> int:
  return jax.process_index()


def is_multiprocess() -> bool:
  return jax.process_count() > 1


def is_primary() -> bool:
  """True on the process that writes the run's files (process 0)."""
  return jax.process_index() == 0


def initialize(env=None) -> bool:
  """``jax.distributed.initialize`` when the environment asks for it; a no-op otherwise.
  Returns True if initialized. Must run before anything touches a device.

  ``JAX_COORDINATOR_ADDRESS`` (host:port of process 0), ``JAX_NUM_PROCESSES`` and
  ``JAX_PROCESS_ID``: set by :mod:`specrl.launch` or by hand; ``SPECRL_DISTRIBUTED=auto``
  instead: JAX detects all three (a TPU slice, SLURM, Open MPI). ``SPECRL_HEARTBEAT_S``:
  seconds without a heartbeat before the coordinator declares a process dead and the
  others stop (JAX's default 100).
  """
  env = os.environ if env is None else env
  auto = env.get('SPECRL_DISTRIBUTED', '') == 'auto'  # TPU slice / SLURM: JAX detects
  if not env.get(COORDINATOR_ENV) and not auto:
    return False
  kw = {}
  if env.get(NUM_PROCESSES_ENV):
    kw['num_processes'] = int(env[NUM_PROCESSES_ENV])
  if env.get(PROCESS_ID_ENV):
    kw['process_id'] = int(env[PROCESS_ID_ENV])
  heartbeat = int(env.get(HEARTBEAT_ENV) or DEFAULT_HEARTBEAT_S)
  if env.get('JAX_PLATFORMS', '').startswith('cpu'):
    # cross-process collectives on CPU (the local launcher's processes); gloo is JAX's
    # default today, set explicitly so a changed default cannot silently break it
    jax.config.update('jax_cpu_collectives_implementation', 'gloo')
  jax.distributed.initialize(
    coordinator_address=env.get(COORDINATOR_ENV) or None,
    heartbeat_timeout_seconds=heartbeat,
    **kw,
  )
  return True


# ----------------------------------------------------------------------------- rows


def process_rows(n_rows: int, group: int = 1) -> slice:
  """The rows of a batch of ``n_rows`` this process owns: block ``process_index`` of
  ``process_count`` equal contiguous blocks; each block a multiple of ``group`` (GRPO's G)
  or a ValueError naming the sizes."""
  p = jax.process_count()
  if n_rows % p or (n_rows // p) % group:
    raise ValueError(
      f'{n_rows} rows cannot be split into {p} processes x a multiple of {group} rows '
      f'(rl.num_prompts must be a multiple of the {p} processes)'
    )
  n = n_rows // p
  i = jax.process_index()
  return slice(i * n, (i + 1) * n)


def rows_are_process_blocks(sharding: jax.sharding.Sharding, n_rows: int) -> bool:
  """True when, under ``sharding``, the devices of each process p hold exactly block p of
  the ``n_rows`` rows (:func:`process_rows`): then a process's rows go in and come out
  without any collective. Computed from the global device map, so every process gets the
  same answer (the fallbacks below are collectives that all of them must join)."""
  p = jax.process_count()
  if n_rows % p:
    return False
  per = n_rows // p
  cover: dict[int, set] = {}
  for dev, idx in sharding.devices_indices_map((n_rows,)).items():
    rows = idx[0]
    start = rows.start or 0
    stop = n_rows if rows.stop is None else rows.stop
    cover.setdefault(dev.process_index, set()).add((start, stop))
  for proc in range(p):
    spans = cover.get(proc)
    if not spans:
      return False
    if min(a for a, _ in spans) != proc * per or max(b for _, b in spans) != (proc + 1) * per:
      return False
  return True


def global_rows(x, sharding: jax.sharding.Sharding):
  """A global ``jax.Array`` whose rows are every process's ``x`` (its own block, in process
  order) laid out by ``sharding`` (rows on dim 0). One process: ``x`` placed as is.

  When each process's devices hold its own block, ``jax.make_array_from_process_local_data``
  (no communication); otherwise (rows replicated across processes, or a mesh on another
  process's devices: async RL's split) the blocks are all-gathered first and each process
  places the shards it holds."""
  x = np.asarray(x)
  if not is_multiprocess():
    return jax.device_put(x, sharding)
  shape = (x.shape[0] * jax.process_count(),) + x.shape[1:]
  if rows_are_process_blocks(sharding, shape[0]):
    return jax.make_array_from_process_local_data(sharding, x, shape)
  full = allgather_rows(x)
  return jax.make_array_from_callback(full.shape, sharding, lambda idx: full[idx])


def local_rows(x) -> np.ndarray:
  """This process's block of rows of a global array (batch on dim 0) as numpy: read from
  its addressable shards when they hold the block, else from the replicated value or an
  all-gather. One process, or a fully addressable array: the whole array."""
  if not isinstance(x, jax.Array) or x.is_fully_addressable:
    return np.asarray(x)
  n = x.shape[0]
  own = process_rows(n)
  if x.is_fully_replicated:
    return np.asarray(x)[own]
  if not rows_are_process_blocks(x.sharding, n):
    return to_host(x)[own]
  out = np.empty((own.stop - own.start,) + x.shape[1:], x.dtype)
  for shard in x.addressable_shards:
    rows = shard.index[0] if shard.index else slice(None)
    start = rows.start or 0
    stop = n if rows.stop is None else rows.stop
    out[(slice(start - own.start, stop - own.start), *shard.index[1:])] = np.asarray(shard.data)
  return out


def to_host(tree):
  """numpy values of a pytree of arrays, identical on every process: ``device_get`` when a
  leaf is all local (or fully replicated), else an all-gather of its shards."""

  def one(x):
    if not isinstance(x, jax.Array) or x.is_fully_addressable or x.is_fully_replicated:
      return np.asarray(jax.device_get(x))
    from jax.experimental import multihost_utils

    return np.asarray(multihost_utils.process_allgather(x, tiled=True))

  return jax.tree.map(one, tree)


def allgather_rows(x) -> np.ndarray:
  """Every process's numpy rows ``x`` concatenated in process order (one process: ``x``)."""
  x = np.asarray(x)
  if not is_multiprocess():
    return x
  from jax.experimental import multihost_utils

  return np.asarray(multihost_utils.process_allgather(x, tiled=True))


def copy_to_devices(tree, shardings):
  """``tree`` (global arrays) copied to ``shardings`` on other devices, each process
  filling its target shards from its own source shards (through host memory: on CPU JAX
  cannot move arrays between processes' devices, ``jax.device_put`` refuses a cross-host
  reshard). Needs every process to hold, on its source devices, every index its target
  devices need (async RL's meshes: :func:`specrl.async_rl.make_meshes` gives each process
  devices in both); a ValueError otherwise."""

  def one(x, sh):
    host = np.zeros(x.shape, x.dtype)
    have = np.zeros(x.shape, bool)
    for shard in x.addressable_shards:
      host[shard.index] = np.asarray(shard.data)
      have[shard.index] = True
    arrays = []
    for dev, idx in sh.addressable_devices_indices_map(x.shape).items():
      if not have[idx].all():
        raise ValueError(
          f'process {jax.process_index()} holds only part of what its devices of the target '
          f'mesh need (array {x.shape}, {sh.spec}): give every process devices in both meshes'
        )
      arrays.append(jax.device_put(host[idx], dev))
    return jax.make_array_from_single_device_arrays(x.shape, sh, arrays)

  return jax.tree.map(one, tree, shardings)


# ----------------------------------------------------------------------------- decisions


def broadcast(tree):
  """Process 0's value of a pytree of numbers / numpy arrays, on every process."""
  if not is_multiprocess():
    return tree
  from jax.experimental import multihost_utils

  return jax.tree.map(np.asarray, multihost_utils.broadcast_one_to_all(tree))


def decide(what: str, flag: bool) -> bool:
  """A yes / no decision taken from this process's wall clock (a time budget): process 0's
  ``flag`` on every process, so all of them take the same branch (one broadcast; ``what``
  names it for readers of a trace). One process: ``flag``."""
  del what
  if not is_multiprocess():
    return bool(flag)
  return bool(broadcast(np.asarray(bool(flag), np.int32)))


def _test_disagreement(what: str, v: np.ndarray) -> np.ndarray:
  """Test-only (``SPECRL_TEST_DISAGREE=<process>:<text>``): on that process, the values of a
  :func:`check_agree` whose ``what`` contains ``text`` are changed (+1), as if it had
  computed something else, so a test can see the disagreement fail cleanly."""
  spec = os.environ.get(DISAGREE_ENV, '')
  proc, _, text = spec.partition(':')
  if spec and text and text in what and int(proc) == jax.process_index():
    return v + 1
  return v


def check_agree(what: str, values: Sequence[int] | np.ndarray) -> None:
  """Raise :class:`ProcessesDisagree` on every process unless ``values`` (integers) are the
  same on all of them. One all-gather that every process joins: no hang."""
  if not is_multiprocess():
    return
  v = _test_disagreement(what, np.asarray(values, np.int64).ravel())
  sizes = allgather_rows(np.asarray([v.size], np.int64))
  if len(set(sizes.tolist())) != 1:
    raise ProcessesDisagree(f'processes disagree on {what}: sizes {sizes.tolist()}')
  allv = allgather_rows(v[None, :])
  if not (allv == allv[0]).all():
    bad = [i for i in range(allv.shape[0]) if not (allv[i] == allv[0]).all()]
    raise ProcessesDisagree(
      f'processes disagree on {what}: process 0 has {allv[0].tolist()[:16]}, process '
      f'{bad[0]} has {allv[bad[0]].tolist()[:16]}'
    )


def sync(name: str) -> None:
  """A barrier of every process (no-op with one)."""
  if is_multiprocess():
    from jax.experimental import multihost_utils

    multihost_utils.sync_global_devices(name)


@contextlib.contextmanager
def exit_on_failure():
  """Several processes: an exception (or ``sys.exit``) escaping the block ends this process
  at once, non-zero, after one line on stderr naming the process -- no shutdown barrier.
  Why: a process that died mid-step leaves the others in a collective; they fail there
  ("Connection closed by peer") or, at the latest, when jax.distributed's heartbeat
  timeout (``SPECRL_HEARTBEAT_S``) declares it dead, and must then exit instead of waiting
  in ``jax.distributed.shutdown`` for a peer that is gone. One process: a no-op."""
  try:
    yield
  except BaseException as e:  # noqa: BLE001
    if not is_multiprocess():
      raise
    code = e.code if isinstance(e, SystemExit) else 1
    if isinstance(e, SystemExit) and not code:
      raise
    if not isinstance(e, SystemExit):
      traceback.print_exc()
    first = next((ln.strip() for ln in str(e).splitlines() if ln.strip()), type(e).__name__)
    msg = first if isinstance(e, SystemExit) else f'{type(e).__name__}: {first}'
    sys.stderr.write(
      f'error: process {jax.process_index()} of {jax.process_count()}: {msg[:400]}\n'
    )
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code if isinstance(code, int) and code > 0 else 1)
