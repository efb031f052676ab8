"""Writes ``colabs/quickstart.ipynb`` (no outputs) from the cells below.

  python colabs/make_quickstart.py

Edit the notebook here, not in Jupyter: the cells stay reviewable as code, and
``tests/test_notebook.py`` checks that the committed notebook matches this file.
"""

import os

import nbformat

PATH = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'quickstart.ipynb')

INTRO = """\
# specrl quickstart: GRPO with lossless speculative rollouts

**specrl** post-trains language models with GRPO in JAX. Each GRPO step samples a group of
responses per prompt (the *rollout*), scores them with a verifiable reward, and takes a
PPO-clipped policy-gradient step on group-normalised advantages. Rollouts dominate the
wall-clock of RL post-training, so specrl can run them with **speculative decoding**: a
cheap drafter proposes `k` tokens, the policy checks all of them in one forward pass, and
rejection sampling keeps every token distributed *exactly* as the policy's. The rollouts
are lossless: the same distribution and the same training signal, only faster when a
drafting round plus one verify pass costs less than the plain decoding steps it replaces.

The task is **running sum**: a prompt `3+5+2+7=......` asks for the running sum mod 10
after each term, then the answer, `3 8 0 7#7`. The number of terms follows a power law,
so a few answers are several times longer than the median: the long tail that keeps a
rollout batch waiting and that speculative decoding attacks.

This notebook:

1. warms a small policy up on worked solutions (supervised), then trains it with GRPO,
   validating on held-out prompts (which training never sees) at the start of GRPO, every
   `EVAL_EVERY` steps and at the end;
2. plots the SFT loss, the validation curve, and the GRPO reward and response length;
3. shows the run report (validation before/after GRPO with 95% confidence intervals,
   throughput, time split) and its figure;
4. decodes a few held-out prompts with the trained policy;
5. validates with a speculative drafter and compares acceptance and tokens/s.

With the defaults it takes several minutes on a 2-core CPU (most of it the 200 warm-up
and 60 GRPO steps); set `SMOKE = True` for a run of well under a minute."""

SETUP = """\
# Setup: find the repo root (this folder, its parent, or a clone in it), install the
# requirements on Colab, and make `specrl` and `configs` importable.
import os
import sys

IN_COLAB = 'google.colab' in sys.modules
_here = os.getcwd()
ROOT = next((d for d in (_here, os.path.dirname(_here), os.path.join(_here, 'specrl'))
             if os.path.isfile(os.path.join(d, 'configs', 'default.py'))), None)
if ROOT is None:
  raise RuntimeError('Run this notebook from the specrl repo or its colabs/ folder '
                     '(on Colab: first clone the repo into the working directory).')
if IN_COLAB:
  !pip install -q -r "{ROOT}/requirements.txt"
if ROOT not in sys.path:
  sys.path.insert(0, ROOT)"""

PARAMETERS = """\
# Parameters (papermill-style: this cell is tagged `parameters`).
SMOKE = False  # True: the tiny `smoke` config, seconds instead of minutes
SFT_STEPS = 200  # supervised warm-up steps on generated worked solutions
RL_STEPS = 60  # GRPO steps after the warm-up
DRAFTER = 'none'  # drafter for the training rollouts: none | self | ngram | quantized
SPEC_DRAFTER = 'quantized'  # drafter for the speculative rollout at the end
NUM_DRAFT = 4  # k: draft tokens proposed per verify pass (used when a drafter is on)
EVAL_EVERY = 20  # GRPO steps between validations on the held-out prompts"""

CONFIG = """\
import tempfile
import time

import jax
import matplotlib.pyplot as plt
import numpy as np
from absl import logging

from configs import default
from specrl import evaluation, progress, report, train

config = default.get_config('smoke' if SMOKE else None)
config.sft.steps = SFT_STEPS
config.rl.steps = RL_STEPS
config.rollout.drafter = DRAFTER
config.rollout.num_draft = NUM_DRAFT if DRAFTER != 'none' else 0
config.eval.every = EVAL_EVERY
config.log_every = 1 if SMOKE else 10

# The loop prints a progress line every `log_every` steps and the validation results;
# library INFO logs (checkpoint saves, backend probes) stay quiet.
logging.set_verbosity(logging.WARNING)
progress.quiet_backend_probe()
print(f'JAX {jax.__version__} on {jax.devices()[0].platform}; '
      f'{config.sft.steps} warm-up + {config.rl.steps} GRPO steps, '
      f'{config.rl.num_prompts} prompts x {config.rl.num_generations} generations each')"""

TRAIN_MD = """\
## Train

`train.train_and_evaluate` is everything `main.py` does: supervised warm-up, then GRPO,
with checkpoints and TensorBoard events in `workdir` (rerunning with the same `workdir`
resumes). It returns the final train state and one metric dict per step; the steps after
which the policy was validated also carry `eval/...` metrics (`eval/step`: the optimizer
steps the validated params had). At the end it writes `report.md` and `report.png`."""

TRAIN = """\
workdir = tempfile.mkdtemp(prefix='specrl_')
t0 = time.perf_counter()
state, history = train.train_and_evaluate(config, workdir=workdir)
print(f'{len(history)} steps in {time.perf_counter() - t0:.0f}s; checkpoints in {workdir}')"""

PLOT_MD = """\
## Learning curves

`phase` is 0 for warm-up steps and 1 for GRPO steps. The reward gives partial credit for
correct worked steps before the first mistake; accuracy is the exact final answer. The
validation curve is measured on the task's fixed held-out prompts (`G` samples each, with
95% confidence intervals over prompts, plus greedy decoding), so unlike the per-step GRPO
reward it compares like with like from one point to the next."""

PLOT = """\
sft = [m for m in history if m['phase'] == 0]
rl = [m for m in history if m['phase'] == 1]


def curve(ax, rows, key, label=None):
  ax.plot([m['step'] for m in rows], [m[key] for m in rows], label=label)


evals = [m for m in history if 'eval/step' in m]

fig, axes = plt.subplots(1, 4, figsize=(19, 3.8))
curve(axes[0], sft, 'sft_loss')
axes[0].set(title='warm-up: SFT loss', xlabel='step')
for key in ('reward', 'accuracy'):
  axes[1].errorbar([m['eval/step'] for m in evals], [m[f'eval/{key}'] for m in evals],
                   yerr=[m[f'eval/{key}_ci95'] for m in evals], marker='o', capsize=3,
                   label=key)
axes[1].plot([m['eval/step'] for m in evals], [m['eval/greedy_accuracy'] for m in evals],
             'k--x', label='greedy accuracy')
axes[1].set(title='validation (held-out, 95% CI)', xlabel='step', ylim=(-0.02, 1.02))
curve(axes[2], rl, 'reward', 'reward')
curve(axes[2], rl, 'accuracy', 'accuracy')
axes[2].set(title='GRPO batches: reward and accuracy', xlabel='step', ylim=(-0.02, 1.02))
curve(axes[3], rl, 'response_len_mean', 'mean')
curve(axes[3], rl, 'response_len_max', 'max')
axes[3].set(title='GRPO: response length (tokens)', xlabel='step')
for ax in axes[1:]:
  ax.legend()
fig.tight_layout()
plt.show()
for m in evals:
  print(evaluation.format_line(m))"""

REPORT_MD = """\
## Run report

Written by the loop at the end of the run (`<workdir>/report.md`, `<workdir>/report.png`),
or on demand for any workdir: `python -m specrl.report <workdir>`."""

REPORT = """\
from IPython.display import Image, Markdown, display

display(Markdown(open(os.path.join(workdir, report.REPORT_MD)).read()))
display(Image(filename=os.path.join(workdir, report.REPORT_PNG)))"""

SAMPLES_MD = """\
## Samples from the trained policy

Held-out prompts (`task.heldout_prompts`: a fixed pool that training never draws),
decoded by the rollout engine with the training temperature."""

SAMPLES = """\
def rollout_config(drafter):
  c = config.copy_and_resolve_references()
  c.rollout.drafter = drafter
  c.rollout.num_draft = NUM_DRAFT if drafter != 'none' else 0
  c.eval.greedy = False  # the comparison below needs only the sampled rollouts
  return c


plain = train.build_experiment(rollout_config('none'))
held = plain.task.heldout_prompts(6)
out, _ = plain.engine.generate(state.params, held.tokens, held.lengths, jax.random.key(1))
tok = plain.task.tokenizer
response, length = np.asarray(out.response), np.asarray(out.length)

print(f"{'prompt':<34}{'response':<36}{'reference':<36}reward")
for i in range(len(held.answers)):
  prompt = tok.decode(held.tokens[i, :held.lengths[i]]).rstrip('.')
  reference = plain.task.solution([int(t) for t in held.answers[i]])
  answer = tok.decode(response[i, :length[i]])
  print(f'{prompt:<34}{answer:<36}{reference:<36}'
        f'{plain.task.reward(response[i, :length[i]], held.answers[i]):.2f}')"""

SPEC_MD = """\
## Speculative rollouts

Validation again, with a drafter (`evaluation.Evaluator`: the same held-out prompts and
keys as in training). `quantized` drafts with an int8 copy of the live policy
(re-derived from the params, so it never drifts); `self` drafts with the policy itself,
so every draft is accepted (a correctness check, never faster). The samples follow the
policy's distribution either way, so accuracy only differs by sampling noise.

- **alpha** (acceptance): accepted draft tokens that were committed / draft tokens proposed;
- **tokens per pass**: tokens committed per policy forward pass (plain decoding: 1).

Acceptance and tokens per pass are properties of the policy and the drafter; tokens/s
also depends on how much a drafting round and a verify pass over `k + 1` tokens cost on
your hardware compared with `k + 1` plain decoding steps. Timings exclude compilation
(one untimed call first) and are the median of 3 rollouts."""

SPEC = """\
def timed_validation(exp, repeats=3):
  validate = evaluation.Evaluator.from_experiment(exp)
  validate(state.params)  # compiles
  runs = [validate(state.params) for _ in range(repeats)]
  return sorted(runs, key=lambda m: m['eval/tokens_per_s'])[repeats // 2]


spec = train.build_experiment(rollout_config(SPEC_DRAFTER))
plain_m, spec_m = timed_validation(plain), timed_validation(spec)
label = f'{SPEC_DRAFTER}, k={NUM_DRAFT}:'
print(f"{'plain:':<20}{plain_m['eval/tokens_per_s']:9.0f} tok/s  "
      f"accuracy {plain_m['eval/accuracy']:.3f}")
print(f"{label:<20}{spec_m['eval/tokens_per_s']:9.0f} tok/s  "
      f"accuracy {spec_m['eval/accuracy']:.3f}  alpha {spec_m['eval/spec/alpha']:.2f}  "
      f"{spec_m['eval/spec/tokens_per_pass']:.2f} tokens per pass")
print(f"speedup: {spec_m['eval/tokens_per_s'] / plain_m['eval/tokens_per_s']:.2f}x")"""

NEXT_MD = """\
## Next

- Train with speculative rollouts: set `DRAFTER = 'quantized'` above, or run

  ```
  python main.py --config=configs/default.py --workdir=/tmp/r \\
    --config.rollout.drafter=quantized
  ```
- Try `--config.drafter.quantized.bits=4`, `--config.rollout.num_draft=2`, or the `ngram` drafter.
- `bench/` measures rollout throughput and acceptance (`--quick` for under a minute).
- TensorBoard: `tensorboard --logdir <workdir>/tb` (validation under `eval/`).
- The report of any run: `python -m specrl.report <workdir>`."""

CELLS = [
  ('intro', 'markdown', INTRO, []),
  ('setup', 'code', SETUP, []),
  ('parameters', 'code', PARAMETERS, ['parameters']),
  ('config', 'code', CONFIG, []),
  ('train-md', 'markdown', TRAIN_MD, []),
  ('train', 'code', TRAIN, []),
  ('plot-md', 'markdown', PLOT_MD, []),
  ('plot', 'code', PLOT, []),
  ('report-md', 'markdown', REPORT_MD, []),
  ('report', 'code', REPORT, []),
  ('samples-md', 'markdown', SAMPLES_MD, []),
  ('samples', 'code', SAMPLES, []),
  ('spec-md', 'markdown', SPEC_MD, []),
  ('spec', 'code', SPEC, []),
  ('next-md', 'markdown', NEXT_MD, []),
]


def build() -> nbformat.NotebookNode:
  nb = nbformat.v4.new_notebook()
  nb.metadata.update(
    {
      'kernelspec': {'name': 'python3', 'display_name': 'Python 3', 'language': 'python'},
      'language_info': {'name': 'python'},
      'colab': {'name': 'quickstart.ipynb', 'provenance': []},
    }
  )
  for cell_id, kind, source, tags in CELLS:
    new = nbformat.v4.new_markdown_cell if kind == 'markdown' else nbformat.v4.new_code_cell
    cell = new(source, id=cell_id)
    if tags:
      cell.metadata['tags'] = tags
    nb.cells.append(cell)
  nbformat.validate(nb)
  return nb


if __name__ == '__main__':
  nbformat.write(build(), PATH)
  print(f'wrote {PATH}')
