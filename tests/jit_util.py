"""One place for the tests' compile-and-run helper (used by the verify tests)."""

import functools

import jax

# Interpret-mode kernels are big HLO programs: XLA CPU compile time dominates these tests,
# so compile cheaply (about 3x faster; the semantics of the ops are unchanged).
FAST_COMPILE = {'xla_backend_optimization_level': 0, 'xla_llvm_disable_expensive_passes': True}


def run(f, *args, **static):
  """jit f with keyword static args, compile with FAST_COMPILE on CPU, run."""
  lowered = jax.jit(functools.partial(f, **static)).lower(*args)
  opts = FAST_COMPILE if jax.default_backend() == 'cpu' else {}
  return lowered.compile(opts)(*args)
