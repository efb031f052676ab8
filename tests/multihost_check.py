"""One run per case, in this process: as one of N processes under ``jax.distributed``
(started by ``python -m specrl.launch``) or alone with 8 fake CPU devices. Used by
test_multihost.py, which compares the two.

  python tests/multihost_check.py OUT CASE[,CASE...]

Each case trains a tiny model for a few steps (greedy rollouts, a fixed adaptive policy) in
``OUT/<case>/work`` and process 0 writes the final params to ``OUT/<case>/params.npz``
(outside the workdir). The last line printed by process 0 is a JSON object of wall times.
"""

import faulthandler
import json
import os
import sys
import time

if 'JAX_COORDINATOR_ADDRESS' not in os.environ:  # alone: 8 fake devices, as 2 x 4
  os.environ['XLA_FLAGS'] = (
    os.environ.get('XLA_FLAGS', '') + ' --xla_force_host_platform_device_count=8'
  )
os.environ['JAX_PLATFORMS'] = 'cpu'
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from specrl import multihost  # noqa: E402

multihost.initialize()

import jax  # noqa: E402
import numpy as np  # noqa: E402

from configs import default  # noqa: E402
from specrl import train  # noqa: E402


def base_config():
  c = default.get_config('smoke')
  c.model.update(d_model=32, n_heads=4, n_kv_heads=2, head_dim=8, d_ff=64, n_layers=1)
  c.rl.num_prompts, c.rl.num_generations = 2, 4  # 8 rows: 4 (one group) per process
  c.sft.batch_size, c.sft.steps, c.rl.steps = 8, 1, 3
  c.rollout.temperature = 0.0  # greedy
  c.mesh_shape = (2, 2, 2)  # data across the processes, fsdp and tensor inside each
  c.checkpoint_every, c.log_every = 2, 1
  c.eval.prompts = 0
  c.rollout.estimate_costs = False  # timing-only metrics; their profile's compiles cost CPU
  return c


def case_config(name: str):
  c = base_config()
  if name == 'adaptive_suffix':  # compaction to buckets below the 4-way batch sharding
    c.adaptive.enabled, c.adaptive.policy = True, 'always'
    c.adaptive.buckets, c.adaptive.arms, c.adaptive.chunk_steps = (8, 4, 2, 1), (2,), 3
    c.rollout.drafter = 'suffix'
    c.drafter.suffix.history = 2  # the host-side history store, all-gathered
  elif name == 'disagree':  # adaptive_suffix's run (its compiles cached), process 1's
    # compaction plan changed (SPECRL_TEST_DISAGREE): both processes must stop at once
    c = case_config('adaptive_suffix')
  elif name == 'async':  # rollout / train split: each process gives devices to both meshes
    c.rl.async_staleness = 1
    c.mesh_shape = ()
    c.rollout_mesh_shape, c.train_mesh_shape = (4, 1, 1), (2, 2, 1)
    c.rollout.drafter, c.rollout.num_draft = 'quantized', 2  # self-drafter of the new params
    c.eval.prompts, c.eval.generations, c.eval.every, c.eval.greedy = 2, 4, 0, False
  elif name == 'eagle_spot':  # static engine, 2 x 2 x 2 mesh; the eagle head trained online:
    # a warm-up, then spot updates
    c.sft.steps, c.rl.steps, c.checkpoint_every = 0, 2, 100  # spot updates in step 1's tail
    c.rollout.drafter, c.rollout.num_draft = 'eagle', 2
    e = c.drafter.eagle
    e.mode, e.reduced_vocab, e.warmup_steps, e.spot_max_updates = 'spot', 16, 1, 1
    # budgets by update count (no wall clock: the runs stay comparable); the budget checks
    # still run, taken by process 0
    e.warmup_budget_s, e.spot_budget_s, e.spot_buffer_steps = 1e6, 1e6, 2
  else:
    raise ValueError(f'unknown case {name!r}')
  return c


def main():
  out, cases = sys.argv[1], sys.argv[2].split(',')
  # MULTIHOST_DEADLINE_S: a hang becomes a failure with every thread's stack on stderr
  # (where it waits), before the test's own timeout would leave nothing to read
  if deadline := float(os.environ.get('MULTIHOST_DEADLINE_S', 0)):
    faulthandler.dump_traceback_later(deadline, exit=True)
  times, first = {}, {}
  kill = os.environ.pop('MULTIHOST_KILL', '')  # '<case>=<SPECRL_FAULT spec>'
  for name in cases:
    t0 = time.perf_counter()
    if kill.partition('=')[0] == name:
      os.environ['SPECRL_FAULT'] = kill.partition('=')[2]
    if name == 'disagree':
      os.environ[multihost.DISAGREE_ENV] = '1:the compaction plan'
    if multihost.is_primary():
      print(json.dumps({'case': name, 'start': time.time()}), flush=True)
    print(f'case {name} starts in process {jax.process_index()}', file=sys.stderr, flush=True)
    workdir = os.path.join(out, name, 'work')
    state, history = train.train_and_evaluate(case_config(name), workdir)
    first[name] = history[0]['step'] if history else None  # > 0: resumed
    params = {'policy': state.params}
    if getattr(state.drafter, 'params', None) is not None:  # the eagle head, trained online
      params['head'] = state.drafter.params
    params = multihost.to_host(params)
    if multihost.is_primary():
      leaves = jax.tree_util.tree_flatten_with_path(params)[0]
      flat = {jax.tree_util.keystr(p): np.asarray(x) for p, x in leaves}
      np.savez(os.path.join(out, name, 'params.npz'), **flat)
    times[name] = time.perf_counter() - t0
    if multihost.is_primary():
      print(json.dumps({'case': name, 'seconds': times[name], 'first_step': first[name]}))
  if multihost.is_primary():
    print(json.dumps({'processes': jax.process_count(), 'seconds': times, 'first_step': first}))


if __name__ == '__main__':
  with multihost.exit_on_failure():
    main()
