"""Inner products of per-sample gradients (fastgrad.attribution) against their naive definitions.

The definitions are read off the (B, P) matrix of per-sample gradients of the naive loop
(reference.run_naive): Gram = G Gᵀ, cross Gram = G G'ᵀ, dot = G v, TracIn = Σ_k η_k G_k G'_kᵀ.
A dot product's entries may cancel to zero, so the error of entry (i, j) is measured against
the size of its terms, ‖g_i‖ ‖g'_j‖ (‖g_i‖ ‖v‖ for the dot): the relative error of a dot product.
"""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from problems import make_problem, make_targets

import fastgrad
from fastgrad import attribution, cpu, reference
from fastgrad.cpu import config

BACKENDS = ("numpy", "numba")
TOL = {np.float64: 1e-12, np.float32: 1e-5}
SIZES = [3, 6, 5, 4]  # per-sample layer gradients of 24, 35 and 24 entries


@pytest.fixture(autouse=True)
def both_kinds_of_layer(monkeypatch):
    """Layers of SIZES with at most 30 entries are materialised: the first and last, not the middle one."""
    monkeypatch.setattr(attribution, "MATERIALISE_MAX", 30)


def per_sample(net, theta, X, y) -> np.ndarray:
    """The naive (B, P) matrix, in float64 for the products of the definitions."""
    return reference.per_sample_gradients(net, theta, X, y).astype(np.float64)


def assert_products_close(got, want, rows1, rows2, dtype, same_dtype=True):
    """|got − want| ≤ tol ‖g_i‖ ‖g'_j‖ entry by entry (rows: the two sides' per-sample vectors)."""
    scale = np.linalg.norm(rows1, axis=1)[:, None] * np.linalg.norm(rows2, axis=1)[None, :]
    assert got.shape == want.shape and (got.dtype == dtype or not same_dtype)
    err = np.abs(got.astype(np.float64) - want) / np.maximum(scale, np.finfo(np.float64).tiny)
    assert err.max() <= TOL[dtype], err.max()


def two_batches(activation, loss, dtype, B=7, B2=5, seed=0):
    net, theta, X, y = make_problem(SIZES, activation, loss, B=B, dtype=dtype, seed=seed)
    rng = np.random.default_rng(seed + 1)
    X2 = rng.standard_normal((B2, SIZES[0])).astype(dtype)
    return net, theta, X, y, X2, make_targets(net, B2, rng, dtype)


def test_the_problem_has_both_kinds_of_layer():
    net = fastgrad.MLP(SIZES)
    deltas = [np.zeros((1, 1, s.n_out)) for s in net.layers]
    assert attribution.materialised(net, deltas) == [True, False, True]


# ----------------------------------------------------------- against the definitions


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("loss", fastgrad.LOSSES)
@pytest.mark.parametrize("activation", fastgrad.ACTIVATIONS)
def test_gram_cross_gram_layers_and_dot_match_the_per_sample_matrix(backend, dtype, loss, activation):
    net, theta, X, y, X2, y2 = two_batches(activation, loss, dtype)
    G1, G2 = per_sample(net, theta, X, y), per_sample(net, theta, X2, y2)
    got = fastgrad.gram(net, theta, X, y, backend=backend)
    assert_products_close(got, G1 @ G1.T, G1, G1, dtype)
    assert np.array_equal(got, got.T)  # exactly symmetric
    assert_products_close(fastgrad.gram(net, theta, X, y, X2, y2, backend=backend), G1 @ G2.T, G1, G2, dtype)
    layers = fastgrad.gram(net, theta, X, y, X2, y2, per_layer=True, backend=backend)
    assert layers.shape == (net.num_layers, 7, 5)
    for l, s in enumerate(net.layers):
        part1, part2 = G1[:, s.w_start : s.end], G2[:, s.w_start : s.end]
        assert_products_close(layers[l], part1 @ part2.T, G1, G2, dtype)
    v = np.random.default_rng(3).standard_normal(net.num_params).astype(dtype)
    dot = fastgrad.grad_dot(net, theta, X, y, v, backend=backend)
    assert_products_close(dot[:, None], G1 @ v.astype(np.float64)[:, None], G1, v[None, :], dtype)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_tracin_is_the_weighted_sum_of_the_checkpoints_grams(backend, dtype):
    net, theta, X, y, X2, y2 = two_batches("tanh", "cross_entropy", dtype)
    thetas = [theta, 0.8 * theta, theta + dtype(0.1)]
    etas = [0.5, 0.25, -1.5]
    want = np.zeros((7, 5))
    scale = np.zeros((7, 5))
    for th, eta in zip(thetas, etas):
        G1, G2 = per_sample(net, th, X, y), per_sample(net, th, X2, y2)
        want += eta * G1 @ G2.T
        scale += abs(eta) * np.linalg.norm(G1, axis=1)[:, None] * np.linalg.norm(G2, axis=1)[None, :]
    got = fastgrad.tracin(net, list(zip(thetas, etas)), X, y, X2, y2, backend=backend)
    assert got.shape == (7, 5) and got.dtype == dtype
    assert (np.abs(got - want) / scale).max() <= TOL[dtype]
    self_inf = fastgrad.tracin(net, [(theta, 2.0)], X, y, backend=backend)
    norms = fastgrad.backprop(net, theta, X, y, compute=("norms",)).norms.astype(np.float64)
    np.testing.assert_allclose(np.diag(self_inf), 2 * norms**2, rtol=10 * TOL[dtype])


def output_deltas(net, theta, X, y):
    """∂ℓ_i/∂f(x_i) (B, K) from the naive reference's loss, at the network's outputs."""
    inp = fastgrad._validation.check_inputs(net, theta, X, y)
    Zs, _ = reference.forward(net, inp.theta, inp.X)
    return reference.loss_and_delta(net.loss, Zs[-1], inp.labels, inp.targets)[1].astype(np.float64)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("loss", fastgrad.LOSSES)
@pytest.mark.parametrize("activation", fastgrad.ACTIVATIONS)
def test_ntk_contracted_with_the_output_deltas_is_the_loss_gram(backend, dtype, loss, activation):
    # ∇ℓ_i = J_iᵀ g_i with g_i = ∂ℓ_i/∂f, so ∇ℓ_i·∇ℓ'_j = g_iᵀ Θ_ij g'_j: checks Θ against the naive matrix
    net, theta, X, y, X2, y2 = two_batches(activation, loss, dtype)
    G1, G2 = per_sample(net, theta, X, y), per_sample(net, theta, X2, y2)
    theta_k = fastgrad.ntk(net, theta, X, X2, backend=backend)
    assert theta_k.shape == (7, 5, net.n_out, net.n_out) and theta_k.dtype == dtype
    g1, g2 = output_deltas(net, theta, X, y), output_deltas(net, theta, X2, y2)
    got = np.einsum("ik,ijkl,jl->ij", g1, theta_k.astype(np.float64), g2)
    assert_products_close(got, G1 @ G2.T, G1, G2, dtype, same_dtype=False)
    trace = fastgrad.ntk(net, theta, X, X2, trace=True, backend=backend)
    np.testing.assert_allclose(trace, np.einsum("ijkk->ij", theta_k), rtol=10 * TOL[dtype], atol=0)
    own = fastgrad.ntk(net, theta, X, backend=backend)
    assert np.array_equal(own, own.transpose(1, 0, 3, 2))  # Θ_ij^{kk'} = Θ_ji^{k'k}, exactly


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("activation", ["tanh", "relu", "gelu", "sigmoid"])
def test_ntk_matches_torch_func_jacobians(activation, dtype):
    torch = pytest.importorskip("torch")
    from torch.func import functional_call, jacrev, vmap

    net, theta, X, _, X2, _ = two_batches(activation, "mse", dtype, B=6, B2=4, seed=5)
    module = fastgrad.to_torch(net, theta)
    params = {k: v.detach() for k, v in module.named_parameters()}

    def jacobian(x):  # (B, K, P) in θ's layout: Linear weight (row-major) then bias, layer by layer
        f = lambda p, xi: functional_call(module, p, (xi[None],))[0]  # noqa: E731
        jac = vmap(jacrev(f), (None, 0))(params, torch.from_numpy(x))
        return torch.cat([j.reshape(x.shape[0], net.n_out, -1) for j in jac.values()], dim=2)

    J1, J2 = jacobian(X).double(), jacobian(X2).double()
    want = torch.einsum("ikp,jlp->ijkl", J1, J2).numpy()
    got = fastgrad.ntk(net, theta, X, X2)
    scale = (
        np.linalg.norm(J1.numpy(), axis=2)[:, None, :, None]
        * np.linalg.norm(J2.numpy(), axis=2)[None, :, None, :]
    )
    assert (np.abs(got - want) / scale).max() <= TOL[dtype]


# ------------------------------------------------------------------ numba specifics


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_numba_factors_over_several_chunks_match_the_reference(dtype, monkeypatch):
    net, theta, X, y = make_problem([5, 40, 30, 3], "tanh", "mse", B=300, dtype=dtype, seed=2)
    inp = fastgrad._validation.check_inputs(net, theta, X, y)
    monkeypatch.setattr(config, "WORKSPACE_BYTES", 64 * 8 * (2 * 70 + 73 + 75))  # chunks of 64 rows
    assert cpu._chunking(net.sizes, inp.dtype, 300)[0] < 300
    deltas, inputs = cpu.layer_factors(net, inp)
    want_deltas, want_inputs = reference.layer_factors(net, inp)
    rtol = 1e-12 if dtype == np.float64 else 2e-5
    for got, want in zip(deltas + inputs, want_deltas + want_inputs):
        np.testing.assert_allclose(got, want, rtol=rtol, atol=rtol * np.abs(want).max())
    A, dphi = cpu.forward_factors(net, inp.theta, inp.X)
    want_A, want_dphi = reference.forward_factors(net, inp.theta, inp.X)
    for got, want in zip(A + dphi, want_A + want_dphi):
        np.testing.assert_allclose(got, want, rtol=rtol, atol=rtol * np.abs(want).max())


def test_numba_results_are_the_same_bits_across_runs_and_thread_counts():
    import numba

    net, theta, X, y = make_problem([6, 40, 20, 4], "tanh", "cross_entropy", B=600, dtype=np.float32, seed=4)
    v = np.random.default_rng(0).standard_normal(net.num_params).astype(np.float32)
    before = numba.get_num_threads()

    def results():
        return (
            fastgrad.gram(net, theta, X, y, backend="numba"),
            fastgrad.gram(net, theta, X, y, X[:300], y[:300], per_layer=True, backend="numba"),
            fastgrad.grad_dot(net, theta, X, y, v, backend="numba"),
            fastgrad.ntk(net, theta, X[:300], backend="numba"),
        )

    try:
        numba.set_num_threads(1)
        first = results()
        numba.set_num_threads(numba.config.NUMBA_NUM_THREADS)
        for _ in range(2):
            for a, b in zip(first, results()):
                assert np.array_equal(a, b)
    finally:
        numba.set_num_threads(before)


def test_numba_inner_products_add_no_compiled_specialisation():
    # docs/architecture.md: cpu.layer_factors and forward_factors call fused_backprop with backprop's types
    for loss in ("cross_entropy", "mse"):
        for dtype in (np.float32, np.float64):
            net, theta, X, y = make_problem([3, 4, 2], "tanh", loss, B=5, dtype=dtype)
            fastgrad.backprop(net, theta, X, y, compute=("grad",), backend="numba")
    before = set(cpu.fused_backprop.signatures)
    for loss in ("cross_entropy", "mse"):
        for dtype in (np.float32, np.float64):
            net, theta, X, y = make_problem([3, 4, 2], "tanh", loss, B=5, dtype=dtype)
            fastgrad.gram(net, theta, X, y, backend="numba")
            fastgrad.ntk(net, theta, X, backend="numba")
    assert set(cpu.fused_backprop.signatures) == before


# ------------------------------------------------------------------ memory


@pytest.mark.parametrize("backend", BACKENDS)
def test_gram_and_dot_never_allocate_a_per_sample_matrix(backend):
    import tracemalloc

    # B × P = 256 × 263k float32 would be 269 MB; the factors (B × 1.1k) and the output are ~1 MB
    net, theta, X, y = make_problem([512, 512, 10], "relu", "cross_entropy", B=256, dtype=np.float32, seed=1)
    v = np.ones(net.num_params, np.float32)
    fastgrad.gram(net, theta, X[:2], y[:2], backend=backend)  # imports, first-call caches
    tracemalloc.start()
    try:
        fastgrad.gram(net, theta, X, y, backend=backend)
        fastgrad.gram(net, theta, X, y, X[:100], y[:100], backend=backend)
        fastgrad.grad_dot(net, theta, X, y, v, backend=backend)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 16 * 2**20, peak  # far below B × P × 4 bytes = 269 MB, and below P × B / 16


# ------------------------------------------------------------------ properties


@settings(max_examples=40, deadline=None)
@given(
    sizes=st.lists(st.integers(1, 9), min_size=2, max_size=5),
    B=st.integers(1, 12),
    B2=st.integers(1, 12),
    activation=st.sampled_from(fastgrad.ACTIVATIONS),
    loss=st.sampled_from(fastgrad.LOSSES),
    seed=st.integers(0, 2**16),
)
def test_shapes_and_definitions_on_random_architectures(sizes, B, B2, activation, loss, seed):
    net, theta, X, y = make_problem(sizes, activation, loss, B=B, seed=seed)
    rng = np.random.default_rng(seed)
    X2, y2 = rng.standard_normal((B2, sizes[0])), make_targets(net, B2, rng)
    G1, G2 = per_sample(net, theta, X, y), per_sample(net, theta, X2, y2)
    L, K = net.num_layers, net.n_out
    assert_products_close(fastgrad.gram(net, theta, X, y, X2, y2), G1 @ G2.T, G1, G2, np.float64)
    assert fastgrad.gram(net, theta, X, y, per_layer=True).shape == (L, B, B)
    assert fastgrad.grad_dot(net, theta, X, y, np.zeros(net.num_params)).shape == (B,)
    assert fastgrad.tracin(net, [(theta, 1.0)], X, y, X2, y2).shape == (B, B2)
    assert fastgrad.ntk(net, theta, X, X2).shape == (B, B2, K, K)
    assert fastgrad.ntk(net, theta, X, trace=True).shape == (B, B)


def test_blocks_cover_the_output_when_it_has_several(monkeypatch):
    monkeypatch.setattr(attribution, "BLOCK_ROWS", 3)
    net, theta, X, y, X2, y2 = two_batches("tanh", "mse", np.float64, B=8, B2=7)
    G1, G2 = per_sample(net, theta, X, y), per_sample(net, theta, X2, y2)
    got = fastgrad.gram(net, theta, X, y)
    assert_products_close(got, G1 @ G1.T, G1, G1, np.float64)
    assert np.array_equal(got, got.T)
    assert_products_close(fastgrad.gram(net, theta, X, y, X2, y2), G1 @ G2.T, G1, G2, np.float64)
    v = np.arange(net.num_params, dtype=np.float64)
    np.testing.assert_allclose(fastgrad.grad_dot(net, theta, X, y, v), G1 @ v, rtol=1e-12)
    K = fastgrad.ntk(net, theta, X)
    assert np.array_equal(K, K.transpose(1, 0, 3, 2))


# ------------------------------------------------------------------ bad input


def _bad_calls():
    net, theta, X, y = make_problem([3, 4, 2], "tanh", "cross_entropy", B=4)
    P = net.num_params
    return [
        (
            lambda: fastgrad.grad_dot(net, theta, X, y, np.zeros(P + 1)),
            ValueError,
            r"v: expected shape \(26,\)",
        ),
        (
            lambda: fastgrad.grad_dot(net, theta, X, y, np.zeros(P, np.float32)),
            TypeError,
            "v: expected θ's dtype",
        ),
        (lambda: fastgrad.grad_dot(net, theta, X, y, [0.0] * P), TypeError, "v: expected a NumPy array"),
        (lambda: fastgrad.grad_dot(net, theta, X, y, np.full(P, np.nan)), ValueError, "v: contains NaN"),
        (lambda: fastgrad.gram(net, theta, X, y, X2=X), ValueError, "y2: X2 was given without it"),
        (lambda: fastgrad.gram(net, theta, X, y, y2=y), ValueError, "X2: y2 was given without it"),
        (lambda: fastgrad.gram(net, theta, X, y, np.zeros((4, 5)), y), ValueError, "X2, y2 .*X: expected 3"),
        (lambda: fastgrad.gram(net, theta, X, y, X, y[:3]), ValueError, "X2, y2 .*y: cross_entropy expects"),
        (lambda: fastgrad.ntk(net, theta, X, np.zeros((2, 4))), ValueError, "X2 .*X: expected 3 columns"),
        (lambda: fastgrad.gram(net, theta, X, y, backend="naive"), ValueError, "backend: 'naive' has no"),
        (lambda: fastgrad.gram(net, theta, X, y, backend="nope"), ValueError, "backend: unknown"),
        (lambda: fastgrad.tracin(net, [], X, y), ValueError, "checkpoints: empty"),
        (
            lambda: fastgrad.tracin(net, theta, X, y),
            TypeError,
            "checkpoints: expected a sequence .* got ndarray",
        ),
        (lambda: fastgrad.tracin(net, [theta], X, y), TypeError, r"checkpoints\[0\]: expected a pair"),
        (lambda: fastgrad.tracin(net, None, X, y), TypeError, "checkpoints: expected a sequence"),
        (
            lambda: fastgrad.tracin(net, [(theta, np.nan)], X, y),
            ValueError,
            r"checkpoints\[0\]: eta must be a finite real number",
        ),
        (
            lambda: fastgrad.tracin(net, [(theta, np.inf)], X, y),
            ValueError,
            "eta must be a finite real number, got inf",
        ),
        (
            lambda: fastgrad.tracin(net, [(theta, "1")], X, y),
            TypeError,
            "eta must be a finite real number, got str",
        ),
        (
            lambda: fastgrad.tracin(net, [(theta, True)], X, y),
            TypeError,
            "eta must be a finite real number, got bool",
        ),
        (
            lambda: fastgrad.tracin(net, [(theta, 1), (theta[:5], 1)], X, y),
            ValueError,
            r"checkpoints\[1\]: theta",
        ),
        (
            lambda: fastgrad.tracin(net, [(theta, 1), (theta.astype(np.float32), 1)], X, y),
            TypeError,
            r"checkpoints\[1\]: theta has dtype float32",
        ),
    ]


@pytest.mark.parametrize("case", range(len(_bad_calls())))
def test_bad_input_is_a_clear_error_naming_the_argument(case):
    call, error, message = _bad_calls()[case]
    with pytest.raises(error, match=message):
        call()


def test_auto_backend_is_the_one_resolve_backend_picks():
    net, theta, X, y = make_problem([3, 4, 2], "tanh", "cross_entropy", B=6)
    picked = fastgrad.resolve_backend("auto")
    assert np.array_equal(
        fastgrad.gram(net, theta, X, y, backend="auto"), fastgrad.gram(net, theta, X, y, backend=picked)
    )
