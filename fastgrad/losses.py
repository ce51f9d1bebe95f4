"""Per-sample losses: names, run-time codes and their scalar definitions.

Each loss owns the output nonlinearity; ``delta`` is d loss_i / d z_L. As with
:mod:`fastgrad.activations`, the ``register_jitable`` functions are the single
definition compiled by both the CPU and the CUDA targets; the loss is a run-time
code. Cross-entropy uses log-sum-exp and BCE uses softplus, so neither
overflows at large logits.

Targets reach the kernels in two arrays of fixed type, so that one compiled
kernel serves every loss: ``labels`` (int64, (B,)) for cross-entropy and
``targets`` (float, (B, n_L)) for the others; the unused one has length 0.
"""

from __future__ import annotations

import math

from numba.extending import register_jitable

from ._scalar import like
from .activations import stable_sigmoid, stable_softplus

LOSSES: tuple[str, ...] = ("mse", "cross_entropy", "binary_cross_entropy", "linear")
"""Valid loss names, in code order."""

MSE, CROSS_ENTROPY, BINARY_CROSS_ENTROPY, LINEAR = range(len(LOSSES))


def loss_code(name: str) -> int:
    """Run-time code of loss ``name``; ``ValueError`` listing the valid names."""
    if not isinstance(name, str) or name not in LOSSES:
        raise ValueError(f"loss: unknown name {name!r}; expected one of {', '.join(LOSSES)}")
    return LOSSES.index(name)


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
