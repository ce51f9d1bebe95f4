"""Differential privacy around :func:`fastgrad.clipped_grad`: accounting, Poisson sampling, noise.

- **Accounting** (needs the ``dp`` extra, Google's ``dp-accounting``): :func:`epsilon` is the
  ε spent by DP-SGD with noise multiplier σ, sampling rate q and a number of steps, at δ,
  from the RDP or the PLD accountant; :func:`calibrate_noise_multiplier` is the smallest σ
  (within a tolerance) whose ε is at most a target. Both describe DP-SGD as
  ``SelfComposedDpEvent(PoissonSampledDpEvent(q, GaussianDpEvent(σ)), steps)``
  (:func:`dp_event`), add-or-remove-one neighbours, as Opacus does.
- **Poisson sampling** (:func:`poisson_batches`): each step takes each sample independently
  with probability q, the sampling that the accountants' analysis assumes.
- **Noise** (:func:`standard_normal`): the ξ ~ N(0, I) of DP-SGD, either from fastgrad's
  counter-based generator (:mod:`fastgrad.noise`: Philox4x32-10 and a ziggurat, compiled and
  parallel; reproducible, fast, not secure) or, with ``secure=True``, from the operating
  system's CSPRNG (``os.urandom``) with Opacus's ``secure_mode`` defence against floating-point
  attacks. See docs/dp.md for what that does and does not protect.
- **The step** (:func:`dp_step`): where the clipped sum, the noise and the denominator make
  DP-SGD's step, on the host and on the device, after refusing a sample whose gradient norm is
  NaN or Inf (:func:`check_clip_norms`). (The numba backend makes it inside its kernels, with the
  same compiled expression and the same refusal.)

Only the accounting needs the extra; the rest is NumPy, Numba and the standard library.
"""

from __future__ import annotations

import contextlib
import logging
import math
import numbers
import os
from collections.abc import Iterator

import numpy as np

from . import noise as _noise
from .extras import MissingExtraError, require
from .update import sgd_update

ACCOUNTANTS: tuple[str, ...] = ("rdp", "pld")
"""Accountants of :func:`epsilon`: Rényi DP (fast, a slightly loose upper bound) and the
privacy loss distribution (tighter, slower: about a second per call at 1000 steps)."""

SECURE_DRAWS = 4
"""Gaussians summed per secure sample (then divided by √4 = 2): Opacus's ``secure_mode``, from
Holohan & Braghin 2021 (arXiv:2107.10138, §5.1) with n = 2: an attacker who reads the
noise's low-order bits must now search 2^(53·(2n−1)) = 2^159 candidates rather than 2^53."""


# ------------------------------------------------------------------ arguments


def _real(name: str, value) -> float:
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name}: expected a real number, got {type(value).__name__}")
    value = float(value)
    if math.isnan(value):
        raise ValueError(f"{name}: expected a number, got NaN")
    return value


def _check_sampling_rate(q) -> float:
    q = _real("sampling_rate", q)
    if not 0 < q <= 1:
        raise ValueError(f"sampling_rate: expected a probability in (0, 1], got {q}")
    return q


def _check_delta(delta) -> float:
    delta = _real("delta", delta)
    if not 0 < delta < 1:
        raise ValueError(f"delta: expected a probability in (0, 1), got {delta}")
    return delta


def _check_count(name: str, value, minimum: int) -> int:
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name}: expected an integer, got {type(value).__name__}")
    if value < minimum:
        raise ValueError(f"{name}: expected an integer ≥ {minimum}, got {value}")
    return int(value)


def _check_accountant(accountant) -> str:
    if not isinstance(accountant, str) or accountant not in ACCOUNTANTS:
        raise ValueError(f"accountant: unknown {accountant!r}; expected one of {', '.join(ACCOUNTANTS)}")
    return accountant


def check_seed(seed, secure: bool = False):
    """``seed`` of the noise or the sampling, checked before any work: ``None``, a non-negative
    integer, a non-empty sequence of them, a ``numpy.random.SeedSequence`` or a
    ``numpy.random.Generator`` (whose state the draw advances); ``None`` when ``secure`` (a
    draw from ``os.urandom`` cannot be seeded). Returns ``seed``; ``TypeError``/``ValueError``
    naming the argument otherwise."""
    if not isinstance(secure, (bool, np.bool_)):
        raise TypeError(f"secure: expected True or False, got {type(secure).__name__}")
    expected = "None, a non-negative integer, a sequence of them, a numpy SeedSequence or Generator"
    if secure and seed is not None:
        raise ValueError("seed: a secure draw comes from os.urandom and cannot be seeded; pass seed=None")
    if seed is None or isinstance(seed, (np.random.SeedSequence, np.random.Generator)):
        return seed
    is_sequence = isinstance(seed, (tuple, list, np.ndarray))
    if is_sequence and len(seed) == 0:
        raise ValueError(f"seed: expected {expected}; got an empty sequence")
    for s in np.ravel(np.asarray(seed if is_sequence else (seed,), dtype=object)):
        if isinstance(s, (bool, np.bool_)) or not isinstance(s, numbers.Integral):
            raise TypeError(f"seed: expected {expected}; got {type(s).__name__} {s!r}")
        if s < 0:
            raise ValueError(f"seed: expected {expected}; got the negative integer {s}")
    return seed


# ----------------------------------------------------------------- accounting


def accounting_available() -> bool:
    """Whether the ``dp`` extra (``dp-accounting``) is installed, so that ε can be computed."""
    try:
        _dp_accounting()
    except MissingExtraError:
        return False
    return True


def _dp_accounting():
    return require("dp_accounting", "dp", "privacy accounting (fastgrad.privacy)")


def dp_event(noise_multiplier: float, sampling_rate: float, steps: int):
    """DP-SGD as a ``dp_accounting.DpEvent``: ``steps`` Poisson-sampled Gaussian mechanisms.

    For users who want another accountant or to compose DP-SGD with other releases.
    """
    dpa = _dp_accounting()
    sigma = _real("noise_multiplier", noise_multiplier)
    if not 0 <= sigma < math.inf:
        raise ValueError(f"noise_multiplier: expected a non-negative finite number, got {sigma}")
    q = _check_sampling_rate(sampling_rate)
    steps = _check_count("steps", steps, 0)
    return dpa.SelfComposedDpEvent(dpa.PoissonSampledDpEvent(q, dpa.GaussianDpEvent(sigma)), steps)


@contextlib.contextmanager
def _quiet_accountants():
    """dp-accounting logs a warning (through absl) for every RDP order it drops as numerically
    unstable, dozens per call at small σ; the orders left still bound ε, so keep them quiet."""
    log = logging.getLogger("absl")
    level = log.level
    log.setLevel(logging.ERROR)
    try:
        yield
    finally:
        log.setLevel(level)


def _accountant(name: str):
    dpa = _dp_accounting()
    return dpa.rdp.RdpAccountant() if name == "rdp" else dpa.pld.PLDAccountant()


def epsilon(
    noise_multiplier: float, sampling_rate: float, steps: int, delta: float, accountant: str = "rdp"
) -> float:
    """ε spent by DP-SGD at ``delta``: ``steps`` steps of Poisson sampling at rate q and Gaussian
    noise of standard deviation σ·C on the clipped sum.

    Parameters
    ----------
    noise_multiplier : float
        σ ≥ 0 (σ = 0 spends ε = inf after one step).
    sampling_rate : float
        q in (0, 1]: each sample's probability of being in a step's batch (expected batch
        size / dataset size).
    steps : int
        Number of noised steps so far, ≥ 0.
    delta : float
        δ in (0, 1); usually below 1 / dataset size.
    accountant : {"rdp", "pld"}
        ``dp_accounting.rdp.RdpAccountant`` (the figure Opacus's ``"rdp"`` accountant gives,
        to its choice of orders) or ``dp_accounting.pld.PLDAccountant`` (tighter).

    Returns
    -------
    float
        ε (inf when σ = 0 and steps ≥ 1; 0 when steps = 0).

    Raises
    ------
    TypeError, ValueError
        For a bad argument, naming it.
    fastgrad.extras.MissingExtraError
        When ``dp-accounting`` is not installed (``pip install "fastgrad[dp]"``).
    """
    accountant = _check_accountant(accountant)
    delta = _check_delta(delta)
    event = dp_event(noise_multiplier, sampling_rate, steps)
    if steps == 0:
        return 0.0
    if noise_multiplier == 0:
        return math.inf
    with _quiet_accountants():
        return float(_accountant(accountant).compose(event).get_epsilon(delta))


def calibrate_noise_multiplier(
    target_epsilon: float,
    delta: float,
    sampling_rate: float,
    steps: int,
    accountant: str = "rdp",
    tol: float = 1e-4,
) -> float:
    """The noise multiplier σ for which :func:`epsilon` is at most ``target_epsilon`` after ``steps``.

    A root search (``dp_accounting.calibrate_dp_mechanism``, Brent's method) for ε(σ) = target,
    then rounded up: the σ returned is at most ``tol`` above the smallest σ that meets the
    target, and its ε is checked to be ≤ ``target_epsilon``.

    Parameters
    ----------
    target_epsilon : float
        ε > 0.
    delta, sampling_rate, accountant
        As for :func:`epsilon`.
    steps : int
        ≥ 1: the whole run's number of steps.
    tol : float
        Absolute tolerance on σ, > 0.

    Returns
    -------
    float
        σ.

    Raises
    ------
    TypeError, ValueError, fastgrad.extras.MissingExtraError
        As for :func:`epsilon`.
    """
    eps = _real("target_epsilon", target_epsilon)
    if not 0 < eps < math.inf:
        raise ValueError(f"target_epsilon: expected a positive finite number, got {eps}")
    delta = _check_delta(delta)
    q = _check_sampling_rate(sampling_rate)
    steps = _check_count("steps", steps, 1)
    accountant = _check_accountant(accountant)
    tol = _real("tol", tol)
    if not 0 < tol < math.inf:
        raise ValueError(f"tol: expected a positive finite number, got {tol}")
    dpa = _dp_accounting()

    def search(name: str, bracket) -> float:
        with _quiet_accountants():
            return float(
                dpa.calibrate_dp_mechanism(
                    lambda: _accountant(name),
                    lambda s: dp_event(s, q, steps),
                    eps,
                    delta,
                    bracket,
                    tol=tol / 2,
                )
            )

    # σ → 0 gives ε → inf, which Brent's method cannot bracket with: start just above it (RDP
    # only: the PLD accountant's discretisation of a tiny σ needs gigabytes)
    sigma = search("rdp", dpa.LowerEndpointAndGuess(1e-3, 1.0))
    if accountant == "pld":  # tighter than RDP, so its σ lies below RDP's: bracket it from there
        hi = sigma + tol
        while epsilon(hi, q, steps, delta, "pld") > eps:
            hi *= 1.25
        lo = hi / 1.25
        while epsilon(lo, q, steps, delta, "pld") <= eps:
            lo /= 1.25
        sigma = search("pld", dpa.ExplicitBracketInterval(lo, hi))
    sigma += tol / 2  # ε falls as σ grows: step past the root's side of the tolerance
    for _ in range(60):  # the PLD accountant's ε is monotone only up to its discretisation
        if epsilon(sigma, q, steps, delta, accountant) <= eps:
            return sigma
        sigma += tol
    raise RuntimeError(f"calibrate_noise_multiplier: no σ near {sigma:g} reaches ε ≤ {eps:g}")


# ------------------------------------------------------------ Poisson sampling


def poisson_batches(
    num_samples: int, sampling_rate: float, steps: int, seed=None, *, secure: bool = False
) -> Iterator[np.ndarray]:
    """Poisson sampling: for each of ``steps`` steps, the sorted indices of the samples taken,
    each independently with probability ``sampling_rate``.

    Batch sizes vary (Binomial(N, q); a batch may be empty), which is what the accountants of
    :func:`epsilon` assume; divide the clipped sum by the expected batch size q·N
    (``clipped_grad(..., expected_batch_size=q * N)``), as Opacus does.

    Parameters
    ----------
    num_samples : int
        N ≥ 1, the dataset size.
    sampling_rate : float
        q in (0, 1].
    steps : int
        ≥ 0.
    seed
        As for :func:`check_seed`: the same seed gives the same batches.
    secure : bool
        Draw the coin flips from ``os.urandom`` (then ``seed`` must be ``None``).

    Returns
    -------
    iterator of ndarray (B_t,) of int64
        The arguments are checked at the call, before the first batch is drawn.
    """
    n = _check_count("num_samples", num_samples, 1)
    q = _check_sampling_rate(sampling_rate)
    steps = _check_count("steps", steps, 0)
    rng = _generator(seed, secure)  # checked here, not at the first step of the iteration
    return _poisson_steps(n, q, steps, rng)


def _poisson_steps(n: int, q: float, steps: int, rng) -> Iterator[np.ndarray]:
    for _ in range(steps):
        u = secure_uniform(n) if rng is None else rng.random(n)
        yield np.flatnonzero(u < q)


# ---------------------------------------------------------------------- noise


def _generator(seed, secure: bool) -> np.random.Generator | None:
    """NumPy's generator for ``seed``, or ``None`` for a secure draw (after :func:`check_seed`)."""
    check_seed(seed, secure)
    return None if secure else np.random.default_rng(seed)


def secure_uniform(n: int) -> np.ndarray:
    """n floats uniform on (0, 1], 53 random bits each, from the OS CSPRNG (``os.urandom``)."""
    bits = np.frombuffer(os.urandom(8 * n), dtype=np.uint64)
    return ((bits >> np.uint64(11)) + np.uint64(1)) * (1.0 / 2**53)


def _secure_gaussian(n: int) -> np.ndarray:
    """n standard normals by Box–Muller from :func:`secure_uniform` (float64)."""
    half = (n + 1) // 2
    u1, u2 = secure_uniform(half), secure_uniform(half)
    r = np.sqrt(-2.0 * np.log(u1))
    return np.concatenate([r * np.cos(2 * np.pi * u2), r * np.sin(2 * np.pi * u2)])[:n]


def standard_normal(n: int, dtype=np.float64, seed=None, *, secure: bool = False) -> np.ndarray:
    """ξ ~ N(0, I_n), DP-SGD's noise, in ``dtype``.

    ``secure=False``: fastgrad's counter-based generator (:mod:`fastgrad.noise`: Philox4x32-10
    keyed by ``SeedSequence(seed)``, a 256-layer ziggurat; float32 values from 32 random bits,
    float64 from 64), compiled and drawn on Numba's threads with the same bits on any thread
    count. Fast and reproducible, but not secure: its key can be recovered from its output.

    ``secure=True``: every random bit comes from ``os.urandom`` (the kernel's CSPRNG, as
    Opacus's ``secure_mode`` uses ``torchcsprng``'s ``/dev/urandom`` generator), and each
    sample is the sum of :data:`SECURE_DRAWS` Box–Muller Gaussians divided by 2 (Opacus's
    defence against floating-point attacks). ``seed`` must be ``None``. It needs 4 × 8 random
    bytes per sample from the kernel: many times the time of the default draw (docs/dp.md).

    Parameters
    ----------
    n : int
        Number of values, ≥ 0.
    dtype : float32 or float64
        Other float dtypes get float64 values, converted.
    seed
        As for :func:`check_seed`.
    secure : bool

    Returns
    -------
    ndarray (n,) of ``dtype``
    """
    n = _check_count("n", n, 0)
    check_seed(seed, secure)
    dt = np.dtype(dtype)
    if not secure:
        draw = dt if dt in (np.float32, np.float64) else np.dtype(np.float64)
        return _noise.standard_normal(n, draw, _noise.seed_words(seed)).astype(dt, copy=False)
    total = np.zeros(n)
    for _ in range(SECURE_DRAWS):
        total += _secure_gaussian(n)
    return (total / math.sqrt(SECURE_DRAWS)).astype(dt)


# ------------------------------------------------------------------- the step


def check_clip_norms(norms: np.ndarray) -> None:
    """Raise ``FloatingPointError`` naming the first sample whose gradient norm is NaN or Inf.

    Such a sample's clip factor C / max(‖∇ℓ_i‖, C) is NaN or 0, not a bound, so DP-SGD's
    guarantee would not hold. Norms are summed in float64, so this happens only where the
    gradient itself is not finite or its norm exceeds θ's dtype. :func:`dp_step` calls it.
    """
    bad = np.flatnonzero(~np.isfinite(norms))
    if bad.size:
        i = int(bad[0])
        raise FloatingPointError(
            f"clipped_grad: the gradient norm of sample {i} is {norms[i]} ({bad.size} of {norms.shape[0]} "
            f"samples), so it cannot be clipped to max_norm; its forward or backward pass overflowed "
            f"{norms.dtype} (scale the inputs, or use float64)"
        )


def _on_device(a) -> bool:
    return hasattr(a, "copy_to_host")  # a Numba CUDA device array


def _writeable_like(a, like: np.ndarray) -> bool:
    """Whether ``a`` is a writeable C-contiguous ndarray of ``like``'s shape and dtype."""
    return (
        isinstance(a, np.ndarray)
        and a.shape == like.shape
        and a.dtype == like.dtype
        and a.flags.c_contiguous
        and a.flags.writeable
    )


def dp_step(
    clipped_sum,
    norms,
    max_norm: float,
    noise_multiplier: float,
    denominator: float,
    seed=None,
    *,
    secure: bool = False,
    out: np.ndarray | None = None,
    update: tuple | None = None,
):
    """DP-SGD's step (1/D) [Σ_i c_i ∇ℓ_i + σ C ξ] from the clipped sum: its one definition.

    Every DP path calls it (:func:`fastgrad.clipped_grad` and :class:`fastgrad.Step` on the naive,
    numpy and cuda backends, and with ``secure_noise``; :func:`fastgrad.dask.clipped_grad`), or, on the
    numba backend, makes the step in its kernels with the same compiled function
    (:func:`fastgrad.noise.noised_block`, :func:`fastgrad.cpu.clipped_step`), so they refuse the same
    samples, draw the same noise for a seed and round the same way:
    ``(clipped_sum + dt(σC) · ξ) / dt(D)`` in the clipped sum's dtype dt, one rounding per
    operation (no fused multiply-add), with ξ = :func:`standard_normal` ``(P, dt, seed)``.

    Parameters
    ----------
    clipped_sum : ndarray (P,) of float32/float64, or a CUDA device array
        Σ_i c_i ∇ℓ_i, c_i = min(1, C / ‖∇ℓ_i‖).
    norms : ndarray (B,), or a CUDA device array
        The per-sample gradient norms the clip factors came from: a NaN or Inf one raises
        ``FloatingPointError`` before anything is drawn (:func:`check_clip_norms`).
    max_norm, noise_multiplier : float
        C and σ (checked by the caller); σ C = 0 draws no noise.
    denominator : float
        D > 0: the batch size, or the expected batch size of Poisson sampling.
    seed, secure
        As for :func:`standard_normal`.
    out : ndarray (P,) of the clipped sum's dtype, optional (host)
        Receives the step; may be ``clipped_sum``.
    update : (θ, pack), optional (host)
        An optimizer's update of the flat parameters θ (P,) (writeable, C-contiguous, the clipped sum's
        dtype) from the step, as the :class:`fastgrad.update.Update` pack (a plain tuple) says
        (:class:`fastgrad.torch.SGD`): made in the noise's compiled pass, each block right after its
        values of the step, else by :func:`fastgrad.update.sgd_update` after; the same bits either way.

    Returns
    -------
    ndarray (P,) (a device array for device inputs)

    Notes
    -----
    On host arrays with a seeded draw the noise is generated, scaled, added and divided in one
    compiled parallel pass over P (:func:`fastgrad.noise.noised_mean`), with the bits of the
    expression above and no array of noise. On device arrays ξ is drawn on the host (the same
    bits) and the device kernel forms the same expression with the same roundings.
    """
    check_seed(seed, secure)
    if not (isinstance(denominator, numbers.Real) and 0 < denominator < math.inf):
        raise ValueError(f"denominator: expected a positive finite number, got {denominator!r}")
    noise_std = noise_multiplier * max_norm
    if _on_device(clipped_sum):
        if update is not None:
            raise ValueError("update: an optimizer's update with dp_step is for host arrays only")
        check_clip_norms(norms.copy_to_host())  # B numbers
        from .cuda import rows

        dt = np.dtype(clipped_sum.dtype)
        P = clipped_sum.shape[0]
        xi = standard_normal(P, dt, seed, secure=secure) if noise_std > 0 else np.zeros(P, dt)
        return rows.noised_mean(
            total=clipped_sum, noise=rows.cuda.to_device(xi), noise_std=noise_std, denominator=denominator
        )
    if not (
        isinstance(clipped_sum, np.ndarray)
        and clipped_sum.ndim == 1
        and clipped_sum.dtype in (np.float32, np.float64)
        and clipped_sum.flags.c_contiguous
    ):
        raise TypeError("clipped_sum: expected a C-contiguous float32 or float64 vector (P,)")
    dt = clipped_sum.dtype
    if out is None:
        out = np.empty_like(clipped_sum)
    elif not _writeable_like(out, clipped_sum):
        raise ValueError(f"out: expected a writeable C-contiguous {dt} vector of shape {clipped_sum.shape}")
    if update is not None and not _writeable_like(update[0], clipped_sum):
        raise ValueError(f"update: θ must be a writeable C-contiguous {dt} vector of {clipped_sum.shape}")
    check_clip_norms(norms)
    if noise_std > 0 and not secure:  # one compiled pass: the noise drawn, scaled, added, divided, θ updated
        return _noise.noised_mean(clipped_sum, noise_std, denominator, _noise.seed_words(seed), out, update)
    if noise_std == 0:
        np.divide(clipped_sum, dt.type(denominator), out=out)
    else:
        xi = standard_normal(clipped_sum.shape[0], dt, seed, secure=True)
        np.multiply(xi, dt.type(noise_std), out=xi)
        np.add(clipped_sum, xi, out=out)
        np.divide(out, dt.type(denominator), out=out)
    if update is not None:
        sgd_update(update[0], out, update[1])
    return out


__all__ = [
    "ACCOUNTANTS",
    "SECURE_DRAWS",
    "accounting_available",
    "calibrate_noise_multiplier",
    "check_clip_norms",
    "check_seed",
    "dp_event",
    "dp_step",
    "epsilon",
    "poisson_batches",
    "secure_uniform",
    "standard_normal",
]
