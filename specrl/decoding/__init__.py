"""The decoding core shared by the static and the adaptive rollout engines.

- :mod:`specrl.decoding.state`: rollout config, the decode-loop state and :func:`commit`
  (the one place finish rules live).
- :mod:`specrl.decoding.steps`: prefill, the plain step, the speculative round, the one
  step chooser :func:`~specrl.decoding.steps.decode_step` and the ``while_loop`` decode.
- :mod:`specrl.decoding.verify`: the verify dispatcher (jnp reference or Pallas kernel).
- :mod:`specrl.decoding.spec_math`: speculation maths (expected tokens, acceptance α), pure
  Python.
- :mod:`specrl.decoding.profile`: the one step-cost profiler (engines and benchmarks).

This ``__init__`` imports nothing, so the pure-Python :mod:`spec_math` stays importable
without JAX.
"""
