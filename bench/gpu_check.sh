#!/usr/bin/env bash
# The one-shot GPU check (issue 18): under 8 minutes on one H200, one table at the end.
#   1. the CUDA tests: every Triton check module compiled on the GPU (not interpreted);
#   2. bench/kernels.py: each kernel's time and bandwidth against the device's own, measured in the run;
#   3. bench/gpu_decode.py: LLM decode in bf16 on the small preset at batch 1 and 64, and offline throughput.
# Runs on the device machine's own python3 (torch, triton; no Ray, no pydantic): moeray is imported
# from the working tree. Each part's full output is kept under $OUT (default /tmp/gpu_check).
#   bash bench/gpu_check.sh
set -u
cd "$(dirname "$0")/.."
PY=$(command -v "${PYTHON:-python3}") || { echo "no ${PYTHON:-python3}"; exit 1; }
case "$PY" in /*) ;; *) PY="$PWD/$PY" ;; esac
OUT=${OUT:-/tmp/gpu_check}
mkdir -p "$OUT"
export PYTHONPATH="$PWD:$PWD/tests${PYTHONPATH:+:$PYTHONPATH}"
export MOERAY_CACHE_DIR="$OUT/cache"

start=$(date +%s)
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader > "$OUT/gpu.txt" 2>&1
timeout 240 "$PY" -m pytest -q -p no:cacheprovider -rA tests/kernels/test_triton_interpreter.py -k compiled \
    > "$OUT/tests.txt" 2>&1
echo "tests rc=$?" > "$OUT/rc.txt"
(cd bench && timeout 150 "$PY" kernels.py > "$OUT/kernels.txt" 2>&1); echo "kernels rc=$?" >> "$OUT/rc.txt"
(cd bench && timeout 150 "$PY" gpu_decode.py > "$OUT/decode.txt" 2>&1); echo "decode rc=$?" >> "$OUT/rc.txt"
echo "seconds=$(( $(date +%s) - start ))" >> "$OUT/rc.txt"
"$PY" bench/gpu_summary.py "$OUT"
