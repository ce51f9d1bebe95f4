"""CUDA backend (numba-cuda): every quantity of docs/design.md §2 computed on the GPU.

The only package that imports ``numba.cuda``. Kernels come in families, each module a
kernels section and then the launchers that call them (as llm.c's ``llmc/*.cuh``):

- :mod:`.fused` (every width ≤ ``FUSED_MAX_WIDTH``): one block takes a tile of T
  samples through the whole forward and backward pass with activations and deltas in
  shared memory, reduces the tile into one partial sum per requested sum of the
  registry (gradient, second moment, clipped gradient: the clip factor is known
  in-block, since the block holds every layer of its samples), writes its per-sample
  gradient rows and norms, and checks the device inputs it reads. One launch per pass.
- :mod:`.gemm` (wider networks): a register-blocked shared-memory GEMM with fused
  epilogues behind ``dense_forward``, ``dense_backward`` and ``layer_sums`` (the sums
  over samples as GEMMs over the batch written straight into θ's layout, split over the
  batch only when a layer has too few output tiles).
- :mod:`.rows`: per-row kernels (``output_forward``'s loss and output deltas,
  ``norms_from_deltas``' Goodfellow terms and ``finish_norms``' norms and clip factors,
  ``sum_partials``' fixed-order sum of partial rows, ``write_rows``' per-sample rows, the
  derived quantities' kernels that the registry declares, the noised mean, the input
  value checks).

Each step has the CPU kernels' name on both paths (docs/architecture.md, "One vocabulary
across the backends").

This module is the host side: the driver of both paths and the public entry points.
Reductions are deterministic: every block writes its own partial row and a second
kernel sums the rows in a fixed order; there are no floating-point atomics, so the same
inputs give the same bits on every run. Tile sizes are constants (:mod:`.config`), not
read from the card.

Inputs are NumPy arrays (copied in, results copied out) or device arrays (numba, CuPy,
PyTorch through ``__cuda_array_interface__``), used in place; results then stay on the device.
"""

from __future__ import annotations

import numpy as np

from .. import _validation
from ..losses import REGISTRY as LOSS_REGISTRY
from ..mlp import MLP
from ..privacy import dp_step
from ..quantities import HOST, SUMS, made_in_pass, needs_norms, sums_to_make
from . import config, fused, gemm, rows
from .config import (
    FLAG_THETA,
    FLAG_X,
    FLAG_Y,
    FUSED_MAX_WIDTH,
    KERNELS,
    N_FLAGS,
    ROW_THREADS,
    SHARED_BYTES,
    SIMULATOR,
    DeviceNDArray,
    cdiv,
    cuda,
)
from .fused import fused_tile, target_range
from .memory import clear_scratch, pinned, scratch, scratch_flat

_IMPORT_ERROR = config.IMPORT_ERROR


def check_available() -> None:
    """Raise ``RuntimeError`` saying why the CUDA backend cannot run here."""
    if cuda is None:
        raise RuntimeError(
            "backend 'cuda': numba-cuda is not installed or failed to import "
            f"({_IMPORT_ERROR}); install it with: pip install 'fastgrad[cuda]'"
        )
    global _GPU_OK
    if SIMULATOR or _GPU_OK:
        return
    try:
        ok = cuda.is_available()
    except Exception as exc:  # pragma: no cover - depends on the driver
        raise RuntimeError(f"backend 'cuda': the CUDA driver could not be initialised ({exc})") from None
    if not ok:
        raise RuntimeError(
            "backend 'cuda': no CUDA GPU or driver found (numba.cuda.is_available() is False); "
            "use backend='numba' for the CPU, or set NUMBA_ENABLE_CUDASIM=1 to run the kernels "
            "slowly in the CUDA simulator"
        )
    _GPU_OK = True


_GPU_OK = False  # a GPU was found once: later calls skip the driver query


class _Device:
    """Device inputs: θ (P,), X (B, n0), labels (B,) int64, targets (B, nL); one unused dummy.

    Shapes and dtypes are checked; ``values_checked`` says whether the values are too (host
    inputs were checked on the host; device inputs are checked by the kernels that read them).
    """

    def __init__(self, theta, X, labels, targets, batch, dtype, values_checked):
        self.theta, self.X, self.labels, self.targets = theta, X, labels, targets
        self.batch_size, self.dtype = batch, np.dtype(dtype)
        self.values_checked = values_checked


def _raise_input_error(flags, net: MLP) -> None:
    """Turn the device checks' flags (non-finite θ, X, y; y out of range) into the host checks' errors."""
    for name, bad in (("theta", flags[FLAG_THETA]), ("X", flags[FLAG_X]), ("y", flags[FLAG_Y])):
        if bad:
            raise ValueError(f"{name}: contains NaN or Inf")
    loss = LOSS_REGISTRY[net.loss]
    if loss.labels:
        raise ValueError(f"y: labels must lie in [0, {net.n_out}) (sizes[-1] = {net.n_out})")
    raise ValueError(loss.domain_error())


# -------------------------------------------------------------- the driver


def _wanted_sums(need: frozenset[str], clip: bool) -> tuple[bool, ...]:
    """Per sum of the registry, in order: is it made? (:func:`fastgrad.quantities.sums_to_make`)."""
    made = sums_to_make(need, clip)
    return tuple(q in made for q in SUMS)


def _run_device(
    net: MLP,
    d: _Device,
    need: frozenset[str],
    max_norm: float | None,
    G=None,
    path: str = "auto",
    host_loss: bool = True,
) -> dict:
    """Every quantity in ``need`` (and ``clipped_sum`` with ``max_norm``) as device arrays; loss a float.

    With ``host_loss=False`` nothing waits for the GPU: the loss stays as its device partial
    sums (``loss_partials``), which is how the benchmarks time the launches alone.
    """
    B, P, L = d.batch_size, net.num_params, net.num_layers
    tile = fused_tile(net, B, d.dtype) if path in ("auto", "fused") else 0
    if path == "fused" and tile == 0:
        raise ValueError(f"path: the fused path does not fit sizes {list(net.sizes)}")
    if "per_sample" in need and G is None:
        G = cuda.device_array((B, P), dtype=d.dtype)
    dummy2 = scratch("dummy2", (1, 1), d.dtype)
    layer_norms = cuda.device_array((B, L), dtype=d.dtype) if "layer_norms" in need else None
    if not tile and not d.values_checked:
        _check_values(net, d)
    run_path = _fused_path if tile else _tiled_path
    res = run_path(net, d, need, max_norm, G if G is not None else dummy2, layer_norms, tile, host_loss)
    if layer_norms is not None:
        res["layer_norms"] = layer_norms
    if "per_sample" in need:
        res["per_sample"] = G
    return res


def _fused_path(net: MLP, d: _Device, need, max_norm, G, layer_norms, tile: int, host_loss: bool) -> dict:
    """One fused launch, then the partial rows summed, the norms finished and the loss read."""
    B, P, L = d.batch_size, net.num_params, net.num_layers
    F = d.dtype.type
    want = _wanted_sums(need, max_norm is not None)
    nblk = cdiv(B, tile)
    size, offs = fused.workspace_size(nblk, B, net, want)
    zero_flags = np.zeros(N_FLAGS, dtype=d.dtype)
    flags = slice(nblk, nblk + N_FLAGS)  # the input flags, after the tile losses
    ws = scratch("fused_ws", (size,), d.dtype, on_create=lambda buf: buf[flags].copy_to_device(zero_flags))
    fused.fused_backprop(
        net=net,
        d=d,
        tile=tile,
        ws=ws,
        sum_offsets=offs,
        per_sample="per_sample" in need,
        max_norm=max_norm,
        G=G,
    )
    res: dict = {}
    for q, off in zip(SUMS, offs):
        if off >= 0:
            res[q.name] = cuda.device_array(P, dtype=d.dtype)
            scale = F(1.0 / B) if q.mean else F(1.0)
            rows.sum_partials(part=ws, offset=off, nrows=nblk, ncols=P, scale=scale, out=res[q.name])
    if needs_norms(need, max_norm is not None):
        res["norms"] = cuda.device_array(B, dtype=d.dtype)
        off_lsq = nblk + N_FLAGS
        rows.finish_norms(
            per_layer=ws[off_lsq : off_lsq + B * L].reshape(B, L), norms=res["norms"], layer_norms=layer_norms
        )
    if not host_loss:
        res["loss_partials"] = ws[:nblk]
        return res
    # the tile losses and the input flags in one small copy; the losses summed here in a fixed order
    head = ws[: nblk + N_FLAGS].copy_to_host(pinned(nblk + N_FLAGS, d.dtype.str))
    if head[flags].any():
        ws[flags].copy_to_device(zero_flags)
        _raise_input_error(head[flags], net)
    res["loss"] = head[:nblk].sum(dtype=d.dtype) / F(B)
    return res


def _tiled_path(net: MLP, d: _Device, need, max_norm, G, layer_norms, tile: int, host_loss: bool) -> dict:
    """Forward and backward by GEMMs, then the sums over samples by GEMMs, the norms and the rows."""
    B, P, L = d.batch_size, net.num_params, net.num_layers
    F = d.dtype.type
    clip = max_norm is not None
    need_norms = needs_norms(need, clip)
    per_layer = scratch("per_layer", (B, L), d.dtype)
    losses, deltas, acts = _tiled_backward(net, d, per_layer if need_norms else None)
    clip_c = scratch("clip_c", (B if clip else 1,), d.dtype)
    res: dict = {}
    if need_norms:
        res["norms"] = cuda.device_array(B, dtype=d.dtype)
        rows.finish_norms(
            per_layer=per_layer,
            norms=res["norms"],
            layer_norms=layer_norms,
            max_norm=max_norm,
            clip=clip_c if clip else None,
        )
    for q, wanted in zip(SUMS, _wanted_sums(need, clip)):
        if wanted:
            out = cuda.device_array(P, dtype=d.dtype)
            scale = F(1.0 / B) if q.mean else F(1.0)
            for l, s in enumerate(net.layers):
                gemm.layer_sums(
                    batch=B,
                    delta=deltas[l][1],
                    inputs=acts[l][1],
                    layer=s,
                    operand=q.operand,
                    source=q.source,
                    rowscale=clip_c,
                    scale=scale,
                    out=out,
                )
            res[q.name] = out
    if "per_sample" in need:
        for l, s in enumerate(net.layers):
            rows.write_rows(delta=deltas[l][0], inputs=acts[l][0], out=G, layer=s)
    if host_loss:  # per-sample losses summed here in a fixed order
        res["loss"] = losses.copy_to_host(pinned(B, d.dtype.str)).sum(dtype=d.dtype) / F(B)
    else:
        res["loss_partials"] = losses
    return res


def _check_values(net: MLP, d: _Device) -> None:
    """The value checks of device inputs for the tiled path: one kernel, one flag copy."""
    flags = scratch("flags", (N_FLAGS,), np.int32, zero=True)  # stays zero unless a check fails
    lo, hi = target_range(net, d.dtype)
    rows.check_values(
        theta=d.theta,
        X=d.X,
        targets=d.targets,
        labels=d.labels,
        lo=lo,
        hi=hi,
        n_classes=net.n_out,
        flags=flags,
    )
    f = flags.copy_to_host()
    if f.any():
        flags.copy_to_device(np.zeros(N_FLAGS, dtype=np.int32))
        _raise_input_error(f, net)
    d.values_checked = True


def _tiled_forward(net: MLP, d: _Device):
    """The forward pass by tiled GEMMs: layer inputs [A_0..A_{L-1}] and the hidden layers' φ'(Z_l),
    as (array, flat view) pairs, and the outputs Z_L (B, n_L)."""
    B, L = d.batch_size, net.num_layers
    acts = [(d.X, d.X.reshape(d.X.size))]
    derivs = []
    for l, s in enumerate(net.layers):
        out = scratch_flat(f"act{l}", (B, s.n_out), d.dtype)
        if l == L - 1:
            gemm.dense_forward(
                batch=B, inputs=acts[-1][1], theta=d.theta, layer=s, act=net.activation_code, out=out[1]
            )
            z_out = out[0]
        else:
            deriv = scratch_flat(f"deriv{l}", (B, s.n_out), d.dtype)
            gemm.dense_forward(
                batch=B,
                inputs=acts[-1][1],
                theta=d.theta,
                layer=s,
                act=net.activation_code,
                out=out[1],
                deriv=deriv[1],
            )
            acts.append(out)
            derivs.append(deriv)
    return acts, derivs, z_out


def _tiled_backward(net: MLP, d: _Device, per_layer):
    """Forward and backward by tiled GEMMs: losses (B,), deltas [Δ_1..Δ_L], layer inputs [A_0..A_{L-1}].

    Deltas and inputs are (array, flat view) pairs, so ``deltas[k]`` is Δ_{k+1} and ``acts[k]``
    is A_k, the input of layer k + 1 (``net.layers[k]``); ``per_layer`` (B, L), when given, gets
    the layer norms ‖∇_{W_l,b_l} ℓ_i‖ (Goodfellow).
    """
    B, L = d.batch_size, net.num_layers
    acts, derivs, z_out = _tiled_forward(net, d)  # derivs φ'(Z_l) are overwritten with Δ_l
    deltas = [None] * L
    deltas[L - 1] = scratch_flat("delta_out", (B, net.n_out), d.dtype)
    losses = scratch("losses", (B,), d.dtype)
    rows.output_forward(
        z_out=z_out,
        labels=d.labels,
        targets=d.targets,
        loss=net.loss_code,
        deltas=deltas[L - 1][0],
        losses=losses,
    )
    for l in range(L - 1, 0, -1):  # Δ_{l+1} -> Δ_l through layer l + 1, for l + 1 = L..2
        gemm.dense_backward(
            batch=B, delta=deltas[l][1], theta=d.theta, layer=net.layers[l], deriv=derivs[l - 1][1]
        )
        deltas[l - 1] = derivs[l - 1]
    if per_layer is not None:
        for l in range(L):
            rows.norms_from_deltas(delta=deltas[l][0], inputs=acts[l][0], per_layer=per_layer, col=l)
    return losses, deltas, acts


# ---------------------------------------------------------------- entry points


def _host_device(net: MLP, inp: _validation.Inputs) -> _Device:
    """Validated host inputs copied to the device (values already checked on the host)."""
    dt = inp.dtype
    return _Device(
        cuda.to_device(inp.theta),
        cuda.to_device(inp.X),
        cuda.to_device(inp.labels if inp.labels.shape[0] else np.zeros(1, dtype=np.int64)),
        cuda.to_device(inp.targets if inp.targets.shape[0] else np.zeros((1, net.n_out), dtype=dt)),
        inp.batch_size,
        dt,
        values_checked=True,
    )


def layer_factors(net: MLP, inp: _validation.Inputs) -> tuple[list, list]:
    """The factors of every per-sample gradient from the tiled path's forward and backward GEMMs,
    copied to the host: deltas [Δ_1..Δ_L] (B, n_l) and layer inputs [A_0..A_{L-1}] (B, n_{l-1})."""
    check_available()
    _, deltas, acts = _tiled_backward(net, _host_device(net, inp), None)
    return [D[0].copy_to_host() for D in deltas], [inp.X] + [A[0].copy_to_host() for A in acts[1:]]


def forward_factors(net: MLP, theta: np.ndarray, X: np.ndarray) -> tuple[list, list]:
    """The tiled path's forward pass, copied to the host: layer inputs [A_0..A_{L-1}] (B, n_{l-1}) and
    the hidden layers' derivatives [φ'(z_1)..φ'(z_{L-1})] (B, n_l)."""
    check_available()
    d = _Device(cuda.to_device(theta), cuda.to_device(X), None, None, X.shape[0], theta.dtype, True)
    acts, derivs, _ = _tiled_forward(net, d)
    return [X] + [A[0].copy_to_host() for A in acts[1:]], [g[0].copy_to_host() for g in derivs]


def run(
    net: MLP,
    inp: _validation.Inputs,
    need: frozenset[str],
    max_norm: float | None,
    out=None,
    path: str = "auto",
) -> dict:
    """The backend contract of :mod:`fastgrad.api`: validated host arrays in, host arrays out."""
    check_available()
    raw = _run_device(net, _host_device(net, inp), need, max_norm, None, path)
    res = {"loss": raw.pop("loss")}
    for name, arr in raw.items():
        if name == "per_sample" and out is not None:
            arr.copy_to_host(out)
            res[name] = out
        else:
            res[name] = arr.copy_to_host()
    return res


def is_device_array(a) -> bool:
    """True for arrays that live on the GPU (``__cuda_array_interface__``, or the simulator's arrays)."""
    if cuda is None:
        return False
    if hasattr(a, "__cuda_array_interface__"):
        return True
    return SIMULATOR and type(a).__name__ == "FakeCUDAArray"


def _as_device(name: str, a):
    if not is_device_array(a):
        raise TypeError(
            f"{name}: expected a device array like the other inputs (θ, X and y must all be on the GPU, "
            f"or all on the host), got {type(a).__name__}"
        )
    if isinstance(a, DeviceNDArray) or (SIMULATOR and not hasattr(a, "__cuda_array_interface__")):
        return a  # numba's own arrays need no wrapping (as_cuda_array would also synchronise)
    return cuda.as_cuda_array(a)


def check_device_inputs(net: MLP, theta, X, y, values: bool = True) -> _Device:
    """The checks of :func:`fastgrad._validation.check_inputs` for device arrays, used in place.

    Shapes and dtypes go through the host's own shape checks (read from the array interface);
    device arrays must also have θ's dtype (int64 labels) and be C-contiguous. The values
    (finite, labels and targets in range) are checked on the device: by one kernel here
    (``values=True``), or, with ``values=False``, by the kernels of the pass itself, whose
    verdict comes back with the loss; either way a bad input raises the host checks' error
    and returns nothing.
    """
    check_available()
    _validation.check_net(net)
    theta, X, y = _as_device("theta", theta), _as_device("X", X), _as_device("y", y)
    _validation.check_theta_shape(net, theta.shape, theta.dtype)
    dt = np.dtype(theta.dtype)
    _validation.check_X_shape(net, X.shape)
    B = X.shape[0]
    if np.dtype(X.dtype) != dt:
        raise TypeError(f"X: device inputs are used in place, so X must have θ's dtype {dt}, got {X.dtype}")
    ce = LOSS_REGISTRY[net.loss].labels
    if ce and np.dtype(y.dtype) != np.int64:
        raise TypeError(f"y: {net.loss} on the device expects int64 labels, got dtype {y.dtype}")
    shape = _validation.check_y_shape(net, y.shape, B)
    if not ce:
        y = y.reshape(*shape) if tuple(y.shape) != shape else y
        if np.dtype(y.dtype) != dt:
            raise TypeError(f"y: device targets are used in place, need θ's dtype {dt}, not {y.dtype}")
    for name, a in (("theta", theta), ("X", X), ("y", y)):
        if not a.is_c_contiguous():
            raise ValueError(f"{name}: device inputs must be C-contiguous")
    labels = y if ce else scratch("no_labels", (1,), np.int64, zero=True)
    targets = scratch("no_targets", (1, net.n_out), dt, zero=True) if ce else y
    d = _Device(theta, X, labels, targets, B, dt, values_checked=False)
    if values:
        _check_values(net, d)
    return d


def backprop_device(net: MLP, theta, X, y, need: frozenset[str], out=None, path: str = "auto") -> dict:
    """Raw quantities for device inputs, as device arrays, plus the derived quantities of ``need`` that
    the registry says this backend makes (:func:`fastgrad.quantities.made_in_pass`); the rest are
    finished from them with :data:`ARRAYS`."""
    d = check_device_inputs(net, theta, X, y, values=False)
    if out is not None:
        out = _as_device("out", out)
        if tuple(out.shape) != (d.batch_size, net.num_params) or np.dtype(out.dtype) != d.dtype:
            raise ValueError(
                f"out: expected shape {(d.batch_size, net.num_params)} and dtype {d.dtype}, "
                f"got {tuple(out.shape)} and {out.dtype}"
            )
    raw = _run_device(net, d, need, None, out, path)
    for q, make in made_in_pass("cuda", need):  # only when asked: quantities.needed puts their names in need
        raw[q.name] = cuda.device_array_like(raw[q.needs[0]])
        make(*(raw[n] for n in q.needs), raw[q.name])
    return raw


class DeviceArrays:
    """The array module of device results (numba-cuda arrays) for the registry's ``finish`` of a
    derived quantity: :class:`fastgrad.quantities.HostArrays`' operations, on the device where this
    class has its own (``zeros_like``, ``to_host``, ``row_dot``: a kernel); any other (``map``, or one
    a new quantity adds to ``HostArrays``) runs on host copies of the device arrays and returns a
    device array, so a derived quantity needs no code here to work. One that must stay on the GPU
    gets a kernel here, or declares one in the registry's ``made_in_pass``."""

    def __getattr__(self, name: str):
        host_op = getattr(HOST, name)

        def on_host_copies(*args):
            out = host_op(*(a.copy_to_host() if is_device_array(a) else a for a in args))
            return cuda.to_device(np.ascontiguousarray(out)) if isinstance(out, np.ndarray) else out

        return on_host_copies

    @staticmethod
    def zeros_like(a):
        return cuda.to_device(np.zeros(a.shape, dtype=a.dtype))

    @staticmethod
    def to_host(a) -> np.ndarray:
        return a.copy_to_host() if is_device_array(a) else np.asarray(a)

    @staticmethod
    def row_dot(M, v):
        return rows.row_dot(M, v)


ARRAYS = DeviceArrays()
"""The array module :func:`fastgrad.backprop` finishes derived quantities of device results with."""


def clipped_grad_device(
    net: MLP, theta, X, y, max_norm: float, noise_multiplier: float, seed, path: str = "auto"
):
    """DP-SGD's clipped, noised mean gradient for device inputs, as a device array (P,)."""
    d = check_device_inputs(net, theta, X, y, values=False)
    raw = _run_device(net, d, frozenset({"loss"}), max_norm, None, path)
    return dp_step(raw["clipped_sum"], raw["norms"], max_norm, noise_multiplier, d.batch_size, seed)


__all__ = [
    "ARRAYS",
    "FUSED_MAX_WIDTH",
    "KERNELS",
    "ROW_THREADS",
    "SHARED_BYTES",
    "SIMULATOR",
    "DeviceArrays",
    "backprop_device",
    "check_available",
    "check_device_inputs",
    "clear_scratch",
    "clipped_grad_device",
    "cuda",
    "forward_factors",
    "fused_tile",
    "is_device_array",
    "layer_factors",
    "run",
]
