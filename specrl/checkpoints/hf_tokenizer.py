"""Hugging Face tokenizer loading with the special ids RL rollouts need (EOS set, pad, BOS).

Why this is its own module: it needs the optional ``tokenizers`` package and nothing from the
tensor side, so tasks can load a tokenizer without touching safetensors or the model.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
from typing import Any

import jinja2
import jinja2.sandbox

from specrl.faults import DataError


@functools.lru_cache(maxsize=8)
def _compiled_chat_template(source: str) -> jinja2.Template:
  """Compile a chat template the way transformers does (sandboxed, trimmed blocks)."""

  def raise_exception(message):
    raise jinja2.exceptions.TemplateError(message)

  env = jinja2.sandbox.ImmutableSandboxedEnvironment(
    trim_blocks=True, lstrip_blocks=True, extensions=['jinja2.ext.loopcontrols']
  )
  env.filters['tojson'] = lambda x, indent=None: json.dumps(x, ensure_ascii=False, indent=indent)
  env.globals['raise_exception'] = raise_exception
  return env.from_string(source)


@dataclasses.dataclass(frozen=True)
class HFTokenizer:
  """Thin wrapper over a ``tokenizers.Tokenizer`` with the special ids RL rollouts need.

  ``encode`` does *not* add special tokens by default: prompts are usually rendered from a
  chat template that already contains BOS, and a double BOS silently shifts the
  distribution. Prepend ``bos_id`` yourself when a raw-text prompt needs it.

  ``eos_ids`` is every id that ends generation (tokenizer_config eos plus all of
  generation_config's ``eos_token_id``, e.g. Llama-3-Instruct's ``<|eot_id|>``);
  ``eos_id`` is the primary one. ``pad_id``/``bos_id`` are None when the checkpoint does not
  define them. ``chat_template`` is the Jinja source (``tokenizer_config.json``'s
  ``chat_template`` or a GGUF's ``tokenizer.chat_template``), None when absent.
  """

  tokenizer: Any
  eos_id: int | None
  pad_id: int | None
  bos_id: int | None
  eos_ids: tuple[int, ...]
  chat_template: str | None = None

  def apply_chat_template(
    self, messages: list[dict], add_generation_prompt: bool = True, **kwargs
  ) -> str:
    """Render ``[{'role': ..., 'content': ...}, ...]`` with the chat template (to text;
    ``encode`` it). Raises ValueError when the tokenizer has no template."""
    if not self.chat_template:
      raise ValueError('this tokenizer has no chat template')

    def token(i):
      return None if i is None else self.tokenizer.id_to_token(i)

    return _compiled_chat_template(self.chat_template).render(
      messages=messages,
      add_generation_prompt=add_generation_prompt,
      bos_token=token(self.bos_id) or '',
      eos_token=token(self.eos_id) or '',
      **kwargs,
    )

  def save_pretrained(self, path: str) -> None:
    """Write ``tokenizer.json``, ``tokenizer_config.json`` (special tokens, chat template)
    and ``generation_config.json`` (every EOS id) so :func:`load_tokenizer` and transformers
    read the same tokenizer back."""
    os.makedirs(path, exist_ok=True)
    self.tokenizer.save(os.path.join(path, 'tokenizer.json'))
    tcfg = {'tokenizer_class': 'PreTrainedTokenizerFast', 'clean_up_tokenization_spaces': False}
    for field, tid in (('bos_token', self.bos_id), ('eos_token', self.eos_id)):
      if tid is not None:
        tcfg[field] = self.tokenizer.id_to_token(tid)
    if self.pad_id is not None:
      tcfg['pad_token'] = self.tokenizer.id_to_token(self.pad_id)
    if self.chat_template:
      tcfg['chat_template'] = self.chat_template
    with open(os.path.join(path, 'tokenizer_config.json'), 'w') as f:
      json.dump(tcfg, f, indent=2, ensure_ascii=False)
    gcfg = {'eos_token_id': list(self.eos_ids)}
    if self.bos_id is not None:
      gcfg['bos_token_id'] = self.bos_id
    if self.pad_id is not None:
      gcfg['pad_token_id'] = self.pad_id
    with open(os.path.join(path, 'generation_config.json'), 'w') as f:
      json.dump(gcfg, f, indent=2)

  def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
    return list(self.tokenizer.encode(text, add_special_tokens=add_special_tokens).ids)

  def decode(self, ids, skip_special_tokens: bool = False) -> str:
    return self.tokenizer.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)

  def token_to_id(self, token: str) -> int | None:
    return self.tokenizer.token_to_id(token)

  @property
  def vocab_size(self) -> int:
    return self.tokenizer.get_vocab_size(with_added_tokens=True)


def _read_json(path: str) -> dict:
  if not os.path.exists(path):
    return {}
  with open(path) as f:
    return json.load(f)


def _token_content(v) -> str | None:
  """tokenizer_config stores special tokens as a string or an AddedToken dict."""
  if isinstance(v, dict):
    return v.get('content')
  return v


def load_tokenizer(path: str) -> HFTokenizer:
  """Load ``tokenizer.json`` (+ special tokens from ``tokenizer_config.json``,
  ``special_tokens_map.json`` and ``generation_config.json``) from a checkpoint directory.

  Requires the HF ``tokenizers`` package (imported lazily so the rest of specrl does not).
  """
  try:
    from tokenizers import Tokenizer
  except ImportError as e:
    raise ImportError(
      'load_tokenizer needs the Hugging Face tokenizers package: pip install tokenizers'
    ) from e
  tok_file = os.path.join(path, 'tokenizer.json')
  if not os.path.isfile(tok_file):
    raise DataError(f'tokenizer file {tok_file} not found (no tokenizer.json in {path!r})')
  try:
    tok = Tokenizer.from_file(tok_file)
  except Exception as e:  # noqa: BLE001 - the tokenizers library raises plain Exception
    first = (str(e).splitlines() or [''])[0]
    raise DataError(f'tokenizer file {tok_file} cannot be read: {first}') from e
  tcfg = _read_json(os.path.join(path, 'tokenizer_config.json'))
  smap = _read_json(os.path.join(path, 'special_tokens_map.json'))
  gcfg = _read_json(os.path.join(path, 'generation_config.json'))

  def special(field: str) -> int | None:
    for src, fname in ((tcfg, 'tokenizer_config.json'), (smap, 'special_tokens_map.json')):
      content = _token_content(src.get(field))
      if content is not None:
        tid = tok.token_to_id(content)
        if tid is None:
          raise ValueError(f'{fname} {field}={content!r} is not in tokenizer.json')
        return int(tid)
    gid = gcfg.get(f'{field}_id')
    if isinstance(gid, list):
      gid = gid[0] if gid else None
    return None if gid is None else int(gid)

  eos_id = special('eos_token')
  gen_eos = gcfg.get('eos_token_id')
  gen_eos = [] if gen_eos is None else gen_eos if isinstance(gen_eos, list) else [gen_eos]
  eos_ids = tuple(dict.fromkeys([i for i in [eos_id, *gen_eos] if i is not None]))
  return HFTokenizer(
    tokenizer=tok,
    eos_id=eos_id,
    pad_id=special('pad_token'),
    bos_id=special('bos_token'),
    eos_ids=tuple(int(i) for i in eos_ids),
    chat_template=_chat_template(path, tcfg),
  )


def _chat_template(path: str, tcfg: dict) -> str | None:
  """``chat_template.jinja`` (newer transformers) or ``tokenizer_config.json``'s field."""
  jinja_file = os.path.join(path, 'chat_template.jinja')
  if os.path.isfile(jinja_file):
    with open(jinja_file) as f:
      return f.read()
  template = tcfg.get('chat_template')
  if isinstance(template, list):  # named templates: [{'name': 'default', 'template': ...}]
    named = {t.get('name'): t.get('template') for t in template}
    template = named.get('default', next(iter(named.values()), None))
  return template
