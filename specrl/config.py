"""One path from an ml_collections config section to a config dataclass.

Every static settings dataclass (``ModelConfig``, ``RLConfig``, ``SamplingParams``,
``RolloutConfig``, ``QuantConfig``, ``AdaptiveConfig``, ...) is built by
:func:`from_config`, which

- rejects a key of the section that is neither a field nor listed in ``ignore`` (keys that
  belong to another dataclass or to the loop), with a one-line error naming the section's
  valid keys;
- converts lists to tuples (ml_collections and the command line give lists; the
  dataclasses are hashable jit static arguments);
- lets the caller supply ``derived`` fields (values computed from other sections, e.g. the
  rollout's ``eos_id`` from the task), which take precedence over the section.

``configs/default.py`` lists every field that is read from a section, so every field can be
set from the command line (``--config.section.field=value``); ``tests/test_config.py`` checks
that the dataclass defaults equal the config file's values.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Mapping
from typing import Any, TypeVar

T = TypeVar('T')


def section_dict(section) -> dict[str, Any]:
  """A ConfigDict (or mapping) as a plain dict, nested ConfigDicts included."""
  if hasattr(section, 'to_dict'):
    return section.to_dict()
  return dict(section)


def _tuples(v):
  """Lists (at any depth) -> tuples, so the value is hashable."""
  if isinstance(v, list | tuple):
    return tuple(_tuples(x) for x in v)
  return v


def init_field_names(cls) -> list[str]:
  """Names of the dataclass fields a constructor accepts."""
  return [f.name for f in dataclasses.fields(cls) if f.init]


def check_keys(section, name: str, valid: Iterable[str]) -> None:
  """Raise ``ValueError('unknown key config.<name>.<key>; valid keys: ...')`` for the first
  key of ``section`` not in ``valid``."""
  valid = sorted(set(valid))
  prefix = f'config.{name}.' if name else 'config.'
  for key in sorted(section_dict(section)):
    if key not in valid:
      raise ValueError(f'unknown key {prefix}{key}; valid keys: {", ".join(valid)}')


def from_config(
  cls: type[T],
  section: Mapping | Any,
  name: str,
  *,
  ignore: Iterable[str] = (),
  exclude: Iterable[str] = (),
  **derived,
) -> T:
  """Build dataclass ``cls`` from config ``section`` (named ``config.<name>`` in errors).

  Args:
    cls: a dataclass type.
    section: an ml_collections ConfigDict (or mapping) of field values.
    name: dotted path of the section, e.g. ``'adaptive'`` or ``'drafter.quantized'``.
    ignore: keys of the section that are valid but not fields of ``cls`` (read elsewhere).
    exclude: fields of ``cls`` the section may not set (derived from other sections, or
      left at their defaults); they are not valid keys of the section.
    **derived: fields set by the caller; they override the section's value of the same key.

  Returns ``cls(**fields)``; the dataclass's own ``__post_init__`` validates the values.
  """
  fields = init_field_names(cls)
  check_keys(section, name, [*(set(fields) - set(exclude)), *ignore])
  bad = sorted(set(derived) - set(fields))
  if bad:
    raise TypeError(f'{cls.__name__} has no field(s) {bad}')
  ignored = set(ignore)
  kwargs = {k: _tuples(v) for k, v in section_dict(section).items() if k not in ignored}
  kwargs.update(derived)
  return cls(**kwargs)


def unknown_override(config, dotted: str) -> str | None:
  """One-line error for a command-line override ``config.<dotted>`` naming a key that is
  not in ``config`` (None if the path exists), e.g. ``unknown key config.rl.learning_rate;
  valid keys: aggregation, clip_eps, ...``."""
  node, walked = config, []
  for part in dotted.split('.'):
    keys = section_dict(node) if hasattr(node, 'to_dict') or isinstance(node, Mapping) else None
    if keys is None:
      where = 'config.' + '.'.join(walked)
      return f'config.{dotted}: {where} is a value, not a section'
    if part not in keys:
      where = '.'.join(['config', *walked, part])
      return f'unknown key {where}; valid keys: {", ".join(sorted(keys))}'
    node, walked = node[part], [*walked, part]
  return None


def config_overrides(argv, flag: str = 'config') -> list[str]:
  """The dotted paths overridden by ``--<flag>.a.b=v`` / ``--<flag>.a.b v`` in ``argv``."""
  prefix = f'--{flag}.'
  return [a[len(prefix) :].split('=', 1)[0] for a in argv if a.startswith(prefix)]
