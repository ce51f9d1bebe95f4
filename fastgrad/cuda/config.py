"""The CUDA target: its import guard, the tunables, and the kernel registry.

Every kernel of :mod:`fastgrad.cuda` is a *builder* ``build(F)`` returning the kernel's
Python function for float type ``F`` (its shared and local arrays need ``F`` at compile
time), registered with its argument types by :func:`kernel`, so each kernel's signature
sits beside it: ``KERNELS`` is what ``compile_ptx`` and the tests walk, and
``kernel.launch(dtype, grid, block, *args)`` is what the launchers call (and count).

The host-side tunables (``TARGET_BLOCKS``, ``GRAD_MIN_BLOCKS``, ``FUSED_MAX_WIDTH``,
``FUSED_MAX_TILE``, ``SHARED_BYTES``) are read at call time through this module, so a test
or a benchmark changes them here (``fastgrad.cuda.config.TARGET_BLOCKS = ...``; the names
re-exported by ``fastgrad.cuda`` are copies). Block shapes (``GEMM_*``, ``SUM_*``,
``FUSED_THREADS``) are compiled into the kernels.
"""

from __future__ import annotations

from collections import Counter

import numpy as np

if not hasattr(np, "row_stack"):
    # NumPy 2.5 removed np.row_stack, but numba-cuda 0.30.4 registers an overload of it when it
    # first compiles a kernel (AttributeError); the alias it had since NumPy 2.0 keeps it working.
    np.row_stack = np.vstack

try:  # numba-cuda is an optional dependency: without it the backend reports itself unavailable
    import numba
    from numba import cuda
    from numba import types as nbt

    IMPORT_ERROR: Exception | None = None
except Exception as exc:  # pragma: no cover - depends on the installation
    numba = cuda = nbt = None
    IMPORT_ERROR = exc
try:
    from numba.cuda.cudadrv.devicearray import DeviceNDArray
except Exception:  # the simulator, or no numba-cuda
    DeviceNDArray = ()

SIMULATOR = bool(cuda is not None and numba.config.ENABLE_CUDASIM)

# ------------------------------------------------------------------ tunables
# The simulator runs every thread as a Python thread (about 1-3 ms each), so it
# gets the same kernels with tiny blocks; the GPU gets blocks sized for an SM.
if SIMULATOR:
    GEMM_THREADS, GEMM_REG, GEMM_BK = 2, 2, 2  # 4x4 output tile, 4 threads
    FUSED_THREADS, FUSED_MAX_TILE = 4, 4
    SUM_X, SUM_Y, ROW_THREADS, WRITE_THREADS = 2, 2, 4, 4
    TARGET_BLOCKS = 2  # aim for at least this many fused blocks
    GRAD_MIN_BLOCKS = 4  # fewer weight-gradient output tiles than this: split the batch
else:
    # 32x32 output tiles of 64 threads, 4x4 outputs each: the batches here are small (B = 256 gives
    # only 64 blocks of 64x64 for a 1024-wide layer on 132 SMs), so more, smaller blocks fill the GPU
    GEMM_THREADS, GEMM_REG, GEMM_BK = 8, 4, 16
    FUSED_THREADS, FUSED_MAX_TILE = 128, 32
    SUM_X, SUM_Y, ROW_THREADS, WRITE_THREADS = 32, 8, 128, 256
    TARGET_BLOCKS = 512  # fixed, not read from the card: results must not depend on it
    GRAD_MIN_BLOCKS = 96
GEMM_TILE = GEMM_THREADS * GEMM_REG

FUSED_MAX_WIDTH = 128  # the fused path is used when every width is at most this
FUSED_SAMPLES_PER_THREAD = 4  # register blocking of the fused kernel's products
FUSED_MAX_LAYERS = 16
FLAG_THETA, FLAG_X, FLAG_Y, FLAG_RANGE = range(4)
N_FLAGS = 4
"""The device input checks' flags, in this order in every flags array (the fused workspace's, after the
tile losses, and the tiled path's): non-finite θ, X, targets; labels or targets out of range."""
SHARED_BYTES = 48 * 1024  # dynamic shared memory available without an opt-in
DIRECT_LAUNCH = False
"""Launch each kernel through its overload for the declared signature, resolved once per dtype,
instead of Numba's dispatcher (which types every argument on every launch). An A/B switch that
``benchmarks/gpu_check.py`` measures (results compared bit for bit first), off by default: it
skips the dispatcher's typing, so every array argument must be C-contiguous and every argument of
the declared type. The device inputs are (:func:`fastgrad.cuda.check_device_inputs` requires
it), the scratch buffers are; a caller's ``out`` for the per-sample rows is not checked for
contiguity, so a strided ``out`` would be written wrongly with the switch on. Ignored under the
simulator, which has no compiled overloads."""


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


# ---------------------------------------------------------- kernel registry


class Kernel:
    """One CUDA kernel: ``build(F)`` gives its Python function, ``signature(F)`` its argument types."""

    def __init__(self, build, signature):
        self.name = build.__name__
        self.build = build
        self.signature = signature
        self._compiled: dict = {}
        self._direct: dict = {}

    def launch(self, dtype, grid, block, *args, shared: int = 0) -> None:
        """Launch the kernel for float dtype ``dtype`` on ``grid`` × ``block`` with ``shared`` bytes of
        dynamic shared memory. Every launch of the package goes through here, so :data:`LAUNCHES`
        counts them (a test holds each call's launch count) and a cheaper launcher has one place to go."""
        LAUNCHES[self.name] += 1
        if DIRECT_LAUNCH and not SIMULATOR:
            k = self._direct.get(dtype)
            if k is None:
                k = self._direct[dtype] = self.resolved(dtype)
            k.launch(args, *_dims(grid, block), _default_stream(), shared)
            return
        self.compiled(dtype)[grid, block, 0, shared](*args)

    def resolved(self, dtype):
        """The compiled overload (numba-cuda's ``_Kernel``) for the declared signature and float dtype
        ``dtype``: what :data:`DIRECT_LAUNCH` launches."""
        return self.compiled(dtype).compile(tuple(self.signature(numba.from_dtype(np.dtype(dtype)))))

    def compiled(self, dtype):
        """The kernel for float dtype ``dtype``, compiled lazily (at its first launch), once per process."""
        dtype = np.dtype(dtype)
        k = self._compiled.get(dtype)
        if k is None:
            k = self._compiled[dtype] = cuda.jit(self.build(numba.from_dtype(dtype)))
        return k


_STREAM = []


def _default_stream():
    """The default stream as the object a compiled kernel's ``launch`` takes (numba-cuda's launch
    configuration converts the ``0`` of ``kernel[grid, block, 0, shared]`` the same way), made once."""
    if not _STREAM:
        from numba.cuda.cudadrv import driver

        _STREAM.append(driver._to_core_stream(0))
    return _STREAM[0]


def _dims(grid, block):
    """``(grid, block)`` as the 3-tuples a compiled kernel's ``launch`` takes (ints or tuples given)."""
    from numba.cuda.errors import normalize_kernel_dimensions

    return normalize_kernel_dimensions(grid, block)


KERNELS: dict[str, Kernel] = {}
"""Every kernel by name (for ``compile_ptx`` and the tests)."""

LAUNCHES: Counter = Counter()
"""Launches per kernel name since the last ``LAUNCHES.clear()``, counted by :meth:`Kernel.launch`.
A launch costs tens of µs of host time through Numba's dispatcher, more than most kernels here
run, so the number of launches per call is a cost the tests watch (tests/cuda/test_launches.py)."""


def kernel(signature):
    """Register the kernel builder below it, with ``signature(F)``: its argument types for float ``F``."""

    def register(build) -> Kernel:
        k = Kernel(build, signature)
        KERNELS[k.name] = k
        return k

    return register


def device_function(func):
    """``func`` as a CUDA device function, inlined into its callers (NVVM ``alwaysinline``), so
    splitting a kernel into device functions keeps its local arrays in registers."""
    if cuda is None:
        return func
    if SIMULATOR:  # the simulator's jit has no forceinline
        return cuda.jit(device=True)(func)
    return cuda.jit(device=True, forceinline=True)(func)


# argument types of the signatures (C-contiguous arrays)


def vec(F):
    return nbt.Array(F, 1, "C")


def mat(F):
    return nbt.Array(F, 2, "C")


def ints(n: int):
    """A tuple of n int64 (a kernel argument passed by value, like n scalars)."""
    return nbt.UniTuple(nbt.int64, n)


def floats(F, n: int):
    return nbt.UniTuple(F, n)
