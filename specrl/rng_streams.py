"""The run's independent randomness streams, derived once from ``config.seed``.

One job: every consumer of randomness in a run (initialisation, GRPO shuffles, rollouts,
drafter init, held-out evaluation, host-side prompt sampling) gets its keys from here, so
no stream's keys are derived from another's and a resumed run draws exactly what the
uninterrupted run would.
"""

from __future__ import annotations

import dataclasses

import jax
import numpy as np

# stream -> fold_in constant of the root key jax.random.key(config.seed). params and train
# keep the constants they always had, so initialisation and warm-up are unchanged.
STREAMS = {'params': 1, 'train': 2, 'rollout': 3, 'drafter': 4, 'eval': 5}


@dataclasses.dataclass(frozen=True)
class RngStreams:
  """Independent device-randomness streams, derived ONCE from ``config.seed``.

  Step ``t`` of a stream uses ``fold_in(stream, t)``; no stream's keys are derived from
  another's, so e.g. the GRPO minibatch shuffle (``train``: ``fold_in(fold_in(train, t),
  epoch)`` in :func:`specrl.rl.train_step`) never reuses a key the rollout derives from
  ``fold_in(rollout, t)`` (its prefill ``split`` and per-round ``fold_in``).

  - params: policy initialisation;  train: ``TrainState.rng`` (minibatch shuffles);
  - rollout: GRPO rollouts;  drafter: drafter init (small_model without a checkpoint);
  - eval: held-out evaluation rollouts, never shared with training.
  """

  params: jax.Array
  train: jax.Array
  rollout: jax.Array
  drafter: jax.Array
  eval: jax.Array


def rng_streams(seed) -> RngStreams:
  """The streams of :class:`RngStreams`: ``fold_in(key(seed), STREAMS[name])`` (pure;
  jittable). Distinct constants give distinct, independent keys."""
  root = jax.random.key(seed)
  return RngStreams(**{name: jax.random.fold_in(root, c) for name, c in STREAMS.items()})


def rollout_key(streams: RngStreams, step: int) -> jax.Array:
  """The key of the GRPO rollout at ``step``: step ``step`` of the rollout stream."""
  return jax.random.fold_in(streams.rollout, step)


def data_rng(seed: int, step: int) -> np.random.Generator:
  """Host randomness of step ``step`` (prompts, SFT batches): a pure function of both."""
  return np.random.default_rng([seed, step])
