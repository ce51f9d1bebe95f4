"""Cached problem builders and backend lists shared by the asv suite.

asv (≥ 0.6) re-runs ``setup`` before timed calls, so everything ``setup`` needs is
built once per process here. The suite must also run against old commits in
asv-built environments: it uses only the public API of ``fastgrad`` and imports
newer modules (``fastgrad.tools.bench``, before it ``fastgrad.bench``) lazily,
skipping what a commit lacks. That is why the configurations, the problem builder and
the work counts below are a frozen copy of ``fastgrad.tools.configs``, not imports of
it: old commits lack that module.
"""

from __future__ import annotations

import functools
import itertools

import numpy as np

import fastgrad

CONFIGS: dict[str, tuple[tuple[int, ...], int]] = {
    "narrow": ((64, 64, 64, 10), 4096),
    "mnist": ((784, 512, 256, 10), 512),
    "wide": ((1024, 1024, 1024, 10), 256),
}
"""docs/design.md §6: name -> (sizes, batch size); tanh hidden layers, cross-entropy, float32.

A FROZEN COPY of ``fastgrad.tools.configs.CONFIGS`` (asv runs this suite against old
commits that lack ``fastgrad.tools``). It must stay equal to it, or the history breaks:
tests/tools/test_configs.py checks the two match, and that ``problem`` below builds the
same arrays as ``fastgrad.tools.configs.problem``."""

SMALL_BATCH_CONFIGS: dict[str, tuple[tuple[int, ...], int]] = {
    "mnist128-B64": ((784, 128, 10), 64),
    "narrow-B32": ((64, 64, 64, 10), 32),
    "narrow-B256": ((64, 64, 64, 10), 256),
}
"""docs/design.md §6's small-batch set: a FROZEN COPY of ``fastgrad.tools.configs.SMALL_BATCH_CONFIGS``,
checked like :data:`CONFIGS`."""

ALL_CONFIGS = [*CONFIGS, *SMALL_BATCH_CONFIGS]
"""The names of every configuration the suite times: docs/design.md §6's, then the small-batch set."""


def sizes_and_batch(name: str) -> tuple[tuple[int, ...], int]:
    """``(sizes, batch size)`` of a configuration of either table."""
    return CONFIGS[name] if name in CONFIGS else SMALL_BATCH_CONFIGS[name]


KNOWN_BACKENDS = ("numpy", "numba", "cuda")
"""Always listed, so results keep their keys across commits and machines; a backend that
cannot run here is skipped (shown as n/a). The ``naive`` definition is too slow to track."""

COMPILED_BACKENDS = ("numba", "cuda")
"""Backends with a JIT compile step worth tracking."""


@functools.cache
def available() -> tuple[str, ...]:
    """The backends that can run here, asked once per process."""
    return tuple(fastgrad.available_backends())


def backend_names(known=KNOWN_BACKENDS) -> list[str]:
    """``known`` plus any other available backend but ``naive``, in a stable order."""
    return [b for b in dict.fromkeys(tuple(known) + available()) if b != "naive"]


def require(backend: str) -> None:
    """Skip (asv: ``NotImplementedError`` in setup) a backend that cannot run here."""
    if backend not in available():
        raise NotImplementedError(f"backend {backend!r} is not available here")


@functools.cache
def problem(config: str):
    """``(net, theta, X, y)`` of a configuration, float32; shared, so never modify it."""
    sizes, B = sizes_and_batch(config)
    net = fastgrad.MLP(sizes, activation="tanh", loss="cross_entropy")
    rng = np.random.default_rng(0)
    theta = net.init(seed=0, dtype=np.float32)
    X = rng.standard_normal((B, sizes[0])).astype(np.float32)
    y = rng.integers(0, sizes[-1], size=B)
    return net, theta, X, y


@functools.lru_cache(maxsize=1)
def per_sample_buffer(config: str) -> np.ndarray:
    """A (B, P) float32 buffer for ``out=``, touched once so its pages exist before timing."""
    net, _, X, _ = problem(config)
    return np.zeros((X.shape[0], net.num_params), dtype=np.float32)


def mean_grad_flops(config: str) -> int:
    """6·B·Σ n_l n_{l-1}: the forward, input-gradient and weight-gradient GEMMs."""
    sizes, B = sizes_and_batch(config)
    return 6 * B * sum(a * b for a, b in itertools.pairwise(sizes))


def per_sample_bytes(config: str) -> int:
    """B·P·4: the bytes float32 per-sample gradients write."""
    sizes, B = sizes_and_batch(config)
    return 4 * B * sum(b * (a + 1) for a, b in itertools.pairwise(sizes))
