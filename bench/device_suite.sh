#!/usr/bin/env bash
# The device suite (issue 32) in one device call: run from the repository root on the GPU
# machine, e.g. run(command='bash bench/device_suite.sh', carry=['.device/wheels'],
# timeout_s=540). Extra arguments go to bench/device_suite.py (--sections, --resume_from,
# --cpu_smoke, ...). Writes under $OUT (default ./device_out): gpu.txt, suite.log and at most
# four suite_*.json files (6 files; a device call brings back 8 at most).
#
# Steps: install the wheels carried in .device/wheels (ml_collections, gguf: missing from the
# device image; made by bench/device_pack.py) into /tmp/site; print the GPU; run the driver
# with a global budget of SUITE_BUDGET (420) seconds under `timeout SUITE_TIMEOUT` (480 s =
# 8 minutes: a cell started before the budget ran out may overrun it). Exit status: the
# driver's (124 if the timeout stopped it; what it had measured is already in $OUT).
set -u -o pipefail
OUT=${OUT:-device_out}
export OUT
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
# JAX takes 75% of the GPU by default; the 8k-budget cells at B = 256 want more headroom.
export XLA_PYTHON_CLIENT_MEM_FRACTION=${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.92}
PY=${PY:-python3}
# Compiled executables persist in the ignored .device/ (kept on a warm machine between calls,
# so a resume call compiles less); SPECRL_JAX_CACHE='' turns the cache off.
export SPECRL_JAX_CACHE=${SPECRL_JAX_CACHE-.device/jax_cache}

if compgen -G '.device/wheels/*.whl' >/dev/null; then
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .device/wheels/*.whl || exit 1
  export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi

{
  nvidia-smi --query-gpu=name,memory.total,clocks.sm,clocks.mem,driver_version --format=csv
  $PY -c 'import jax; print("jax", jax.__version__, jax.devices())'
} 2>&1 | tee "$OUT/gpu.txt"

timeout "${SUITE_TIMEOUT:-480}" $PY bench/device_suite.py --out "$OUT" \
  --budget_s "${SUITE_BUDGET:-420}" "$@" 2>&1 | tee "$OUT/suite.log"
rc=${PIPESTATUS[0]}
echo "device_suite.py exit: $rc"
exit "$rc"
