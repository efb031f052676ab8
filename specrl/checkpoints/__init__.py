"""Checkpoint import/export: Hugging Face safetensors <-> the pure-function model pytree."""
