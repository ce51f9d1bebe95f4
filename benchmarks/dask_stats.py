"""Dataset-scale statistics on Dask (``fastgrad.dask``): overhead, scaling with workers, memory.

Part of the asv suite (history across commits); also a script that takes the numbers of
docs/scale.md in one run, A/B interleaved::

    python benchmarks/dask_stats.py [--log2-samples 20] [--rounds 5] [--chunk-rows 65536]

The problem: docs/design.md §6's narrow net [64, 64, 64, 10], tanh, cross-entropy, float32, with
2^20 samples in a memory-mapped ``.npy`` file (written once to the temp folder), and
``compute=("grad", "noise_scale")``. Compared, each on one Numba thread:

- ``core``: one :func:`fastgrad.backprop` over all the rows, in this process;
- ``dask-1``, ``dask-2``: :func:`fastgrad.dask.backprop` on a ``LocalCluster`` of one or
  two worker processes (one thread each, ``NUMBA_NUM_THREADS=1``), reading their chunks
  from the same file.

The script warms every runner up (compilation, page cache), then times them in turn,
``rounds`` times, so each round sees the same load; ratios are medians of per-round ratios.
It reports each worker's peak resident memory (Linux's ``VmHWM``) against the chunk size, and
for a fixed chunk size at N and N/4, which shows whether memory grows with N. It is a
script, not a test: nothing here asserts.
"""

from __future__ import annotations

import argparse
import datetime
import functools
import os
import statistics
import sys
import tempfile

import numpy as np

try:
    from . import _timing
except ImportError:  # run as a script (python benchmarks/dask_stats.py): its folder is on sys.path
    import _timing

SIZES = (64, 64, 64, 10)
"""docs/design.md §6's narrow configuration."""
COMPUTE = ("grad", "noise_scale")
WORKER_ENV = {"NUMBA_NUM_THREADS": "1", "OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1"}


@functools.cache
def dataset(log2_samples: int) -> tuple[str, str]:
    """Paths of X (2^k, 64) float32 and y (2^k,) int64 ``.npy`` files, written once per machine."""
    n = 2**log2_samples
    folder = tempfile.gettempdir()
    x_path = os.path.join(folder, f"fastgrad-bench-narrow-X-2^{log2_samples}.npy")
    y_path = os.path.join(folder, f"fastgrad-bench-narrow-y-2^{log2_samples}.npy")
    if not (os.path.exists(x_path) and os.path.exists(y_path)):
        rng = np.random.default_rng(0)
        X = np.lib.format.open_memmap(x_path + ".tmp", mode="w+", dtype=np.float32, shape=(n, SIZES[0]))
        for r0 in range(0, n, 2**16):
            r1 = min(n, r0 + 2**16)
            X[r0:r1] = rng.standard_normal((r1 - r0, SIZES[0]), dtype=np.float32)
        X.flush()
        del X
        np.save(y_path, rng.integers(0, SIZES[-1], n))
        os.replace(x_path + ".tmp", x_path)
    return x_path, y_path


def problem(log2_samples: int):
    """``(net, theta, X, y)``: X memory-mapped, y in memory."""
    import fastgrad

    x_path, y_path = dataset(log2_samples)
    net = fastgrad.MLP(list(SIZES), activation="tanh", loss="cross_entropy")
    theta = net.init(seed=0, dtype=np.float32)
    return net, theta, np.load(x_path, mmap_mode="r"), np.load(y_path)


def start_cluster(workers: int):
    """A ``(cluster, client)`` of ``workers`` processes with one thread (and one Numba thread) each."""
    import distributed

    cluster = distributed.LocalCluster(
        n_workers=workers,
        threads_per_worker=1,
        processes=True,
        dashboard_address=":0",
        env=WORKER_ENV,
        silence_logs=40,
    )
    return cluster, distributed.Client(cluster)


def worker_peak_rss_mb(client) -> list[float]:
    """Each worker's peak resident memory so far (MB); see :func:`peak_rss_mb`."""

    def peak():  # nested, so that it travels by value (workers cannot import this module)
        with open("/proc/self/status") as fh:
            return next(int(line.split()[1]) / 1024 for line in fh if line.startswith("VmHWM:"))

    return sorted(client.run(peak).values())


def peak_rss_mb() -> float:
    """This process's peak resident memory (MB): Linux's VmHWM, which a new program starts afresh
    (``ru_maxrss`` is kept across ``execve``: a worker spawned by a big parent reports the
    parent's peak)."""
    with open("/proc/self/status") as fh:
        return next(int(line.split()[1]) / 1024 for line in fh if line.startswith("VmHWM:"))


def worker_rss_mb(client) -> list[float]:
    """Each worker's resident memory now (MB)."""

    def rss():
        import psutil

        return psutil.Process().memory_info().rss / 2**20

    return sorted(client.run(rss).values())


def warm_up(client, net, theta) -> list[float]:
    """Load the kernels on every worker with a tiny run (2^12 rows); return each worker's RSS after it."""
    dask_call(client, net, theta, 12, 1024)()
    return worker_rss_mb(client)


def dask_call(client, net, theta, log2_samples: int, chunk_rows: int):
    """The dataset's chunks read from the files by the workers (``fastgrad.dask.from_npy``)."""
    import fastgrad.dask

    x_path, y_path = dataset(log2_samples)
    dX = fastgrad.dask.from_npy(x_path, chunk_rows)
    dy = fastgrad.dask.from_npy(y_path, chunk_rows)
    return lambda: fastgrad.dask.backprop(net, theta, dX, dy, COMPUTE, backend="numba", scheduler=client)


def core_call(net, theta, X, y):
    import fastgrad

    return lambda: fastgrad.backprop(net, theta, X, y, COMPUTE, backend="numba")


def _require_dask():
    try:
        import distributed  # noqa: F401

        import fastgrad.dask  # noqa: F401
    except ImportError as exc:  # asv: skip on commits or environments without it
        raise NotImplementedError(f"fastgrad.dask is not available here: {exc}") from None


# ----------------------------------------------------------------------- asv


class DatasetNoiseScale:
    """The gradient and noise scale of 2^20 narrow samples from a memory-mapped ``.npy``."""

    params = (["core", "dask-1", "dask-2"], [65536])
    param_names = ("runner", "chunk_rows")
    timeout = 600.0
    number = 1
    repeat = 3

    def setup(self, runner, chunk_rows):
        _require_dask()
        import numba

        net, theta, X, y = problem(20)
        self.client = self.cluster = None
        if runner == "core":
            numba.set_num_threads(1)
            self.call = core_call(net, theta, X, y)
        else:
            self.cluster, self.client = start_cluster(int(runner.split("-")[1]))
            self.call = dask_call(self.client, net, theta, 20, chunk_rows)
        self.call()  # compile or load the kernels everywhere; fill the page cache

    def teardown(self, runner, chunk_rows):
        if self.client is not None:
            self.client.close()
            self.cluster.close()

    def time_grad_noise_scale(self, runner, chunk_rows):
        self.call()

    def track_peak_rss_per_worker_mb(self, runner, chunk_rows):
        """The largest worker's peak resident memory (this process's for ``core``)."""
        if self.client is None:
            return peak_rss_mb()
        return max(worker_peak_rss_mb(self.client))

    track_peak_rss_per_worker_mb.unit = "MB"


# -------------------------------------------------------------------- script


def _load() -> str:
    return ", ".join(f"{v:.2f}" for v in _timing.load())


def measure_runners(log2: int, chunk_rows: int, rounds: int, workers=(1, 2)) -> None:
    import numba

    numba.set_num_threads(1)
    net, theta, X, y = problem(log2)
    clusters = {w: start_cluster(w) for w in workers}
    try:
        calls = {"core": core_call(net, theta, X, y)}
        for w, (_, client) in clusters.items():
            calls[f"dask-{w}"] = dask_call(client, net, theta, log2, chunk_rows)
        base = {w: warm_up(client, net, theta) for w, (_, client) in clusters.items()}
        for call in calls.values():  # warm-up: compile or load kernels, page cache
            call()
        times = {name: [] for name in calls}
        order = list(calls)
        print(f"load before: {_load()}")
        for r in range(rounds):
            for name in order[r % len(order) :] + order[: r % len(order)]:  # rotate who goes first
                times[name].append(_timing.timer(calls[name])())
            print(f"round {r}: " + ", ".join(f"{k} {v[-1]:.3f} s" for k, v in times.items()), flush=True)
        print(f"load after:  {_load()}")
        rows = 2**log2
        print(f"\n{rows} samples, chunks of {chunk_rows} rows, {rounds} rounds (median s, samples/s):")
        for name, ts in times.items():
            print(f"  {name:<7} {statistics.median(ts):8.3f} s  {rows / statistics.median(ts):12.0f}/s  {ts}")
        first = f"dask-{workers[0]}"
        over = statistics.median(d / c for d, c in zip(times[first], times["core"]))
        print(f"  overhead {first} / core: {over:.3f}x (median of per-round ratios)")
        for w in workers[1:]:
            speed = statistics.median(a / b for a, b in zip(times[first], times[f"dask-{w}"]))
            print(f"  throughput dask-{w} / {first}: {speed:.3f}x")
        for w, (_, client) in clusters.items():
            peak = [round(v) for v in worker_peak_rss_mb(client)]
            warm = [round(v) for v in base[w]]
            print(f"  RSS per worker, dask-{w}: after a tiny warm-up {warm} MB, peak {peak} MB")
    finally:
        for cluster, client in clusters.values():
            client.close()
            cluster.close()


def measure_chunks(log2: int, chunk_sizes: list[int]) -> None:
    """Time and each worker's peak memory against the chunk size: one fresh 1-worker cluster each."""
    net, theta, _, _ = problem(log2)
    print(
        f"\nchunk size (1 worker, {2**log2} samples): rows, X's MB per chunk, chunks, median of 3 (s), "
        "worker RSS after a tiny warm-up, peak RSS, peak - warm (MB)"
    )
    for rows in chunk_sizes:
        cluster, client = start_cluster(1)
        try:
            base = warm_up(client, net, theta)[0]
            call = dask_call(client, net, theta, log2, rows)
            t = _timing.median(_timing.consecutive(call, 3))
            peak = worker_peak_rss_mb(client)[0]
            mb = rows * SIZES[0] * 4 / 2**20
            print(
                f"  {rows:>8} {mb:6.1f} {-(-(2**log2) // rows):>6} {t:8.3f} {base:8.0f} {peak:8.0f} "
                f"{peak - base:8.0f}"
            )
        finally:
            client.close()
            cluster.close()


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--log2-samples", type=int, default=20)
    parser.add_argument("--chunk-rows", type=int, default=65536)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--chunk-sizes", default="8192,32768,65536,262144", help="for the memory table")
    parser.add_argument(
        "--workers",
        default="1,2",
        help="comma-separated worker counts, one cluster each (one thread per worker)",
    )
    parser.add_argument("--skip-runners", action="store_true")
    parser.add_argument("--skip-chunks", action="store_true")
    args = parser.parse_args(argv)
    import logging

    import dask
    import numba

    import fastgrad

    logging.getLogger("distributed").setLevel(logging.WARNING)
    print(
        f"{datetime.datetime.now(datetime.UTC):%Y-%m-%d %H:%M} UTC, {os.cpu_count()} cores, fastgrad "
        f"{fastgrad.__version__}, numba {numba.__version__}, dask {dask.__version__}; load {_load()}"
    )
    if not args.skip_runners:
        workers = tuple(int(w) for w in args.workers.split(","))
        measure_runners(args.log2_samples, args.chunk_rows, args.rounds, workers)
    if not args.skip_chunks:
        measure_chunks(args.log2_samples, [int(s) for s in args.chunk_sizes.split(",")])
        measure_chunks(args.log2_samples - 2, [args.chunk_rows])
    return 0


if __name__ == "__main__":
    sys.exit(main())
