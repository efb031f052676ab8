"""specrl: RL post-training of language models with lossless speculative rollouts in JAX."""

__version__ = '0.1.0'
