"""The adaptive engine's acceptance memory per bucket (``policies.alpha_at``): each bucket
learns its own alpha once measured, unmeasured buckets use the running one, and the memory
survives the JSON round trip of the host-state checkpoint (older checkpoints without it
still load)."""

import json

from specrl import adaptive
from specrl.adaptive import AdaptiveConfig, policies


def _obs(bucket, k, rounds, accepted):
  return adaptive.ChunkObs(
    bucket=bucket, strategy=k, steps=rounds, seconds=1.0, tokens=rounds + accepted,
    rounds=rounds, accepted=accepted, active_start=bucket, active_end=bucket,
  )  # fmt: skip


def test_each_bucket_learns_its_own_alpha():
  acfg = AdaptiveConfig(alpha_memory=1.0)
  mem = adaptive.Memory(alpha=0.5)
  mem = adaptive.memory_observe(mem, _obs(16, 4, 1000, 4000), None, acfg)  # all accepted
  mem = adaptive.memory_observe(mem, _obs(2, 4, 1000, 0), None, acfg)  # none accepted
  a16, n16 = adaptive.alpha_at(mem, 16)
  a2, n2 = adaptive.alpha_at(mem, 2)
  assert a16 > 0.99 and a2 < 0.01 and n16 == n2 == 1000
  # an unmeasured bucket decides with the running alpha over all buckets
  assert adaptive.alpha_at(mem, 8) == (mem.alpha, mem.alpha_n)
  assert 0.0 < mem.alpha < 0.1  # the global one follows the latest chunks


def test_bucket_alpha_survives_the_checkpoint_round_trip():
  mem = adaptive.memory_observe(
    adaptive.Memory(alpha=0.5), _obs(4, 2, 10, 5), None, AdaptiveConfig()
  )
  back = policies.memory_from_json(json.loads(json.dumps(policies.memory_to_json(mem))))
  assert back.bucket_alpha == mem.bucket_alpha and 4 in back.bucket_alpha  # JSON floats: exact
  old = policies.memory_to_json(mem)
  del old['bucket_alpha']  # a checkpoint written before per-bucket memory
  assert policies.memory_from_json(old).bucket_alpha == {}
