"""Device memory the kernels share across calls: scratch buffers, pinned host buffers, layouts."""

from __future__ import annotations

import functools

import numpy as np

from ..mlp import MLP
from .config import cuda

_SCRATCH: dict = {}
_FLAT: dict = {}
_SCRATCH_MAX = 64


def scratch(tag: str, shape: tuple, dtype, zero: bool = False, on_create=None):
    """A device buffer for intermediates that never leave this package, reused across calls.

    numba allocates with cudaMalloc/cudaFree, which cost more than the small kernels
    here; every kernel runs on the default stream, so reuse by the next call is ordered.
    """
    key = (tag, tuple(int(x) for x in shape), np.dtype(dtype).str, zero)
    buf = _SCRATCH.get(key)
    if buf is None:
        if len(_SCRATCH) >= _SCRATCH_MAX:
            _FLAT.pop(next(iter(_SCRATCH)), None)
            _SCRATCH.pop(next(iter(_SCRATCH)))
        if zero:
            buf = _SCRATCH[key] = cuda.to_device(np.zeros(key[1], dtype=dtype))
        else:
            buf = _SCRATCH[key] = cuda.device_array(key[1], dtype=dtype)
        _FLAT[key] = buf.reshape(buf.size)
        if on_create is not None:
            on_create(buf)
    return buf


def scratch_flat(tag: str, shape: tuple, dtype):
    """``scratch`` and a cached flat view of it (a reshape costs tens of µs of Python per call)."""
    buf = scratch(tag, shape, dtype)
    return buf, _FLAT[(tag, tuple(int(x) for x in shape), np.dtype(dtype).str, False)]


def clear_scratch() -> None:
    """Free every cached scratch buffer (benchmarks call it between configurations)."""
    _SCRATCH.clear()
    _FLAT.clear()


@functools.cache
def layout(sizes: tuple[int, ...]):
    """The widths, then each layer's offset in θ, on the device (the fused kernel's ``layout``)."""
    w_starts = [s.w_start for s in MLP(sizes).layers]
    return cuda.to_device(np.asarray(list(sizes) + w_starts, dtype=np.int64))


@functools.cache
def pinned(n: int, dtype: str):
    """A page-locked host buffer: small device-to-host copies into it are several times cheaper."""
    return cuda.pinned_array(n, dtype=np.dtype(dtype))
