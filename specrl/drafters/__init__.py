"""Drafters for speculative rollouts, interchangeable by config (``rollout.drafter``).

- ``none``: plain decoding.
- ``self``: the policy drafts for itself (acceptance 1.0 -- an engine correctness check).
- ``small_model``: a separate small transformer sharing the tokenizer, from an HF
  checkpoint directory (``drafter.small_model.checkpoint``) or initialised from the drafter
  RNG stream with the architecture ``drafter.small_model.model`` (overrides of ``model``).
- ``ngram``: model-free prompt/response lookup (``drafter.ngram.n``).
- ``suffix``: model-free lookup in the group's sibling answers (and earlier answers to
  the same prompt): :mod:`specrl.drafters.suffix` (``drafter.suffix.*``); with
  ``drafter.suffix.fallback = 'quantized'`` the hybrid of :mod:`specrl.drafters.hybrid`
  (rows without a match draft with the quantized self-drafter).
- ``quantized``: an int8/int4 copy of the live policy (``drafter.quantized.*``,
  :mod:`specrl.drafters.quantized`).
- ``eagle``: an EAGLE-style head on the live policy's hidden states (``drafter.eagle.*``,
  :mod:`specrl.drafters.eagle`).

Each drafter reads only its own section ``config.drafter.<name>``; the sections of the
other drafters are ignored. See :mod:`specrl.drafters.base` for the protocol.
"""

from __future__ import annotations

import dataclasses

import jax

from specrl import config as config_lib
from specrl import model as model_lib
from specrl import sharding as shd
from specrl.checkpoints import hf
from specrl.drafters import eagle, hybrid, quantized
from specrl.drafters.base import Drafter
from specrl.drafters.hybrid import HybridSuffixDrafter
from specrl.drafters.model_drafter import ModelDrafter
from specrl.drafters.ngram import NgramDrafter
from specrl.drafters.suffix import SuffixDrafter

DRAFTERS = ('none', 'self', 'small_model', 'ngram', 'suffix', 'quantized', 'eagle')

__all__ = [
  'DRAFTERS',
  'Drafter',
  'HybridSuffixDrafter',
  'ModelDrafter',
  'NgramDrafter',
  'SuffixDrafter',
  'make_drafter',
  'place_draft_params',
]


def place_draft_params(drafter, draft_params, mesh):
  """Draft params on ``mesh``, ready to be jit arguments of the rollout's steps.

  Derived params (``self``, ``quantized``) come out of jitted functions of the policy
  params and are on the mesh already (leaves that are not, e.g. history arrays next to
  them, are replicated). A drafter's own params (``small_model``) are loaded
  or initialised on one device: they get the policy's sharding rules (``PARAM_RULES``)
  applied to their own architecture, like the policy's params.
  """
  if drafter is None or draft_params is None:
    return draft_params
  devices = set(mesh.devices.flat)

  def placed(x):
    return getattr(x, 'sharding', None) is not None and x.sharding.device_set == devices

  leaves = jax.tree.leaves(draft_params)
  if all(placed(x) for x in leaves):
    return draft_params
  cfg = getattr(drafter, 'cfg', None)
  if not drafter.derived and cfg is not None:
    axes = model_lib.param_logical_axes(cfg)
    return jax.device_put(
      draft_params, shd.tree_shardings(axes, draft_params, mesh, shd.PARAM_RULES)
    )
  # derived leaves stay as the jitted derivation sharded them; the rest (e.g. the hybrid
  # suffix drafter's history arrays, made on the host) are replicated
  rep = shd.replicated(mesh)
  return jax.tree.map(lambda x: x if placed(x) else jax.device_put(x, rep), draft_params)


def _small_model(section, model_cfg: model_lib.ModelConfig, rng) -> ModelDrafter:
  config_lib.check_keys(section, 'drafter.small_model', ('model', 'checkpoint'))
  if section.checkpoint:
    dcfg, dparams = hf.load_hf_checkpoint(section.checkpoint)
  else:
    overrides = config_lib.section_dict(section.model)
    config_lib.check_keys(
      overrides, 'drafter.small_model.model', config_lib.init_field_names(model_lib.ModelConfig)
    )
    dcfg = dataclasses.replace(model_cfg, **overrides)
    dparams = model_lib.init_params(dcfg, rng)
  if dcfg.vocab_size != model_cfg.vocab_size:
    raise ValueError(
      f'drafter vocab_size {dcfg.vocab_size} != policy vocab_size '
      f'{model_cfg.vocab_size}: a drafter must share the tokenizer'
    )
  return ModelDrafter('small_model', dcfg, own_params=dparams)


SUFFIX_KEYS = ('n_min', 'n_max', 'history', 'history_prompts', 'max_group', 'fallback')


def _suffix(config, model_cfg: model_lib.ModelConfig):
  """``suffix``, or the hybrid with ``drafter.suffix.fallback`` (one of ``FALLBACKS``;
  the fallback reads its own section, e.g. ``drafter.quantized``)."""
  section = config.drafter.suffix
  config_lib.check_keys(section, 'drafter.suffix', SUFFIX_KEYS)
  if section.fallback and section.fallback not in hybrid.FALLBACKS:
    raise ValueError(
      f'drafter.suffix.fallback={section.fallback!r}: must be one of '
      f"{('',) + hybrid.FALLBACKS} ('' = no fallback)"
    )
  suffix = SuffixDrafter(
    model_cfg.vocab_size,
    n_min=section.n_min,
    n_max=section.n_max,
    history=section.history,
    history_prompts=section.history_prompts,
    max_group=section.max_group,
  )
  if not section.fallback:
    return suffix
  fallback = quantized.make_quantized_drafter(config.drafter.quantized, model_cfg)
  return hybrid.HybridSuffixDrafter(suffix, fallback)


def make_drafter(config, model_cfg: model_lib.ModelConfig, rng=None):
  """Drafter named by ``config.rollout.drafter`` (None for 'none').

  ``rng``: the drafter RNG stream (initialises a ``small_model`` without a checkpoint);
  defaults to ``jax.random.key(config.seed)``.
  """
  name = config.rollout.drafter
  if name not in DRAFTERS:
    raise ValueError(f'config.rollout.drafter must be one of {DRAFTERS}, got {name!r}')
  config_lib.check_keys(
    config.drafter, 'drafter', ('ngram', 'suffix', 'small_model', 'quantized', 'eagle')
  )
  if name == 'none':
    return None
  if name == 'self':
    return ModelDrafter('self', model_cfg, derive=lambda p: p)
  if name == 'ngram':
    config_lib.check_keys(config.drafter.ngram, 'drafter.ngram', ('n',))
    return NgramDrafter(model_cfg.vocab_size, config.drafter.ngram.n)
  if name == 'suffix':
    return _suffix(config, model_cfg)
  if name == 'small_model':
    rng = jax.random.key(config.seed) if rng is None else rng
    return _small_model(config.drafter.small_model, model_cfg, rng)
  if name == 'eagle':
    rng = jax.random.key(config.seed) if rng is None else rng
    return eagle.make_eagle_drafter(config.drafter.eagle, model_cfg, rng)
  return quantized.make_quantized_drafter(config.drafter.quantized, model_cfg)
