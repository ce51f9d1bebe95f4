"""fastgrad inside other people's processes: fork, Python threads, shared workspaces (docs/design.md §8).

The fork tests run in a subprocess with a timeout, so that a hang fails the test instead of CI.
"""

from __future__ import annotations

import importlib
import os
import subprocess
import sys
import textwrap
import threading

import numpy as np
import pytest
from problems import make_problem
from threadpoolctl import threadpool_limits

import fastgrad
from fastgrad import cpu

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

FORK_SCRIPT = textwrap.dedent(
    """
    import multiprocessing as mp, sys
    import numpy as np, numba, fastgrad
    net = fastgrad.MLP([6, 16, 3], activation="tanh", loss="cross_entropy")
    theta = net.init(seed=0)
    X = np.random.default_rng(0).standard_normal((300, 6)).astype(np.float32)
    y = np.arange(300) % 3

    def grad_sum(i):  # every host backend, the numba one last
        return [float(fastgrad.backprop(net, theta, X[i:], y[i:], backend=b).grad.sum())
                for b in ("naive", "numpy", "numba")]

    if __name__ == "__main__":
        parent = [grad_sum(i) for i in range(4)]  # the parent starts Numba's threads first
        with mp.get_context("fork").Pool(2) as pool:
            try:
                child = pool.map(grad_sum, range(4))
            except RuntimeError as exc:
                print("child raised:", exc)
                sys.exit(3)
        print("layer:", numba.threading_layer())
        print("same:", child == parent)
    """
)


def _run_script(script: str, env_extra: dict, timeout: float = 300) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "NUMBA_THREADING_LAYER"}  # the user's choice
    env.update(PYTHONPATH=ROOT, **env_extra)
    return subprocess.run(
        [sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=timeout, cwd=ROOT
    )


def _has_tbb() -> bool:
    from fastgrad import _threading

    return _threading.load_tbb() is not None


@pytest.mark.skipif(not hasattr(os, "fork"), reason="no fork on this platform")
@pytest.mark.skipif(not _has_tbb(), reason="TBB not installed (a dependency on Linux and Windows x86_64)")
def test_forked_pool_after_the_parent_used_numba_returns_the_parents_results():
    # Today's main: the children abort ("fork() called from a process already using GNU OpenMP")
    # and Pool.map never returns: the timeout below fails the test.
    done = _run_script(FORK_SCRIPT, {})
    assert done.returncode == 0, done.stdout + done.stderr
    assert "layer: tbb" in done.stdout
    assert "same: True" in done.stdout


@pytest.mark.skipif(not hasattr(os, "fork"), reason="no fork on this platform")
def test_forked_child_of_gnu_openmp_raises_a_clear_error_instead_of_hanging():
    try:
        from numba.np.ufunc import omppool

        vendor = omppool.openmp_vendor
    except ImportError:
        pytest.skip("Numba's OpenMP layer is not available here")
    if vendor != "GNU":
        pytest.skip(f"OpenMP here is {vendor}, not GNU")
    done = _run_script(FORK_SCRIPT, {"NUMBA_THREADING_LAYER": "omp"})
    assert done.returncode == 3, done.stdout + done.stderr
    assert "forked from one that had started Numba's GNU OpenMP threads" in done.stdout
    assert "spawn" in done.stdout


def test_the_layer_is_chosen_on_import_before_the_users_set_num_threads():
    if not _has_tbb():
        pytest.skip("TBB not installed")
    # numba.set_num_threads() starts Numba's threads: with the layer chosen only at the first
    # numba call (as before), they started on OpenMP and fastgrad's choice came too late
    script = (
        "import numba, numpy as np, fastgrad\n"
        "numba.set_num_threads(1)\n"
        "net = fastgrad.MLP([3, 4, 2]); X = np.ones((2, 3), np.float32)\n"
        "fastgrad.backprop(net, net.init(seed=0), X, np.array([0, 1]), backend='numba')\n"
        "print('layer:', numba.threading_layer())\n"
    )
    done = _run_script(script, {}, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "layer: tbb" in done.stdout


def test_tbb_preload_makes_numbas_tbb_layer_importable():
    if not _has_tbb():
        pytest.skip("TBB not installed")
    # without the preload: "libtbb.so.12: cannot open shared object file" in a pip venv
    importlib.import_module("numba.np.ufunc.tbbpool")

    assert cpu.THREADING_LAYER in ("tbb", os.environ.get("NUMBA_THREADING_LAYER", "tbb"))


LAYER_SCRIPT = """
import numba
import fastgrad._threading as t
if {hide_tbb}:  # import fastgrad chose TBB already; Numba's threads have not started, so choose again
    t.TBB_LIBRARY, t._tbb_candidates = "libtbb-not-here.so.12", lambda: []
    t._tried, t._tbb_path = False, None
    numba.config.THREADING_LAYER = "default"
from fastgrad import cpu
print("configured:", cpu.THREADING_LAYER)
"""


@pytest.mark.parametrize(
    ("hide_tbb", "env", "expected"),
    [
        (True, {}, "threadsafe"),  # no TBB: OpenMP, which two Python threads can share (workqueue cannot)
        (False, {"NUMBA_THREADING_LAYER": "workqueue"}, "workqueue"),  # the user's choice is kept
    ],
    ids=["without-tbb", "users-choice"],
)
def test_the_layer_falls_back_without_tbb_and_keeps_the_users_choice(hide_tbb, env, expected):
    done = _run_script(LAYER_SCRIPT.format(hide_tbb=hide_tbb), env, timeout=120)
    assert done.returncode == 0, done.stderr
    assert f"configured: {expected}" in done.stdout


# --------------------------------------------------------------- Python threads


@pytest.fixture(scope="module")
def big_gemm_problem():
    # the net: its GEMMs are far above OpenBLAS's single-thread threshold (MNK > 262144)
    return make_problem([32, 700, 200, 5], B=256, dtype=np.float32, seed=3)


def _bits(problem):
    net, theta, X, y = problem
    r = fastgrad.backprop(net, theta, X, y, compute=("loss", "grad", "sq_mean", "norms"), backend="numba")
    return np.concatenate([np.atleast_1d(r.loss), r.grad, r.sq_mean, r.norms])


def _in_threads(fn, n: int) -> list:
    out = [None] * n
    barrier = threading.Barrier(n)

    def work(i):
        barrier.wait()
        out[i] = fn()

    threads = [threading.Thread(target=work, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return out


def test_bits_are_the_same_from_the_main_thread_a_worker_thread_and_concurrent_calls(big_gemm_problem):
    # BLAS with 2 threads outside fastgrad's calls, set by the main thread: on today's main the
    # main thread then "controls" OpenBLAS (threadpoolctl 3.8) and a worker thread's limit to one
    # thread is ignored, so its GEMMs ran on OpenBLAS's threads and gave other bits.
    with threadpool_limits(limits=2, user_api="blas"):
        main = _bits(big_gemm_problem)
        (worker,) = _in_threads(lambda: _bits(big_gemm_problem), 1)
        concurrent = _in_threads(lambda: _bits(big_gemm_problem), 2)
        again = _bits(big_gemm_problem)
    for got in (worker, *concurrent, again):
        np.testing.assert_array_equal(got, main)


def test_blas_thread_count_is_restored_after_calls_from_any_thread(big_gemm_problem):
    from threadpoolctl import threadpool_info

    def counts():
        return [i["num_threads"] for i in threadpool_info() if i["user_api"] == "blas"]

    with threadpool_limits(limits=2, user_api="blas"):
        before = counts()
        _in_threads(lambda: _bits(big_gemm_problem), 2)
        assert counts() == before


# --------------------------------------------------------------- shared workspace


def test_a_workspace_in_use_by_another_call_raises_instead_of_corrupting_it():
    net, theta, X, y = make_problem([4, 8, 3], B=16, dtype=np.float32)
    ws = cpu.Workspace()
    expected = fastgrad.backprop(net, theta, X, y, backend="numba", workspace=ws).grad
    holding, release = threading.Event(), threading.Event()

    def other_call():  # stands for a second thread's call that is inside the kernels right now
        with ws.claimed():
            holding.set()
            release.wait(30)

    t = threading.Thread(target=other_call)
    t.start()
    try:
        assert holding.wait(30)
        with pytest.raises(RuntimeError, match="workspace: this Workspace is in use by another call"):
            fastgrad.backprop(net, theta, X, y, backend="numba", workspace=ws)
    finally:
        release.set()
        t.join()
    # the refused call left the workspace usable, and the next call is right
    again = fastgrad.backprop(net, theta, X, y, backend="numba", workspace=ws).grad
    np.testing.assert_array_equal(again, expected)


def test_threads_sharing_one_workspace_never_get_wrong_results():
    # The case: 28 of 30 results were wrong. Now every call either raises or is right.
    net, theta, X, y = make_problem([16, 64, 64, 4], B=512, dtype=np.float64, seed=1)
    ws = cpu.Workspace()
    expected = fastgrad.backprop(net, theta, X, y, backend="numba").grad
    results, errors = [], []

    def work():
        for _ in range(10):
            try:
                results.append(fastgrad.backprop(net, theta, X, y, backend="numba", workspace=ws).grad)
            except RuntimeError as exc:
                errors.append(exc)

    threads = [threading.Thread(target=work) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(results) + len(errors) == 30
    for got in results:
        np.testing.assert_array_equal(got, expected)
