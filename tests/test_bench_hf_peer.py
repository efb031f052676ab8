"""bench/hf_peer.py: the parts that need no peer environment (the run itself needs torch +
transformers in a side venv and the SmolLM2 wheel; see docs/benchmarks.md)."""

import numpy as np
import pytest

from bench import hf_peer


def test_missing_peer_interpreter_names_how_to_create_it(tmp_path):
  with pytest.raises(hf_peer.PeerError, match='pip install torch') as e:
    hf_peer.Peer(str(tmp_path / 'venv' / 'bin' / 'python'))
  assert str(tmp_path / 'venv') in str(e.value) and '--peer_python' in str(e.value)


def test_agreeing_prefix_is_the_shortest_shared_prefix_over_rows():
  a = np.array([[1, 2, 3, 4], [5, 6, 7, 8]])
  b = np.array([[1, 2, 9, 4], [5, 6, 7, 8]])
  assert hf_peer.agreeing_prefix(a, b) == 2
  assert hf_peer.agreeing_prefix(a, a) == 4
