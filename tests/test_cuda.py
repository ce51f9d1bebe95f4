"""The CUDA backend without running a kernel here: PTX for sm_90, the no-GPU error, input routing.

The kernels themselves are tested in ``tests/cuda``: in-process on a GPU or under
the simulator, otherwise by ``test_cuda_kernels_under_simulator`` in a subprocess.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import fastgrad
from fastgrad import cuda as fc

HERE = Path(__file__).resolve().parent
needs_numba_cuda = pytest.mark.skipif(fc.cuda is None, reason="numba-cuda is not installed")
not_simulated = pytest.mark.skipif(fc.SIMULATOR, reason="NUMBA_ENABLE_CUDASIM=1: numba.cuda is the simulator")


def gpu_present() -> bool:
    return fc.cuda is not None and not fc.SIMULATOR and bool(fc.cuda.is_available())


@needs_numba_cuda
@not_simulated
@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_every_kernel_compiles_to_ptx_for_sm90(dtype, monkeypatch):
    from numba import cuda, types

    if not gpu_present():
        # A kernel calling a device function asks for the current device's compute capability;
        # with no GPU, stand in a Hopper one (only for this test).
        class Hopper:
            compute_capability = (9, 0)

        monkeypatch.setattr("numba.cuda.dispatcher.get_current_device", lambda: Hopper())
    F = getattr(types, dtype)
    assert {"tiled_gemm_kernel", "fused_narrow_kernel", "sum_partials_kernel"} <= set(fc.KERNELS)
    f64_kernels = []
    for name, kern in fc.KERNELS.items():  # each kernel's signature is registered beside it
        ptx, _ = cuda.compile_ptx(kern.build(F), kern.signature(F), cc=(9, 0))
        assert ".target sm_90" in ptx, name
        if re.search(r"\.f64\b", ptx):
            f64_kernels.append(name)
    if dtype == "float32":
        assert f64_kernels == [], f"float64 arithmetic in the float32 PTX of {f64_kernels}"
    else:  # the check above sees float64 where it is
        assert set(f64_kernels) == set(fc.KERNELS)


@needs_numba_cuda
@not_simulated
@pytest.mark.parametrize("dtype, suffix", [("float32", "f32"), ("float64", "f64")])
def test_the_dp_step_kernel_multiplies_without_fusing_into_an_fma(dtype, suffix, monkeypatch):
    # the host rounds σC·ξ, then the sum, then the quotient (privacy.dp_step); NVVM contracts a
    # plain a * b + c into one FMA, which would round once where the host rounds twice
    from numba import cuda, types

    if not gpu_present():

        class Hopper:
            compute_capability = (9, 0)

        monkeypatch.setattr("numba.cuda.dispatcher.get_current_device", lambda: Hopper())
    F = getattr(types, dtype)
    kern = fc.KERNELS["noised_mean_kernel"]
    ptx, _ = cuda.compile_ptx(kern.build(F), kern.signature(F), cc=(9, 0))
    assert f"mul.rn.{suffix}" in ptx and f"div.rn.{suffix}" in ptx
    assert "fma" not in ptx


@needs_numba_cuda
@not_simulated
def test_cuda_backend_without_gpu_is_a_clear_runtime_error(monkeypatch):
    monkeypatch.setattr(fc.cuda, "is_available", lambda: False)
    monkeypatch.setattr(fc, "_GPU_OK", False)  # forget an earlier success
    net = fastgrad.MLP([3, 4, 2])
    X, y = np.zeros((2, 3), dtype=np.float32), np.array([0, 1])
    with pytest.raises(RuntimeError, match="backend 'cuda': no CUDA GPU or driver found"):
        fastgrad.backprop(net, net.init(), X, y, backend="cuda")
    with pytest.raises(RuntimeError, match="no CUDA GPU"):
        fastgrad.clipped_grad(net, net.init(), X, y, 1.0, backend="cuda")
    assert "cuda" not in fastgrad.available_backends()


def test_missing_numba_cuda_is_a_clear_runtime_error(monkeypatch):
    monkeypatch.setattr(fc, "cuda", None)
    monkeypatch.setattr(fc, "_IMPORT_ERROR", ImportError("No module named 'numba.cuda'"))
    with pytest.raises(RuntimeError, match=r"numba-cuda is not installed.*fastgrad\[cuda\]"):
        fc.check_available()


class FakeGPUArray:
    """Anything with ``__cuda_array_interface__`` counts as a GPU array."""

    @property
    def __cuda_array_interface__(self):
        return {"shape": (3,), "typestr": "<f4", "data": (0, False), "version": 3}


def test_gpu_arrays_on_a_host_backend_are_a_type_error():
    net = fastgrad.MLP([3, 4, 2])
    X, y = np.zeros((2, 3), dtype=np.float32), np.array([0, 1])
    with pytest.raises(TypeError, match="backend: 'numpy' takes host .*backend='cuda'"):
        fastgrad.backprop(net, FakeGPUArray(), X, y, backend="numpy")
    with pytest.raises(TypeError, match="backend: 'numba' takes host"):
        fastgrad.clipped_grad(net, net.init(), FakeGPUArray(), y, 1.0, backend="numba")


def test_fused_path_is_chosen_only_for_narrow_networks(monkeypatch):
    narrow, wide = fastgrad.MLP([64, 64, 64, 10]), fastgrad.MLP([64, 200, 10])
    assert fc.fused_tile(narrow, 4096, np.float32) >= 1
    assert fc.fused_tile(wide, 4096, np.float32) == 0
    for B in (1, 100, 10**6):  # the tile always fits the shared memory
        for dt in (np.float32, np.float64):
            tile = fc.fused_tile(narrow, B, dt)
            assert tile >= 1 and fc.fused.shared_bytes(narrow, tile, dt) <= fc.SHARED_BYTES
    monkeypatch.setattr(fc.config, "FUSED_MAX_WIDTH", 32)  # the tunables are read through config
    assert fc.fused_tile(narrow, 4096, np.float32) == 0


@needs_numba_cuda
def test_cuda_kernels_under_simulator():
    if fc.SIMULATOR:
        pytest.skip("NUMBA_ENABLE_CUDASIM=1: tests/cuda ran in this process under the simulator")
    if gpu_present():
        pytest.skip("a GPU is present: tests/cuda ran in this process on it")
    env = dict(os.environ, NUMBA_ENABLE_CUDASIM="1")
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-o", "addopts="]
    cmd.append(str(HERE / "cuda"))
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900, cwd=HERE.parent)
    summary = proc.stdout.strip().splitlines()[-1] if proc.stdout.strip() else ""
    assert proc.returncode == 0, proc.stdout[-8000:] + proc.stderr[-3000:]
    assert " passed" in summary and "failed" not in summary, summary
