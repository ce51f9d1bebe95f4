"""fastgrad.noise: Philox4x32-10 against its published answers, the compiled draw against the NumPy
definition bit for bit (any thread count, any length), the ziggurat's tables, the statistics of
the values, and privacy.dp_step's one pass against the expression it stands for.

The statistical checks use fixed seeds, so they are deterministic; each threshold is a bound that
a correct generator meets with room (about 5 standard errors) and a broken one (a wrong table, a
lost sign bit, reused words, an offset block) misses by far.
"""

from __future__ import annotations

import math

import numba
import numpy as np
import pytest
from numba import njit
from scipy import stats

from fastgrad import noise, privacy

# Random123's kat_vectors for philox4x32_10 (counter, key, output), checked against randomgen's
# Philox(number=4, width=32) on 2026-12-04.
KAT = [
    ((0, 0, 0, 0), (0, 0), (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)),
    ((0xFFFFFFFF,) * 4, (0xFFFFFFFF,) * 2, (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD)),
    (
        (0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344),
        (0xA4093822, 0x299F31D0),
        (0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1),
    ),
]
N_STATS = 1_000_000


@njit
def _compiled_philox(c, k):
    out = np.empty(4, np.uint64)
    out[0], out[1], out[2], out[3] = noise.philox_block(c[0], c[1], c[2], c[3], k[0], k[1])
    return out


@pytest.mark.parametrize("counter, key, want", KAT)
def test_philox_gives_random123s_known_answers(counter, key, want):
    assert tuple(int(w) for w in noise.philox4x32(np.array([counter]), key)[0]) == want
    got = _compiled_philox(np.array(counter, np.uint64), np.array(key, np.uint64))
    assert tuple(int(w) for w in got) == want


def test_philox_agrees_with_randomgen_on_random_counters_and_keys():
    randomgen = pytest.importorskip("randomgen")
    rng = np.random.default_rng(0)
    for _ in range(20):
        c = rng.integers(0, 2**32, 4, dtype=np.uint64)
        k = rng.integers(0, 2**32, 2, dtype=np.uint64)
        value = sum(int(w) << (32 * i) for i, w in enumerate(c))
        # randomgen counts up before it draws, so start it one below
        g = randomgen.Philox(
            number=4, width=32, counter=(value - 1) % 2**128, key=int(k[0]) | int(k[1]) << 32
        )
        want = [int(w) for w in g.random_raw(4)]
        assert [int(w) for w in noise.philox4x32(c[None], k)[0]] == want
        assert [int(w) for w in _compiled_philox(c, k)] == want


def test_ziggurat_tables_close_and_are_ordered():
    z = noise.ZIGGURAT
    assert abs(z.closure) < 1e-12  # the top layer ends at f(0) = 1: r and v agree
    assert z.x[-1] == noise.ZIGGURAT_R and np.all(np.diff(z.x[1:]) > 0)
    # every layer has area v: the base strip (x_0 f(r)) and the rectangles x_j (f_{j-1} - f_j)
    assert z.x[0] * z.f[-1] == pytest.approx(z.area, rel=1e-12)
    np.testing.assert_allclose(z.x[2:] * (z.f[1:-1] - z.f[2:]), z.area, rtol=1e-9)
    assert z.k32[1] == 0 and np.all(z.k32[2:] < 2**23) and np.all(z.k64[2:] < 2**52)
    assert z.area == pytest.approx(0.00492867323399, rel=1e-10)  # Marsaglia & Tsang's v for 256 layers


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("seed", [0, 12345, (7, 8, 9)])
def test_the_compiled_draw_has_the_bits_of_the_numpy_definition(dtype, seed):
    words = noise.seed_words(seed)
    for n in (0, 1, 3, 5, 2 * noise.BLOCK + 7):  # lengths off every multiple of a block and of 4
        got = noise.standard_normal(n, dtype, words)
        assert got.dtype == dtype and got.shape == (n,)
        np.testing.assert_array_equal(got, noise.standard_normal_reference(n, dtype, words))


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_the_bits_do_not_depend_on_the_thread_count_or_the_length(dtype):
    words = noise.seed_words(3)
    n = 5 * noise.BLOCK + 3
    before = numba.get_num_threads()
    try:
        numba.set_num_threads(1)
        one = noise.standard_normal(n, dtype, words)
        numba.set_num_threads(min(2, numba.config.NUMBA_NUM_THREADS))
        two = noise.standard_normal(n, dtype, words)
    finally:
        numba.set_num_threads(before)
    np.testing.assert_array_equal(one, two)
    np.testing.assert_array_equal(
        noise.standard_normal(1000, dtype, words), one[:1000]
    )  # value i is f(key, i)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_the_slow_values_have_the_reference_bits(dtype):
    # about 1.5 % of values take the wedge or tail path: pick them out and compare them alone
    words = noise.seed_words(21)
    got = noise.standard_normal(200_000, dtype, words)
    want = noise.standard_normal_reference(200_000, dtype, words)
    k0, k1, c3 = words
    per = 2 if dtype == np.float64 else 4
    blocks = np.arange(-(-got.size // per), dtype=np.uint64)
    ctr = np.stack([blocks, 0 * blocks, 0 * blocks, 0 * blocks + np.uint64(c3)], 1)
    w = noise.philox4x32(ctr, (k0, k1)).astype(np.uint64)
    if dtype == np.float64:
        bits = (w[:, 1::2] << np.uint64(32) | w[:, 0::2]).reshape(-1)
        slow = (bits >> np.uint64(9)) & np.uint64(2**52 - 1) >= noise.ZIGGURAT.k64[bits & np.uint64(255)]
    else:
        bits = w.reshape(-1)
        slow = bits >> np.uint64(9) >= noise.ZIGGURAT.k32[bits & np.uint64(255)]
    assert 0.005 < slow.mean() < 0.03
    np.testing.assert_array_equal(got[slow], want[slow])
    assert np.count_nonzero(np.abs(want) > noise.ZIGGURAT_R) > 20  # the tail sampler ran


def test_the_slow_values_are_listed_in_order_whatever_the_buffer_held_past_the_count():
    from numba import njit

    listed = njit(lambda flag, slow, count: noise._flagged(flag, slow, count))
    rng = np.random.default_rng(3)
    for count in [
        1,
        7,
        8,
        9,
        63,
        64,
        65,
        1000,
        noise.BLOCK - 1,
        noise.BLOCK,
        *rng.integers(1, noise.BLOCK, 40),
    ]:
        for rate in (0.015, 0.5, 1.0):
            flag = rng.integers(0, 256, noise.BLOCK).astype(np.uint8)  # what a reused buffer may hold
            flag[:count] = rng.random(count) < rate
            slow = np.full(noise.BLOCK, -1, np.int32)
            n = listed(flag, slow, int(count))
            np.testing.assert_array_equal(slow[:n], np.flatnonzero(flag[:count]), err_msg=f"{count} {rate}")


@pytest.fixture(scope="module", params=[np.float32, np.float64], ids=["float32", "float64"])
def million(request):
    return noise.standard_normal(N_STATS, request.param, noise.seed_words(2026)).astype(np.float64)


def test_moments_match_the_standard_normal(million):
    z, n = million, N_STATS
    se = 1 / math.sqrt(n)
    assert abs(z.mean()) < 5 * se
    assert abs(z.var() - 1) < 5 * math.sqrt(2) * se
    assert abs(stats.skew(z)) < 5 * math.sqrt(6) * se
    assert abs(stats.kurtosis(z)) < 5 * math.sqrt(24) * se


def test_kolmogorov_smirnov_against_the_normal_cdf(million):
    z = np.sort(million)
    cdf = 0.5 * (1 + np.frompyfunc(math.erf, 1, 1)(z / math.sqrt(2)).astype(np.float64))
    n = z.size
    d = max(np.max(np.arange(1, n + 1) / n - cdf), np.max(cdf - np.arange(n) / n))
    # Kolmogorov's limit: P(√n D > 1.95) ≈ 0.001; a one-in-256 layer error gives √n D ≈ 4
    assert math.sqrt(n) * d < 1.95


def test_tails_beyond_the_ziggurat_edge_have_the_normal_frequency(million):
    for t in (noise.ZIGGURAT_R, 4.5):
        p = math.erfc(t / math.sqrt(2))  # P(|Z| > t)
        expected, sd = N_STATS * p, math.sqrt(N_STATS * p * (1 - p))
        count = np.count_nonzero(np.abs(million) > t)
        assert abs(count - expected) < 5 * sd + 1, (t, count, expected)
    assert np.count_nonzero(million > 0) == pytest.approx(N_STATS / 2, abs=5 * math.sqrt(N_STATS) / 2)


def test_neighbours_blocks_and_seeds_are_uncorrelated(million):
    z, n = million, N_STATS
    bound = 5 / math.sqrt(n)
    for lag in (1, 2, 3, 4, 8, noise.BLOCK):  # within a Philox block, the next block, the next task
        assert abs(np.corrcoef(z[:-lag], z[lag:])[0, 1]) < bound, lag
    other = noise.standard_normal(n, np.float64, noise.seed_words(2027))
    assert abs(np.corrcoef(z, other)[0, 1]) < bound
    near = noise.standard_normal(
        n, np.float64, noise.seed_words(np.random.SeedSequence(2026, spawn_key=(1,)))
    )
    assert abs(np.corrcoef(z, near)[0, 1]) < bound
    assert abs(np.corrcoef(z**2, np.roll(z, 1) ** 2)[0, 1]) < bound * math.sqrt(2)


# ------------------------------------------------------------------ the step


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_dp_step_is_the_noised_mean_rounded_one_operation_at_a_time(dtype):
    rng = np.random.default_rng(1)
    P = 3 * noise.BLOCK + 5
    total = (rng.standard_normal(P) * 3).astype(dtype)
    norms = rng.uniform(0, 2, 9).astype(dtype)
    C, sigma, D = 0.7, 1.3, 9.5
    xi = privacy.standard_normal(P, dtype, 42)
    dt = np.dtype(dtype)
    want = (total + dt.type(sigma * C) * xi) / dt.type(D)
    np.testing.assert_array_equal(privacy.dp_step(total, norms, C, sigma, D, 42), want)
    out = total.copy()  # out may be the clipped sum itself
    privacy.dp_step(out, norms, C, sigma, D, 42, out=out)
    np.testing.assert_array_equal(out, want)
    np.testing.assert_array_equal(privacy.dp_step(total, norms, C, 0.0, D, 42), total / dt.type(D))
    secure = privacy.dp_step(total, norms, C, sigma, D, secure=True)
    assert secure.dtype == dtype and not np.array_equal(secure, want)


def test_dp_step_refuses_bad_arguments_by_name():
    total = np.zeros(10, np.float32)
    norms = np.ones(3, np.float32)
    with pytest.raises(ValueError, match="out"):
        privacy.dp_step(total, norms, 1.0, 1.0, 2.0, 0, out=np.zeros(10))
    with pytest.raises(TypeError, match="clipped_sum"):
        privacy.dp_step(total.astype(np.int64), norms, 1.0, 1.0, 2.0, 0)
    with pytest.raises(ValueError, match="denominator"):
        privacy.dp_step(total, norms, 1.0, 1.0, 0.0, 0)
    with pytest.raises(ValueError, match="seed"):
        privacy.dp_step(total, norms, 1.0, 1.0, 2.0, -1)


def test_dp_step_refuses_a_nan_or_inf_norm_before_drawing():
    total = np.zeros(10, np.float32)
    for bad in (np.nan, np.inf):
        with pytest.raises(FloatingPointError, match="sample 1"):
            privacy.dp_step(total, np.array([1.0, bad], np.float32), 1.0, 1.0, 2.0, 0)
