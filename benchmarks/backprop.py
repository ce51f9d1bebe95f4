"""Time and peak memory of each quantity, per configuration (docs/design.md §6, and its small-batch set)
and backend.

Part of the asv suite, whose job is the history across commits (see benchmarks/__init__.py).

Every class times one quantity; ``setup`` takes the cached problem and runs the call
once, so JIT compilation (or loading it from Numba's cache) happens before timing.
"""

from __future__ import annotations

import fastgrad

from ._problems import ALL_CONFIGS, backend_names, per_sample_buffer, problem, require

MAX_NORM = 1.0
"""DP-SGD clipping norm of the ``clipped`` benchmarks."""


def make_call(quantity: str, config: str, backend: str):
    """A no-argument call computing ``quantity`` for ``config`` on ``backend``."""
    net, theta, X, y = problem(config)
    if quantity == "grad":
        return lambda: fastgrad.backprop(net, theta, X, y, ("grad",), backend=backend)
    if quantity == "per_sample":
        out = per_sample_buffer(config)
        return lambda: fastgrad.backprop(net, theta, X, y, ("per_sample",), backend=backend, out=out)
    if quantity == "grad_norms":
        return lambda: fastgrad.backprop(net, theta, X, y, ("grad", "norms"), backend=backend)
    if quantity == "clipped":
        return lambda: fastgrad.clipped_grad(net, theta, X, y, max_norm=MAX_NORM, backend=backend)
    if quantity == "grad_variance":
        return lambda: fastgrad.backprop(net, theta, X, y, ("grad", "variance"), backend=backend)
    if quantity == "compare_shortcut":
        return lambda: fastgrad.compare_shortcut(net, theta, X, y, backend=backend)
    raise ValueError(f"quantity: unknown name {quantity!r}")


class _Quantity:
    """Shared parameters and setup; subclasses name the quantity and define the benchmarks."""

    quantity = ""
    params = (list(ALL_CONFIGS), backend_names())
    param_names = ("config", "backend")
    timeout = 600.0  # a cold Numba compile in setup can take a minute on 2 cores

    def setup(self, config, backend):
        require(backend)
        self.call = make_call(self.quantity, config, backend)
        self.call()


class Grad(_Quantity):
    """The mean gradient alone: (1/B) Σ ∇ℓ_i."""

    quantity = "grad"

    def time_grad(self, config, backend):
        self.call()

    def peakmem_grad(self, config, backend):
        self.call()


class PerSample(_Quantity):
    """Per-sample gradients (B, P), written into a preallocated ``out`` buffer."""

    quantity = "per_sample"

    def time_per_sample(self, config, backend):
        self.call()

    def peakmem_per_sample(self, config, backend):
        self.call()


class GradNorms(_Quantity):
    """The mean gradient and the per-sample gradient norms from one pass."""

    quantity = "grad_norms"

    def time_grad_norms(self, config, backend):
        self.call()

    def peakmem_grad_norms(self, config, backend):
        self.call()


class Clipped(_Quantity):
    """DP-SGD's clipped mean gradient (no noise)."""

    quantity = "clipped"

    def time_clipped(self, config, backend):
        self.call()

    def peakmem_clipped(self, config, backend):
        self.call()


class GradVariance(_Quantity):
    """The mean gradient and the per-parameter gradient variance."""

    quantity = "grad_variance"

    def time_grad_variance(self, config, backend):
        self.call()

    def peakmem_grad_variance(self, config, backend):
        self.call()


class CompareShortcut(_Quantity):
    """The shortcut report: both shortcuts against the true gradient computed by ``backend``."""

    quantity = "compare_shortcut"

    def time_compare_shortcut(self, config, backend):
        self.call()

    def peakmem_compare_shortcut(self, config, backend):
        self.call()
