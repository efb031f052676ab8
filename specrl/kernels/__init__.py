"""Pallas kernels (GPU via Triton, TPU via Mosaic; CPU via interpret mode)."""
