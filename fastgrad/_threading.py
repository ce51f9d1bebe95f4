"""Numba's threading layer, chosen on purpose, and the fork guard of the numba backend.

``import fastgrad`` calls :func:`choose_layer` (:mod:`fastgrad.cpu` again, harmlessly), before
any kernel runs:

- TBB (pip's ``tbb``, a dependency of fastgrad where PyPI has wheels) is made loadable: pip
  puts ``libtbb.so.12`` in ``<venv>/lib``, which is not on the loader's path, so Numba's
  ``tbbpool`` fails to import ("libtbb.so.12: cannot open shared object file") unless the
  library is loaded first. :func:`load_tbb` loads it by its full path (``RTLD_GLOBAL``).
- When the user has not chosen a layer (``NUMBA_THREADING_LAYER`` or
  ``numba.config.THREADING_LAYER`` still ``"default"``) and Numba has not started its
  threads yet, the layer is set to ``"tbb"`` when TBB loads, else to ``"threadsafe"``
  (OpenMP): Numba's own default would pick ``workqueue`` where neither is present, which
  aborts when two Python threads call a kernel at once.

Why TBB: a forked child (``multiprocessing``'s default start method on Linux, DataLoader
workers) cannot use GNU OpenMP once its parent has started OpenMP threads; Numba aborts the
child ("fork() called from a process already using GNU OpenMP"), and ``Pool.map`` then never
returns. TBB works in a forked child, and its idle workers sleep instead of spinning, so a
small call stays fast on a machine shared with other busy processes (docs/benchmarks.md).

Where TBB is missing and the layer is GNU OpenMP, :func:`check_fork_safe` makes the numba
backend raise a clear ``RuntimeError`` in such a child instead of letting it abort.

BLAS threads: the numba backend's GEMMs are Numba's ``np.dot`` (SciPy's OpenBLAS) called inside
``prange``, so BLAS is held to one thread for the duration of a call (:data:`kernel_blas`), and the
threads come from Numba alone. OpenBLAS partitions a multi-threaded GEMM differently, with other
bits, so the hold must work from every Python thread: pip's OpenBLAS (pthreads) is set through its
own ``openblas_set_num_threads``, because threadpoolctl 3.8 ignores a limit set by any thread but
the first one that set one (:class:`_BLASThreads`); other BLAS libraries go through threadpoolctl.
The kernels hold only the libraries Numba's GEMMs can call (SciPy's LP64 interface, not NumPy's
ILP64 OpenBLAS); :data:`single_threaded_blas` holds every one (NumPy's GEMMs on threads). The hold
is process-wide: BLAS calls of other Python threads run on one thread while a fastgrad call is
inside the kernels.
"""

from __future__ import annotations

import ctypes
import importlib
import itertools
import os
import sys
import threading

import numba

TBB_LIBRARY = {"win32": "tbb12.dll", "darwin": "libtbb.12.dylib"}.get(sys.platform, "libtbb.so.12")
"""The file name of the TBB runtime that Numba's ``tbbpool`` links against."""
TBB_MIN_INTERFACE = 12060
"""Numba refuses TBB runtimes older than this interface version (oneTBB 2021.6)."""

_tbb_path: str | None = None
_tried = False
_forked_from_layer: str | None = None


def _tbb_candidates() -> list[str]:
    """Paths where the TBB runtime may be: the files of the installed ``tbb`` distribution,
    then ``<sys.prefix>/lib`` (pip's data files) and ``<sys.prefix>/Library/bin`` (Windows)."""
    paths = []
    try:
        from importlib import metadata

        files = metadata.distribution("tbb").files or []
        paths += [str(f.locate()) for f in files if f.name == TBB_LIBRARY]
    except Exception:  # no tbb distribution, or one without a RECORD
        pass
    for folder in (os.path.join(sys.prefix, "lib"), os.path.join(sys.prefix, "Library", "bin")):
        paths.append(os.path.join(folder, TBB_LIBRARY))
    return [os.path.abspath(p) for p in paths if os.path.exists(p)]


def load_tbb() -> str | None:
    """Load the TBB runtime so that Numba's ``tbbpool`` finds it; returns what was loaded
    (a path, or the bare file name when the loader found it by itself), or ``None``.

    A runtime older than Numba accepts counts as missing."""
    global _tbb_path, _tried
    if _tried:
        return _tbb_path
    _tried = True
    for target in (TBB_LIBRARY, *_tbb_candidates()):
        try:
            lib = ctypes.CDLL(target, mode=getattr(ctypes, "RTLD_GLOBAL", 0))
            if lib.TBB_runtime_interface_version() < TBB_MIN_INTERFACE:
                continue
        except (OSError, AttributeError):
            continue
        _tbb_path = target
        break
    return _tbb_path


def _launched_layer() -> str | None:
    """The layer Numba's threads run on, or ``None`` while they have not started."""
    try:
        return numba.threading_layer()
    except ValueError:  # "Threading layer is not initialized."
        return None


def choose_layer() -> str:
    """Load TBB if it is installed, and pick Numba's layer when the user has not; returns the
    configured layer name (what ``numba.config.THREADING_LAYER`` now says)."""
    tbb = load_tbb() is not None
    if tbb:
        try:
            importlib.import_module("numba.np.ufunc.tbbpool")  # the extension that links libtbb
        except ImportError:
            tbb = False
    if numba.config.THREADING_LAYER == "default" and _launched_layer() is None:
        numba.config.THREADING_LAYER = "tbb" if tbb else "threadsafe"
    return numba.config.THREADING_LAYER


def _omp_vendor() -> str:
    try:
        from numba.np.ufunc import omppool

        return str(omppool.openmp_vendor)
    except Exception:  # pragma: no cover - omppool is there whenever the layer is omp
        return "unknown"


def _after_fork_in_child() -> None:
    global _forked_from_layer
    layer = _launched_layer()
    if layer is not None:
        _forked_from_layer = layer


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)


def check_fork_safe() -> None:
    """Raise ``RuntimeError`` in a child forked from a process whose Numba threads run on GNU
    OpenMP, which aborts the child at the first parallel kernel (the parent's threads are gone)."""
    if _forked_from_layer == "omp" and _omp_vendor() == "GNU":
        raise RuntimeError(
            "backend 'numba': this process was forked from one that had started Numba's GNU OpenMP "
            "threads, and GNU OpenMP cannot run in a forked child. Use Numba's TBB threading layer "
            "(pip install tbb; fastgrad picks it unless NUMBA_THREADING_LAYER or "
            "numba.config.THREADING_LAYER says otherwise), or start the workers with the 'spawn' or "
            "'forkserver' method (multiprocessing.get_context('spawn')), or use backend='numpy' in them."
        )


def describe() -> str:
    """One line for reports: the configured and the running layer, and where TBB came from."""
    running = _launched_layer() or "not started"
    tbb = _tbb_path or "absent"
    return f"numba threading layer: {numba.config.THREADING_LAYER} (running: {running}); tbb: {tbb}"


# ------------------------------------------------------------------ BLAS threads


class _BLASThreads:
    """Get and set one BLAS library's thread count, process-wide, from any Python thread.

    OpenBLAS built with pthreads (NumPy's and SciPy's wheels) has one process-wide count, but
    threadpoolctl (3.8) lets only the first Python thread that set it change it and silently
    ignores the others: a call from a second thread then ran its GEMMs with OpenBLAS's threads,
    which partition a GEMM differently, and got other bits (73k of 164k gradient entries on a
    [32, 700, 200, 5] net). So for that library the count is set through OpenBLAS's own
    ``openblas_set_num_threads``; other libraries go through threadpoolctl."""

    def __init__(self, lib):
        self._lib = lib
        self._get = self._set = None
        self.ilp64 = False
        """An OpenBLAS with 64-bit integers (symbols suffixed ``64_``, as NumPy's wheels ship)."""
        if lib.internal_api == "openblas" and lib.threading_layer != "openmp":
            dynlib = ctypes.CDLL(lib.filepath)
            for prefix, suffix in itertools.product(("", "scipy_"), ("", "64_", "_64")):
                get = getattr(dynlib, f"{prefix}openblas_get_num_threads{suffix}", None)
                set_ = getattr(dynlib, f"{prefix}openblas_set_num_threads{suffix}", None)
                if get is not None and set_ is not None:
                    self._get, self._set = get, set_
                    self.ilp64 = "64" in suffix
                    break

    def get(self) -> int:
        return int(self._get()) if self._get is not None else self._lib.get_num_threads()

    def set(self, n: int) -> None:
        if self._set is not None:
            self._set(int(n))
        else:
            self._lib.set_num_threads(n)


class _BLASHolds:
    """The process's BLAS libraries and, per library, how many calls hold it at one thread: a library's
    setting is saved when its first hold begins and restored when its last one ends, under one lock, so
    nested and concurrent holds (two Python threads) restore the user's setting exactly once."""

    def __init__(self):
        self.lock = threading.Lock()
        self.inside: dict = {}
        self.saved: dict = {}
        self._controllers = None

    def libraries(self) -> list[_BLASThreads]:
        if self._controllers is None:
            import scipy.linalg.cython_blas  # noqa: F401  (load the BLAS Numba calls)
            from threadpoolctl import ThreadpoolController

            libs = ThreadpoolController().select(user_api="blas").lib_controllers
            self._controllers = [_BLASThreads(lib) for lib in libs]
        return self._controllers


_blas_holds = _BLASHolds()


class _SingleThreadedBLAS:
    """Holds BLAS libraries to one thread while a call is inside a kernel: every loaded one, or with
    ``kernels_only`` those Numba's GEMMs can call. ``with single_threaded_blas:`` (or ``...()``).

    Numba's ``np.dot`` calls SciPy's LP64 interface (``int *`` dimensions), never an ILP64 library such
    as NumPy's own OpenBLAS (symbols suffixed ``64_``), so the kernels' hold leaves that one alone:
    holding it as well would cost two more ctypes calls a call (docs/benchmarks.md, host overhead).
    NumPy's GEMMs run on threads (:mod:`fastgrad.attribution`) need the hold of every library.
    A library already at one thread is left alone."""

    def __init__(self, kernels_only: bool = False):
        self._kernels_only = kernels_only
        self._libs = None

    def _blas(self) -> list[_BLASThreads]:
        if self._libs is None:
            libs = _blas_holds.libraries()
            self._libs = [lib for lib in libs if not lib.ilp64] if self._kernels_only else libs
        return self._libs

    def __call__(self):
        return self

    def __enter__(self):
        holds = _blas_holds
        with holds.lock:
            for lib in self._blas():
                k = holds.inside.get(lib, 0)
                if k == 0:
                    n = holds.saved[lib] = lib.get()
                    if n != 1:
                        lib.set(1)
                holds.inside[lib] = k + 1
        return self

    def __exit__(self, *exc):
        holds = _blas_holds
        with holds.lock:
            for lib in self._blas():
                k = holds.inside[lib] = holds.inside[lib] - 1
                if k == 0 and holds.saved[lib] != 1:
                    lib.set(holds.saved[lib])


single_threaded_blas = _SingleThreadedBLAS()
kernel_blas = _SingleThreadedBLAS(kernels_only=True)
"""The hold around the Numba kernels: the BLAS libraries their GEMMs call."""
