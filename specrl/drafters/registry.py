"""The drafter registry: drafter name -> factory, config section and one line of docs.

One job: the single list of drafters. ``config.rollout.drafter`` accepts exactly the
registered names (plus ``'none'``); ``config.drafter`` has exactly one section per
registered drafter that has options (:func:`default_sections`, which ``configs/default.py``
uses); the README's drafter table is :func:`docs_table`. What a drafter *can do* is not
recorded here: the train loop and the engines ask the drafter itself through the protocol
(:mod:`specrl.drafters.base`, :mod:`specrl.drafters.hooks`).

Adding a drafter = one module (the protocol) + one :func:`register` call with its factory
and config section. A drafter defined outside ``specrl`` (a notebook, a test file) registers
the same way and runs through both engines and the train loop.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import ml_collections

from specrl import config as config_lib
from specrl import model as model_lib
from specrl.checkpoints import hf
from specrl.drafters import eagle, eagle_train, hybrid, quantized
from specrl.drafters.model_drafter import ModelDrafter
from specrl.drafters.ngram import NgramDrafter
from specrl.drafters.suffix import SuffixDrafter

NONE = 'none'  # plain decoding: not a drafter, always accepted by rollout.drafter


@dataclasses.dataclass(frozen=True)
class DrafterEntry:
  """A registered drafter.

  ``build(config, model_cfg, rng) -> drafter``: from the whole run config (a drafter reads
  ``config.drafter.<name>``, and may read another drafter's section, e.g. the hybrid's
  fallback), the policy's ``ModelConfig`` and the drafter RNG stream key.
  ``section() -> ConfigDict | None``: the default options, ``config.drafter.<name>`` (None:
  the drafter has none). ``summary``: the docs table's line; ``module``: where it lives.
  ``reads(config) -> names``: the sections of ``config.drafter`` the drafter reads when it
  is chosen (None: its own, if it has one), so an override of another section, which
  would do nothing, can be refused (:func:`sections_read`).
  """

  name: str
  build: Callable[[ml_collections.ConfigDict, model_lib.ModelConfig, Any], Any]
  section: Callable[[], ml_collections.ConfigDict] | None
  summary: str
  module: str
  reads: Callable[[ml_collections.ConfigDict], tuple[str, ...]] | None = None


_REGISTRY: dict[str, DrafterEntry] = {}


def register(entry: DrafterEntry, replace: bool = False) -> DrafterEntry:
  """Add ``entry`` (a name already taken is refused unless ``replace``)."""
  if entry.name == NONE or (entry.name in _REGISTRY and not replace):
    raise ValueError(f'drafter name {entry.name!r} is already registered')
  _REGISTRY[entry.name] = entry
  return entry


def unregister(name: str) -> None:
  _REGISTRY.pop(name, None)


def names() -> tuple[str, ...]:
  """Every value ``config.rollout.drafter`` accepts: ``'none'`` and the registered names."""
  return (NONE, *_REGISTRY)


def entry(name: str) -> DrafterEntry:
  if name not in _REGISTRY:
    raise ValueError(f'config.rollout.drafter must be one of {names()}, got {name!r}')
  return _REGISTRY[name]


def sections_read(config: ml_collections.ConfigDict) -> tuple[str, ...]:
  """The sections of ``config.drafter`` the run's drafter (``config.rollout.drafter``) reads;
  () for plain decoding."""
  name = config.rollout.drafter
  if name == NONE:
    return ()
  e = entry(name)
  if e.reads is not None:
    return e.reads(config)
  return (name,) if e.section is not None else ()


def default_sections() -> ml_collections.ConfigDict:
  """``config.drafter``: one section of default options per registered drafter that has
  options (each read only when its drafter is chosen)."""
  return ml_collections.ConfigDict(
    {e.name: e.section() for e in _REGISTRY.values() if e.section is not None}
  )


def make_drafter(config: ml_collections.ConfigDict, model_cfg: model_lib.ModelConfig, rng=None):
  """The drafter named by ``config.rollout.drafter`` (None for ``'none'``).

  Every section of ``config.drafter`` must belong to a registered drafter (a typo is refused
  listing them), whichever drafter is chosen. ``rng``: the drafter RNG stream (initialises a
  model drafter without a checkpoint); defaults to ``jax.random.key(config.seed)``.
  """
  name = config.rollout.drafter
  if name != NONE:
    entry(name)  # refuses an unknown name, listing the valid ones
  sections = tuple(e.name for e in _REGISTRY.values() if e.section is not None)
  config_lib.check_keys(config.drafter, 'drafter', sections)
  if name == NONE:
    return None
  rng = jax.random.key(config.seed) if rng is None else rng
  return _REGISTRY[name].build(config, model_cfg, rng)


def docs_table() -> str:
  """The README's drafter table (markdown), from the registry."""
  rows = ['| `rollout.drafter` | options | module | what |', '| --- | --- | --- | --- |']
  rows.append(f'| `{NONE}` | | | plain decoding |')
  for e in _REGISTRY.values():
    opts = '' if e.section is None else f'`drafter.{e.name}.*`'
    rows.append(f'| `{e.name}` | {opts} | `{e.module}` | {e.summary} |')
  return '\n'.join(rows)


# ----------------------------------------------------------------------------- built-ins


def _self(config, model_cfg, rng):
  return ModelDrafter('self', model_cfg, derive=lambda p: p)


def _small_model(config, model_cfg, rng):
  section = config.drafter.small_model
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


def _small_model_section():
  return ml_collections.ConfigDict(
    dict(
      # architecture overrides of the policy's model section (vocab must match)
      model=ml_collections.ConfigDict(
        dict(d_model=64, n_layers=1, n_heads=2, n_kv_heads=1, head_dim=32, d_ff=128)
      ),
      checkpoint='',  # HF checkpoint directory; '' = random init from the drafter stream
    )
  )


def _ngram(config, model_cfg, rng):
  config_lib.check_keys(config.drafter.ngram, 'drafter.ngram', ('n',))
  return NgramDrafter(model_cfg.vocab_size, config.drafter.ngram.n)


SUFFIX_KEYS = ('n_min', 'n_max', 'history', 'history_prompts', 'max_group', 'fallback')


def _suffix(config, model_cfg, rng):
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


def _suffix_reads(config) -> tuple[str, ...]:
  """The hybrid's fallback reads its own section too (``drafter.suffix.fallback``)."""
  fallback = config.drafter.suffix.get('fallback', '')
  return ('suffix', fallback) if fallback else ('suffix',)


def _suffix_section():
  return ml_collections.ConfigDict(
    dict(
      n_min=2,  # shortest suffix match that is drafted from (shorter: row not drafted)
      n_max=8,  # longest suffix matched
      history=0,  # earlier answers kept per prompt id and drafted from (0 = siblings only)
      history_prompts=4096,  # at most this many prompt ids in the history store
      max_group=16,  # rows of a group drafted from (>= rl.num_generations to see all)
      fallback='',  # '' | quantized: drafter of rows without a match (drafter.quantized)
    )
  )


def _quantized_section():
  # every field of specrl.quant.QuantConfig, plus share_kv
  return ml_collections.ConfigDict(
    dict(
      bits=8,  # 8 | 4
      group_size=0,  # 0 = auto (int4: largest divisor of each K <= 128; int8: per channel)
      backend='jnp',  # jnp | aqt | qwix
      quantize_embeddings=False,
      quantize_lm_head=False,
      act_bits=0,  # 0 = weight-only | 8
      fp8='',  # '' | e4m3
      scale_dtype='float32',
      share_kv=False,  # read the policy's KV cache instead of keeping a second one
    )
  )


def _eagle_section():
  # every field of specrl.drafters.eagle.EagleConfig (documented there)
  return ml_collections.ConfigDict(dataclasses.asdict(eagle.EagleConfig()))


def _quantized(config, model_cfg, rng):
  return quantized.make_quantized_drafter(config.drafter.quantized, model_cfg)


def _eagle(config, model_cfg, rng):
  section = config.drafter.eagle
  return eagle.make_eagle_drafter(section, model_cfg, rng, cls=eagle_train.OnlineEagleDrafter)


_MODEL_DRAFTER = 'specrl/drafters/model_drafter.py'
register(
  DrafterEntry(
    'self',
    _self,
    None,
    'the policy drafts for itself (acceptance 1: an engine check)',
    _MODEL_DRAFTER,
  )
)
register(
  DrafterEntry(
    'small_model',
    _small_model,
    _small_model_section,
    'a separate small transformer sharing the tokenizer (HF checkpoint or random init)',
    _MODEL_DRAFTER,
  )
)
register(
  DrafterEntry(
    'ngram',
    _ngram,
    lambda: ml_collections.ConfigDict(dict(n=2)),
    'model-free prompt / response lookup of the last n tokens',
    'specrl/drafters/ngram.py',
  )
)
register(
  DrafterEntry(
    'suffix',
    _suffix,
    _suffix_section,
    "model-free lookup in the GRPO group's sibling answers and earlier answers to the same "
    'prompt; with `fallback`, the hybrid',
    'specrl/drafters/suffix.py',
    reads=_suffix_reads,
  )
)
register(
  DrafterEntry(
    'quantized',
    _quantized,
    _quantized_section,
    'int8 / int4 / fp8 copy of the live policy, re-derived in the train step',
    'specrl/drafters/quantized.py',
  )
)
register(
  DrafterEntry(
    'eagle',
    _eagle,
    _eagle_section,
    "EAGLE-style head on the policy's hidden states, trained online",
    'specrl/drafters/eagle.py',
  )
)
