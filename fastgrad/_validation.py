"""Input checks shared by every host backend: done once, before any kernel runs.

Each check raises ``TypeError`` (wrong kind of thing) or ``ValueError`` (wrong
shape or value) naming the argument and what was expected. What comes out is
clean: C-contiguous, native byte order, in θ's dtype, finite, labels in range.

The dtype rules (docs/api.md, "Input types"): θ is float32 or float64 (a NumPy array or a CPU
``torch.Tensor``, read through :func:`host_array` like X and y); X and float
targets are real numbers (bool, integer or floating, converted to θ's dtype); labels
are integers. Complex, datetime/timedelta, string, object and structured arrays are
refused, and so are NumPy masked arrays (their mask would be dropped silently, a
masked NaN included). Any byte order is accepted and converted to the native one;
only ``out=``, which is written in place, must already be native.

The shape and dtype checks (:func:`check_theta_shape`, :func:`check_X_shape`,
:func:`check_y_shape`) read only ``.shape`` and ``.dtype``, so the CUDA backend runs
the same functions on device arrays (``fastgrad.cuda.check_device_inputs``) and the
two cannot word an error differently. The value checks (finite, label range) are the
host's here; the device's run in its kernels and raise these same messages.
"""

from __future__ import annotations

import numbers
import os
from dataclasses import dataclass

import numpy as np

from .losses import REGISTRY as LOSS_REGISTRY
from .mlp import FLOAT_DTYPES, MLP
from .quantities import QUANTITIES


@dataclass(frozen=True)
class Inputs:
    """Validated host inputs. ``labels`` (int64, (B,)) is used by cross-entropy,
    ``targets`` ((B, n_L), θ's dtype) by the other losses; the unused one has length 0."""

    theta: np.ndarray
    X: np.ndarray
    labels: np.ndarray
    targets: np.ndarray

    @property
    def batch_size(self) -> int:
        return self.X.shape[0]

    @property
    def dtype(self) -> np.dtype:
        return self.theta.dtype


def check_net(net) -> MLP:
    if not isinstance(net, MLP):
        raise TypeError(f"net: expected a fastgrad.MLP, got {type(net).__name__}")
    return net


# ------------------------------------------------ shapes and dtypes (host and device)


def check_theta_shape(net: MLP, shape: tuple, dtype) -> None:
    """θ's dtype (float32 or float64) and shape (P,), from its ``.shape`` and ``.dtype``."""
    if np.dtype(dtype) not in FLOAT_DTYPES:
        raise TypeError(f"theta: expected dtype float32 or float64, got {dtype}")
    shape = tuple(shape)
    if len(shape) != 1 or shape[0] != net.num_params:
        raise ValueError(
            f"theta: expected shape ({net.num_params},) for sizes {list(net.sizes)}, got {shape}"
        )


def check_X_shape(net: MLP, shape: tuple) -> None:
    """X's shape (B, n0) with B ≥ 1, from its ``.shape``."""
    shape = tuple(shape)
    if len(shape) != 2:
        raise ValueError(f"X: expected a 2-D array (B, {net.n_in}), got shape {shape}")
    if shape[0] == 0:
        raise ValueError("X: the batch is empty (B = 0); need at least one sample")
    if shape[1] != net.n_in:
        raise ValueError(f"X: expected {net.n_in} columns (sizes[0]), got shape {shape}")


def check_y_shape(net: MLP, shape: tuple, batch: int) -> tuple:
    """y's shape for the loss: labels (B,) for a loss that takes labels (cross-entropy), else
    targets (B, n_L); returns the shape the kernels take (flat targets (B,) of a one-output network
    become (B, 1))."""
    shape = tuple(shape)
    n_out = net.n_out
    if LOSS_REGISTRY[net.loss].labels:
        if shape != (batch,):
            raise ValueError(f"y: {net.loss} expects labels of shape ({batch},), got {shape}")
        return shape
    if len(shape) == 1 and n_out == 1 and shape[0] == batch:
        shape = (batch, 1)
    if shape != (batch, n_out):
        raise ValueError(f"y: {net.loss} expects targets of shape ({batch}, {n_out}), got {shape}")
    return shape


# ------------------------------------------------------------- host arrays


def _refuse_masked(name: str, a) -> None:
    if isinstance(a, np.ma.MaskedArray):
        raise TypeError(
            f"{name}: a NumPy masked array is not accepted (its mask would be ignored); "
            f"pass a plain array, e.g. {name}.filled(value) or {name}.compressed()"
        )


def _native(arr: np.ndarray) -> np.ndarray:
    """``arr`` in native byte order (a converted copy when it is not)."""
    return arr if arr.dtype.isnative else arr.astype(arr.dtype.newbyteorder("="))


REAL_KINDS = "biuf"
"""dtype kinds accepted as real numbers: bool, signed and unsigned integers, floating point
(``timedelta64`` counts as an integer for ``np.issubdtype``, so kinds are checked instead)."""


def host_array(name: str, a):
    """``a`` itself, or a CPU ``torch.Tensor`` as the NumPy array sharing its memory (detached from
    autograd: the kernels read values only). torch is not imported: a tensor is recognised by its
    type's module. A tensor NumPy cannot hold (bfloat16) is a ``TypeError`` naming ``name``."""
    if type(a).__module__.startswith("torch") and hasattr(a, "detach"):
        try:
            return a.detach().numpy()
        except (TypeError, RuntimeError) as exc:
            raise TypeError(f"{name}: this torch tensor cannot be read as a NumPy array ({exc})") from None
    return a


def check_theta(net: MLP, theta) -> np.ndarray:
    theta = host_array("theta", theta)
    if not isinstance(theta, np.ndarray):
        raise TypeError(f"theta: expected a NumPy array, got {type(theta).__name__}")
    _refuse_masked("theta", theta)
    if theta.dtype.kind == "f":
        theta = _native(theta)
    check_theta_shape(net, theta.shape, theta.dtype)
    if not np.isfinite(theta).all():
        raise ValueError("theta: contains NaN or Inf")
    return np.ascontiguousarray(theta)


def _real_array(name: str, a) -> np.ndarray:
    _refuse_masked(name, a)
    arr = np.asarray(host_array(name, a))
    if arr.dtype.kind not in REAL_KINDS:
        raise TypeError(
            f"{name}: expected real numbers (a numeric bool, integer or float array), got dtype {arr.dtype}"
        )
    return _native(arr)


def check_X(net: MLP, X, dtype: np.dtype) -> np.ndarray:
    X = _real_array("X", X)
    check_X_shape(net, X.shape)
    X = np.ascontiguousarray(X, dtype=dtype)
    if not np.isfinite(X).all():
        raise ValueError("X: contains NaN or Inf")
    return X


def check_y(net: MLP, y, batch: int, dtype: np.dtype) -> tuple[np.ndarray, np.ndarray]:
    """Return ``(labels, targets)`` for the kernels; the unused one is empty."""
    y = _real_array("y", y)
    n_out = net.n_out
    loss = LOSS_REGISTRY[net.loss]
    if loss.labels:
        if not np.issubdtype(y.dtype, np.integer):
            raise TypeError(f"y: {net.loss} expects integer class labels, got dtype {y.dtype}")
        check_y_shape(net, y.shape, batch)
        if y.min() < 0 or y.max() >= n_out:
            raise ValueError(
                f"y: labels must lie in [0, {n_out}) (sizes[-1] = {n_out}), "
                f"got values in [{y.min()}, {y.max()}]"
            )
        return np.ascontiguousarray(y, dtype=np.int64), np.zeros((0, n_out), dtype=dtype)
    targets = np.ascontiguousarray(y.reshape(check_y_shape(net, y.shape, batch)), dtype=dtype)
    if not np.isfinite(targets).all():
        raise ValueError("y: contains NaN or Inf")
    loss.check_domain(targets)
    return np.zeros(0, dtype=np.int64), targets


def check_inputs(net, theta, X, y) -> Inputs:
    """Validate and normalise ``(theta, X, y)`` for ``net``; see :class:`Inputs`."""
    net = check_net(net)
    theta = check_theta(net, theta)
    X = check_X(net, X, theta.dtype)
    labels, targets = check_y(net, y, X.shape[0], theta.dtype)
    return Inputs(theta, X, labels, targets)


def check_compute(compute) -> frozenset[str]:
    if isinstance(compute, str):
        compute = (compute,)
    try:
        names = list(compute)
    except TypeError:
        raise TypeError(
            f"compute: expected a sequence of quantity names, got {type(compute).__name__}"
        ) from None
    for name in names:
        if name not in QUANTITIES:
            raise ValueError(f"compute: unknown quantity {name!r}; expected any of {', '.join(QUANTITIES)}")
    if not names:
        raise ValueError(f"compute: empty; expected any of {', '.join(QUANTITIES)}")
    return frozenset(names)


def check_positive(name: str, value) -> float:
    """``value`` as a float when it is a positive finite real number; else ``TypeError`` or
    ``ValueError`` naming ``name``."""
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name}: expected a positive real number, got {type(value).__name__}")
    if not np.isfinite(value) or value <= 0:
        raise ValueError(f"{name}: expected a positive finite number, got {value}")
    return float(value)


def check_max_norm(max_norm) -> float:
    return check_positive("max_norm", max_norm)


def check_noise_multiplier(noise_multiplier) -> float:
    if isinstance(noise_multiplier, (bool, np.bool_)) or not isinstance(noise_multiplier, numbers.Real):
        raise TypeError(
            f"noise_multiplier: expected a non-negative real number, got {type(noise_multiplier).__name__}"
        )
    if not np.isfinite(noise_multiplier) or noise_multiplier < 0:
        raise ValueError(f"noise_multiplier: expected a non-negative finite number, got {noise_multiplier}")
    return float(noise_multiplier)


def check_out(out, shape: tuple[int, int], dtype: np.dtype, inputs: dict | None = None):
    """``out`` for ``per_sample``: a writeable C-contiguous array of ``shape`` and ``dtype`` (native
    byte order) that shares no memory with any of ``inputs`` (name -> the caller's array): the
    kernels write rows while still reading θ and X, so an overlap gives silently wrong results."""
    if out is None:
        return None
    if not isinstance(out, np.ndarray):
        raise TypeError(f"out: expected a NumPy array (or np.memmap), got {type(out).__name__}")
    _refuse_masked("out", out)
    if out.shape != shape or out.dtype != dtype:
        raise ValueError(f"out: expected shape {shape} and dtype {dtype}, got {out.shape} and {out.dtype}")
    if not out.flags.c_contiguous or not out.flags.writeable:
        raise ValueError("out: must be C-contiguous and writeable")
    for name, a in (inputs or {}).items():
        if isinstance(a, np.ndarray) and np.shares_memory(out, a):
            raise ValueError(f"out: shares memory with {name}; per_sample needs a separate array")
    return out


# ---------------------------------------------------------------- memory


class PerSampleMemoryError(MemoryError, ValueError):
    """``per_sample``'s (B, P) matrix would not fit in the memory available; raised before any work.

    A ``MemoryError`` (what it is) and a ``ValueError`` (the request is too big for this machine,
    like the other bad-input errors, which are ``ValueError``s); catch either.
    """


def available_memory() -> int | None:
    """Bytes of memory this process can still allocate without swapping, or None when unknown.

    Linux's ``MemAvailable``, lowered to the room left under a cgroup v2 memory limit (a
    container's); elsewhere the free physical pages, or None.
    """
    avail = None
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    avail = int(line.split()[1]) * 1024
                    break
    except (OSError, ValueError):
        pass
    if avail is None:
        try:
            avail = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        except (AttributeError, OSError, ValueError):
            return None
    try:  # cgroup v2: "0::/path" in /proc/self/cgroup; memory.max is "max" when unlimited
        with open("/proc/self/cgroup") as fh:
            group = next(line.split("::", 1)[1].strip() for line in fh if line.startswith("0::"))
        folder = os.path.join("/sys/fs/cgroup", group.lstrip("/"))
        with open(os.path.join(folder, "memory.max")) as fh:
            limit = fh.read().strip()
        if limit != "max":
            with open(os.path.join(folder, "memory.current")) as fh:
                avail = min(avail, max(0, int(limit) - int(fh.read())))
    except (OSError, ValueError, StopIteration):
        pass
    return avail


def check_per_sample_fits(batch: int, num_params: int, dtype: np.dtype) -> None:
    """Raise :class:`PerSampleMemoryError` when B × P × itemsize bytes exceed the available memory
    (unchecked, a 19.7 GiB request grows until the OS kills the process, and one above RAM fails only
    after 13 s of work). Not called when ``out=`` is given: then the rows go there."""
    need = batch * num_params * np.dtype(dtype).itemsize
    free = available_memory()
    if free is not None and need > free:
        rows = max(free // max(num_params * np.dtype(dtype).itemsize, 1), 0)
        raise PerSampleMemoryError(
            f"compute: 'per_sample' needs a ({batch}, {num_params}) {np.dtype(dtype)} matrix, "
            f"{need / 2**30:.1f} GiB, but only {free / 2**30:.1f} GiB of memory is available; pass "
            f"out= an np.memmap (np.lib.format.open_memmap(path, 'w+', dtype, shape)) to write the rows "
            f"to disk, or fewer samples per call (at most ~{rows} fit)"
        )
