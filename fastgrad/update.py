"""The optimizer's update on the flat θ, compiled and parallel: PyTorch's SGD, bit for bit.

:class:`fastgrad.torch.SGD` runs :func:`sgd_update` in place of ``torch.optim.SGD``'s per-tensor
update when every parameter of a :class:`fastgrad.torch.GradStep` lies in its flat θ and every
gradient in its flat gradient. One pass over θ, the gradient and the momentum buffer, on Numba's
threads, replaces torch's three or four passes on its own threads; each element's arithmetic is
torch's, rounded as torch rounds it, so the parameters and buffers come out with the same bits
(tests/test_torch_optim.py). Torch's ``add(other, alpha=a)`` is a fused multiply-add (``x + a·y``
rounded once, :func:`fma`) where its CPU kernels are vectorised (its AVX2 and AVX-512 builds, the
default on x86 CPUs that have them) and a multiply then an add in its plain build
(``ATEN_CPU_CAPABILITY=default``); the caller says which (``fused``).

The update travels as one :class:`Update` pack, which :func:`fastgrad.cpu.kernels.fused_backprop` also
takes: there it runs in the kernel's last pass over each block of parameters, right after the block's
gradient is made, so that θ, the gradient and the momentum are updated while in the core's cache
(``optimizer.step(step.closure(X, y))`` of :class:`fastgrad.torch.SGD`).
"""

from __future__ import annotations

import functools
from collections import namedtuple

import numpy as np
from numba import njit, prange
from numba.core import types
from numba.extending import intrinsic, register_jitable

from . import _cache, _threading

__all__ = [
    "UPDATE_BLOCK",
    "Update",
    "fma",
    "fused_add",
    "no_update",
    "plain_add",
    "sgd_update",
    "update_block",
]

CACHE = _cache.configure()

UPDATE_BLOCK = 16384
"""Elements per parallel task of :func:`_sgd_pass`. The update is element-wise, so any split gives the
same bits; 16,384 float32 (64 KiB a stream) keeps a task's three streams within L2 and makes 7 tasks of
the [784, 128, 10] network's 101,770 parameters."""

Update = namedtuple("Update", "buf segments coef modes")
"""An SGD update of the flat θ, torch's rule (:func:`_sgd_pass`): ``buf`` (P,) the flat momentum buffer in
θ's dtype, or (0,) for no update at all; ``segments`` (S, 3) int64, per parameter tensor to update its
[start, stop) in θ and 1 when it has no momentum buffer yet (torch then starts one as a copy of the
gradient), else 0; ``coef`` (5,) in θ's dtype at :data:`LR`, :data:`MOMENTUM`, :data:`KEEP`
(1 − dampening), :data:`WEIGHT_DECAY` and :data:`SCALE` (the gradient's factor first, 1 for none);
``modes`` (4,) int64 at :data:`ROW` (which of the kernel's sums is the gradient), :data:`NESTEROV`,
:data:`MAXIMIZE` and :data:`FUSED` (torch's alpha-adds are fused multiply-adds), 0 or 1. A compiled
caller takes it as a plain tuple in this order (a namedtuple is slower to type at dispatch)."""
LR, MOMENTUM, KEEP, WEIGHT_DECAY, SCALE = range(5)
"""Entries of :class:`Update`'s ``coef``."""
ROW, NESTEROV, MAXIMIZE, FUSED = range(4)
"""Entries of :class:`Update`'s ``modes``."""
START, STOP, FRESH = range(3)
"""Columns of :class:`Update`'s ``segments``."""


@functools.cache
def no_update(dtype) -> tuple:
    """The :class:`Update` pack (as a plain tuple) that updates nothing, for θ's ``dtype``: one per dtype,
    shared by every caller (nothing writes it: a pack with an empty ``buf`` is never read past that)."""
    dt = np.dtype(dtype)
    return (np.empty(0, dt), np.empty((0, 3), np.int64), np.ones(5, dt), np.zeros(4, np.int64))


@intrinsic
def fma(typingctx, a, b, c):
    """a·b + c rounded once (LLVM's ``llvm.fma``), for three floats of one type."""
    if not (isinstance(a, types.Float) and a == b == c):
        return None

    def codegen(context, builder, signature, args):
        return builder.fma(*args)

    return a(a, b, c), codegen


@register_jitable
def fused_add(x, alpha, y):
    # torch's y.add(x, alpha=alpha) in its vectorised CPU kernels: alpha·x + y rounded once
    return fma(x, alpha, y)


@register_jitable
def plain_add(x, alpha, y):
    # the same in torch's plain build: alpha·x rounded, then the sum
    return x * alpha + y


def _update_loop(add_scaled):
    """The element loop of :func:`_sgd_pass` with torch's alpha-add ``add_scaled`` (one compiled loop
    per rounding: a choice made inside the loop kept LLVM from vectorising it)."""

    @register_jitable
    def update_run(th, gr, bu, start_buf, step, sign, momentum, keep, weight_decay, nesterov):
        # th, gr, bu (n,) views of θ, the gradient and the momentum buffer -> th, bu updated
        # (_sgd_pass's element rule). Every element computes each candidate and keeps one (selects on
        # loop-invariant flags, no branch) and bu is always written (with momentum 0 nothing reads it),
        # so LLVM vectorises the loop
        decay, heavy = weight_decay != 0, momentum != 0
        for k in range(th.shape[0]):
            p = th[k]
            g = gr[k] * sign
            g = add_scaled(p, weight_decay, g) if decay else g  # grad.add(param, alpha=weight_decay)
            # torch.clone(grad), or buf.mul_(momentum).add_(grad, alpha=1 - dampening)
            b = g if start_buf else add_scaled(g, keep, bu[k] * momentum)
            bu[k] = b
            # grad.add(buf, alpha=momentum)
            d = (add_scaled(b, momentum, g) if nesterov else b) if heavy else g
            th[k] = add_scaled(d, step, p)  # param.add_(grad, alpha=-lr)

    return update_run


_update_fused, _update_plain = _update_loop(fused_add), _update_loop(plain_add)


@register_jitable
def update_block(update, grad, theta, b0, b1):
    # update (Update), grad and theta (P,) -> elements [b0, b1) of theta and update.buf updated by the rule of
    # _sgd_pass, on the segments that overlap the block; grad[b0:b1] first multiplied by coef[SCALE] unless 1
    buf, segments, coef, modes = update.buf, update.segments, update.coef, update.modes
    scale = coef[SCALE]
    if scale != 1:
        gs = grad[b0:b1]  # a view from 0, so the loop vectorizes
        for k in range(gs.shape[0]):
            gs[k] *= scale
    step = -coef[LR]
    momentum, keep, weight_decay = coef[MOMENTUM], coef[KEEP], coef[WEIGHT_DECAY]
    nesterov = modes[NESTEROV] != 0
    sign = theta.dtype.type(-1 if modes[MAXIMIZE] != 0 else 1)  # −x is x·(−1), exactly
    for s in range(segments.shape[0]):
        k0, k1 = max(b0, segments[s, START]), min(b1, segments[s, STOP])
        if k0 >= k1:
            continue
        th, gr, bu = theta[k0:k1], grad[k0:k1], buf[k0:k1]  # views from 0, so the loop vectorizes
        fresh = segments[s, FRESH] != 0
        if modes[FUSED] != 0:
            _update_fused(th, gr, bu, fresh, step, sign, momentum, keep, weight_decay, nesterov)
        else:
            _update_plain(th, gr, bu, fresh, step, sign, momentum, keep, weight_decay, nesterov)


@njit(parallel=True, cache=CACHE)
def _sgd_pass(theta, grad, update_t):
    # theta, grad (P,) one dtype; update_t: an Update pack as a plain tuple (its coef's SCALE 1)
    # -> theta and update.buf updated in place as torch.optim.SGD's step updates each tensor:
    #    g = ±grad (+ wd·θ); buf = g if fresh else momentum·buf + keep·g;
    #    g = g + momentum·buf if nesterov else buf (with momentum ≠ 0); θ = θ − lr·g
    update = Update(*update_t)
    P = theta.shape[0]
    for blk in prange((P + UPDATE_BLOCK - 1) // UPDATE_BLOCK):
        update_block(update, grad, theta, blk * UPDATE_BLOCK, min(P, (blk + 1) * UPDATE_BLOCK))


def sgd_update(theta: np.ndarray, grad: np.ndarray, update: tuple) -> None:
    """``torch.optim.SGD``'s update of the flat ``theta`` (P,) from the flat ``grad`` (P,), in place, as the
    :class:`Update` pack ``update`` (a plain tuple) says, after the fork check of every compiled parallel
    call."""
    _threading.check_fork_safe()
    _sgd_pass(theta, grad, update)
