"""DP-SGD's Gaussian noise from a counter-based generator: Philox4x32-10 and a 256-layer ziggurat.

Value i of a draw is a pure function of (key, i), so the noise can be drawn in parallel over
fixed blocks, on any number of threads, with the same bits, and fused with the step that uses it
(:func:`noised_mean`: no array of noise at all).

**Bits.** Philox4x32-10 (Salmon, Moraes, Dror & Shaw, "Parallel random numbers: as easy as 1, 2,
3", SC 2011; the Random123 library) maps a 128-bit counter (c0, c1, c2, c3) and a 64-bit key
(k0, k1) to four 32-bit words. The key and c3 come from the seed
(``SeedSequence(seed).generate_state(3, uint32)``); the *main stream* is c2 = 0 and (c0, c1) the
64-bit index of a block of four words:

- float32: value i takes word i mod 4 of block i // 4;
- float64: value i takes words 2h and 2h + 1 of block i // 2 (h = i mod 2), as lo | hi << 32.

**Gaussian.** A ziggurat (Marsaglia & Tsang, "The ziggurat method for generating random
variables", J. Stat. Softw. 2000) of 256 equal-area layers, with the layer index, the sign and
the abscissa taken from disjoint bits of one draw as Doornik ("An improved ziggurat method",
2005) and NumPy do: from bits b, layer j = b & 255, sign = bit 8, and u = b >> 9 (23 bits for
float32; the next 52 bits for float64), x = u · w_j. When u < k_j (x lies in the part of layer j
under the curve; about 99 % of draws) x is the value. Otherwise value i's *slow path* reads
further Philox blocks from its own counter space, (c0, c1) = i and c2 = 1, 2, 3, ... in turn,
and never the main stream, so no value depends on how the work was split:

- layer j ≥ 1 (a wedge): accept x when f_j + U (f_{j-1} − f_j) < exp(−x²/2), U from words 0–1;
  else the next candidate's bits are word 2 (float32) or words 2–3 (float64) of the same block;
- layer 0 beyond r (the tail): Marsaglia's exact tail, x = r + a with a = −log1p(−U₁)/r,
  accepted when −2 log1p(−U₂) > a², U₁ from words 0–1 and U₂ from words 2–3; else the next block.

U = ((w_a << 32) | w_b) >> 11 · 2⁻⁵³ ∈ [0, 1) from words a, b. The wedge and tail arithmetic is
float64 (a float32 candidate x is u · w_j rounded to float32, then widened); exp and log1p are the
C library's, as Python's ``math`` and Numba call them.

The tables (:data:`ZIGGURAT`) are computed at import in float64: r = 3.6541528853610088 (the
256-layer constant of Marsaglia & Tsang and NumPy), each layer's area v = r f(r) + √(π/2)
erfc(r/√2) (f(x) = exp(−x²/2)), and x_{i−1} = f⁻¹(v / x_i + f(x_i)) down from x_255 = r.

:func:`philox4x32` and :func:`standard_normal_reference` are the readable NumPy definition; the
compiled kernels (:func:`standard_normal`, :func:`noised_mean`) are tested against them bit for
bit. docs/dp.md gives the statistical basis.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import numpy as np
from numba import njit, prange
from numba.cpython.unsafe.numbers import trailing_zeros
from numba.extending import register_jitable

from . import _cache, _threading
from .update import Update, no_update, update_block

# ----------------------------------------------------------- Philox4x32-10

PHILOX_M0 = np.uint64(0xD2511F53)
PHILOX_M1 = np.uint64(0xCD9E8D57)
PHILOX_W0 = np.uint64(0x9E3779B9)  # the key's Weyl increments (golden ratio, √3 − 1)
PHILOX_W1 = np.uint64(0xBB67AE85)
PHILOX_ROUNDS = 10
_MASK32 = np.uint64(0xFFFFFFFF)
_SHIFT32 = np.uint64(32)


def philox4x32(counters: np.ndarray, key) -> np.ndarray:
    """Philox4x32-10, the NumPy definition: counters (n, 4) of uint32 → (n, 4) of uint32 words.

    ``key``: two 32-bit integers (k0, k1). One round maps (c0, c1, c2, c3) to
    (hi(M1·c2) ^ c1 ^ k0, lo(M1·c2), hi(M0·c0) ^ c3 ^ k1, lo(M0·c0)); the key then grows by
    (W0, W1), modulo 2³².
    """
    c = np.asarray(counters, dtype=np.uint32).astype(np.uint64)
    c0, c1, c2, c3 = c[:, 0], c[:, 1], c[:, 2], c[:, 3]
    k0, k1 = int(key[0]) & 0xFFFFFFFF, int(key[1]) & 0xFFFFFFFF
    for _ in range(PHILOX_ROUNDS):
        p0 = c0 * PHILOX_M0  # exact: both factors are below 2³²
        p1 = c2 * PHILOX_M1
        c0, c1, c2, c3 = (
            (p1 >> _SHIFT32) ^ c1 ^ np.uint64(k0),
            p1 & _MASK32,
            (p0 >> _SHIFT32) ^ c3 ^ np.uint64(k1),
            p0 & _MASK32,
        )
        k0 = (k0 + int(PHILOX_W0)) & 0xFFFFFFFF
        k1 = (k1 + int(PHILOX_W1)) & 0xFFFFFFFF
    return np.stack([c0, c1, c2, c3], axis=1).astype(np.uint32)


@register_jitable(inline="always")
def _philox_round(c0, c1, c2, c3, k0, k1):
    p0 = c0 * PHILOX_M0  # exact: both factors are below 2³²
    p1 = c2 * PHILOX_M1
    return (p1 >> _SHIFT32) ^ c1 ^ k0, p1 & _MASK32, (p0 >> _SHIFT32) ^ c3 ^ k1, p0 & _MASK32


@register_jitable(inline="always")
def philox_block(c0, c1, c2, c3, k0, k1):
    """Philox4x32-10 on one counter, for Numba's CPU and CUDA targets: every argument and result a
    uint64 holding a 32-bit word (the same rounds as :func:`philox4x32`).

    Inlined into the caller's IR, the rounds written out and every input masked to 32 bits: then
    LLVM knows the products' factors are below 2³² and vectorises a loop of blocks (AVX2
    ``vpmuludq``, four blocks at once; 4.6× faster than a call per block, docs/benchmarks.md)."""
    c0, c1, c2, c3 = c0 & _MASK32, c1 & _MASK32, c2 & _MASK32, c3 & _MASK32
    a0, a1 = k0 & _MASK32, k1 & _MASK32
    b0, b1 = (a0 + PHILOX_W0) & _MASK32, (a1 + PHILOX_W1) & _MASK32
    d0, d1 = (b0 + PHILOX_W0) & _MASK32, (b1 + PHILOX_W1) & _MASK32
    e0, e1 = (d0 + PHILOX_W0) & _MASK32, (d1 + PHILOX_W1) & _MASK32
    f0, f1 = (e0 + PHILOX_W0) & _MASK32, (e1 + PHILOX_W1) & _MASK32
    g0, g1 = (f0 + PHILOX_W0) & _MASK32, (f1 + PHILOX_W1) & _MASK32
    h0, h1 = (g0 + PHILOX_W0) & _MASK32, (g1 + PHILOX_W1) & _MASK32
    i0, i1 = (h0 + PHILOX_W0) & _MASK32, (h1 + PHILOX_W1) & _MASK32
    j0, j1 = (i0 + PHILOX_W0) & _MASK32, (i1 + PHILOX_W1) & _MASK32
    l0, l1 = (j0 + PHILOX_W0) & _MASK32, (j1 + PHILOX_W1) & _MASK32
    c0, c1, c2, c3 = _philox_round(c0, c1, c2, c3, a0, a1)
    c0, c1, c2, c3 = _philox_round(c0, c1, c2, c3, b0, b1)
    c0, c1, c2, c3 = _philox_round(c0, c1, c2, c3, d0, d1)
    c0, c1, c2, c3 = _philox_round(c0, c1, c2, c3, e0, e1)
    c0, c1, c2, c3 = _philox_round(c0, c1, c2, c3, f0, f1)
    c0, c1, c2, c3 = _philox_round(c0, c1, c2, c3, g0, g1)
    c0, c1, c2, c3 = _philox_round(c0, c1, c2, c3, h0, h1)
    c0, c1, c2, c3 = _philox_round(c0, c1, c2, c3, i0, i1)
    c0, c1, c2, c3 = _philox_round(c0, c1, c2, c3, j0, j1)
    return _philox_round(c0, c1, c2, c3, l0, l1)  # PHILOX_ROUNDS = 10


# ---------------------------------------------------------------- ziggurat

ZIGGURAT_LAYERS = 256
ZIGGURAT_R = 3.6541528853610088
"""The right edge of the widest layer (Marsaglia & Tsang's 256-layer r; NumPy's ``ziggurat_nor_r``)."""


class Ziggurat(NamedTuple):
    """The tables of a 256-layer ziggurat for f(x) = exp(−x²/2) (index j = layer).

    ``x`` (256,) float64: layer j's right edge (x_0: the base strip's width v / f(r)); ``f``: f(x_j)
    (f_0 = 1, the top of layer 1); ``k32``/``k64``: the acceptance bounds ⌊(x_{j−1}/x_j) m⌋ for
    u of m = 2²³ or 2⁵² values (k_0 = ⌊(r/x_0) m⌋, k_1 = 0: the top layer has no inner part);
    ``w32`` (float32) and ``w64``: x_j / m.
    """

    x: np.ndarray
    f: np.ndarray
    k32: np.ndarray
    w32: np.ndarray
    k64: np.ndarray
    w64: np.ndarray
    area: float
    closure: float  # v / x_1 + f(x_1) − 1: how far the top layer is from closing (0 exactly)


def ziggurat_tables(r: float = ZIGGURAT_R, layers: int = ZIGGURAT_LAYERS) -> Ziggurat:
    """Marsaglia & Tsang's tables for ``layers`` layers with right edge ``r``, in float64."""

    def f(t: float) -> float:
        return math.exp(-0.5 * t * t)

    v = r * f(r) + math.sqrt(math.pi / 2) * math.erfc(r / math.sqrt(2))
    x = np.empty(layers)
    x[layers - 1] = r
    for i in range(layers - 1, 1, -1):
        x[i - 1] = math.sqrt(-2.0 * math.log(v / x[i] + f(x[i])))
    x[0] = v / f(r)
    fx = np.array([1.0] + [f(t) for t in x[1:]])
    ratio = np.empty(layers)
    ratio[0] = r / x[0]
    ratio[1] = 0.0
    ratio[2:] = x[1:-1] / x[2:]
    m32, m64 = 2.0**23, 2.0**52
    return Ziggurat(
        x=x,
        f=fx,
        k32=np.floor(ratio * m32).astype(np.uint32),
        w32=(x / m32).astype(np.float32),
        k64=np.floor(ratio * m64).astype(np.uint64),
        w64=x / m64,
        area=v,
        closure=v / x[1] + f(x[1]) - 1.0,
    )


ZIGGURAT = ziggurat_tables()
_X = ZIGGURAT.x
_F = ZIGGURAT.f
_K32, _W32 = ZIGGURAT.k32, ZIGGURAT.w32
_K64, _W64 = ZIGGURAT.k64, ZIGGURAT.w64
_R = ZIGGURAT_R
_INV_R = 1.0 / ZIGGURAT_R
_U53 = 2.0**-53
_MANTISSA52 = np.uint64((1 << 52) - 1)
_BYTE = np.uint64(0xFF)
# the fast path's tables indexed by a draw's low 9 bits (bit 8 the sign, bits 0-7 the layer): ±w_j
# and k_j, so the sign costs no load, multiply or branch (an exact negation, the same bits)
_WS32 = np.concatenate([_W32, -_W32])
_KS32 = np.concatenate([_K32, _K32])
_WS64 = np.concatenate([_W64, -_W64])
_KS64 = np.concatenate([_K64, _K64])
_LOW9 = np.uint64(0x1FF)
_LOW9_32 = np.uint32(0x1FF)
_SHIFT9_32 = np.uint32(9)
_ZERO = np.uint64(0)
_ONE = np.uint64(1)
_SHIFT8 = np.uint64(8)
_SHIFT9 = np.uint64(9)
_SHIFT11 = np.uint64(11)
_SHIFT56 = np.uint64(56)
_BYTE_GATHER = np.uint64(0x0102040810204080)


@register_jitable
def _uniform(hi, lo):
    # two 32-bit words (uint64) -> a float64 uniform on [0, 1), 53 bits
    return float(((hi << _SHIFT32) | lo) >> _SHIFT11) * _U53


@register_jitable
def _slow_value(i, bits, wide, w0, w1, w2, w3, k0, k1, c3):
    """Value i's ziggurat past the fast test (|value|, float64), from its main-stream ``bits`` and
    the words w0..w3 of its first own Philox block ((c0, c1) = i, c2 = 1: the caller draws them,
    so that a loop over slow values vectorises); later blocks c2 = 2, 3, ... are drawn here.
    ``wide``: float64 (else float32)."""
    j = bits & _BYTE
    u = (bits >> _SHIFT9) & _MANTISSA52
    n = _ONE
    while True:
        if n > _ONE:
            w0, w1, w2, w3 = philox_block(i, i >> _SHIFT32, n, c3, k0, k1)
        n += _ONE
        if j == _ZERO:  # the tail beyond r: Marsaglia's exact sampler, looping in place
            a = -math.log1p(-_uniform(w0, w1)) * _INV_R
            b = -math.log1p(-_uniform(w2, w3))
            if b + b > a * a:
                return _R + a
            continue
        if wide:
            x = float(np.int64(u)) * _W64[j]
        else:
            x = float(np.float32(np.int32(u)) * _W32[j])
        if _F[j] + _uniform(w0, w1) * (_F[j - _ONE] - _F[j]) < math.exp(-0.5 * x * x):
            return x
        bits = (w3 << _SHIFT32) | w2 if wide else w2  # the next candidate
        j = bits & _BYTE
        if wide:
            u = (bits >> _SHIFT9) & _MANTISSA52
            if u < _K64[j]:
                return float(np.int64(u)) * _W64[j]
        else:
            u = bits >> _SHIFT9
            if u < _K32[j]:
                return float(np.float32(np.int32(u)) * _W32[j])


@register_jitable
def _finish_slow(xi, bits, slow, n_slow, start, wide, k0, k1, c3):
    # xi (≥ count,): a task's values from ``start`` on; redo those at t = slow[:n_slow] (in xi's dtype)
    first = np.empty((4, n_slow), np.uint64)
    for s in range(n_slow):  # their first own blocks, branch-free (vectorised)
        i = np.uint64(start + slow[s])
        first[0, s], first[1, s], first[2, s], first[3, s] = philox_block(i, i >> _SHIFT32, _ONE, c3, k0, k1)
    for s in range(n_slow):
        t = slow[s]
        b = np.uint64(bits[t])
        w0, w1, w2, w3 = first[0, s], first[1, s], first[2, s], first[3, s]
        x = _slow_value(np.uint64(start + t), b, wide, w0, w1, w2, w3, k0, k1, c3)
        xi[t] = -x if (b >> _SHIFT8) & _ONE else x


@register_jitable
def _noised_into(out, total, std, denominator, xi, start, count):
    # out[start : start + count] <- (total[...] + std·xi[:count]) / denominator, in out's dtype
    # (xi is a task's own buffer, so ``out`` may be ``total``); over views from 0, so that it vectorizes
    dst, src = out[start : start + count], total[start : start + count]
    for t in range(count):
        dst[t] = (src[t] + std * xi[t]) / denominator


# --------------------------------------------------------- NumPy reference


def seed_words(seed) -> tuple[int, int, int]:
    """(k0, k1, c3) of a draw, from a seed as :func:`fastgrad.privacy.check_seed` accepts it:
    ``SeedSequence(seed).generate_state(3, uint32)``. A ``SeedSequence`` is used as it is (it
    does not advance); a ``Generator`` gives the entropy of a new SeedSequence from 4 of its
    64-bit draws (its state advances); ``None``: fresh entropy from the OS."""
    if isinstance(seed, np.random.Generator):
        seed = np.random.SeedSequence(seed.integers(0, 2**63, size=4, dtype=np.uint64).tolist())
    elif not isinstance(seed, np.random.SeedSequence):
        seed = np.random.SeedSequence(seed)
    k0, k1, c3 = (int(w) for w in seed.generate_state(3, np.uint32))
    return k0, k1, c3


def standard_normal_reference(n: int, dtype, words: tuple[int, int, int]) -> np.ndarray:
    """n standard normals (n,) of float32 or float64 for seed words (k0, k1, c3): the NumPy
    definition of the generator (vectorised fast path, then the slow values round by round)."""
    dt = np.dtype(dtype)
    wide = dt == np.float64
    k0, k1, c3 = words
    per_block = 2 if wide else 4
    blocks = -(-n // per_block)
    idx = np.arange(blocks, dtype=np.uint64)
    ctr = np.stack(
        [idx & _MASK32, idx >> _SHIFT32, np.zeros(blocks, np.uint64), np.full(blocks, c3, np.uint64)], 1
    )
    w = philox4x32(ctr, (k0, k1)).astype(np.uint64)
    if wide:
        bits = (w[:, 1::2] << _SHIFT32 | w[:, 0::2]).reshape(-1)[:n]
        u = (bits >> _SHIFT9) & _MANTISSA52
        x = u.astype(np.float64) * _W64[bits & _BYTE]
        fast = u < _K64[bits & _BYTE]
    else:
        bits = w.reshape(-1)[:n]
        u = bits >> _SHIFT9
        x = u.astype(np.float32) * _W32[bits & _BYTE]
        fast = u < _K32[bits & _BYTE]
    x = x.astype(dt)
    for i in np.flatnonzero(~fast):  # about 1 %: the scalar slow path, math's exp and log1p
        x[i] = _slow_value_reference(int(i), int(bits[i]), wide, k0, k1, c3)
    negative = (bits >> _SHIFT8) & _ONE == 1
    x[negative] = -x[negative]
    return x


def _slow_value_reference(i: int, bits: int, wide: bool, k0: int, k1: int, c3: int) -> float:
    """:func:`_slow_value` in plain Python (the definition the compiled one is tested against)."""
    z = ZIGGURAT
    j, u = bits & 0xFF, (bits >> 9) & ((1 << 52) - 1)
    n = 1
    while True:
        w0, w1, w2, w3 = (int(t) for t in philox4x32([[i & 0xFFFFFFFF, i >> 32, n, c3]], (k0, k1))[0])
        n += 1
        u1 = (((w0 << 32) | w1) >> 11) * 2.0**-53
        if j == 0:
            a = -math.log1p(-u1) / ZIGGURAT_R
            b = -math.log1p(-((((w2 << 32) | w3) >> 11) * 2.0**-53))
            if b + b > a * a:
                return ZIGGURAT_R + a
            continue
        x = u * z.w64[j] if wide else float(np.float32(u) * z.w32[j])
        if z.f[j] + u1 * (z.f[j - 1] - z.f[j]) < math.exp(-0.5 * x * x):
            return x
        bits = (w3 << 32) | w2 if wide else w2
        j = bits & 0xFF
        u = (bits >> 9) & ((1 << 52) - 1)
        if u < (z.k64[j] if wide else z.k32[j]):
            return u * z.w64[j] if wide else float(np.float32(u) * z.w32[j])


# --------------------------------------------------------- compiled kernels

CACHE = _cache.configure()

BLOCK = 4096
"""Values per parallel task (a multiple of 8: the fast test's flags are read eight at a time): a task's
raw words fit in L1 (32 KiB), and P = 101,770 (the [784, 128, 10] network) makes 25 tasks for 2
threads. Any multiple of 8 gives the same bits."""


@register_jitable
def _raw_bits(bits, first, count, wide, k0, k1, c3):
    # bits (≥ count,) <- the main-stream bits of values first·(2 or 4) ... + count, branch-free: uint64
    # (wide), or one uint32 word a value
    # (LLVM vectorises these loops: four Philox blocks per AVX2 register)
    if wide:
        for q in range((count + 1) // 2):
            c = first + np.uint64(q)
            w0, w1, w2, w3 = philox_block(c, c >> _SHIFT32, _ZERO, c3, k0, k1)
            bits[2 * q] = (w1 << _SHIFT32) | w0
            bits[2 * q + 1] = (w3 << _SHIFT32) | w2
    else:
        for q in range((count + 3) // 4):
            c = first + np.uint64(q)
            w0, w1, w2, w3 = philox_block(c, c >> _SHIFT32, _ZERO, c3, k0, k1)
            bits[4 * q] = w0
            bits[4 * q + 1] = w1
            bits[4 * q + 2] = w2
            bits[4 * q + 3] = w3


@register_jitable
def _fast_path(bits, xi, flag, count, wide):
    # xi[:count] <- the fast path's value of every draw in bits (sign included); flag[:count] <- 1 where
    # the draw fails the fast test (redone after), else 0. No store depends on an earlier iteration,
    # so LLVM vectorises the loop (the tables' loads as gathers where the target has them)
    if wide:
        for t in range(count):
            b = bits[t]
            k = b & _LOW9
            u = (b >> _SHIFT9) & _MANTISSA52
            xi[t] = float(np.int64(u)) * _WS64[k]
            flag[t] = u >= _KS64[k]
    else:  # bits: one 32-bit word a value
        for t in range(count):
            b = bits[t]
            k = b & _LOW9_32
            u = b >> _SHIFT9_32
            xi[t] = np.float32(np.int32(u)) * _WS32[k]
            flag[t] = u >= _KS32[k]


@register_jitable
def _flagged(flag, slow, count):
    # slow[:n] <- the positions t < count with flag[t] set, in order; -> n. flag (BLOCK,) uint8, 0 or 1 below
    # count, is read as masks of 64 flags (_byte_bits on each 8-flag word) whose set bits are listed lowest
    # first (trailing_zeros): about 1.5 % of draws are flagged, so a mask holds about one. (Testing each
    # 8-flag word for 0 and each flag of a word that was not took 1.8x as long: mispredicted branches.)
    n_words = (count + 7) // 8
    for t in range(count, 8 * n_words):  # the last word's bytes past count: 0, not what the buffer held
        flag[t] = 0
    words = flag.view(np.uint64)
    n = 0
    for g in range((n_words + 7) // 8):
        mask = _ZERO
        for q in range(min(8, n_words - 8 * g)):
            mask |= _byte_bits(words[8 * g + q]) << np.uint64(8 * q)
        while mask != _ZERO:
            slow[n] = 64 * g + trailing_zeros(mask)
            n += 1
            mask &= mask - _ONE
    return n


@register_jitable(inline="always")
def _byte_bits(w):
    # eight bytes of 0 or 1 (byte i: bits 8i .. 8i + 7) -> an 8-bit mask, bit i = byte i: the product with
    # Σ_k 2^(8k + 7 − k) puts byte i's bit at 56 + i (from k = 7 − i) and every other product term at its own
    # lower bit or past bit 63, so nothing carries into the top byte
    return (w * _BYTE_GATHER) >> _SHIFT56


@register_jitable
def _task_values(bits, xi, flag, slow, start, count, wide, k0, k1, c3):
    # xi[:count] <- the task's values start ... start + count - 1 (ξ, in xi's dtype)
    per_block = 2 if wide else 4
    _raw_bits(bits, np.uint64(start // per_block), count, wide, k0, k1, c3)
    _fast_path(bits, xi, flag, count, wide)
    _finish_slow(xi, bits, slow, _flagged(flag, slow, count), start, wide, k0, k1, c3)


@register_jitable
def _block_values(xi, start, count, wide, k0, k1, c3):
    # xi[:count] <- values start ... start + count − 1 (count ≤ BLOCK, start a multiple of 4), in xi's dtype
    bits = np.empty(BLOCK, np.uint64)
    flag = np.empty(BLOCK, np.uint8)
    slow = np.empty(BLOCK, np.int32)
    if wide:  # two words a value
        _task_values(bits, xi, flag, slow, start, count, True, k0, k1, c3)
    else:  # one word a value, in the first half of the same buffer
        _task_values(bits.view(np.uint32), xi, flag, slow, start, count, False, k0, k1, c3)


@register_jitable
def noised_block(out, total, std, denominator, k0, k1, c3, wide, start, count):
    """out[start : start + count] <- (total[...] + std·ξ[...]) / denominator, each operation in out's dtype,
    ξ the values start ... start + count − 1 of seed words (k0, k1, c3) (count ≤ :data:`BLOCK`, start a
    multiple of 4; wide: float64). The one compiled form of DP-SGD's noised step: :func:`noised_mean`'s
    tasks and the numba backend's kernels (:func:`fastgrad.cpu.kernels.noise_block`) call it."""
    xi = np.empty(BLOCK, out.dtype)  # the noise, never stored: ``out`` may be ``total``
    _block_values(xi, start, count, wide, k0, k1, c3)
    _noised_into(out, total, std, denominator, xi, start, count)


@njit(parallel=True, nogil=True, cache=CACHE)
def _draw(out, total, std, denominator, k0, k1, c3, fused, wide, theta, update_t):
    # out (n,) <- ξ, or (total + std·ξ) / denominator with total (n,), each operation in out's dtype;
    # wide: out is float64 (two words a value), else float32 (one); theta (n,) and update_t (an update.Update
    # as a plain tuple, an empty buf for none): with fused, each task's block of θ then updated from out's
    update = Update(*update_t)
    updating = fused and update.buf.shape[0] > 0
    n = out.shape[0]
    for task in prange((n + BLOCK - 1) // BLOCK):
        start = task * BLOCK
        count = min(BLOCK, n - start)
        if fused:
            noised_block(out, total, std, denominator, k0, k1, c3, wide, start, count)
            if updating:
                update_block(update, out, theta, start, start + count)
        else:  # straight into out
            _block_values(out[start : start + count], start, count, wide, k0, k1, c3)


def _words(words) -> tuple[np.uint64, np.uint64, np.uint64]:
    return tuple(np.uint64(w) for w in words)


def standard_normal(n: int, dtype, words: tuple[int, int, int], out: np.ndarray | None = None) -> np.ndarray:
    """n standard normals (n,) in ``dtype`` (float32 or float64) for seed words (k0, k1, c3)
    (:func:`seed_words`), compiled and parallel; the bits of :func:`standard_normal_reference` on
    any number of threads. ``out`` (n,) of ``dtype``, C-contiguous, receives them when given."""
    dt = np.dtype(dtype)
    if out is None:
        out = np.empty(n, dt)
    _threading.check_fork_safe()
    _draw(
        out, out[:0], dt.type(0), dt.type(1), *_words(words), False, dt == np.float64, out[:0], no_update(dt)
    )
    return out


def noised_mean(
    total: np.ndarray,
    noise_std: float,
    denominator: float,
    words: tuple[int, int, int],
    out: np.ndarray,
    update: tuple | None = None,
) -> np.ndarray:
    """(total + σC·ξ) / D into ``out`` (P,) in one compiled pass, ξ of seed words (k0, k1, c3) in
    total's dtype, never stored: the bits of ``(total + dt(σC) * ξ) / dt(D)`` with
    ξ = :func:`standard_normal`, each operation rounded to the dtype. ``out`` may be ``total``.

    ``update`` = (θ, pack): θ (P,) of total's dtype, updated in place in the same pass, each block right
    after its values of ``out`` are made, as the :class:`fastgrad.update.Update` pack (a plain tuple)
    says: the bits of :func:`fastgrad.update.sgd_update` run after the pass (``out`` first multiplied by
    the pack's scale, as that does)."""
    dt = total.dtype
    _threading.check_fork_safe()
    theta, pack = (out[:0], no_update(dt)) if update is None else update
    _draw(
        out,
        total,
        dt.type(noise_std),
        dt.type(denominator),
        *_words(words),
        True,
        dt == np.float64,
        theta,
        pack,
    )
    return out
