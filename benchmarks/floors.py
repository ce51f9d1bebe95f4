"""The ratio of each quantity's time to its floor, both measured in the same process.

Part of the asv suite, whose job is the history across commits (see benchmarks/__init__.py).

Floors (docs/design.md §6): the mean gradient needs 6·B·Σ n_l n_{l-1} flops, run at the
machine's sgemm rate; per-sample gradients write B·P float32 numbers, at the fill
bandwidth of a Numba loop writing outer products. Ratios travel across machines and
noisy runs better than times. The floor timers come from ``fastgrad.tools.bench``
(``fastgrad.bench`` on older commits; commits before it are skipped), so the fill floor is
the one of ``fastgrad.tools.configs``.
"""

from __future__ import annotations

import functools

from ._problems import CONFIGS, backend_names, mean_grad_flops, per_sample_bytes, require
from .backprop import make_call
from ._timing import best_of, median, timer, turns

ROUNDS = 7
"""Interleaved rounds: floor timer, then the quantity; medians of each."""

FLOOR_CALLS = 3
"""Back-to-back floor calls per round, the fastest kept (as in ``fastgrad.tools.bench``): a floor
is what the machine reaches, and the first call may find the cores still busy."""

FLOOR_OF = {
    "grad": "flops",
    "grad_norms": "flops",
    "clipped": "flops",
    "grad_variance": "flops",
    "per_sample": "writes",
}


@functools.cache
def floor_timer(kind: str):
    """``(call, work)``: an sgemm and its flops, or an outer-product fill and its bytes."""
    try:
        from fastgrad.tools import bench
    except ImportError:  # commits before fastgrad.tools
        try:
            from fastgrad import bench
        except ImportError:
            raise NotImplementedError("fastgrad.bench (the floor timers) is missing in this commit") from None
    return bench.sgemm_timer() if kind == "flops" else bench.fill_timer()


class RatioToFloor:
    """time(quantity) / floor time; 1 would be as fast as the machine allows."""

    params = (list(CONFIGS), backend_names(), list(FLOOR_OF))
    param_names = ("config", "backend", "quantity")
    unit = "× floor"
    timeout = 600.0

    def setup(self, config, backend, quantity):
        require(backend)
        self.floor_call, self.floor_work = floor_timer(FLOOR_OF[quantity])
        self.call = make_call(quantity, config, backend)
        self.call()
        self.floor_call()

    def track_ratio_to_floor(self, config, backend, quantity):
        rounds = turns(
            {"floor": lambda: best_of(self.floor_call, FLOOR_CALLS), "call": timer(self.call)}, ROUNDS
        )
        rate = self.floor_work / median(rounds["floor"])
        work = mean_grad_flops(config) if FLOOR_OF[quantity] == "flops" else per_sample_bytes(config)
        return median(rounds["call"]) / (work / rate)
