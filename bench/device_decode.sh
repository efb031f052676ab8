#!/usr/bin/env bash
# One device run for issue 17 (GPU decode vs the bandwidth floor, weight-only int8 kernel).
# Run from the repository root on the GPU machine: bash bench/device_decode.sh
# Writes logs and the JSON lines under $OUT (or ./device_out); total well under 400 s:
#   1. bench/decode.py: copy bandwidth; the Pallas int8 kernel checked natively against its
#      reference on the Qwen2.5-1.5B shapes (M = 1, 16, 64, 256); single matmuls (bf16 vs int8
#      jnp vs int8 Pallas); a kernel tiling sweep; then plain / int8 / int8-pallas / int4
#      decode steps for the 1.5B and 0.5B shapes, B = 1, 64, 256, 16 (cells stop at the budget).
#   2. bench/verify_kernel.py at B = 64, 256, k = 8, V = 152064 (bandwidth of the verify kernel).
set -u -o pipefail
OUT=${OUT:-device_out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
PY=${PY:-python3}
nvidia-smi --query-gpu=name,memory.total,clocks.sm,clocks.mem,driver_version --format=csv \
  2>&1 | tee "$OUT/gpu.txt"
$PY -c 'import jax; print(jax.__version__, jax.devices())' 2>&1 | tee -a "$OUT/gpu.txt"

# DECODE_EXTRA / VERIFY_ARGS: overrides for a CPU smoke test (e.g. DECODE_EXTRA=--quick).
timeout 300 $PY bench/decode.py --check --matmul --sweep 1,64 --time_budget 230 \
  --compile_cache '' ${DECODE_EXTRA:-} 2>&1 | tee "$OUT/decode.log"
echo "decode.py exit: $?"
tail -n 1 "$OUT/decode.log" > "$OUT/decode.json"

timeout 60 $PY bench/verify_kernel.py ${VERIFY_ARGS:---batches 64,256 --ks 8 --vocabs 152064} \
  2>&1 | tee "$OUT/verify_kernel.log"
echo "verify_kernel.py exit: $?"
tail -n 1 "$OUT/verify_kernel.log" > "$OUT/verify_kernel.json"
