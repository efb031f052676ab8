"""A run's config, checked and turned into the settings dataclasses before anything is built.

One job: the top-level sections of a run's ``ConfigDict`` (the keys each may hold, the
values they may take) and the settings that are derived from it (sampling, ``RLConfig``,
``RolloutConfig``, ``AdaptiveConfig``, the static engine's k). A bad value fails here in
one line naming the field (:mod:`specrl.config` turns each section into its dataclass);
:func:`specrl.experiment.build_experiment` builds from what these return.
"""

from __future__ import annotations

import jax
import ml_collections

from specrl import adaptive, async_rl, evaluation, faults, sampling
from specrl import config as config_lib
from specrl import rl as rl_lib
from specrl import rollout as rollout_lib
from specrl import tasks as tasks_lib
from specrl.decoding import executables
from specrl.drafters import registry as drafter_registry

TOP_LEVEL_KEYS = (
  'seed', 'model', 'task', 'rollout', 'drafter', 'adaptive', 'sft', 'rl', 'mesh_shape',
  'log_every', 'checkpoint_every', 'keep_checkpoints', 'train', 'eval',
  *async_rl.ASYNC_KEYS,
)  # fmt: skip
SFT_KEYS = ('steps', 'batch_size', 'lr', 'warmup_steps')
# rl section keys read by the loop / optimizer rather than RLConfig
RL_LOOP_KEYS = (
  'steps', 'num_prompts', 'lr', 'warmup_steps', 'weight_decay', 'grad_clip', 'async_staleness',
)  # fmt: skip
# rollout section keys that are not RolloutConfig fields
ROLLOUT_OTHER_KEYS = (
  'drafter',
  'temperature',
  'top_k',
  'top_p',
  'max_executables',
  'estimate_costs',
)
DEFAULT_NUM_DRAFT = 4  # the static engine's k with a drafter when rollout.num_draft = 0
# AdaptiveConfig fields the adaptive section does not set: seed comes from config.seed.
ADAPTIVE_NOT_IN_SECTION = ('seed',)
# adaptive section keys that are not AdaptiveConfig fields: the engine switch
ADAPTIVE_OTHER_KEYS = ('enabled',)
# RolloutConfig fields derived from the task and the sampling keys, not set in the section
ROLLOUT_DERIVED = ('sampling', 'eos_id', 'extra_eos_ids', 'pad_id', 'max_prompt_len', 'max_draft')


def _check_positive(config, names):
  for name in names:
    section, field = name.split('.')
    v = config[section][field]
    if v <= 0:
      raise ValueError(f'config.{name} must be > 0, got {v}')


def check_run_config(config: ml_collections.ConfigDict) -> None:
  """The loop's own keys and values: top-level keys, ``sft``, step counts, cadences, the
  fault (``train``) and validation (``eval``) sections."""
  config_lib.check_keys(config, '', TOP_LEVEL_KEYS)
  config_lib.check_keys(config.sft, 'sft', SFT_KEYS)
  _check_positive(config, ['rl.num_prompts', 'rl.lr', 'sft.batch_size', 'rl.grad_clip'])
  if config.sft.steps < 0 or config.rl.steps < 0:
    raise ValueError('config.sft.steps and config.rl.steps must be >= 0')
  if config.log_every <= 0 or config.checkpoint_every <= 0:
    raise ValueError('config.log_every and config.checkpoint_every must be > 0')
  faults.fault_config(config)  # train.nonfinite / max_skips
  faults.check_fault_env()  # $SPECRL_FAULT: a typo fails here, not after the first rollout
  evaluation.eval_config(config)  # the eval section (the loop builds the Evaluator)
  executables.check_limit(config.rollout.max_executables)
  if config.rl.get('attention_impl') == 'pallas' and jax.default_backend() not in ('gpu', 'tpu'):
    raise ValueError(
      "config.rl.attention_impl='pallas' (jax's Pallas flash kernels) needs a GPU or TPU, "
      f"this run's backend is {jax.default_backend()!r}: use 'blocked' (memory-bounded jnp)"
    )


def _no_drafter(c) -> bool:
  return c.rollout.drafter == 'none'


# Fields that only one mode of the run reads: (field name prefixes, whether this config
# reads them, why not and what would make them count). Each was checked against its reader.
MODE_FIELDS = (
  (
    ('rollout.verify_impl',),
    lambda c: not _no_drafter(c),
    "rollout.drafter='none' runs no verify pass (set --config.rollout.drafter)",
  ),
  (
    ('rollout.estimate_costs',),
    lambda c: not _no_drafter(c) and not c.adaptive.enabled,
    'only the static engine with a drafter profiles its costs (rollout.drafter, '
    'adaptive.enabled=False)',
  ),
  (
    ('eval.every', 'eval.generations', 'eval.greedy'),
    lambda c: c.eval.prompts > 0,
    'eval.prompts=0 turns validation off (set --config.eval.prompts)',
  ),
  (
    ('sft.batch_size', 'sft.lr', 'sft.warmup_steps'),
    lambda c: c.sft.steps > 0,
    'sft.steps=0 runs no warm-up (set --config.sft.steps)',
  ),
  (
    ('rl.is_cap',),
    lambda c: c.rl.get('offpolicy', 'none') != 'none',
    "rl.offpolicy='none' computes no importance weights (set --config.rl.offpolicy)",
  ),
  (
    ('rl.attention_block',),
    lambda c: c.rl.get('attention_impl', 'full') == 'blocked',
    "only rl.attention_impl='blocked' attends in blocks (set --config.rl.attention_impl)",
  ),
  (
    ('train.max_skips',),
    lambda c: c.train.nonfinite == 'skip',
    "train.nonfinite='halt' stops at the first non-finite update (set --config.train.nonfinite)",
  ),
  (
    ('adaptive.tlt_',),
    lambda c: c.adaptive.policy == 'tlt',
    "only adaptive.policy='tlt' reads it (set --config.adaptive.policy)",
  ),
  (
    ('adaptive.roofline_',),
    lambda c: c.adaptive.policy == 'roofline',
    "only adaptive.policy='roofline' reads it (set --config.adaptive.policy)",
  ),
)


def ineffective_override(config: ml_collections.ConfigDict, dotted: str) -> str | None:
  """One line for a command-line override ``--config.<dotted>`` that this run never reads
  (None if it may be read), naming what would make it count:

  - ``task.<key>`` that the chosen task does not read (:data:`specrl.tasks.TASK_FIELDS`: the
    section is shared by the tasks);
  - ``drafter.<name>.*`` of a section the chosen drafter does not read
    (:func:`specrl.drafters.registry.sections_read`);
  - ``adaptive.*`` with the adaptive engine off (``adaptive.enabled``);
  - a field that only one mode reads, in another mode (:data:`MODE_FIELDS`: e.g.
    ``rollout.verify_impl`` without a drafter, ``eval.generations`` with validation off,
    ``adaptive.tlt_patience`` under another policy).

  ``main.py`` refuses such an override: a setting that silently does nothing is a wrong
  answer. Checked on the command line only, where a user just typed it: a config file or a
  sweep's base may keep other tasks' or drafters' settings on purpose."""
  section, _, rest = dotted.partition('.')
  key = rest.split('.')[0]
  if not key:
    return None
  if section == 'task':
    reads = tasks_lib.TASK_FIELDS.get(config.task.name)
    if reads is not None and key not in reads and key != 'name':
      return (
        f'--config.{dotted} has no effect on task {config.task.name!r} (it reads '
        f'{", ".join(reads)})'
      )
  if section == 'drafter' and config.rollout.drafter in drafter_registry.names():
    reads = drafter_registry.sections_read(config)
    if key not in reads:
      what = f'reads drafter.{", drafter.".join(reads)}' if reads else 'reads no drafter section'
      return (
        f'--config.{dotted} has no effect: rollout.drafter={config.rollout.drafter!r} {what} '
        f'(set --config.rollout.drafter)'
      )
  if section == 'adaptive' and key != 'enabled' and not config.adaptive.enabled:
    return (
      f'--config.{dotted} has no effect with the adaptive engine off '
      '(set --config.adaptive.enabled=True)'
    )
  field = f'{section}.{key}'
  for prefixes, reads, what in MODE_FIELDS:
    if any(field.startswith(p) for p in prefixes) and not reads(config):
      return f'--config.{dotted} has no effect: {what}'
  return None


def resolve_num_draft(config: ml_collections.ConfigDict, has_drafter: bool) -> int:
  """The static engine's k: ``rollout.num_draft``, 0 meaning the mode's default (4 with a
  drafter, 0 without). A value the chosen mode would ignore is refused naming the knob
  that applies (the adaptive engine's draft lengths are ``adaptive.arms``)."""
  k = config.rollout.num_draft
  if k < 0:
    raise ValueError(f'config.rollout.num_draft must be >= 0 (0 = default), got {k}')
  n = config.rollout.get('tree_nodes', 0)
  if n and not has_drafter:
    raise ValueError(
      f"config.rollout.tree_nodes={n} needs a drafter: set config.rollout.drafter (it is 'none')"
    )
  if n and k:
    raise ValueError(
      f'config.rollout.num_draft={k} conflicts with config.rollout.tree_nodes={n}: a tree '
      'round verifies tree_nodes - 1 drafts (leave rollout.num_draft=0)'
    )
  if n and not config.adaptive.enabled:
    return n - 1
  if config.adaptive.enabled:
    if k:
      raise ValueError(
        f'config.rollout.num_draft={k} is ignored by the adaptive engine: set its draft '
        'lengths with config.adaptive.arms (and leave rollout.num_draft=0)'
      )
    return 0
  if not has_drafter:
    if k:
      raise ValueError(
        f"config.rollout.num_draft={k} needs a drafter: set config.rollout.drafter (it is 'none')"
      )
    return 0
  return k or DEFAULT_NUM_DRAFT


def sampling_params(config: ml_collections.ConfigDict) -> sampling.SamplingParams:
  """Temperature / top-k / top-p from the ``rollout`` section."""
  rollout_fields = config_lib.init_field_names(rollout_lib.RolloutConfig)
  return config_lib.from_config(
    sampling.SamplingParams,
    config.rollout,
    'rollout',
    ignore=[
      *(set(rollout_fields) - set(ROLLOUT_DERIVED)),
      'drafter',
      'max_executables',
      'estimate_costs',
    ],
  )


def rl_config(config: ml_collections.ConfigDict, sp: sampling.SamplingParams) -> rl_lib.RLConfig:
  """``RLConfig`` from the ``rl`` section; its logprob temperature is the sampler's."""
  return config_lib.from_config(
    rl_lib.RLConfig,
    config.rl,
    'rl',
    ignore=RL_LOOP_KEYS,
    exclude=('temperature',),
    temperature=sp.logprob_temperature,
  )


def rollout_config(
  config: ml_collections.ConfigDict, task, sp: sampling.SamplingParams, has_drafter: bool
) -> rollout_lib.RolloutConfig:
  """``RolloutConfig`` from the ``rollout`` section, with what the task fixes (prompt
  length, default answer budget, EOS set, padding) and the static engine's k."""
  return config_lib.from_config(
    rollout_lib.RolloutConfig,
    config.rollout,
    'rollout',
    ignore=ROLLOUT_OTHER_KEYS,
    exclude=ROLLOUT_DERIVED,
    max_new_tokens=config.rollout.max_new_tokens or task.max_response_len,
    max_prompt_len=task.max_prompt_len,
    sampling=sp,
    **tasks_lib.rollout_eos(task.tokenizer),  # the one end-of-response rule (benches too)
    pad_id=task.tokenizer.pad_id,
    num_draft=resolve_num_draft(config, has_drafter),
  )


def adaptive_config(config: ml_collections.ConfigDict, has_drafter: bool):
  """AdaptiveConfig from the ``adaptive`` section (validated even when the static engine
  runs, so a typo never waits for the day adaptive is switched on). Without a drafter the
  policy is 'never' (compaction only)."""
  a = config.adaptive
  return config_lib.from_config(
    adaptive.AdaptiveConfig,
    a,
    'adaptive',
    ignore=ADAPTIVE_OTHER_KEYS,
    exclude=ADAPTIVE_NOT_IN_SECTION,
    policy=a.policy if has_drafter else 'never',
    seed=config.seed,
  )
