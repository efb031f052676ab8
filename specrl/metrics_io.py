"""The run's metrics on disk: ``<workdir>/metrics.jsonl`` (one JSON object per step: the
TensorBoard scalars + ``step``) and the TensorBoard writer. One module so the loop, the run
report and sweeps agree on the file."""

from __future__ import annotations

import json
import os

from absl import logging

METRICS_FILE = 'metrics.jsonl'


def json_number(v):
  """numpy / jax scalars in a metrics dict -> Python numbers (``json.dumps(default=)``)."""
  return v.item() if hasattr(v, 'item') else float(v)


def read_metrics(workdir: str) -> list[dict]:
  """The lines of ``<workdir>/metrics.jsonl`` (a resumed run appends after its restart)."""
  with open(os.path.join(workdir, METRICS_FILE)) as f:
    return [json.loads(line) for line in f if line.strip()]


def tensorboard_writer(workdir: str):
  """A tensorboardX ``SummaryWriter`` on ``<workdir>/tb``, or None without tensorboardX."""
  try:
    from tensorboardX import SummaryWriter
  except ImportError:  # pragma: no cover - tensorboardX is in requirements.txt
    logging.warning('tensorboardX not installed: no TensorBoard events')
    return None
  return SummaryWriter(os.path.join(workdir, 'tb'))
