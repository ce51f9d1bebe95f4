#!/usr/bin/env bash
# Everything the device machine (a CUDA GPU, many CPU cores) measures, in one go, from the source
# tree with nothing installed (needs numba, numba-cuda, numpy, pytest and torch; cupy optional):
#   0. the machine: nvidia-smi, CPU, versions                       -> $OUT/machine.txt
#   1. the CUDA tests without the simulator, and `fastgrad validate --backend cuda`
#      (both at once: they only check results)                       -> $OUT/tests.txt, validate.{txt,json}
#   2. timings against PyTorch CUDA with their profile: host cost above the kernels, the kernels'
#      GPU time, cuBLAS on the tiled path's GEMM shapes, each kernel's time (torch.profiler)
#                                                                    -> $OUT/timings.txt, gpu_check.json,
#                                                                       kernel_profile.txt
#   3. Dask scaling on the CPU cores: benchmarks/dask_stats.py with 1, 2, 4 and 8 workers, one
#      Numba thread each; dask and distributed come from the wheelhouse .device/wheels (carried to
#      the machine, installed offline into .device/site) when the machine lacks them. The wheelhouse
#      is git-ignored: build it (about 10 MB) before the run, for each v in 3.10 3.11 3.12 3.13,
#        pip download dask distributed --dest .device/wheels --only-binary=:all: --python-version $v \
#          --implementation cp --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 \
#          --platform manylinux_2_28_x86_64 --platform linux_x86_64 --platform any
#      (no numpy: dask and distributed do not need it), and pass carry [".device/wheels"] to the device tool
#                                                                    -> $OUT/dask.txt, dask_install.txt
# then a summary (each step's status and time, the timing table, the targets, the Dask lines) last.
# Each step is time-boxed (`timeout`); a failing step does not stop the others.
#
#   OUT=some/dir bash benchmarks/gpu_check.sh            # on the device: about 4-5 min (at most
#                                                         # 15 + 170 + 125 + 95 = 405 s by the time boxes)
#   SMOKE=1 bash benchmarks/gpu_check.sh  (or --smoke)   # here: CUDA simulator, tiny sizes, torch on CPU
#
# Results go to $OUT (default ./gpu_check_out). Exit status: non-zero if any step failed.
set -uo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
SMOKE="${SMOKE:-0}"
[ "${1:-}" = "--smoke" ] && SMOKE=1
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
export NUMBA_CUDA_LOW_OCCUPANCY_WARNINGS=0
if [ "$SMOKE" = 1 ]; then
    export NUMBA_ENABLE_CUDASIM=1
else
    unset NUMBA_ENABLE_CUDASIM
fi
OUT="${OUT:-$ROOT/gpu_check_out}"
mkdir -p "$OUT"
SUMMARY="$OUT/summary.tsv"
export ROOT OUT SMOKE
printf "step\trc\tseconds\n" >"$SUMMARY"
status=0
start=$SECONDS

# step NAME LIMIT_S FUNCTION: runs an exported shell function under `timeout` (which ends its whole
# process group), records its status and time
step() {
    local name=$1 limit=$2
    shift 2
    local t0=$SECONDS rc
    [ "$SMOKE" = 1 ] && limit=$((3 * limit)) # the simulator is slow
    echo "== $name (limit ${limit} s; $((SECONDS - start)) s so far)"
    timeout -k 10 "$limit" bash -c "$*"
    rc=$?
    [ $rc -eq 124 ] && echo "   $name: timed out after $limit s"
    printf "%s\t%s\t%s\n" "$name" "$rc" "$((SECONDS - t0))" >>"$SUMMARY"
    [ $rc -eq 0 ] || status=1
    return 0
}

# ------------------------------------------------------------------ 0. the machine
machine_info() {
    {
        echo "date: $(date -u)"
        echo "uptime: $(uptime)"
        echo "nproc: $(nproc)"
        grep -m1 "model name" /proc/cpuinfo
        grep -E "MemTotal" /proc/meminfo
        nvidia-smi 2>&1 | head -30
        nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm,clocks.max.mem,power.limit \
            --format=csv 2>&1
        python - <<'EOF'
import importlib, platform, sys
print("python", platform.python_version(), sys.executable)
for m in ("numpy", "numba", "numba_cuda", "torch", "cupy", "dask", "distributed", "pytest", "tbb"):
    try:
        mod = importlib.import_module(m)
        print(m, getattr(mod, "__version__", "?"))
    except Exception as exc:
        print(m, "missing:", type(exc).__name__, exc)
try:
    import torch
    print("torch cuda", torch.version.cuda, "available", torch.cuda.is_available())
except Exception:
    pass
try:
    import fastgrad._threading as t
    print(t.describe())
except Exception as exc:
    print("threading:", exc)
EOF
    } >"$OUT/machine.txt" 2>&1
    head -4 "$OUT/machine.txt" | tail -2
}
export -f machine_info
step machine 15 machine_info

# ------------------------------------------------------ 1. tests and validate, side by side
if [ "$SMOKE" = 1 ]; then
    TESTS="tests/cuda/test_launches.py"
    VALIDATE="--quick"
else
    TESTS="tests/test_cuda.py tests/tools/test_validate.py tests/cuda"
    VALIDATE=""
fi
run_tests() {
    python -m pytest -q -p no:cacheprovider -o addopts="" -ra $TESTS >"$OUT/tests.txt" 2>&1
}
run_validate() {
    python -m fastgrad.tools.validate --backend cuda $VALIDATE --json "$OUT/validate.json" \
        >"$OUT/validate.txt" 2>&1
}
export TESTS VALIDATE
export -f run_tests run_validate
step tests 170 run_tests &
tests_pid=$!
step validate 120 run_validate
wait $tests_pid
# `step` ran in a subshell for the tests: its status is in the summary file
awk -F'\t' 'NR > 1 && $2 != 0 { bad = 1 } END { exit bad }' "$SUMMARY" || status=1
tail -n 1 "$OUT/tests.txt"
grep -E "FAIL|Error" "$OUT/validate.txt" | head -10
tail -n 1 "$OUT/validate.txt"

# ------------------------------------------------------------------ 2. timings
if [ "$SMOKE" = 1 ]; then
    TIMING_ARGS="--smoke --reps 3"
else
    TIMING_ARGS="--kernel-profile $OUT/kernel_profile.txt"
fi
run_timings() {
    python benchmarks/gpu_check.py --profile --json "$OUT/gpu_check.json" $TIMING_ARGS \
        >"$OUT/timings.txt" 2>&1
}
export TIMING_ARGS
export -f run_timings
step timings 125 run_timings

# ------------------------------------------------------------------ 3. Dask scaling
DASK_SITE="$ROOT/.device/site"
install_dask() {
    if [ "${FORCE_DASK_INSTALL:-0}" != 1 ] && python -c "import dask.array, distributed" 2>/dev/null; then
        echo "dask and distributed already importable"
        return 0
    fi
    if [ "${FORCE_DASK_INSTALL:-0}" != 1 ] && [ -d "$DASK_SITE" ] && PYTHONPATH="$DASK_SITE:$PYTHONPATH" python -c "import dask.array, distributed"; then
        echo "dask and distributed already in $DASK_SITE"
        return 0
    fi
    [ -d "$ROOT/.device/wheels" ] || {
        echo "no wheelhouse .device/wheels (carry it)"
        return 1
    }
    rm -rf "$DASK_SITE"
    if python -m pip --version; then
        python -m pip install --no-index --find-links "$ROOT/.device/wheels" --target "$DASK_SITE" \
            --no-warn-script-location --disable-pip-version-check dask distributed && return 0
        echo "pip failed; unpacking the wheels by hand"
    fi
    # no pip: unzip, per distribution, the newest wheel whose tags fit this interpreter
    python - "$ROOT/.device/wheels" "$DASK_SITE" <<'EOF'
import os, sys, zipfile
wheels, site = sys.argv[1], sys.argv[2]
v = sys.version_info
best = {}
for f in sorted(os.listdir(wheels)):
    if not f.endswith(".whl"):
        continue
    dist, ver, py, abi, plat = f[:-4].split("-")[:5]
    ok_plat = plat == "any" or ("x86_64" in plat and "linux" in plat)
    here = f"cp{v.major}{v.minor}"
    ok_py = any(
        t in ("py3", "py2")
        or t == here
        or (abi == "abi3" and t.startswith("cp3") and int(t[3:]) <= v.minor)
        for t in py.split(".")
    )
    if ok_plat and ok_py and (abi in ("none", "abi3") or abi == here):
        key = tuple(int(p) if p.isdigit() else 0 for p in ver.split("."))
        if dist.lower() not in best or key > best[dist.lower()][0]:
            best[dist.lower()] = (key, f)
os.makedirs(site, exist_ok=True)
for _, f in best.values():
    zipfile.ZipFile(os.path.join(wheels, f)).extractall(site)
    print("unpacked", f)
EOF
}
run_dask() {
    install_dask >"$OUT/dask_install.txt" 2>&1 || {
        tail -5 "$OUT/dask_install.txt"
        return 1
    }
    export PYTHONPATH="$DASK_SITE:$PYTHONPATH"
    export NUMBA_NUM_THREADS=1 OMP_NUM_THREADS=1 OPENBLAS_NUM_THREADS=1
    # the workers start by `spawn` and run one Numba thread each: any threading layer will do;
    # where neither TBB nor OpenMP loads, Numba's workqueue (one thread per process is safe)
    # the probe also compiles the benchmark's kernels into the disk cache, once, before the workers
    local probe='import numpy as np, numba, fastgrad
net = fastgrad.MLP([64, 64, 64, 10], activation="tanh", loss="cross_entropy")
X, y = np.ones((64, 64), np.float32), np.zeros(64, dtype=np.int64)
fastgrad.backprop(net, net.init(seed=0, dtype=np.float32), X, y, ("grad", "noise_scale"), backend="numba")
print("threading layer:", numba.threading_layer())'
    if ! python -c "$probe" >>"$OUT/dask_install.txt" 2>&1; then
        export NUMBA_THREADING_LAYER=workqueue
        echo "threading layer probe failed: NUMBA_THREADING_LAYER=workqueue" >>"$OUT/dask_install.txt"
    fi
    python benchmarks/dask_stats.py --skip-chunks $DASK_ARGS >"$OUT/dask.txt" 2>&1
}
if [ "$SMOKE" = 1 ]; then
    DASK_ARGS="--workers 1,2 --log2-samples 14 --chunk-rows 4096 --rounds 2"
else
    DASK_ARGS="--workers 1,2,4,8 --log2-samples 20 --chunk-rows 32768 --rounds 3"
fi
export DASK_SITE DASK_ARGS
export -f install_dask run_dask
step dask 95 run_dask

# ------------------------------------------------------------------ summary, last
echo
echo "==================== summary ($((SECONDS - start)) s in all; files in $OUT)"
column -t -s $'\t' "$SUMMARY" 2>/dev/null || cat "$SUMMARY"
echo "-- machine"
grep -m1 "model name" "$OUT/machine.txt"
grep -E "^(nproc|python|numba|numba_cuda|torch|cupy|dask) " "$OUT/machine.txt"
echo "-- tests: $(tail -n 1 "$OUT/tests.txt" 2>/dev/null)"
echo "-- validate: $(tail -n 1 "$OUT/validate.txt" 2>/dev/null)"
echo "-- timings"
grep -E "failed:" "$OUT/timings.txt" 2>/dev/null | head -5
grep -E "^overheads:" "$OUT/timings.txt" 2>/dev/null | cut -c1-1500
# the table and the targets: from the line before "floors: device copy" to the end
awk '/^floors: device copy/ { p = 1; print prev } p { print } { prev = $0 }' "$OUT/timings.txt" 2>/dev/null
[ -s "$OUT/timings.txt" ] && ! grep -q "^floors: device copy" "$OUT/timings.txt" && tail -n 15 "$OUT/timings.txt"
echo "-- dask"
grep -E "cores|samples, chunks|/s |overhead|throughput|RSS|Error|error" "$OUT/dask.txt" 2>/dev/null | head -30
echo "gpu_check: $((SECONDS - start)) s, status $status"
exit $status
