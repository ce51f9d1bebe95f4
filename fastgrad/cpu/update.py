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
"""

from __future__ import annotations

from numba import njit, prange
from numba.core import types
from numba.extending import intrinsic, register_jitable

from .. import _threading
from .config import CACHE

__all__ = ["UPDATE_BLOCK", "fma", "fused_add", "plain_add", "sgd_update"]

UPDATE_BLOCK = 16384
"""Elements per parallel task of :func:`_sgd_pass`. The update is element-wise, so any split gives the
same bits; 16,384 float32 (64 KiB a stream) keeps a task's three streams within L2 and makes 7 tasks of
the [784, 128, 10] network's 101,770 parameters."""


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


@njit(parallel=True, cache=CACHE)
def _sgd_pass(theta, grad, buf, segments, fresh, lr, momentum, keep, weight_decay, nesterov, maximize,
              fused):  # fmt: skip
    # theta, grad, buf (P,) one dtype; segments (S, 2) int64 [start, stop) of the parameters to update
    # (the tensors whose grad is set); fresh (S,) bool: the segment has no momentum buffer yet (torch then
    # starts it as a copy of the gradient); lr, momentum, keep = 1 − dampening, weight_decay: scalars of
    # θ's dtype (torch casts its Python floats so); nesterov, maximize bool; fused: torch's alpha-adds
    # are fused multiply-adds
    # -> theta and buf updated in place as torch.optim.SGD's step updates each tensor:
    #    g = ±grad (+ wd·θ); buf = g if fresh else momentum·buf + keep·g;
    #    g = g + momentum·buf if nesterov else buf (with momentum ≠ 0); θ = θ − lr·g
    step = -lr
    sign = theta.dtype.type(-1 if maximize else 1)  # −x is x·(−1), exactly
    P = theta.shape[0]
    for blk in prange((P + UPDATE_BLOCK - 1) // UPDATE_BLOCK):
        b0, b1 = blk * UPDATE_BLOCK, min(P, (blk + 1) * UPDATE_BLOCK)
        for s in range(segments.shape[0]):
            k0, k1 = max(b0, segments[s, 0]), min(b1, segments[s, 1])
            if k0 >= k1:
                continue
            th, gr, bu = theta[k0:k1], grad[k0:k1], buf[k0:k1]  # views from 0, so the loop vectorizes
            if fused:
                _update_fused(th, gr, bu, fresh[s], step, sign, momentum, keep, weight_decay, nesterov)
            else:
                _update_plain(th, gr, bu, fresh[s], step, sign, momentum, keep, weight_decay, nesterov)


def sgd_update(
    theta, grad, buf, segments, fresh, lr, momentum, keep, weight_decay, nesterov, maximize, fused
):
    """``torch.optim.SGD``'s update of the parameters in ``segments`` of the flat ``theta``, in place, with
    ``buf`` the flat momentum buffer: the arguments and rule of :func:`_sgd_pass`, after the fork check of
    every compiled parallel call."""
    _threading.check_fork_safe()
    _sgd_pass(theta, grad, buf, segments, fresh, lr, momentum, keep, weight_decay, nesterov, maximize, fused)
