"""The CUDA kernel tests run in-process only on a GPU or under the CUDA simulator.

Without either, ``tests/test_cuda.py::test_cuda_kernels_under_simulator`` runs this
folder in a subprocess with ``NUMBA_ENABLE_CUDASIM=1`` (the variable must be set
before ``numba.cuda`` is first imported, so it cannot be switched on here).
"""

import os


def _kernels_can_run_here() -> bool:
    if os.environ.get("NUMBA_ENABLE_CUDASIM") == "1":
        return True
    try:
        from numba import cuda
    except Exception:
        return False
    return bool(cuda.is_available())


collect_ignore_glob = [] if _kernels_can_run_here() else ["test_*.py"]
