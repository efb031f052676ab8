"""The Hugging Face side of ``bench/hf_peer.py``: runs in the peer environment only.

Started by ``bench/hf_peer.py`` as a subprocess with the peer interpreter (``--peer_python``,
an environment with torch and transformers; never a requirement of specrl). It speaks one
JSON object per line: it reads commands on stdin and answers each on stdout, so the driver
can alternate specrl and HF repeats in one run without both sides computing at once.

Commands:
  {"cmd": "load", "gguf": PATH, "threads": 2}
      -> {"ok": true, "torch", "transformers", "load_s"}
  {"cmd": "generate", "prompts": [[ids], ...], "new_tokens": N}
      -> {"ok": true, "seconds": wall seconds of generate(), "cpu_seconds": its process CPU
          seconds (all threads), "tokens": [[N new ids], ...]}
  {"cmd": "quit"}

``generate`` is ``model.generate`` on the prompt ids left-padded (HF's convention for
decoder-only batches, with an attention mask), greedy, EOS ignored (``eos_token_id`` unset,
so exactly N new tokens), f32 weights dequantized from the same GGUF by transformers' own
reader (``from_pretrained(dir, gguf_file=name)``, offline). The seconds cover the whole
call: prefill and N - 1 decode steps, the same span the specrl side times.
"""

from __future__ import annotations

import json
import os
import sys
import time

os.environ.setdefault('HF_HUB_OFFLINE', '1')
os.environ.setdefault('TRANSFORMERS_OFFLINE', '1')

import torch  # noqa: E402
import transformers  # noqa: E402


def _load(cmd: dict) -> dict:
  torch.set_num_threads(int(cmd.get('threads', 2)))
  path = cmd['gguf']
  t0 = time.perf_counter()
  model = transformers.AutoModelForCausalLM.from_pretrained(
    os.path.dirname(path), gguf_file=os.path.basename(path), dtype=torch.float32
  )
  model.eval()
  gc = model.generation_config
  gc.eos_token_id = None  # EOS ignored: exactly N new tokens
  gc.do_sample = False
  gc.temperature = gc.top_p = gc.top_k = None
  return model, {
    'ok': True,
    'torch': torch.__version__,
    'transformers': transformers.__version__,
    'threads': torch.get_num_threads(),
    'load_s': time.perf_counter() - t0,
  }


def _generate(model, cmd: dict) -> dict:
  prompts = cmd['prompts']
  n = int(cmd['new_tokens'])
  width = max(len(p) for p in prompts)
  pad = int(cmd.get('pad_id', 0))
  ids = torch.tensor([[pad] * (width - len(p)) + list(p) for p in prompts], dtype=torch.long)
  mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts], dtype=torch.long)
  with torch.inference_mode():
    t0, c0 = time.perf_counter(), time.process_time()
    out = model.generate(
      input_ids=ids,
      attention_mask=mask,
      max_new_tokens=n,
      min_new_tokens=n,
      do_sample=False,
      pad_token_id=pad,
    )
    dt, cpu = time.perf_counter() - t0, time.process_time() - c0
  new = out[:, width:].tolist()
  if any(len(r) != n for r in new):
    return {'ok': False, 'error': f'generate returned {[len(r) for r in new]} tokens, wanted {n}'}
  return {'ok': True, 'seconds': dt, 'cpu_seconds': cpu, 'tokens': new}


def main() -> None:
  model = None
  for line in sys.stdin:
    if not line.strip():
      continue
    cmd = json.loads(line)
    try:
      if cmd['cmd'] == 'load':
        model, reply = _load(cmd)
      elif cmd['cmd'] == 'generate':
        reply = _generate(model, cmd)
      elif cmd['cmd'] == 'quit':
        break
      else:
        reply = {'ok': False, 'error': f'unknown command {cmd["cmd"]!r}'}
    except Exception as e:  # reported to the driver, which raises it
      reply = {'ok': False, 'error': f'{type(e).__name__}: {e}'}
    sys.stdout.write(json.dumps(reply) + '\n')
    sys.stdout.flush()


if __name__ == '__main__':
  main()
