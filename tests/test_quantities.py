"""The registry of quantities and the per-row math both compiled targets share.

The shared functions run in three places: compiled by Numba for the CPU, compiled by
numba-cuda (tests/test_cuda.py compiles every kernel to PTX), and element-wise on NumPy
arrays in the batched reference. Here: their values at the edges, that the compiled and
the NumPy forms agree bit for bit, that float32 stays float32, and that everything which
lists quantities reads the registry.
"""

import dataclasses
import re
from pathlib import Path

import numba
import numpy as np
import pytest

import fastgrad
from fastgrad import quantities, reference
from fastgrad.quantities import REGISTRY, Derived, PerSample, Sum

DOCS = Path(__file__).resolve().parents[1] / "docs"


@numba.njit(cache=False)
def _compiled_row_math(norms, max_norm, dsq, asq, sq, g, out):
    # every input (n,) but max_norm (scalar); out (3, n): clip factor, layer term, variance
    for i in range(norms.shape[0]):
        out[0, i] = quantities.clip_factor(norms[i], max_norm)
        out[1, i] = quantities.layer_norm_sq(dsq[i], asq[i])
        out[2, i] = quantities.variance_from_moments(sq[i], g[i])


@numba.njit(cache=False)
def _compiled_types(x, c):
    return (
        quantities.clip_factor(x, c),
        quantities.layer_norm_sq(x, x),
        quantities.variance_from_moments(x, x),
    )


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_clip_factor_is_one_at_or_below_the_norm_and_c_over_norm_above(dtype):
    C = dtype(1.5)
    norms = np.array([0.0, 1e-30, 1.0, 1.5, np.nextafter(C, dtype(2)), 3.0, 1e30, np.inf], dtype)
    c = quantities.clip_factor(norms, C)
    assert c.dtype == dtype
    np.testing.assert_array_equal(c[:4], 1)  # a zero gradient and a gradient at C are left as they are
    above = norms[4:] > C
    assert above.all()
    np.testing.assert_array_equal(c[4:], C / norms[4:])  # exactly C / ‖g‖, so ‖c g‖ = C to rounding
    assert c[-1] == 0
    assert np.isnan(quantities.clip_factor(np.array([np.nan], dtype), C)[0])  # never silently unclipped


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_layer_norm_sq_is_the_frobenius_norm_of_the_layer_gradient(dtype):
    rng = np.random.default_rng(0)
    delta, a = rng.standard_normal(5).astype(dtype), rng.standard_normal(7).astype(dtype)
    dense = np.concatenate([np.outer(delta, a).ravel(), delta]).astype(np.float64)
    got = quantities.layer_norm_sq((delta * delta).sum(), (a * a).sum())
    assert got.dtype == dtype
    np.testing.assert_allclose(got, (dense**2).sum(), rtol=10 * np.finfo(dtype).eps)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_variance_from_moments_clamps_rounding_below_zero(dtype):
    g = np.array([3.0, 0.5, 1e-3], dtype)
    sq = np.array([9.0, 0.5, np.nextafter(dtype(1e-6), dtype(0))], dtype)  # the last one rounds below g²
    v = quantities.variance_from_moments(sq, g)
    assert v.dtype == dtype
    np.testing.assert_array_equal(v, np.maximum(sq - g * g, 0))
    assert (v >= 0).all() and v[1] == dtype(0.25)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_compiled_and_numpy_row_math_agree_bit_for_bit(dtype):
    rng = np.random.default_rng(1)
    n = 257
    norms = np.abs(rng.standard_normal(n)).astype(dtype)
    norms[:3] = 0
    C = dtype(0.8)
    dsq, asq = (np.abs(rng.standard_normal(n)) ** 2).astype(dtype), (rng.uniform(0, 50, n)).astype(dtype)
    g = rng.standard_normal(n).astype(dtype)
    sq = (g * g + rng.uniform(-1e-6, 1, n)).astype(dtype)
    out = np.empty((3, n), dtype)
    _compiled_row_math(norms, C, dsq, asq, sq, g, out)
    want = [
        quantities.clip_factor(norms, C),
        quantities.layer_norm_sq(dsq, asq),
        quantities.variance_from_moments(sq, g),
    ]
    for got, w in zip(out, want):
        assert w.dtype == dtype
        assert got.tobytes() == w.tobytes()


def test_float32_row_math_stays_float32_when_compiled():
    # a float literal would make these float64 (slow on the GPU, and not what was asked for)
    _compiled_types(np.float32(2.0), np.float32(1.0))
    assert _compiled_types.nopython_signatures[-1].return_type == numba.types.UniTuple(numba.float32, 3)


# ------------------------------------------------------------------ registry


def test_compute_accepts_exactly_the_public_entries_in_registry_order():
    assert fastgrad.QUANTITIES == tuple(n for n, q in REGISTRY.items() if q.public)
    assert [f.name for f in dataclasses.fields(fastgrad.BackpropResult)] == list(fastgrad.QUANTITIES)
    for name in fastgrad.QUANTITIES:
        assert REGISTRY[name].doc in fastgrad.BackpropResult.__doc__


def test_every_raw_quantity_has_its_naive_definition_and_every_sum_a_valid_reducer():
    raw = set(quantities.RAW) - {"loss"}
    assert raw <= set(reference.NAIVE)
    for q in quantities.SUMS:
        assert q.operand in range(len(quantities.OPERANDS))
        assert q.source in range(len(quantities.SOURCES))
        assert q.shape == "(P,)"
    for q in REGISTRY.values():
        if isinstance(q, Derived):
            assert set(q.needs) <= set(quantities.RAW), q.name
            assert q.name in reference.NAIVE  # the naive loop defines it independently
        else:
            assert isinstance(q, (Sum, PerSample))


def test_needed_adds_the_parts_of_derived_quantities_and_the_loss():
    assert quantities.needed(["grad"]) == {"loss", "grad"}
    assert quantities.needed(["variance"]) >= {"loss", "grad", "sq_mean"}
    assert quantities.needed(["noise_scale"]) >= {"loss", "grad", "norms"}
    assert "clipped_sum" in quantities.needed([], clipping=True)
    assert "clipped_sum" not in quantities.needed(fastgrad.QUANTITIES)


def test_the_docs_table_of_quantities_is_the_registry():
    text = (DOCS / "api.md").read_text()
    rows = re.findall(r"^\| `(\w+)` \| ([^|]+) \|", text, flags=re.M)
    table = {name: shape.strip() for name, shape in rows if name in REGISTRY or name in fastgrad.QUANTITIES}
    assert list(table) == list(fastgrad.QUANTITIES)
    for name, shape in table.items():
        assert shape == REGISTRY[name].shape, name


@pytest.mark.parametrize("backend", ["naive", "numpy", "numba"])
def test_derived_quantities_are_finished_by_the_registry_functions(backend):
    net = fastgrad.MLP([3, 5, 2], activation="tanh", loss="mse")
    rng = np.random.default_rng(2)
    theta = net.init(seed=2, dtype=np.float64)
    X, y = rng.standard_normal((9, 3)), rng.standard_normal((9, 2))
    r = fastgrad.backprop(net, theta, X, y, ("grad", "sq_mean", "norms", "variance", "noise_scale"), backend)
    np.testing.assert_allclose(r.variance, quantities.variance_from_moments(r.sq_mean, r.grad), atol=1e-15)
    assert r.noise_scale == pytest.approx(quantities.noise_scale(r.grad, r.norms), rel=1e-10)


@pytest.mark.parametrize("dtype,tol", [(np.float64, 1e-12), (np.float32, 2e-6)])
@pytest.mark.parametrize("backend", ["naive", "numpy", "numba"])
def test_grad_cosine_matches_the_naive_definition(backend, dtype, tol):
    # the naive loop's float64 value (its own definition, from the rows) on every host backend
    net = fastgrad.MLP([4, 7, 5, 3], activation="gelu", loss="cross_entropy")
    rng = np.random.default_rng(7)
    theta = net.init(seed=7, dtype=np.float64)
    X, y = rng.standard_normal((23, 4)), rng.integers(0, 3, 23)
    want = fastgrad.backprop(net, theta, X, y, ("grad_cosine", "per_sample", "grad"), backend="naive")
    G, g = want.per_sample, want.grad
    by_hand = G @ g / (np.linalg.norm(G, axis=1) * np.linalg.norm(g))
    np.testing.assert_allclose(want.grad_cosine, by_hand, rtol=0, atol=1e-14)
    assert np.ptp(by_hand) > 0.5  # samples that disagree: a swapped or constant result would fail
    got = fastgrad.backprop(net, theta.astype(dtype), X.astype(dtype), y, ("grad_cosine",), backend=backend)
    assert got.grad_cosine.dtype == dtype and got.grad_cosine.shape == (23,)
    assert got.per_sample is None  # read from the pass, not returned
    np.testing.assert_allclose(got.grad_cosine, want.grad_cosine, rtol=0, atol=tol)


@pytest.mark.parametrize("backend", ["naive", "numpy", "numba"])
def test_grad_cosine_of_one_sample_is_one_and_of_a_zero_gradient_is_zero(backend):
    net = fastgrad.MLP([3, 4, 2], activation="tanh", loss="mse")
    theta = net.init(seed=1, dtype=np.float64)
    X, y = np.ones((1, 3)), np.ones((1, 2))
    assert fastgrad.backprop(net, theta, X, y, ("grad_cosine",), backend).grad_cosine[0] == pytest.approx(
        1, abs=1e-15
    )
    zero = np.zeros_like(theta)  # every gradient 0 (outputs 0 = targets): no direction, cosine 0
    r = fastgrad.backprop(net, zero, np.ones((3, 3)), np.zeros((3, 2)), ("grad_cosine",), backend)
    np.testing.assert_array_equal(r.grad_cosine, np.zeros(3))


def test_cosine_is_clamped_and_zero_at_a_zero_norm():
    dot = np.array([2.0, -3.0, 0.0, 1.0])
    norm = np.array([1.0, 1.0, 0.0, 2.0], dtype=np.float32)
    np.testing.assert_array_equal(quantities.cosine(dot, norm, 2.0), np.array([1, -1, 0, 0.25], np.float32))
    assert quantities.cosine(dot, norm, 2.0).dtype == np.float32


def test_made_in_pass_gives_a_backend_the_sweeps_its_registry_entries_declare():
    from fastgrad import cpu

    ((q, make),) = quantities.made_in_pass("numba", frozenset({"loss", "grad", "sq_mean", "variance"}))
    assert q is REGISTRY["variance"] and make is cpu.variance_into
    assert quantities.made_in_pass("numba", frozenset({"grad", "noise_scale"})) == ()
    assert quantities.made_in_pass("numpy", frozenset({"variance"})) == ()
    for entry in REGISTRY.values():
        for backend, path in getattr(entry, "made_in_pass", ()):
            assert backend in fastgrad.api.BACKENDS and ":" in path, entry.name
    # the convention f(*needs, out), on the numba backend's sweep
    g, sq = np.array([1.0, 2.0, 0.5]), np.array([2.0, 4.0, 0.2])
    out = np.empty(3)
    make(*(dict(grad=g, sq_mean=sq)[n] for n in q.needs), out)
    np.testing.assert_array_equal(out, quantities.variance_from_moments(sq, g))
