"""bench/device_pack.py: a file split into parts comes back byte for byte (sha256 checked),
a missing or corrupt part is one clear error, and an installed pure-Python distribution
packs back into a wheel pip can read."""

import hashlib
import json
import os
import subprocess
import sys
import zipfile

import pytest

from bench import device_pack as dp


@pytest.fixture
def blob(tmp_path):
  path = tmp_path / 'model.gguf'
  path.write_bytes(os.urandom(100_003))  # odd size: the parts differ by a byte
  return path


@pytest.mark.parametrize('parts', [1, 2, 3])
def test_split_then_join_gives_the_same_bytes(blob, tmp_path, parts):
  dest = tmp_path / 'dev'
  m = dp.split_file(str(blob), str(dest), parts)
  assert len(m['parts']) == parts and sum(p['size'] for p in m['parts']) == blob.stat().st_size
  for i in range(1, parts + 1):  # every part travels with its own copy of the manifest
    assert json.load(open(dest / f'gguf{i}' / 'manifest.json')) == m
  out = dp.join_parts(str(dest), str(tmp_path / 'joined.gguf'))
  assert open(out, 'rb').read() == blob.read_bytes()
  assert m['sha256'] == hashlib.sha256(blob.read_bytes()).hexdigest()
  assert dp.join_parts(str(dest)) == str(dest / 'model.gguf')  # default: next to the parts


def test_a_missing_part_names_it_and_the_30_s_rule(blob, tmp_path):
  dest = tmp_path / 'dev'
  dp.split_file(str(blob), str(dest), 2)
  os.remove(dest / 'gguf2' / 'model.gguf.part2')
  with pytest.raises(dp.PackError, match=r'part 2 of 2 .*missing.*30 s'):
    dp.join_parts(str(dest))
  assert dp.main(['join', '--dest', str(dest)]) == 1
  assert not os.path.exists(dest / 'model.gguf')


def test_a_corrupt_part_is_refused_before_anything_is_written(blob, tmp_path):
  dest = tmp_path / 'dev'
  dp.split_file(str(blob), str(dest), 2)
  part = dest / 'gguf1' / 'model.gguf.part1'
  data = bytearray(part.read_bytes())
  data[7] ^= 1
  part.write_bytes(bytes(data))
  with pytest.raises(dp.PackError, match='part 1 .* corrupt'):
    dp.join_parts(str(dest), str(tmp_path / 'out.gguf'))
  assert not os.path.exists(tmp_path / 'out.gguf')


def test_no_part_here_at_all(tmp_path):
  with pytest.raises(dp.PackError, match='no gguf<i>/manifest.json'):
    dp.join_parts(str(tmp_path))


def test_an_installed_pure_python_dist_packs_back_into_an_importable_wheel(tmp_path):
  whl = dp.repack_wheel('ml_collections', str(tmp_path))
  assert os.path.basename(whl).startswith('ml_collections-') and whl.endswith('-any.whl')
  with zipfile.ZipFile(whl) as z:
    names = z.namelist()
    (record,) = [n for n in names if n.endswith('.dist-info/RECORD')]
    assert any(n.endswith('.dist-info/METADATA') for n in names)
    assert not [n for n in names if n.endswith(('.pyc', '/INSTALLER', '/REQUESTED'))]
    for line in z.read(record).decode().splitlines():
      name, digest, size = line.split(',')
      if name != record:
        data = z.read(name)
        assert digest == dp._record_hash(data) and int(size) == len(data)
  code = f'import sys; sys.path.insert(0, {whl!r}); import ml_collections as m; print(m.__file__)'
  r = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True, timeout=60)
  assert r.stdout.startswith(whl), r.stderr


def test_a_wheel_file_found_is_copied_rather_than_repacked(tmp_path):
  have = tmp_path / 'cache' / 'ab' / 'cd'
  have.mkdir(parents=True)
  version = dp.importlib.metadata.version('ml_collections')
  (have / f'ml_collections-{version}-py3-none-any.whl').write_bytes(b'cached')
  (have / 'ml_collections-0.0.1-py3-none-any.whl').write_bytes(b'old')
  got = dp.build_wheels(['ml_collections'], str(tmp_path / 'out'), [str(tmp_path / 'cache')])
  assert open(got['ml_collections'], 'rb').read() == b'cached'
