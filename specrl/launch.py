"""Start one run as N local CPU processes under ``jax.distributed`` (testing multi-host).

  python -m specrl.launch --num_processes=2 --devices_per_process=4 -- \\
      main.py --config=configs/default.py:smoke --workdir=/tmp/mh

Each child runs ``python <script> <args>`` with ``JAX_PLATFORMS=cpu``,
``--xla_force_host_platform_device_count=<devices_per_process>`` in ``XLA_FLAGS``, and
``JAX_COORDINATOR_ADDRESS=localhost:<port>``, ``JAX_NUM_PROCESSES``, ``JAX_PROCESS_ID``
(read by :func:`specrl.multihost.initialize`, which ``main.py`` calls; gloo collectives
across the processes). Process 0 also hosts the coordinator. ``--heartbeat_s`` sets
``SPECRL_HEARTBEAT_S``: how long the coordinator waits for a silent process before the
others stop.

Failures propagate: when any child exits non-zero (or is killed), the launcher terminates
the others (SIGTERM, then SIGKILL after ``--grace_s``), prints one line naming the process
and its exit status, and exits non-zero (``--no_stop_others``: it waits for them to stop on
their own, as on a cluster; each process's exit is reported with its time). Children's
output goes to the launcher's stdout / stderr, each line prefixed with ``[p<i>]``
(``--log_dir``: also one file per process).
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import subprocess
import sys
import threading
import time


def free_port() -> int:
  with socket.socket() as s:
    s.bind(('localhost', 0))
    return s.getsockname()[1]


def child_env(base, pid: int, n: int, devices: int, port: int, heartbeat_s: int | None):
  env = dict(base)
  flags = [f for f in env.get('XLA_FLAGS', '').split() if 'host_platform_device_count' not in f]
  env['XLA_FLAGS'] = ' '.join(flags + [f'--xla_force_host_platform_device_count={devices}'])
  env['JAX_PLATFORMS'] = 'cpu'
  env['JAX_COORDINATOR_ADDRESS'] = f'localhost:{port}'
  env['JAX_NUM_PROCESSES'] = str(n)
  env['JAX_PROCESS_ID'] = str(pid)
  if heartbeat_s:
    env['SPECRL_HEARTBEAT_S'] = str(heartbeat_s)
  return env


def _pump(stream, prefix: str, out, log_file):
  for line in iter(stream.readline, ''):
    out.write(prefix + line)
    out.flush()
    if log_file is not None:
      log_file.write(line)
      log_file.flush()
  stream.close()


def launch(
  cmd: list[str],
  num_processes: int,
  devices_per_process: int,
  heartbeat_s: int | None = None,
  grace_s: float = 10.0,
  log_dir: str | None = None,
  env=None,
  poll_s: float = 0.2,
  stop_others: bool = True,
) -> int:
  """Run ``python cmd...`` as ``num_processes`` processes; returns the exit status (0 when
  all succeed, else the first failure's status, or 1 for a signal). ``stop_others=False``:
  after a failure, wait for the other processes to end by themselves (jax.distributed's
  heartbeat and failed collectives stop them; what a cluster without this launcher sees)."""
  if num_processes < 1 or devices_per_process < 1:
    raise ValueError('num_processes and devices_per_process must be >= 1')
  port = free_port()
  base = os.environ if env is None else env
  procs, threads, files = [], [], []
  if log_dir:
    os.makedirs(log_dir, exist_ok=True)
  for i in range(num_processes):
    e = child_env(base, i, num_processes, devices_per_process, port, heartbeat_s)
    p = subprocess.Popen(
      [sys.executable, *cmd],
      env=e,
      stdout=subprocess.PIPE,
      stderr=subprocess.PIPE,
      text=True,
      start_new_session=True,  # its own group: terminated with its children
    )
    procs.append(p)
    for stream, out, tag in ((p.stdout, sys.stdout, 'out'), (p.stderr, sys.stderr, 'err')):
      f = open(os.path.join(log_dir, f'p{i}.{tag}'), 'w') if log_dir else None  # noqa: SIM115
      files.append(f)
      t = threading.Thread(target=_pump, args=(stream, f'[p{i}] ', out, f), daemon=True)
      t.start()
      threads.append(t)
  failed, t0, ended = None, time.monotonic(), {}
  try:
    while True:
      for i, p in enumerate(procs):
        if i not in ended and p.poll() is not None:
          ended[i] = time.monotonic() - t0
          sys.stderr.write(
            f'specrl.launch: process {i} exited ({_status(p.returncode)}) at {ended[i]:.1f}s\n'
          )
      bad = [(i, procs[i].returncode) for i in sorted(ended) if procs[i].returncode != 0]
      if bad and failed is None:
        failed = bad[0]
        if stop_others:
          break
      if len(ended) == len(procs):
        break
      time.sleep(poll_s)
  except KeyboardInterrupt:
    failed = (-1, 130)
  if failed is not None:
    _stop(procs, grace_s)
  for t in threads:
    t.join(timeout=60)  # the rest of their output (EOF once the process is gone)
  for f in files:
    if f is not None:
      f.close()
  if failed is None:
    return 0
  i, code = failed
  who = 'interrupted' if i < 0 else f'process {i} of {num_processes} failed ({_status(code)})'
  rest = 'stopped the other processes' if stop_others else 'the others ended on their own'
  sys.stderr.write(f'specrl.launch: {who}; {rest}\n')
  sys.stderr.flush()
  return code if code > 0 else 1


def _status(code: int) -> str:
  return f'killed by signal {-code}' if code < 0 else f'exit status {code}'


def _stop(procs, grace_s: float) -> None:
  for p in procs:
    if p.poll() is None:
      try:
        os.killpg(p.pid, signal.SIGTERM)
      except ProcessLookupError:
        pass
  deadline = time.monotonic() + grace_s
  for p in procs:
    try:
      p.wait(timeout=max(0.0, deadline - time.monotonic()))
    except subprocess.TimeoutExpired:
      try:
        os.killpg(p.pid, signal.SIGKILL)
      except ProcessLookupError:
        pass
      p.wait()


def main(argv=None) -> int:
  argv = sys.argv[1:] if argv is None else argv
  if '--' in argv:
    cut = argv.index('--')
    own, cmd = argv[:cut], argv[cut + 1 :]
  else:
    own, cmd = argv, []
  ap = argparse.ArgumentParser(prog='python -m specrl.launch', description=__doc__.split('\n')[0])
  ap.add_argument('--num_processes', type=int, default=2)
  ap.add_argument('--devices_per_process', type=int, default=4)
  ap.add_argument('--heartbeat_s', type=int, default=None, help='SPECRL_HEARTBEAT_S')
  ap.add_argument('--grace_s', type=float, default=10.0)
  ap.add_argument('--log_dir', default=None)
  ap.add_argument(
    '--no_stop_others',
    action='store_true',
    help='after a failure, let the other processes stop on their own (heartbeat)',
  )
  a = ap.parse_args(own)
  if not cmd:
    ap.error('give the command after --, e.g. -- main.py --config=... --workdir=...')
  try:
    return launch(
      cmd,
      a.num_processes,
      a.devices_per_process,
      a.heartbeat_s,
      a.grace_s,
      a.log_dir,
      stop_others=not a.no_stop_others,
    )
  except ValueError as e:  # a bad argument: argparse's one-line form, not a traceback
    ap.error(str(e))


if __name__ == '__main__':
  sys.exit(main())
