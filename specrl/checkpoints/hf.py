"""Hugging Face checkpoints (Llama / Mistral / Qwen2 / Qwen3) <-> :mod:`specrl.model` params.

The one import for callers (``from specrl.checkpoints import hf``). The work is split by job:

- :mod:`specrl.checkpoints.hf_config`: ``config.json`` <-> :class:`specrl.model.ModelConfig`,
  refusing any architecture feature the model does not implement;
- :mod:`specrl.checkpoints.safetensors_io`: safetensors headers, a raw bf16-capable reader,
  shard indexes and (sharded) writes, with no knowledge of the model;
- :mod:`specrl.checkpoints.hf_params`: HF tensor names/layouts <-> our params tree, validated
  from headers before any data is read; load, export and save;
- :mod:`specrl.checkpoints.hf_tokenizer`: ``tokenizer.json`` + special ids (EOS set, pad, BOS).
"""

from specrl.checkpoints.hf_config import SUPPORTED_MODEL_TYPES, config_from_hf, config_to_hf
from specrl.checkpoints.hf_params import hf_state_dict, load_hf_checkpoint, save_hf_checkpoint
from specrl.checkpoints.hf_tokenizer import HFTokenizer, load_tokenizer
from specrl.checkpoints.safetensors_io import read_safetensors_raw

__all__ = [
  'SUPPORTED_MODEL_TYPES',
  'HFTokenizer',
  'config_from_hf',
  'config_to_hf',
  'hf_state_dict',
  'load_hf_checkpoint',
  'load_tokenizer',
  'read_safetensors_raw',
  'save_hf_checkpoint',
]
