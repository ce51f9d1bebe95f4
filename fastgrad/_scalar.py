"""Typing helpers shared by the scalar code of every compiled target.

Numba types a Python float literal as float64, and ``float32 * float64`` is
float64: a literal such as ``1.0 - t * t`` silently turns float32 kernels into
float64 ones (slow on the GPU, and not what the user asked for). ``like(z, c)``
returns the constant ``c`` in the float type of ``z``; it is resolved at
compile time, so it costs nothing, and it works on the CPU and CUDA targets.
"""

from __future__ import annotations

import numpy as np
from numba import types
from numba.extending import overload


def like(z, c):
    """Return constant ``c`` in the floating type of ``z`` (pure-Python fallback: ``z`` may be
    a NumPy scalar or array, so the shared scalar code also runs element-wise on host arrays)."""
    return np.asarray(z).dtype.type(c)


@overload(like)
def _like_overload(z, c):
    if isinstance(z, types.Float):
        float_type = z

        def impl(z, c):
            return float_type(c)

        return impl
    return None
