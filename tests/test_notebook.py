"""colabs/quickstart.ipynb: matches its generator, and runs end to end with smoke settings."""

import importlib.util
import json
import os

import ipykernel.kernelspec
import nbclient
import nbformat
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
COLABS = os.path.join(ROOT, 'colabs')
NOTEBOOK = os.path.join(COLABS, 'quickstart.ipynb')

# Replaces the `parameters` cell: the smoke config, a couple of steps of each phase.
SMOKE_PARAMETERS = """\
SMOKE = True
SFT_STEPS = 2
RL_STEPS = 2
DRAFTER = 'none'
SPEC_DRAFTER = 'quantized'
NUM_DRAFT = 3
EVAL_EVERY = 1
"""

# Appended: what the test checks beyond "no errors", as one JSON line.
SUMMARY_CELL = """\
import json
print('SUMMARY ' + json.dumps({
  'phases': [m['phase'] for m in history],
  'acceptance': spec_m['eval/spec/alpha'],
  'tokens_per_pass': spec_m['eval/spec/tokens_per_pass'],
  'evals': [m['eval/step'] for m in history if 'eval/step' in m],
}))
"""


def _parameters_cell(nb):
  cells = [c for c in nb.cells if 'parameters' in c.metadata.get('tags', [])]
  assert len(cells) == 1, 'the notebook needs exactly one cell tagged "parameters"'
  return cells[0]


def _outputs(nb):
  return [o for c in nb.cells if c.cell_type == 'code' for o in c.get('outputs', [])]


def test_notebook_matches_generator():
  spec = importlib.util.spec_from_file_location(
    'make_quickstart', os.path.join(COLABS, 'make_quickstart.py')
  )
  gen = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(gen)
  want = gen.build()
  got = nbformat.read(NOTEBOOK, as_version=4)
  assert [(c.cell_type, c.source, c.metadata.get('tags', [])) for c in got.cells] == [
    (c.cell_type, c.source, c.metadata.get('tags', [])) for c in want.cells
  ], 'colabs/quickstart.ipynb is stale: run python colabs/make_quickstart.py'
  assert not _outputs(got), 'commit the notebook without outputs'
  assert 'SMOKE = False' in _parameters_cell(got).source


@pytest.mark.slow
def test_notebook_runs(monkeypatch, tmp_path):
  nb = nbformat.read(NOTEBOOK, as_version=4)
  _parameters_cell(nb).source = SMOKE_PARAMETERS
  nb.cells.append(nbformat.v4.new_code_cell(SUMMARY_CELL))
  # The 'python3' kernel runs this interpreter (the one with specrl's requirements), not
  # whatever a user-level kernelspec points at: JUPYTER_PATH is searched first.
  ipykernel.kernelspec.write_kernel_spec(tmp_path / 'jupyter' / 'kernels' / 'python3')
  monkeypatch.setenv('JUPYTER_PATH', str(tmp_path / 'jupyter'))
  # The kernel inherits this environment: JAX_PLATFORMS=cpu and the cheap XLA compiles of
  # tests/conftest.py, since compiling the train and rollout steps is most of a smoke run.
  monkeypatch.setenv('TMPDIR', str(tmp_path))  # the notebook's tempfile.mkdtemp() workdir
  # Started in colabs/, as Jupyter would: the notebook finds the repo root itself.
  client = nbclient.NotebookClient(
    nb,
    kernel_name='python3',
    timeout=300,
    startup_timeout=120,
    resources={'metadata': {'path': COLABS}},
  )
  client.execute()  # raises CellExecutionError, with the traceback, if a cell fails

  outputs = _outputs(nb)
  assert not [o for o in outputs if o.output_type == 'error']
  pngs = sum('image/png' in o.get('data', {}) for o in outputs)
  assert pngs >= 2, 'the learning curves and the report figure were not both shown'
  assert any('text/markdown' in o.get('data', {}) for o in outputs), 'no report shown'
  lines = [
    line
    for o in outputs
    if o.output_type == 'stream'
    for line in o.text.splitlines()
    if line.startswith('SUMMARY ')
  ]
  assert len(lines) == 1
  summary = json.loads(lines[0].removeprefix('SUMMARY '))
  assert summary['phases'] == [0.0, 0.0, 1.0, 1.0]  # 2 warm-up steps, then 2 GRPO steps
  assert summary['evals'] == [2, 3, 4]  # the validation curve: start of GRPO, each step
  assert 0.0 <= summary['acceptance'] <= 1.0
  assert 1.0 <= summary['tokens_per_pass'] <= 4.0  # at most k + 1 = 4
