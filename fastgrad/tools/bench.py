"""Side-by-side timings: fastgrad's backends, the NumPy reference, the peers, and the floors.

Job: the peer comparison a user runs (``fastgrad bench``) — every backend against the
NumPy reference, PyTorch and JAX, and the machine's floors, one table and a JSON
record. (The other harnesses: ``benchmarks/cpu_targets.py`` A/Bs the CPU kernels
against PyTorch and the floors; ``benchmarks/gpu_check.py`` the GPU; the asv suite in
``benchmarks/`` tracks history across commits.) Configurations and floors come from
:mod:`fastgrad.tools.configs`.

One process, interleaved repetitions, medians (docs/design.md §6). For every configuration
(``narrow``, ``mnist``, ``wide``) each implementation of a quantity runs once per
round, in a fixed order, so slow drifts of a noisy machine hit every row alike:

- fastgrad, every backend that :func:`fastgrad.available_backends` lists except
  ``naive`` (``numpy`` is the NumPy reference);
- PyTorch autograd (mean gradient) and ``torch.func`` ``vmap(grad)`` (per-sample),
  when ``torch`` is installed;
- JAX ``jit(grad)`` and ``jit(vmap(grad))``, when ``jax`` is installed;
- the floors, measured in the same rounds: the sgemm rate of a float32 NumPy
  matmul (the mean gradient needs 6·B·Σ n_l n_{l-1} flops) and the fill bandwidth
  of a Numba loop writing outer products (per-sample gradients write B·P numbers).
  They are what NumPy's BLAS and a plain Numba loop reach on this machine, not the
  hardware's peak: a better GEMM (XLA's, say) can run below "× floor" = 1.

Before timing, every implementation runs once (the warm-up) and its result is
compared with the float64 NumPy reference, so every row computes the same thing.

Run ``fastgrad bench`` or ``python -m fastgrad.tools.bench`` (``--help``).
The numbers depend on the machine and its BLAS set-up: ``OPENBLAS_CORETYPE`` and
``OPENBLAS_L2_SIZE``, when set, change NumPy's (and so the reference's) speed;
the JSON output records them.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import sys
import time
from dataclasses import dataclass, field
from collections.abc import Callable, Sequence

import numpy as np

from ..api import available_backends, backprop, clipped_grad
from . import configs
from .configs import CONFIGS, SMALL_BATCH_CONFIGS, mean_grad_flops, per_sample_bytes, problem

QUANTITIES: tuple[str, ...] = ("grad", "per_sample", "grad+norms", "clipped")
"""What is timed: the mean gradient, per-sample gradients (written into a preallocated
buffer), the mean gradient with per-sample norms, and DP-SGD's clipped mean gradient."""

FLOOR_OF = {"grad": "flops", "grad+norms": "flops", "clipped": "flops", "per_sample": "writes"}
"""Which floor bounds each quantity from below."""

MAX_NORM = 1.0
"""Clipping norm of the ``clipped`` rows."""


def config_names() -> list[str]:
    """Every name ``compare`` takes: docs/design.md §6's :data:`CONFIGS` (the default), then its
    small-batch set (``SMALL_BATCH_CONFIGS``, where training loops live)."""
    return [*CONFIGS, *SMALL_BATCH_CONFIGS]


SGEMM_SIZE = 1024
"""The sgemm rate is measured on (n × n) @ (n × n) float32, n = SGEMM_SIZE: the size of
the ``wide`` layers, large enough to reach the BLAS's sustained rate."""

FILL_SHAPE = (256, 512, 512)
"""The fill bandwidth is measured writing R outer products of n- and m-vectors, (R, n, m)
= FILL_SHAPE: 268 MB of float32, far beyond the caches, like the per-sample matrices."""


# ------------------------------------------------------------------ floors


def sgemm_timer(n: int | None = None) -> tuple[Callable[[], object], int]:
    """:func:`fastgrad.tools.configs.sgemm_timer`: a float32 (n × n) matmul call and its flop count;
    ``n`` defaults to :data:`SGEMM_SIZE`."""
    return configs.sgemm_timer(SGEMM_SIZE if n is None else n)


def fill_timer(shape: tuple[int, int, int] | None = None) -> tuple[Callable[[], object], int]:
    """A call running the fill floor (:func:`fastgrad.tools.configs.fill_kernel`: R float32 outer
    products of n- and m-vectors), and the bytes it writes.

    ``shape`` = (R, n, m) defaults to :data:`FILL_SHAPE`. The kernel is compiled and
    the output's pages are touched here, so the call times only the writes.
    """
    R, n, m = FILL_SHAPE if shape is None else shape
    out = np.empty((R, n * m), dtype=np.float32)
    return configs.fill_timer(out, width=m), out.nbytes


FLOOR_CALLS = 3
"""Back-to-back calls of a floor timer per round, the fastest kept: the previous implementation's
thread pool may still hold the cores for the first one, and a floor is what the machine reaches."""
SETTLE_SECONDS = 0.1  # pause before each implementation's turn (see compare())


def _best_of(fn: Callable[[], object], calls: int) -> float:
    best = float("inf")
    for _ in range(calls):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def _median_time(fn: Callable[[], object], repeat: int) -> float:
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def sgemm_rate(repeat: int = 5, n: int | None = None) -> float:
    """The machine's float32 matmul rate in flop/s (median of ``repeat`` after one warm-up)."""
    fn, flops = sgemm_timer(n)
    fn()
    return flops / _median_time(fn, repeat)


def fill_bandwidth(repeat: int = 5, shape: tuple[int, int, int] | None = None) -> float:
    """The write bandwidth of a parallel Numba loop writing outer products, in bytes/s."""
    fn, nbytes = fill_timer(shape)
    return nbytes / _median_time(fn, repeat)


# -------------------------------------------------------------- candidates


@dataclass
class Candidate:
    """One timed implementation of one quantity on one configuration."""

    config: str
    quantity: str
    impl: str
    call: Callable[[], object]
    extract: Callable[[object], dict[str, np.ndarray]]
    times: list[float] = field(default_factory=list)
    rel_error: float = float("nan")

    @property
    def median(self) -> float:
        return statistics.median(self.times)


CHECK_ROWS = 64
"""Per-sample rows compared with the float64 reference before timing."""

CHECK_RTOL = 1e-3
"""Largest relative error ‖got − ref‖ / ‖ref‖ accepted before timing (float32 against float64)."""


def reference(net, theta, X, y, quantities=QUANTITIES) -> dict[str, np.ndarray]:
    """The float64 NumPy results the candidates are checked against before timing
    (per-sample: the first :data:`CHECK_ROWS` rows)."""
    theta64, X64 = theta.astype(np.float64), X.astype(np.float64)
    res = backprop(net, theta64, X64, y, ("grad", "norms"), backend="numpy")
    ref = {"grad": res.grad, "norms": res.norms}
    if "per_sample" in quantities:
        k = min(CHECK_ROWS, X.shape[0])
        rows = backprop(net, theta64, X64[:k], y[:k], ("per_sample",), backend="numpy")
        ref["per_sample"] = rows.per_sample
    if "clipped" in quantities:
        ref["clipped"] = clipped_grad(net, theta64, X64, y, max_norm=MAX_NORM, backend="numpy")
    return ref


def _rel_error(got: dict[str, np.ndarray], ref: dict[str, np.ndarray]) -> float:
    errs = []
    for key, value in got.items():
        want = ref[key]
        value = np.asarray(value, dtype=np.float64).reshape(want.shape)
        errs.append(float(np.linalg.norm(value - want) / max(np.linalg.norm(want), np.finfo(float).tiny)))
    return max(errs)


def _fastgrad_calls(backend: str, net, theta, X, y, out) -> dict[str, tuple[Callable, Callable]]:
    k = min(CHECK_ROWS, X.shape[0])
    return {
        "grad": (lambda: backprop(net, theta, X, y, ("grad",), backend=backend), lambda r: {"grad": r.grad}),
        "per_sample": (
            lambda: backprop(net, theta, X, y, ("per_sample",), backend=backend, out=out),
            lambda r: {"per_sample": r.per_sample[:k]},
        ),
        "grad+norms": (
            lambda: backprop(net, theta, X, y, ("grad", "norms"), backend=backend),
            lambda r: {"grad": r.grad, "norms": r.norms},
        ),
        "clipped": (
            lambda: clipped_grad(net, theta, X, y, max_norm=MAX_NORM, backend=backend),
            lambda r: {"clipped": r},
        ),
    }


def _mlp_logits(ps, x, tanh):
    """The peers' forward pass of a tanh MLP: ps = (W_1, b_1, ..., W_L, b_L), x (B, n0) -> z_L."""
    h = x
    last = len(ps) // 2 - 1
    for layer in range(len(ps) // 2):
        h = h @ ps[2 * layer].T + ps[2 * layer + 1]
        if layer < last:
            h = tanh(h)
    return h


def _torch_calls(net, theta, X, y) -> dict[str, tuple[Callable, Callable]]:
    import torch
    import torch.nn.functional as F
    from torch.func import grad, vmap

    params = []
    for W, b in net.unpack(theta):
        params += [torch.tensor(W, requires_grad=True), torch.tensor(b, requires_grad=True)]
    params = tuple(params)
    Xt, yt = torch.from_numpy(X), torch.from_numpy(np.asarray(y, dtype=np.int64))

    def logits(ps, x):
        return _mlp_logits(ps, x, torch.tanh)

    def sample_loss(ps, x, label):
        return F.cross_entropy(logits(ps, x[None]), label[None])

    per_sample_grad = vmap(grad(sample_loss), in_dims=(None, 0, 0))
    detached = tuple(p.detach() for p in params)

    def mean_grad():
        loss = F.cross_entropy(logits(params, Xt), yt)
        return torch.autograd.grad(loss, params)

    k = min(CHECK_ROWS, X.shape[0])
    return {
        "grad": (mean_grad, lambda gs: {"grad": np.concatenate([g.detach().numpy().ravel() for g in gs])}),
        "per_sample": (
            lambda: per_sample_grad(detached, Xt, yt),
            lambda gs: {"per_sample": np.concatenate([g[:k].reshape(k, -1).numpy() for g in gs], axis=1)},
        ),
    }


def _jax_calls(net, theta, X, y) -> dict[str, tuple[Callable, Callable]]:
    import jax
    import jax.numpy as jnp

    params = tuple(jnp.asarray(a) for W, b in net.unpack(theta) for a in (W, b))
    Xj, yj = jnp.asarray(X), jnp.asarray(np.asarray(y, dtype=np.int32))

    def logits(ps, x):
        return _mlp_logits(ps, x, jnp.tanh)

    def sample_loss(ps, x, label):
        z = logits(ps, x)
        return jax.nn.logsumexp(z) - z[label]

    def mean_loss(ps, Xb, yb):
        return jnp.mean(jax.vmap(sample_loss, in_axes=(None, 0, 0))(ps, Xb, yb))

    mean_grad = jax.jit(jax.grad(mean_loss))
    per_sample = jax.jit(jax.vmap(jax.grad(sample_loss), in_axes=(None, 0, 0)))
    k = min(CHECK_ROWS, X.shape[0])
    return {
        "grad": (
            lambda: jax.block_until_ready(mean_grad(params, Xj, yj)),
            lambda gs: {"grad": np.concatenate([np.asarray(g).ravel() for g in gs])},
        ),
        "per_sample": (
            lambda: jax.block_until_ready(per_sample(params, Xj, yj)),
            lambda gs: {"per_sample": np.concatenate([np.asarray(g[:k]).reshape(k, -1) for g in gs], axis=1)},
        ),
    }


PEER_LABELS = {
    "torch": {"grad": "torch autograd", "per_sample": "torch.func vmap(grad)"},
    "jax": {"grad": "jax jit(grad)", "per_sample": "jax jit(vmap(grad))"},
}
"""What each peer runs for each quantity it has."""


def candidates(config, net, theta, X, y, out, backends, peers, quantities) -> list[Candidate]:
    """Every implementation of every quantity on one problem, in the order they are timed.

    ``out`` (B, P) receives fastgrad's per-sample gradients; peers allocate their own.
    """
    cands: list[Candidate] = []
    for backend in backends:
        calls = _fastgrad_calls(backend, net, theta, X, y, out)
        cands += [Candidate(config, q, f"fastgrad {backend}", *calls[q]) for q in quantities]
    for peer in peers:
        calls = {"torch": _torch_calls, "jax": _jax_calls}[peer](net, theta, X, y)
        cands += [Candidate(config, q, PEER_LABELS[peer][q], *calls[q]) for q in quantities if q in calls]
    return cands


def check(cands: Sequence[Candidate], ref: dict[str, np.ndarray]) -> None:
    """Run each candidate once (the warm-up: JIT compiles, thread pools start) and compare its
    result with the float64 reference; raise RuntimeError for one that computes something else."""
    for cand in cands:
        cand.rel_error = _rel_error(cand.extract(cand.call()), ref)
        if not cand.rel_error <= CHECK_RTOL:
            raise RuntimeError(
                f"{cand.impl} computes a different {cand.quantity} on {cand.config}: relative error "
                f"{cand.rel_error:.3g} against the float64 NumPy reference (limit {CHECK_RTOL:g})"
            )


def installed_peers() -> list[str]:
    """The peers importable here, among ``torch`` and ``jax``."""
    import importlib.util

    return [name for name in ("torch", "jax") if importlib.util.find_spec(name) is not None]


def fastgrad_backends() -> list[str]:
    """The backends timed: every available one but the slow ``naive`` definition."""
    return [b for b in available_backends() if b != "naive"]


# --------------------------------------------------------------------- run


def _cpu_seconds() -> tuple[float, float, float] | None:
    """(wall, CPU seconds busy on the whole machine, CPU seconds of this process), or None off Linux."""
    try:
        with open("/proc/stat") as fh:
            fields = [int(x) for x in fh.readline().split()[1:]]
    except (OSError, ValueError):
        return None
    busy = sum(fields) - fields[3] - (fields[4] if len(fields) > 4 else 0)  # all but idle and iowait
    own = os.times()
    return time.perf_counter(), busy / os.sysconf("SC_CLK_TCK"), own.user + own.system


def _other_share(start, end) -> float | None:
    """The share of the machine's CPUs that other processes used between ``start`` and ``end``:
    0 on a quiet machine; on a 2-CPU machine 0.5 means another process held a whole core."""
    if start is None or end is None or end[0] - start[0] < 1.0:
        return None  # the kernel counts in clock ticks (10 ms): too coarse for a shorter run
    wall = end[0] - start[0]
    other = (end[1] - start[1]) - (end[2] - start[2])
    return min(1.0, max(0.0, other / (wall * (os.cpu_count() or 1))))


def _versions(peers: Sequence[str]) -> dict[str, str]:
    import numba

    from .. import __version__

    out = {
        "python": platform.python_version(),
        "fastgrad": __version__,
        "numpy": np.__version__,
        "numba": numba.__version__,
    }
    for name in peers:
        try:
            out[name] = __import__(name).__version__
        except ImportError:
            pass
    return out


def _machine(peers: Sequence[str]) -> dict:
    info = {
        "node": platform.node(),
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "env": {
            k: os.environ[k]
            for k in (
                "OPENBLAS_CORETYPE",
                "OPENBLAS_L2_SIZE",
                "OPENBLAS_NUM_THREADS",
                "OMP_NUM_THREADS",
                "NUMBA_NUM_THREADS",
            )
            if k in os.environ
        },
    }
    try:
        import numba

        info["numba_threads"] = numba.get_num_threads()
    except Exception:  # pragma: no cover - numba is a dependency
        pass
    if "torch" in peers:
        import torch

        info["torch_threads"] = torch.get_num_threads()
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    info["cpu"] = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return info


def compare(
    configs: Sequence[str] = tuple(CONFIGS),
    repeat: int = 7,
    backends: Sequence[str] | None = None,
    peers: Sequence[str] | None = None,
    quantities: Sequence[str] = QUANTITIES,
    log: Callable[[str], None] | None = None,
) -> dict:
    """Time every implementation of every quantity, interleaved, and return the results.

    Parameters
    ----------
    configs : sequence of str
        Names from :func:`config_names` (fixed, so results compare across runs).
    repeat : int
        Rounds; each round runs every implementation once. Medians are reported.
    backends : sequence of str, optional
        fastgrad backends (default :func:`fastgrad_backends`).
    peers : sequence of str, optional
        Among ``torch``, ``jax`` (default: those installed).
    quantities : sequence of str
        Among :data:`QUANTITIES`.
    log : callable, optional
        Receives one line per configuration as it starts.

    Returns
    -------
    dict
        ``machine``, ``versions``, ``date``, ``repeat``, ``floors`` (the sgemm rate in
        flop/s and fill bandwidth in bytes/s, medians of this run) and ``rows``: one
        per (config, quantity, implementation) with the median seconds, every time,
        the ratios to the floor and to the NumPy reference, and the relative error of
        its result against the float64 NumPy reference (checked before timing).
    """
    backends, peers = _checked_args(configs, repeat, backends, peers, quantities)
    load_at_start = list(os.getloadavg()) if hasattr(os, "getloadavg") else None
    cpu_at_start = _cpu_seconds()
    sgemm, sgemm_flops = sgemm_timer()
    fill, fill_bytes = fill_timer()
    floor_runs = {"sgemm": [], "fill": []}
    rows = []
    for config in configs:
        if log is not None:
            log(f"{config}: {repeat} rounds")
        net, theta, X, y = problem(config)
        B = X.shape[0]
        out = np.empty((B, net.num_params), dtype=theta.dtype)
        cands = candidates(config, net, theta, X, y, out, backends, peers, quantities)
        check(cands, reference(net, theta, X, y, quantities))
        for _ in range(repeat):
            for timer, key in ((sgemm, "sgemm"), (fill, "fill")):
                floor_runs[key].append(_best_of(timer, FLOOR_CALLS))
            _time_round(cands)
        del out
        rows += [(cand, net, B) for cand in cands]

    machine = _machine(peers)
    machine["loadavg_at_start"] = load_at_start
    machine["loadavg_at_end"] = list(os.getloadavg()) if hasattr(os, "getloadavg") else None
    machine["other_processes_cpu_share"] = _other_share(cpu_at_start, _cpu_seconds())
    rate = sgemm_flops / statistics.median(floor_runs["sgemm"])
    bandwidth = fill_bytes / statistics.median(floor_runs["fill"])
    return {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "machine": machine,
        "versions": _versions(peers),
        "repeat": repeat,
        "floors": {
            "sgemm_flops_per_s": rate,
            "sgemm_size": SGEMM_SIZE,
            "fill_bytes_per_s": bandwidth,
            "fill_shape": list(FILL_SHAPE),
        },
        "rows": _result_rows(rows, rate, bandwidth),
    }


def _checked_args(configs, repeat, backends, peers, quantities) -> tuple[list[str], list[str]]:
    """Check :func:`compare`'s arguments; return the backends and peers to run."""
    if isinstance(repeat, bool) or not isinstance(repeat, int) or repeat < 1:
        raise ValueError(f"repeat: expected a positive int, got {repeat!r}")
    for name in configs:
        if name not in config_names():
            raise ValueError(f"configs: unknown name {name!r}; expected any of {', '.join(config_names())}")
    for q in quantities:
        if q not in QUANTITIES:
            raise ValueError(f"quantities: unknown name {q!r}; expected any of {', '.join(QUANTITIES)}")
    backends = list(fastgrad_backends() if backends is None else backends)
    known = available_backends()
    for b in backends:
        if b not in known:
            raise ValueError(f"backends: {b!r} cannot run here; available: {', '.join(known)}")
    peers = list(installed_peers() if peers is None else peers)
    for p in peers:
        if p not in ("torch", "jax"):
            raise ValueError(f"peers: unknown name {p!r}; expected any of torch, jax")
    return backends, peers


def _time_round(cands: Sequence[Candidate]) -> None:
    """One timed call of every candidate, in order, appended to its ``times``."""
    for cand in cands:
        # Each library keeps its own thread pool, whose threads spin for a while after a
        # call: timed straight after another library's call, an implementation shares the
        # 2 cores with those spinners (seen here: numba's mnist grad 23-32 ms in the
        # round, 6.5 ms alone). So: let the previous pool go idle, wake this one with an
        # untimed call, as a training loop calling it every step would, then time a call.
        time.sleep(SETTLE_SECONDS)
        cand.call()
        t0 = time.perf_counter()
        cand.call()
        cand.times.append(time.perf_counter() - t0)


def _result_rows(rows, rate: float, bandwidth: float) -> list[dict]:
    """One dict per (candidate, net, B): median, times, floor and the ratios to it and to NumPy."""
    result_rows = []
    for cand, net, B in rows:
        floor = (
            mean_grad_flops(net, B) / rate
            if FLOOR_OF[cand.quantity] == "flops"
            else per_sample_bytes(net, B) / bandwidth
        )
        result_rows.append(
            {
                "config": cand.config,
                "quantity": cand.quantity,
                "impl": cand.impl,
                "median_s": cand.median,
                "times_s": cand.times,
                "floor_s": floor,
                "floor_kind": FLOOR_OF[cand.quantity],
                "rel_error": cand.rel_error,
            }
        )
    for row in result_rows:
        ref = [
            r
            for r in result_rows
            if r["config"] == row["config"]
            and r["quantity"] == row["quantity"]
            and r["impl"] == "fastgrad numpy"
        ]
        row["vs_floor"] = row["median_s"] / row["floor_s"]
        row["vs_numpy"] = row["median_s"] / ref[0]["median_s"] if ref else None
    return result_rows


def format_table(result: dict) -> str:
    """The results as a Markdown table, with the floors and the set-up above it."""
    f, v, m = result["floors"], result["versions"], result["machine"]
    lines = [
        f"{result['date']}, {m.get('cpu', m['processor'])}, {m['cpu_count']} CPUs, "
        f"numba threads {m.get('numba_threads', '?')}"
        + (f", torch threads {m['torch_threads']}" if "torch_threads" in m else ""),
        "versions: " + ", ".join(f"{k} {val}" for k, val in v.items()),
        f"floors (this run, median over rounds of the best of {FLOOR_CALLS}): "
        f"sgemm {f['sgemm_flops_per_s'] / 1e9:.1f} GFLOP/s "
        f"(float32 {f['sgemm_size']}³), fill {f['fill_bytes_per_s'] / 1e9:.1f} GB/s; "
        f"{result['repeat']} interleaved rounds",
    ]
    if m.get("loadavg_at_start") is not None:
        lines.append(
            "load average (1, 5, 15 min) at start "
            + ", ".join(f"{x:.2f}" for x in m["loadavg_at_start"])
            + "; at end "
            + ", ".join(f"{x:.2f}" for x in m["loadavg_at_end"])
        )
    if m.get("other_processes_cpu_share") is not None:
        lines.append(
            f"other processes used {100 * m['other_processes_cpu_share']:.0f}% of the CPUs "
            "during the run (0% on a quiet machine)"
        )
    if m.get("env"):
        lines.append("environment: " + ", ".join(f"{k}={val}" for k, val in m["env"].items()))
    lines += [
        "",
        "| config | quantity | implementation | median ms | floor ms | × floor | × NumPy ref |",
        "|---|---|---|---:|---:|---:|---:|",
    ]
    order = {q: i for i, q in enumerate(QUANTITIES)}
    for r in sorted(result["rows"], key=lambda r: (config_names().index(r["config"]), order[r["quantity"]])):
        vs_np = f"{r['vs_numpy']:.2f}" if r["vs_numpy"] is not None else "–"
        lines.append(
            f"| {r['config']} | {r['quantity']} | {r['impl']} | {r['median_s'] * 1e3:.2f} | "
            f"{r['floor_s'] * 1e3:.2f} ({r['floor_kind']}) | {r['vs_floor']:.2f} | {vs_np} |"
        )
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    """Command line: print the comparison table and write the JSON; returns the exit status."""
    parser = argparse.ArgumentParser(
        prog="fastgrad bench",
        description="Time fastgrad's backends against the NumPy reference, PyTorch and JAX (when "
        "installed) and the measured floors: one process, interleaved rounds, medians.",
    )
    parser.add_argument(
        "--configs",
        default=",".join(CONFIGS),
        help=f"comma-separated, any of {', '.join(config_names())} (default: {','.join(CONFIGS)})",
    )
    parser.add_argument(
        "--quantities",
        default=",".join(QUANTITIES),
        help=f"comma-separated, any of {', '.join(QUANTITIES)} (default: all)",
    )
    parser.add_argument("--repeat", type=int, default=None, help="rounds (default 7; 3 with --quick)")
    parser.add_argument(
        "--quick", action="store_true", help="3 rounds on narrow and mnist only (about a minute)"
    )
    parser.add_argument(
        "--backends",
        default=None,
        help="comma-separated fastgrad backends (default: every available one but naive)",
    )
    parser.add_argument("--no-peers", action="store_true", help="skip PyTorch and JAX even if installed")
    parser.add_argument(
        "--json",
        default="peers.json",
        metavar="PATH",
        help="where to write the results (default peers.json; '-' for none)",
    )
    args = parser.parse_args(argv)

    def split(text):
        return [s.strip() for s in text.split(",") if s.strip()]

    configs = split(args.configs)
    if args.quick and args.configs == parser.get_default("configs"):
        configs = ["narrow", "mnist"]
    repeat = args.repeat if args.repeat is not None else (3 if args.quick else 7)
    try:
        result = compare(
            configs=configs,
            repeat=repeat,
            backends=split(args.backends) if args.backends else None,
            peers=[] if args.no_peers else None,
            quantities=split(args.quantities),
            log=lambda line: print(line, file=sys.stderr, flush=True),
        )
    except ValueError as exc:
        parser.error(str(exc))
    print(format_table(result))
    if args.json != "-":
        with open(args.json, "w") as fh:
            json.dump(result, fh, indent=1)
        print(f"\nwrote {args.json}", file=sys.stderr)
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
