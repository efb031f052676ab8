"""Everything static a run needs, built from its config: the :class:`Experiment`.

One job: turn a validated config (:mod:`specrl.run_config`) into the objects the loop
uses -- the model and task, the meshes, the optimizer, the drafter (from the registry,
:mod:`specrl.drafters.registry`) and its trainer if it trains online, the rollout engine
and the run's RNG streams. Nothing here runs a step.
"""

from __future__ import annotations

import dataclasses

import jax
import ml_collections
import optax

from specrl import adaptive, async_rl, drafters
from specrl import model as model_lib
from specrl import multihost as mh
from specrl import rl as rl_lib
from specrl import rollout as rollout_lib
from specrl import run_config as run_config_lib
from specrl import tasks as tasks_lib
from specrl.checkpoints import pretrained as pretrained_lib
from specrl.decoding import executables
from specrl.drafters import hooks
from specrl.rng_streams import RngStreams, rng_streams


@dataclasses.dataclass
class Experiment:
  """Everything static that the loop needs, built (and validated) from a config."""

  config: ml_collections.ConfigDict
  model_cfg: model_lib.ModelConfig
  rl_cfg: rl_lib.RLConfig
  rollout_cfg: rollout_lib.RolloutConfig
  task: object
  mesh: jax.sharding.Mesh
  optimizer: optax.GradientTransformation
  drafter: object
  engine: object  # rollout.RolloutEngine or adaptive.AdaptiveRolloutEngine
  rngs: RngStreams  # independent rollout / train / drafter / eval key streams
  pretrained: object = None  # host params from config.model.checkpoint, or None
  async_cfg: async_rl.AsyncConfig = async_rl.AsyncConfig()
  rollout_mesh: jax.sharding.Mesh | None = None  # the engine's mesh (= mesh without a split)
  # the drafter's hooks.DrafterTrainer when it trains online (the eagle head), else None
  drafter_trainer: object = None

  def plain_engine(self) -> rollout_lib.RolloutEngine:
    """A static engine without a drafter on the train mesh, same sampling (a drafter
    trainer's warm-up rollouts)."""
    rcfg = dataclasses.replace(self.rollout_cfg, num_draft=0, max_draft=0)
    return rollout_lib.RolloutEngine(self.model_cfg, rcfg, self.mesh)


def check_process_split(config: ml_collections.ConfigDict, processes: int) -> None:
  """Start-up check (pure: the config and the process count) that what several processes
  split into equal blocks (:func:`specrl.multihost.process_rows`) divides: the GRPO
  prompts (each process's rows then a multiple of G) and the SFT batch; a ValueError naming
  the field and the values, before anything is built or dispatched. Evaluation chunks
  always divide (:func:`specrl.evaluation.chunk_sizes` rounds them up), and async RL's
  meshes are checked where they are made (:func:`specrl.async_rl.make_meshes`)."""
  for key, n in (
    ('rl.num_prompts', config.rl.num_prompts),
    ('sft.batch_size', config.sft.batch_size if config.sft.steps else 0),
  ):
    if n % processes:  # each process owns an equal block of prompts / rows
      raise ValueError(
        f'config.{key}={n} must be a multiple of the {processes} processes (each process '
        'owns an equal block of it)'
      )


def make_optimizer(config: ml_collections.ConfigDict) -> optax.GradientTransformation:
  """One optimizer for the whole run: linear warm-up to ``sft.lr`` over the supervised
  steps, then linear warm-up to ``rl.lr`` for GRPO."""
  schedule = optax.join_schedules(
    [
      optax.linear_schedule(0.0, config.sft.lr, max(config.sft.warmup_steps, 1)),
      optax.linear_schedule(0.0, config.rl.lr, max(config.rl.warmup_steps, 1)),
    ],
    boundaries=[config.sft.steps],
  )
  return rl_lib.make_optimizer(schedule, config.rl.weight_decay, config.rl.grad_clip)


def build_experiment(config: ml_collections.ConfigDict, mesh=None) -> Experiment:
  """Validates the whole config up front: a bad value fails here, naming the field."""
  run_config_lib.check_run_config(config)
  check_process_split(config, mh.process_count())
  executables.CACHE.set_limit(config.rollout.max_executables)  # process-wide
  streams = rng_streams(config.seed)
  model_cfg = model_lib.ModelConfig.from_config(config.model)
  pretrained = None
  if config.model.checkpoint:  # the architecture is the checkpoint's; dtypes are the config's
    model_cfg, pretrained = pretrained_lib.load_pretrained(
      config.model.checkpoint, model_cfg.param_dtype, model_cfg.compute_dtype
    )
  task = tasks_lib.make_task(config.task)
  if config.sft.steps > 0 and not hasattr(task, 'sample_sft'):
    raise ValueError(
      f'task {config.task.name} has no SFT data: set --config.sft.steps=0 '
      f'(it is {config.sft.steps})'
    )
  if task.tokenizer.vocab_size > model_cfg.vocab_size:
    raise ValueError(
      f'config.model.vocab_size={model_cfg.vocab_size} is smaller than the '
      f"task tokenizer's {task.tokenizer.vocab_size}"
    )
  sp = run_config_lib.sampling_params(config)
  rl_cfg = run_config_lib.rl_config(config, sp)
  drafter = drafters.make_drafter(config, model_cfg, streams.drafter)
  rollout_cfg = run_config_lib.rollout_config(config, task, sp, drafter is not None)
  async_cfg = async_rl.async_config(config)
  mesh, rollout_mesh = async_rl.make_meshes(async_cfg, config.mesh_shape, mesh)
  optimizer = make_optimizer(config)
  acfg = run_config_lib.adaptive_config(config, drafter is not None)
  if config.adaptive.enabled:
    engine = adaptive.AdaptiveRolloutEngine(model_cfg, rollout_cfg, acfg, drafter, rollout_mesh)
  else:
    engine = rollout_lib.RolloutEngine(model_cfg, rollout_cfg, rollout_mesh, drafter)
  exp = Experiment(
    config,
    model_cfg,
    rl_cfg,
    rollout_cfg,
    task,
    mesh,
    optimizer,
    drafter,
    engine,
    streams,
    pretrained,
    async_cfg,
    rollout_mesh,
  )
  exp.drafter_trainer = hooks.make_trainer(drafter, exp)  # may validate against the run
  return exp
