"""The tokenizer stored in a GGUF file's metadata, as a ``tokenizers.Tokenizer``.

Why this exists: a GGUF file carries its own vocabulary (``tokenizer.ggml.tokens``), BPE merges,
token types, special ids, chat template and the *name* of its pre-tokenizer
(``tokenizer.ggml.pre``), but not the split rules themselves: llama.cpp hard-codes a regex per
name. We rebuild the same tokenizer that HF's ``tokenizer.json`` describes, so GGUF and HF
directories share one interface (:class:`specrl.checkpoints.hf_tokenizer.HFTokenizer`), and
refuse names whose rules we have not transcribed rather than silently splitting text
differently from the model's training.

Only byte-level BPE (``tokenizer.ggml.model == 'gpt2'``) is supported; SentencePiece GGUFs
(``'llama'``) are refused.
"""

from __future__ import annotations

import gguf
from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers, processors

from specrl.checkpoints.gguf_file import GGUFFileError, open_gguf, reader_path
from specrl.checkpoints.hf_tokenizer import HFTokenizer

# llama.cpp's split regexes (src/llama-vocab.cpp), as HF's tokenizer.json writes them.
_LLAMA3_SPLIT = (
  r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
  r'|\s*[\r\n]+|\s+(?!\S)|\s+'
)
_QWEN2_SPLIT = (
  r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
  r'|\s*[\r\n]+|\s+(?!\S)|\s+'
)


def _gpt2():
  return [pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)]


def _digits_then_gpt2():
  return [pre_tokenizers.Digits(individual_digits=True), *_gpt2()]


def _split_then_bytes(pattern: str):
  def build():
    return [
      pre_tokenizers.Split(Regex(pattern), behavior='isolated', invert=False),
      pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ]

  return build


# tokenizer.ggml.pre -> (pre-tokenizer builder, BPE ignore_merges).
KNOWN_PRE_TOKENIZERS = {
  'gpt-2': (_gpt2, False),
  'smollm': (_digits_then_gpt2, False),
  'starcoder': (_digits_then_gpt2, False),
  'refact': (_digits_then_gpt2, False),
  'llama-bpe': (_split_then_bytes(_LLAMA3_SPLIT), True),
  'llama3': (_split_then_bytes(_LLAMA3_SPLIT), True),
  'qwen2': (_split_then_bytes(_QWEN2_SPLIT), False),
}

# GGUF token types (gguf.TokenType): 3 = CONTROL (special), 4 = USER_DEFINED (added).
_CONTROL, _USER_DEFINED = 3, 4

# End-of-turn tokens that end an assistant response when the chat template uses them.
_END_OF_TURN_TOKENS = ('<|im_end|>', '<|eot_id|>', '<|end|>', '<end_of_turn>', '<|endofturn|>')


def gguf_field_value(field):
  """A ``gguf.ReaderField`` as a Python value (str, int, float, bool or list of those).

  Written against ``parts``/``data``/``types`` (present in every gguf-py release) rather
  than ``ReaderField.contents`` (newer releases only).
  """
  if not field.types:
    return None
  main = field.types[0]
  if main == gguf.GGUFValueType.ARRAY:
    if field.types[-1] == gguf.GGUFValueType.STRING:
      return [bytes(field.parts[i]).decode('utf-8') for i in field.data]
    return [field.parts[i].tolist()[0] for i in field.data]
  if main == gguf.GGUFValueType.STRING:
    return bytes(field.parts[field.data[0]]).decode('utf-8')
  return field.parts[field.data[0]].tolist()[0]


def reader_field_value(reader: gguf.GGUFReader, key: str, default=None):
  """:func:`gguf_field_value` of ``reader.fields[key]`` (``default`` when absent); a string
  that is not UTF-8 (a corrupted file) is a :class:`GGUFFileError` naming the file and key."""
  field = reader.fields.get(key)
  if field is None:
    return default
  try:
    return gguf_field_value(field)
  except UnicodeDecodeError as e:
    raise GGUFFileError(
      f'{reader_path(reader)}: corrupted GGUF file: metadata {key!r} is not UTF-8 ({e})'
    ) from None


def tokenizer_from_gguf(source) -> HFTokenizer:
  """Build the byte-level BPE tokenizer, special ids and chat template of a GGUF file.

  Args:
    source: a ``.gguf`` path or an open ``gguf.GGUFReader``.

  Returns:
    :class:`HFTokenizer` whose ``eos_ids`` hold ``eos``/``eot``/``eom`` ids and the chat
    template's end-of-turn token (e.g. ``<|im_end|>``), so a chat response ends on it.

  Raises:
    ValueError naming the metadata key for a missing vocabulary, a non-BPE tokenizer model or
    an unknown pre-tokenizer name; :class:`~specrl.checkpoints.gguf_file.GGUFFileError`
    naming the file for an empty, truncated or corrupted one.
  """
  reader = source if isinstance(source, gguf.GGUFReader) else open_gguf(source)

  def get(key, default=None):
    return reader_field_value(reader, key, default)

  model = get('tokenizer.ggml.model')
  if model != 'gpt2':
    raise ValueError(
      f'GGUF tokenizer.ggml.model={model!r} is not supported (only byte-level BPE, "gpt2")'
    )
  pre = get('tokenizer.ggml.pre')
  if pre not in KNOWN_PRE_TOKENIZERS:
    raise ValueError(
      f'GGUF tokenizer.ggml.pre={pre!r} is not a known pre-tokenizer, so its split rules are '
      f'unknown; known: {sorted(KNOWN_PRE_TOKENIZERS)}'
    )
  tokens = get('tokenizer.ggml.tokens')
  merges = get('tokenizer.ggml.merges')
  if not tokens or merges is None:
    raise ValueError('GGUF metadata lacks tokenizer.ggml.tokens or tokenizer.ggml.merges')
  types = get('tokenizer.ggml.token_type') or [1] * len(tokens)
  if len(types) != len(tokens):
    raise ValueError(
      f'GGUF tokenizer.ggml.token_type has {len(types)} entries for {len(tokens)} tokens'
    )
  build_pre, ignore_merges = KNOWN_PRE_TOKENIZERS[pre]
  try:
    bpe = models.BPE(
      vocab={t: i for i, t in enumerate(tokens)},
      merges=[tuple(m.split(' ', 1)) for m in merges],
      ignore_merges=ignore_merges,
    )
  except Exception as e:  # tokenizers raises a bare Exception (or a TypeError) here
    msg = ' '.join(str(e).split())
    raise GGUFFileError(
      f'{reader_path(reader)}: corrupted GGUF tokenizer: tokenizer.ggml.tokens and '
      f'tokenizer.ggml.merges do not form a BPE vocabulary ({msg})'
    ) from e
  tok = Tokenizer(bpe)
  tok.pre_tokenizer = pre_tokenizers.Sequence(build_pre())
  tok.decoder = decoders.ByteLevel()
  typed = list(zip(tokens, types, strict=True))
  tok.add_special_tokens(
    [AddedToken(t, special=True, normalized=False) for t, y in typed if y == _CONTROL]
  )
  tok.add_tokens([AddedToken(t, normalized=False) for t, y in typed if y == _USER_DEFINED])

  def special(name):
    v = get(f'tokenizer.ggml.{name}_token_id')
    return None if v is None else int(v)

  bos_id, eos_id = special('bos'), special('eos')
  if get('tokenizer.ggml.add_bos_token', False) and bos_id is not None:
    tok.post_processor = processors.TemplateProcessing(
      single=f'{tokens[bos_id]} $A',
      pair=f'{tokens[bos_id]} $A {tokens[bos_id]} $B',
      special_tokens=[(tokens[bos_id], bos_id)],
    )
  else:
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
  template = get('tokenizer.chat_template')
  turn_ends = [
    tok.token_to_id(t)
    for t in _END_OF_TURN_TOKENS
    if template and t in template and tok.token_to_id(t) is not None
  ]
  eos_ids = [eos_id, special('eot'), special('eom'), *turn_ends]
  eos_ids = tuple(dict.fromkeys(int(i) for i in eos_ids if i is not None))
  return HFTokenizer(
    tokenizer=tok,
    eos_id=eos_id if eos_id is not None else (eos_ids[0] if eos_ids else None),
    pad_id=special('padding'),
    bos_id=bos_id,
    eos_ids=eos_ids,
    chat_template=template,
  )
