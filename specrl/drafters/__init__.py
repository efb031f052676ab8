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
other drafters are ignored. The list of drafters, their factories and config sections is
:mod:`specrl.drafters.registry`; what each can do is declared through the protocol
(:mod:`specrl.drafters.base`, :mod:`specrl.drafters.hooks`).
"""

from __future__ import annotations

import jax
import numpy as np

from specrl import model as model_lib
from specrl import sharding as shd
from specrl.drafters import registry
from specrl.drafters.base import Drafter
from specrl.drafters.hybrid import HybridSuffixDrafter
from specrl.drafters.model_drafter import ModelDrafter
from specrl.drafters.ngram import NgramDrafter
from specrl.drafters.registry import make_drafter
from specrl.drafters.suffix import SuffixDrafter

__all__ = [
  'Drafter',
  'HybridSuffixDrafter',
  'ModelDrafter',
  'NgramDrafter',
  'SuffixDrafter',
  'make_drafter',
  'names',
  'place_draft_params',
  'registry',
]

names = registry.names  # every accepted rollout.drafter value, 'none' included


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
  # (host values: the same on every process, so a replicated global array is well defined)
  return jax.tree.map(
    lambda x: x if placed(x) else jax.device_put(np.asarray(x), rep), draft_params
  )
