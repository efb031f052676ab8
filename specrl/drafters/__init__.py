"""Drafters for speculative rollouts, interchangeable by config (``rollout.drafter``).

- ``none``: plain decoding.
- ``self``: the policy drafts for itself (acceptance 1.0 -- an engine correctness check).
- ``small_model``: a separate small transformer sharing the tokenizer, from an HF
  checkpoint directory (``drafter.checkpoint``) or initialised from ``drafter.model``.
- ``ngram``: model-free prompt/response lookup.
- ``quantized``: an int8/int4 copy of the live policy (:mod:`specrl.drafters.quantized`).

See :mod:`specrl.drafters.base` for the protocol.
"""

from __future__ import annotations

import dataclasses

import jax

from specrl import model as model_lib
from specrl.drafters.base import Drafter
from specrl.drafters.model_drafter import ModelDrafter
from specrl.drafters.ngram import NgramDrafter

DRAFTERS = ('none', 'self', 'small_model', 'ngram', 'quantized')

__all__ = ['DRAFTERS', 'Drafter', 'ModelDrafter', 'NgramDrafter', 'make_drafter']


def make_drafter(config, model_cfg: model_lib.ModelConfig):
  """Drafter named by ``config.rollout.drafter`` (None for 'none')."""
  name = config.rollout.drafter
  if name not in DRAFTERS:
    raise ValueError(f'config.rollout.drafter must be one of {DRAFTERS}, got {name!r}')
  if name == 'none':
    return None
  if name == 'self':
    return ModelDrafter('self', model_cfg, derive=lambda p: p)
  if name == 'ngram':
    return NgramDrafter(model_cfg.vocab_size, config.drafter.ngram)
  if name == 'small_model':
    dc = config.drafter
    if dc.checkpoint:
      from specrl.checkpoints import hf

      dcfg, dparams = hf.load_hf_checkpoint(dc.checkpoint)
    else:
      dcfg = dataclasses.replace(model_cfg, **dict(dc.model))
      dparams = model_lib.init_params(dcfg, jax.random.key(config.seed + 1))
    if dcfg.vocab_size != model_cfg.vocab_size:
      raise ValueError(
        f'drafter vocab_size {dcfg.vocab_size} != policy vocab_size '
        f'{model_cfg.vocab_size}: a drafter must share the tokenizer'
      )
    return ModelDrafter('small_model', dcfg, own_params=dparams)
  from specrl.drafters import quantized

  return quantized.make_quantized_drafter(config, model_cfg)
