"""One entry point for a pretrained policy: a GGUF file or a Hugging Face directory.

``config.model.checkpoint`` names either; the architecture comes from the checkpoint (the
``model`` section's dtypes still apply) and the params start from its weights, unless the
workdir holds an orbax checkpoint of a run to resume, which wins (see
:func:`specrl.train.train_and_evaluate`). Nothing is downloaded: a path that is neither a
``.gguf`` file nor a directory with ``config.json`` is a clear error.
"""

from __future__ import annotations

import os

from specrl.checkpoints import gguf as gguf_lib
from specrl.checkpoints import hf_params
from specrl.model import ModelConfig, Params


def load_pretrained(
  path: str, dtype: str = 'float32', compute_dtype: str | None = None
) -> tuple[ModelConfig, Params]:
  """``(cfg, host params)`` from a ``.gguf`` file or an HF checkpoint directory."""
  if os.path.isfile(path) and path.endswith('.gguf'):
    return gguf_lib.load_gguf_checkpoint(path, dtype, compute_dtype=compute_dtype, to_device=False)
  if os.path.isdir(path) and os.path.isfile(os.path.join(path, 'config.json')):
    return hf_params.load_hf_checkpoint(path, dtype, compute_dtype=compute_dtype, to_device=False)
  raise FileNotFoundError(
    f'config.model.checkpoint={path!r} is neither a .gguf file nor a Hugging Face '
    'checkpoint directory (config.json + *.safetensors)'
  )
