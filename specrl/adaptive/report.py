"""Host-side record of one adaptive rollout (logs, metrics, plots). Pure Python."""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass
class AdaptiveReport:
  """Host-side record of one adaptive rollout (for logs and plots).

  ``trace``: (seconds since start, active, bucket, strategy) at every chunk start and end,
  compile and profiling time excluded (it is reported in ``compile_s`` / ``profile_s``);
  ``phases``: 'b{bucket}/{plain|k<k>}' -> {'time_s', 'tokens', 'steps', 'accepted',
  'drafted'} (the metric ``adaptive/alpha/b{bucket}``: accepted / drafted at that bucket);
  ``decisions``: one dict per strategy change; ``compile_s`` / ``profile_s``: per bucket.
  """

  batch: int
  policy: str
  trace: list = dataclasses.field(default_factory=list)
  phases: dict = dataclasses.field(default_factory=dict)
  decisions: list = dataclasses.field(default_factory=list)
  compile_s: dict = dataclasses.field(default_factory=dict)
  profile_s: dict = dataclasses.field(default_factory=dict)
  compactions: list = dataclasses.field(default_factory=list)  # (t, from, to, active)
  chosen: dict = dataclasses.field(default_factory=dict)  # bucket -> strategies in order
  # (buffer width, attended slots) of every chunk: the length buckets run (None = dense)
  length_buckets: set = dataclasses.field(default_factory=set)
  kv_peak: int = 0  # bytes: the policy KV cache's largest (batch x slots) at a chunk start
  kv_per_slot: int = 0  # bytes of the policy KV cache per (row, slot)
  draft_kv_peak: int = 0  # bytes: the drafter's state by position (KV cache, hidden), at most
  draft_kv_per_slot: int = 0  # ... per (row, slot)
  drafted: int = 0  # draft tokens proposed to active rows (sum of k x sequence-rounds)
  hook_s: float = 0.0  # seconds in the engine's tail_hook (kept out of the timings above)

  def phase_table(self) -> list[dict]:
    rows = []
    for name, p in self.phases.items():
      rows.append(
        dict(
          phase=name,
          time_s=p['time_s'],
          tokens=p['tokens'],
          steps=p['steps'],
          tokens_per_s=p['tokens'] / max(p['time_s'], 1e-9),
        )
      )
    return rows

  def metrics(self) -> dict:
    """Scalar metrics of this rollout (TensorBoard / metrics.jsonl keys)."""
    spec_time = sum(p['time_s'] for n, p in self.phases.items() if not n.endswith('plain'))
    decode_time = sum(p['time_s'] for p in self.phases.values())
    m = {
      'adaptive/compile_s': float(sum(self.compile_s.values())),
      'adaptive/profile_s': float(sum(self.profile_s.values())),
      'adaptive/decode_s': float(decode_time),
      'adaptive/spec_time_frac': float(spec_time / max(decode_time, 1e-9)),
      'adaptive/compactions': len(self.compactions),
      'adaptive/chunks': len(self.trace) // 2,
      'adaptive/tail_hook_s': float(self.hook_s),
    }
    for name, p in self.phases.items():
      m[f'adaptive/phase/{name}/time_s'] = float(p['time_s'])
      m[f'adaptive/phase/{name}/tokens_per_s'] = float(p['tokens'] / max(p['time_s'], 1e-9))
    for bucket, ks in self.chosen.items():
      m[f'adaptive/k/b{bucket}'] = int(ks[-1])
    # acceptance (accepted / drafted) of the speculative chunks at each bucket
    per_bucket: dict[str, list[int]] = {}
    for name, p in self.phases.items():
      if p.get('drafted', 0) > 0:
        acc = per_bucket.setdefault(name.split('/')[0], [0, 0])
        acc[0] += p['accepted']
        acc[1] += p['drafted']
    for bucket, (accepted, drafted) in per_bucket.items():
      m[f'adaptive/alpha/{bucket}'] = accepted / drafted
    for bucket, sec in self.compile_s.items():
      m[f'adaptive/compile_s/b{bucket}'] = float(sec)
    return m
