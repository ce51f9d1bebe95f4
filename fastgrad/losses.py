"""Per-sample losses: the registry, the run-time codes and their scalar definitions.

:data:`REGISTRY` holds, per loss, everything fastgrad knows about it outside the kernels: its
name, its run-time code, the kind of target it takes (class labels, or real targets in a
:attr:`Loss.domain`), and its PyTorch counterpart with the scale factor s (fastgrad's loss = s ×
PyTorch's mean-reduced loss on K outputs). Input validation (host and device), ``fastgrad
validate``, ``fastgrad.torch``, the tests and the docs read it.

Each loss owns the output nonlinearity; ``delta`` is d loss_i / d z_L. As with
:mod:`fastgrad.activations`, the ``register_jitable`` functions are the single
definition compiled by both the CPU and the CUDA targets; the loss is a run-time
code. Cross-entropy uses log-sum-exp and BCE uses softplus, so neither
overflows at large logits.

Targets reach the kernels in two arrays of fixed type, so that one compiled
kernel serves every loss: ``labels`` (int64, (B,)) for the losses that take labels and
``targets`` (float, (B, n_L)) for the others; the unused one has length 0.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

from numba.extending import register_jitable

from ._scalar import like
from .activations import stable_sigmoid, stable_softplus

MSE, CROSS_ENTROPY, BINARY_CROSS_ENTROPY, LINEAR = range(4)
"""Run-time codes: the branches of :func:`output_delta_row`, :func:`pointwise_loss` and
:func:`pointwise_delta`."""

LABELS, REAL = "labels", "real"
"""Target kinds: integer class labels (B,) in [0, n_L), or real targets (B, n_L)."""

_ANY = (-math.inf, math.inf)


@dataclass(frozen=True)
class Loss:
    """One per-sample loss ℓ_i, as everything outside the kernels sees it."""

    name: str
    code: int  # its branch in output_delta_row
    target: str  # LABELS or REAL
    domain: tuple[float, float] = _ANY  # the closed interval every real target must lie in
    torch: str | None = None  # the torch.nn class of PyTorch's mean-reduced counterpart, if any
    scale: Callable[[int], float] | None = None
    """s(K) with fastgrad's ℓ = s × PyTorch's mean-reduced loss on K outputs (with ``torch``)."""

    @property
    def labels(self) -> bool:
        """Whether y is integer class labels (else real targets)."""
        return self.target == LABELS

    @property
    def bounded(self) -> bool:
        """Whether the real targets are restricted to a :attr:`domain` narrower than the reals."""
        return self.domain != _ANY

    def domain_error(self) -> str:
        """The message of a real target outside :attr:`domain`."""
        lo, hi = self.domain
        return f"y: {self.name} targets must lie in [{lo:g}, {hi:g}]"

    def check_domain(self, targets) -> None:
        """``ValueError`` unless every value of ``targets`` (finite, non-empty) lies in :attr:`domain`."""
        if self.bounded and (targets.min() < self.domain[0] or targets.max() > self.domain[1]):
            raise ValueError(self.domain_error())

    def random_targets(self, rng, batch: int, n_out: int):
        """A random y of the kind this loss takes (the tests' and ``fastgrad validate``'s problems):
        labels (batch,) uniform in [0, n_out); real targets (batch, n_out) uniform over a bounded
        :attr:`domain`, else standard normal (clipped into a half-bounded one), float64."""
        if self.labels:
            return rng.integers(0, n_out, size=batch)
        lo, hi = self.domain
        if math.isfinite(lo) and math.isfinite(hi):
            return rng.uniform(lo, hi, size=(batch, n_out))
        y = rng.standard_normal((batch, n_out))
        return y.clip(lo, hi) if self.bounded else y


REGISTRY: dict[str, Loss] = {
    q.name: q
    for q in (
        Loss("mse", MSE, REAL, torch="MSELoss", scale=lambda K: K / 2),
        Loss("cross_entropy", CROSS_ENTROPY, LABELS, torch="CrossEntropyLoss", scale=lambda K: 1.0),
        Loss(
            "binary_cross_entropy",
            BINARY_CROSS_ENTROPY,
            REAL,
            domain=(0.0, 1.0),
            torch="BCEWithLogitsLoss",
            scale=lambda K: float(K),
        ),
        Loss("linear", LINEAR, REAL),
    )
}
"""Every loss by name, in code order."""

LOSSES: tuple[str, ...] = tuple(REGISTRY)
"""Valid loss names, in code order."""

assert [q.code for q in REGISTRY.values()] == list(range(len(REGISTRY))), "codes must be 0..n-1 in order"


def loss_code(name: str) -> int:
    """Run-time code of loss ``name``; ``ValueError`` listing the valid names."""
    if not isinstance(name, str) or name not in REGISTRY:
        raise ValueError(f"loss: unknown name {name!r}; expected one of {', '.join(LOSSES)}")
    return REGISTRY[name].code


@register_jitable
def pointwise_loss(code, z, y):
    """Contribution of one output unit to loss_i, for the element-wise losses."""
    if code == MSE:
        d = z - y
        return like(z, 0.5) * d * d
    if code == BINARY_CROSS_ENTROPY:
        return stable_softplus(z) - y * z
    return y - z  # LINEAR


@register_jitable
def pointwise_delta(code, z, y):
    """d loss_i / d z for one output unit, for the element-wise losses."""
    if code == MSE:
        return z - y
    if code == BINARY_CROSS_ENTROPY:
        return stable_sigmoid(z) - y
    return like(z, -1.0)  # LINEAR


@register_jitable
def output_delta_row(code, z, target, label, delta):
    """Write d loss_i / d z into ``delta`` and return loss_i, for one sample.

    z, delta: (n_L,); target: (n_L,) (unused, may be empty, for cross-entropy);
    label: int class index (used by cross-entropy only).
    """
    n = z.shape[0]
    if code == CROSS_ENTROPY:
        zmax = z[0]
        for k in range(1, n):
            zmax = max(zmax, z[k])
        s = like(zmax, 0.0)
        for k in range(n):
            e = math.exp(z[k] - zmax)
            delta[k] = e
            s += e
        lse = zmax + math.log(s)
        inv = like(zmax, 1.0) / s
        for k in range(n):
            delta[k] *= inv
        delta[label] -= like(zmax, 1.0)
        return lse - z[label]
    total = like(z[0], 0.0)
    for k in range(n):
        total += pointwise_loss(code, z[k], target[k])
        delta[k] = pointwise_delta(code, z[k], target[k])
    return total
