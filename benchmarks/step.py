"""Time of a prepared call (:class:`fastgrad.Step`) on the small-batch configurations, where the host
code around the kernel is a large part of a call: the mean gradient, and DP-SGD's noised step.

Part of the asv suite, whose job is the history across commits (see benchmarks/__init__.py). The host
overhead itself (a call minus its kernel, phase by phase) is ``benchmarks/step_overhead.py``'s; a whole
PyTorch training step is ``benchmarks/training_step.py``'s (torch is not in asv's environments).
"""

from __future__ import annotations

import numpy as np

import fastgrad

from ._problems import SMALL_BATCH_CONFIGS, problem, require

MAX_NORM = 1.0
NOISE_MULTIPLIER = 1.0


def make_step(config: str, backend: str, dp: bool):
    """A no-argument call of a prepared step on ``config``: ``("loss", "grad")``, or with ``dp`` DP-SGD's
    clipped mean gradient with noise (σ = 1, C = 1, a seed)."""
    step_class = getattr(fastgrad, "Step", None)
    if step_class is None:  # a commit before the prepared step
        raise NotImplementedError("fastgrad.Step is not in this version")
    net, theta, X, y = problem(config)
    if dp:
        step = step_class(
            net, np.float32, backend=backend, max_norm=MAX_NORM, noise_multiplier=NOISE_MULTIPLIER, seed=0
        )
    else:
        step = step_class(net, np.float32, compute=("loss", "grad"), backend=backend)
    return lambda: step(theta, X, y)


class PreparedStep:
    """A prepared step's call, plain and DP, on the small-batch set."""

    params = (list(SMALL_BATCH_CONFIGS), ["numba", "numpy"])
    param_names = ("config", "backend")
    timeout = 600.0  # a cold Numba compile in setup can take a minute on 2 cores

    def setup(self, config, backend):
        require(backend)
        self.plain = make_step(config, backend, dp=False)
        self.dp = make_step(config, backend, dp=True)
        self.plain()
        self.dp()

    def time_step(self, config, backend):
        self.plain()

    def time_dp_step(self, config, backend):
        self.dp()
