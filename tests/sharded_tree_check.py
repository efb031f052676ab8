"""Draft trees on a (2, 2, 2) mesh of 8 fake CPU devices: the adaptive engine (suffix trees
+ compaction 8 -> 2, below the 4-way batch sharding) emits plain decoding's tokens (1
device). The static engine's tree rounds are the same ``decode_step`` (one compile less).
Prints one JSON line. Executed in a subprocess by tests/test_tree.py (the device count is
fixed when JAX starts)."""

import dataclasses
import json
import os
import sys

os.environ['XLA_FLAGS'] = (
  os.environ.get('XLA_FLAGS', '') + ' --xla_force_host_platform_device_count=8'
)
os.environ['JAX_PLATFORMS'] = 'cpu'
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import numpy as np  # noqa: E402

from specrl import adaptive  # noqa: E402
from specrl import model as model_lib  # noqa: E402
from specrl import rollout as rollout_lib  # noqa: E402
from specrl import sharding as shd  # noqa: E402
from specrl.drafters.suffix import SuffixDrafter  # noqa: E402
from specrl.sampling import SamplingParams  # noqa: E402


def main():
  cfg = model_lib.ModelConfig(
    vocab_size=16, d_model=32, n_layers=1, n_heads=4, n_kv_heads=2, head_dim=8, d_ff=64
  )
  params = model_lib.init_params(cfg, jax.random.key(0))
  p, g = 6, 4
  toks = np.asarray(jax.random.randint(jax.random.key(1), (2, p), 1, 16)).repeat(g, 0)
  lens = np.full(2 * g, p, np.int32)
  groups = np.arange(2 * g, dtype=np.int32) // g
  base = rollout_lib.RolloutConfig(
    max_new_tokens=16, max_prompt_len=p, sampling=SamplingParams(0.7, top_k=5), eos_id=3,
    attend_bucket=0,
  )  # fmt: skip
  one = shd.make_mesh((1, 1, 1), jax.devices()[:1])
  eight = shd.make_mesh((2, 2, 2))
  plain, _ = rollout_lib.RolloutEngine(cfg, base, one).generate(
    params, toks, lens, jax.random.key(2), group_ids=groups
  )
  trcfg = dataclasses.replace(base, tree_nodes=6, tree_depth=3)
  acfg = adaptive.AdaptiveConfig(policy='always', buckets=(8, 2), arms=(5,), chunk_steps=4)
  adapt = adaptive.AdaptiveRolloutEngine(cfg, trcfg, acfg, SuffixDrafter(16, 1, 4), eight)
  res = {}
  for name, eng in (('adaptive', adapt),):
    out, m = eng.generate(params, toks, lens, jax.random.key(2), group_ids=groups)
    res[name] = dict(
      equal=bool(np.array_equal(np.asarray(out.response), np.asarray(plain.response))),
      lp_diff=float(np.abs(np.asarray(out.response_logprobs) - plain.response_logprobs).max()),
      accepted=int(np.asarray(out.num_accepted).sum()),
      non_first=int(np.asarray(out.tree_stats)[:, 1].sum()),
      compactions=int(m.get('adaptive/compactions', 0)),
    )
  print(json.dumps(res))


if __name__ == '__main__':
  main()
