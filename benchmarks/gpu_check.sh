#!/usr/bin/env bash
# The CUDA backend on a real GPU, from the source tree with nothing installed
# (needs numba, numba-cuda, numpy, pytest and torch; cupy is optional):
#   1. the CUDA tests without the simulator (tests/test_cuda*.py, tests/cuda),
#   2. `fastgrad validate` for the cuda backend (both paths, every activation,
#      loss, dtype and shape, against the float64 reference),
#   3. timings against PyTorch CUDA (benchmarks/gpu_check.py), its table last.
# Results go to $OUT (default: ./gpu_check_out). Exit status: non-zero if any step failed.
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
unset NUMBA_ENABLE_CUDASIM
OUT="${OUT:-$PWD/gpu_check_out}"
mkdir -p "$OUT"
status=0
start=$SECONDS

nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv 2>&1 | tee "$OUT/gpu.txt"

echo "== 1. CUDA tests on the GPU (no simulator)"
python -m pytest -q -p no:cacheprovider -o addopts="" -ra \
    tests/test_cuda.py tests/test_cuda_validate.py tests/cuda 2>&1 | tee "$OUT/tests.txt"
[ "${PIPESTATUS[0]}" -eq 0 ] || status=1
echo "   ($((SECONDS - start)) s so far)"

echo "== 2. fastgrad validate --backend cuda (fastgrad.tools.validate)"
python -m fastgrad.tools.validate --backend cuda --json "$OUT/validate.json" >"$OUT/validate.txt" 2>&1 || status=1
grep -E "FAIL|Error" "$OUT/validate.txt" | head -20
tail -n 1 "$OUT/validate.txt"
echo "   ($((SECONDS - start)) s so far)"

echo "== 3. timings against PyTorch CUDA"
NUMBA_CUDA_LOW_OCCUPANCY_WARNINGS=0 python benchmarks/gpu_check.py --profile --json "$OUT/gpu_check.json" 2>&1 |
    tee "$OUT/timings.txt"
[ "${PIPESTATUS[0]}" -eq 0 ] || status=1
echo "gpu_check: $((SECONDS - start)) s, status $status"
exit $status
