"""Config sweeps: run every point of a config file's ``get_hyper(hyper)``, resumably.

  python -m specrl.sweep --config=configs/default.py:smoke --workdir=/tmp/sweep

``get_hyper(hyper)`` is big_vision style: it returns a list of points, each a dict of
overrides ``{'config.rollout.drafter': 'ngram', ...}``, built with the helpers of
:data:`hyper` (``sweep``, ``product``, ``zip``, ``chain``, ``fixed``). Each point runs through
:func:`specrl.train.train_and_evaluate` in its own workdir ``DIR/<point name>`` (checkpoints,
TensorBoard, ``metrics.jsonl``); when it finishes, a ``DONE`` marker holding its summary row is
written there. Rerunning the same command skips every point with a ``DONE`` marker and
resumes an interrupted point from its last checkpoint. After the last point,
``DIR/summary.csv`` (one row per point: overrides, final reward / accuracy, mean rollout
tokens/s, summed step time) and ``DIR/summary.png`` (reward and tokens/s per point) are
written. ``--config.a.b=v`` overrides apply to every point.
"""

from __future__ import annotations

import csv
import itertools
import json
import os
import re
import sys
import time
import types

import matplotlib

matplotlib.use('Agg')

import matplotlib.pyplot as plt  # noqa: E402
import ml_collections  # noqa: E402
from absl import app, flags, logging  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from specrl import cli, faults, metrics_io, run_config, train  # noqa: E402
from specrl import config as config_lib  # noqa: E402

DONE = 'DONE'


class SweepError(faults.FatalError, ValueError):
  """A mistake in the sweep itself (its file, a repeated point, an unknown key in a point,
  an override its point never reads): one line, before any point runs."""


SUMMARY_FIELDS = ('final_reward', 'final_accuracy', 'tokens_per_s', 'step_time_s', 'steps')


# ----------------------------------------------------------------------------- hyper


def _sweep(name: str, values) -> list[dict]:
  """One point per value of ``name``."""
  return [{name: v} for v in values]


def _fixed(name: str, value, length: int = 1) -> list[dict]:
  """``length`` points with ``name = value`` (to zip with other sweeps)."""
  return [{name: value}] * length


def _merge(points) -> dict:
  """One point from several (later keys win)."""
  return dict(itertools.chain.from_iterable(p.items() for p in points))


def _product(sweeps) -> list[dict]:
  """Every combination of one point from each sweep (the first varies slowest)."""
  return [_merge(ps) for ps in itertools.product(*sweeps)]


def _zip(sweeps) -> list[dict]:
  """Points merged position by position (the sweeps must have equal lengths)."""
  lengths = {len(s) for s in sweeps}
  if len(lengths) > 1:
    raise SweepError(f'hyper.zip needs sweeps of equal length, got {sorted(lengths)}')
  return [_merge(ps) for ps in zip(*sweeps, strict=True)]


def _chain(*sweeps) -> list[dict]:
  """The points of each sweep, one sweep after another."""
  return [p for s in sweeps for p in s]


# the helpers a config file's get_hyper(hyper) receives
hyper = types.SimpleNamespace(sweep=_sweep, fixed=_fixed, product=_product, zip=_zip, chain=_chain)


# ----------------------------------------------------------------------------- points


def point_name(overrides: dict) -> str:
  """Filesystem-safe name of a point, e.g. ``rollout.drafter=ngram+rollout.num_draft=2``."""
  if not overrides:
    return 'default'
  parts = [f'{k.removeprefix("config.")}={v}' for k, v in overrides.items()]
  return re.sub(r'[^A-Za-z0-9._=+-]', '_', '+'.join(parts))[:200]


def apply_overrides(base: ml_collections.ConfigDict, overrides: dict):
  """A copy of ``base`` with ``{'config.a.b': v}`` set; an unknown key is refused in one line."""
  c = base.copy_and_resolve_references()
  for key, value in overrides.items():
    dotted = key.removeprefix('config.')
    msg = config_lib.unknown_override(c, dotted)
    if msg:
      raise SweepError(f'sweep point {point_name(overrides)}: {msg}')
    *path, leaf = dotted.split('.')
    node = c
    for part in path:
      node = node[part]
    node[leaf] = value
  return c


def summarize(workdir: str) -> dict:
  """Summary of a finished point from its ``metrics.jsonl`` (last line per step counts)."""
  by_step = {m['step']: m for m in metrics_io.read_metrics(workdir)}
  rl = [m for _, m in sorted(by_step.items()) if m.get('phase') == 1.0]
  tps = [m['rollout/tokens_per_s'] for m in rl if 'rollout/tokens_per_s' in m]
  return {
    'final_reward': rl[-1]['reward'] if rl else float('nan'),
    'final_accuracy': rl[-1]['accuracy'] if rl else float('nan'),
    'tokens_per_s': sum(tps) / len(tps) if tps else float('nan'),
    'step_time_s': sum(m['step_time_s'] for m in by_step.values()),
    'steps': len(by_step),
  }


def run_point(base, overrides: dict, workdir: str) -> dict:
  """Run one point (or skip it if ``DONE``); returns its summary row."""
  marker = os.path.join(workdir, DONE)
  if os.path.exists(marker):
    logging.info('sweep: %s is done, skipped', workdir)
    with open(marker) as f:
      return json.load(f)
  t0 = time.perf_counter()
  config = apply_overrides(base, overrides)
  try:  # a bad value in the point or the base config: one line naming the point
    exp = train.build_experiment(config)
  except (ValueError, OSError) as e:
    raise faults.FatalError(f'sweep point {point_name(overrides)}: {e}') from e
  train.train_and_evaluate(config, workdir, exp=exp)
  row = {'name': point_name(overrides), **overrides, **summarize(workdir)}
  row['wall_s'] = time.perf_counter() - t0  # of the run that finished it
  tmp = marker + '.tmp'
  with open(tmp, 'w') as f:
    json.dump(row, f)
  os.replace(tmp, marker)  # atomic: a kill never leaves a half-written marker
  return row


def write_summary(rows: list[dict], workdir: str) -> None:
  """``summary.csv`` (one row per point) and ``summary.png`` (reward, tokens/s per point)."""
  keys = list(dict.fromkeys(k for r in rows for k in r))
  with open(os.path.join(workdir, 'summary.csv'), 'w', newline='') as f:
    w = csv.DictWriter(f, fieldnames=keys)
    w.writeheader()
    w.writerows(rows)
  names = [r['name'] for r in rows]
  fig, axes = plt.subplots(1, 2, figsize=(max(6, 1.2 * len(rows) + 4), 4))
  for ax, key, label in (
    (axes[0], 'final_reward', 'final reward'),
    (axes[1], 'tokens_per_s', 'rollout tokens/s'),
  ):
    ax.bar(range(len(rows)), [r[key] for r in rows])
    ax.set_xticks(range(len(rows)), names, rotation=30, ha='right', fontsize=7)
    ax.set_ylabel(label)
  fig.tight_layout()
  fig.savefig(os.path.join(workdir, 'summary.png'), dpi=100)
  plt.close(fig)


def check_points(base, points: list[dict]) -> list[str]:
  """The points' names; a repeated point, an override of a key the config does not have, or
  a point's own override that its run would never read (:func:`run_config.
  ineffective_override` on the point's config: e.g. ``drafter.eagle.mode`` in a point whose
  drafter is ``'none'``, a run the same as another point's) is refused (:class:`SweepError`,
  one line) before any point runs. The base config and the command line's overrides may
  hold settings that only some points read."""
  names = [point_name(p) for p in points]
  if len(set(names)) != len(names):
    raise SweepError(f'sweep points must be distinct, got {names}')
  for name, p in zip(names, points, strict=True):
    config = apply_overrides(base, p)
    for key in p:
      msg = run_config.ineffective_override(config, key.removeprefix('config.'))
      if msg:
        raise SweepError(f'sweep point {name}: {msg} (build the points with hyper.chain)')
  return names


def run_sweep(base, points: list[dict], workdir: str) -> list[dict]:
  """Every point in its own ``workdir/<name>``, then the summary files."""
  names = check_points(base, points)
  os.makedirs(workdir, exist_ok=True)
  rows = []
  for i, (name, point) in enumerate(zip(names, points, strict=True)):
    logging.info('sweep point %d/%d: %s', i + 1, len(points), name)
    rows.append(run_point(base, point, os.path.join(workdir, name)))
  write_summary(rows, workdir)
  return rows


def load_get_hyper(config_spec: str):
  """``get_hyper`` of the config file named by ``path.py[:arg]``."""
  path = config_spec.partition(':')[0]
  module = cli.load_config_module(config_spec, '_specrl_sweep_config')
  if not hasattr(module, 'get_hyper'):
    raise SweepError(f'{path} has no get_hyper(hyper): nothing to sweep')
  return module.get_hyper


# ----------------------------------------------------------------------------- main

FLAGS = flags.FLAGS
flags.DEFINE_string('workdir', None, 'Sweep directory: one subdirectory per point.')
config_flags.DEFINE_config_file('config', None, 'Config file with get_config and get_hyper.')
flags.mark_flags_as_required(['config', 'workdir'])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  try:  # the sweep file or its points, a bad point, bad data, no restorable checkpoint
    points = load_get_hyper(config_flags.get_config_filename(FLAGS['config']))(hyper)
    run_sweep(FLAGS.config, points, FLAGS.workdir)
  except faults.FatalError as e:
    sys.exit(f'error: {e}')


if __name__ == '__main__':
  app.run(main, flags_parser=cli.parse_flags)  # user mistakes in the flags: one line
