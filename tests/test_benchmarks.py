"""pytest-benchmark groups: fastgrad's backends against the NumPy reference and the peers.

Its job among the timing harnesses (docs/benchmarks.md lists them): a developer's quick
A/B of one kernel change inside the test runner, per configuration and quantity, with
pytest-benchmark's saved runs and ``--benchmark-compare`` between two working trees.
``fastgrad bench`` is the user-facing peer table, ``benchmarks/cpu_targets.py`` the paired
CPU-target ratios, asv the history across commits.

Skipped in the default run (``--benchmark-skip`` in pyproject.toml); run them with

    python -m pytest tests/test_benchmarks.py --benchmark-only

One group per configuration (docs/design.md §6) and quantity; in it every available fastgrad
backend but ``naive`` (``numpy`` is the NumPy reference), and PyTorch (autograd, and
torch.func vmap(grad) per-sample) and JAX when installed. Each implementation's result
is checked against the float64 NumPy reference before it is timed.
"""

from __future__ import annotations

import functools

import numpy as np
import pytest

from fastgrad.tools import bench, configs

BACKENDS = bench.fastgrad_backends()
PEERS = bench.installed_peers()

CASES = [
    pytest.param(config, quantity, impl, id=f"{config}-{quantity}-{impl}")
    for config in bench.CONFIGS
    for quantity in bench.QUANTITIES
    for impl in BACKENDS + [p for p in PEERS if quantity in bench.PEER_LABELS[p]]
]


@functools.cache
def problem(config):
    return configs.problem(config)


@functools.cache
def reference(config):
    return bench.reference(*problem(config))


@pytest.mark.parametrize(("config", "quantity", "impl"), CASES)
def test_benchmark(benchmark, config, quantity, impl):
    net, theta, X, y = problem(config)
    out = np.empty((X.shape[0], net.num_params), dtype=theta.dtype) if quantity == "per_sample" else None
    backends, peers = ([impl], []) if impl in BACKENDS else ([], [impl])
    (cand,) = bench.candidates(config, net, theta, X, y, out, backends, peers, [quantity])
    bench.check([cand], reference(config))
    assert cand.rel_error <= bench.CHECK_RTOL
    benchmark.group = f"{config} {quantity}"
    benchmark.extra_info["rel_error"] = cand.rel_error
    benchmark(cand.call)
