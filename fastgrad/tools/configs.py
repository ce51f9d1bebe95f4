"""One source for the benchmark configurations, their problems and the floors (docs/design.md §6).

Every timing harness of the tools and of ``benchmarks/`` (``fastgrad bench``,
``benchmarks/cpu_targets.py``, ``benchmarks/gpu_check.py``) reads these. The asv suite
(``benchmarks/_problems.py``) keeps a frozen copy of :data:`CONFIGS`, because asv runs it
against old commits that lack this module; a test checks the copy matches.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable

import numpy as np

from ..mlp import MLP

CONFIGS: dict[str, tuple[tuple[int, ...], int]] = {
    "narrow": ((64, 64, 64, 10), 4096),
    "mnist": ((784, 512, 256, 10), 512),
    "wide": ((1024, 1024, 1024, 10), 256),
}
"""docs/design.md §6: name -> (layer sizes, batch size); tanh hidden layers, cross-entropy, float32."""

SMALL_BATCH_CONFIGS: dict[str, tuple[tuple[int, ...], int]] = {
    "mnist128-B64": ((784, 128, 10), 64),
    "narrow-B32": ((64, 64, 64, 10), 32),
    "narrow-B256": ((64, 64, 64, 10), 256),
}
"""docs/design.md §6's small-batch set (where training loops live): name -> (sizes, batch size)."""


def config(name: str) -> tuple[tuple[int, ...], int]:
    """``(sizes, batch size)`` of a configuration named in :data:`CONFIGS` or :data:`SMALL_BATCH_CONFIGS`."""
    for table in (CONFIGS, SMALL_BATCH_CONFIGS):
        if name in table:
            return table[name]
    known = ", ".join([*CONFIGS, *SMALL_BATCH_CONFIGS])
    raise ValueError(f"config: unknown name {name!r}; expected one of {known}")


def problem(config_or_sizes, batch_size: int | None = None, *, dtype=np.float32, seed: int = 0):
    """``(net, theta, X, y)``: a random, reproducible problem of docs/design.md §6.

    Parameters
    ----------
    config_or_sizes : str or sequence of int
        A name of :data:`CONFIGS` or :data:`SMALL_BATCH_CONFIGS`, or layer sizes (then
        ``batch_size`` is required).
    batch_size : int, optional
        Overrides the configuration's batch size.
    dtype : float32 (default) or float64
    seed : int
        Seeds θ (``net.init``), the inputs and the labels.

    Returns
    -------
    net : MLP, tanh hidden layers, cross-entropy
    theta : ndarray (P,)
    X : ndarray (B, n0), standard normal
    y : ndarray (B,) of int64 labels in [0, n_L)
    """
    if isinstance(config_or_sizes, str):
        sizes, B = config(config_or_sizes)
        B = B if batch_size is None else batch_size
    else:
        if batch_size is None:
            raise ValueError("batch_size: required when layer sizes are given")
        sizes, B = tuple(config_or_sizes), batch_size
    net = MLP(list(sizes), activation="tanh", loss="cross_entropy")
    rng = np.random.default_rng(seed)
    theta = net.init(seed=seed, dtype=dtype)
    X = rng.standard_normal((B, sizes[0])).astype(dtype)
    y = rng.integers(0, sizes[-1], size=B)
    return net, theta, X, y


def num_params(sizes) -> int:
    """P = Σ n_l (n_{l-1} + 1): weights and biases."""
    return sum(b * (a + 1) for a, b in itertools.pairwise(sizes))


def mean_grad_flops(sizes, batch_size: int) -> int:
    """6·B·Σ n_l n_{l-1}: the forward, input-gradient and weight-gradient GEMMs.

    ``sizes`` is a sequence of layer sizes or an :class:`~fastgrad.MLP`.
    """
    sizes = _sizes(sizes)
    return 6 * batch_size * sum(a * b for a, b in itertools.pairwise(sizes))


def per_sample_bytes(sizes, batch_size: int, dtype=np.float32) -> int:
    """B·P·itemsize: the bytes the per-sample gradient matrix writes.

    ``sizes`` is a sequence of layer sizes or an :class:`~fastgrad.MLP`.
    """
    return batch_size * num_params(_sizes(sizes)) * np.dtype(dtype).itemsize


def _sizes(sizes) -> list[int]:
    return list(sizes.sizes) if isinstance(sizes, MLP) else list(sizes)


# ------------------------------------------------------------------ floors


def sgemm_timer(n: int = 1024) -> tuple[Callable[[], object], int]:
    """The flop floor's rate: a call running one float32 (n × n) @ (n × n) NumPy matmul into a
    fixed buffer, and its flop count 2n³. n = 1024 is the size of the ``wide`` layers, large
    enough to reach the BLAS's sustained rate. Limit BLAS threads around it as you time."""
    rng = np.random.default_rng(0)
    a = rng.standard_normal((n, n)).astype(np.float32)
    b = rng.standard_normal((n, n)).astype(np.float32)
    c = np.empty((n, n), dtype=np.float32)
    return (lambda: np.matmul(a, b, out=c)), 2 * n**3


FILL_WIDTH = 512
"""Length m of the second vector of each outer product the fill floor writes."""

_FILL_KERNEL = None


def fill_kernel():
    """The fill floor's compiled loop, ``fill_outer(a, b, out)`` (compiled on first use).

    a (R, n), b (R, m), out (R, L) with L ≤ n·m: row r of ``out`` is
    ``outer(a[r], b[r]).ravel()[:L]``, rows split over Numba's threads.

    This is THE fill floor of per-sample gradients (docs/design.md §6: B·P numbers written), used by
    ``fastgrad bench`` (and so the asv floors) and ``benchmarks/cpu_targets.py``. It writes outer
    products rather than a constant because that is what a per-sample gradient row is, δ_l ⊗ a_{l-1} per
    layer: the least work any per-sample kernel does once it has the operands (two short cached vectors
    read, one product per number written), and the "plain Numba loop writing outer products"
    docs/design.md §6 names as the fill rate. Both loops are memory-bound and measured the same here (2
    threads, float32: 12.3 vs 11.7 ms on narrow's 4096 × 8970, 18.1 vs 20.0 ms on 256 × 512²), so the
    choice keeps the meaning without moving the numbers.
    """
    global _FILL_KERNEL
    if _FILL_KERNEL is None:
        import numba

        @numba.njit(parallel=True, cache=False)
        def fill_outer(a, b, out):
            # a (R, n), b (R, m), out (R, L ≤ n*m): out[r] = outer(a[r], b[r]).ravel()[:L]
            m = b.shape[1]
            full = out.shape[1] // m  # whole outer-product rows; the last one may be cut short
            rest = out.shape[1] - full * m
            for r in numba.prange(out.shape[0]):
                for j in range(full):
                    aj = a[r, j]
                    base = j * m
                    for k in range(m):
                        out[r, base + k] = aj * b[r, k]
                if rest > 0:  # a separate loop: a bound of min(m, L - base) above halves the rate
                    aj = a[r, full]
                    for k in range(rest):
                        out[r, full * m + k] = aj * b[r, k]

        _FILL_KERNEL = fill_outer
    return _FILL_KERNEL


def fill_timer(out: np.ndarray, width: int = FILL_WIDTH, seed: int = 0) -> Callable[[], object]:
    """A call writing every number of ``out`` (R, L) as the fill floor does (:func:`fill_kernel`),
    outer products of n- and m-vectors with m = min(``width``, L).

    ``out`` is float32 or float64, C-contiguous; the kernel is compiled and ``out``'s pages
    are touched here, so the call times only the writes (``out.nbytes`` of them).
    """
    R, L = out.shape
    m = min(width, L)
    n = -(-L // m)
    rng = np.random.default_rng(seed)
    a = rng.standard_normal((R, n)).astype(out.dtype)
    b = rng.standard_normal((R, m)).astype(out.dtype)
    kernel = fill_kernel()
    kernel(a, b, out)
    return lambda: kernel(a, b, out)
