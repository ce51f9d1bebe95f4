"""Hypothesis: random architectures, batches and activations; the references agree and stay consistent."""

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st
from problems import make_targets

import fastgrad
from fastgrad import quantities, reference
from fastgrad._validation import check_inputs


@st.composite
def problems(draw):
    depth = draw(st.integers(1, 5))
    sizes = draw(st.lists(st.integers(1, 32), min_size=depth + 1, max_size=depth + 1))
    activation = draw(st.sampled_from(fastgrad.ACTIVATIONS))
    loss = draw(st.sampled_from(fastgrad.LOSSES))
    B = draw(st.integers(1, 64))
    seed = draw(st.integers(0, 2**31))
    net = fastgrad.MLP(sizes, activation=activation, loss=loss)
    rng = np.random.default_rng(seed)
    theta = net.init(seed=seed, dtype=np.float64)
    theta += 0.05 * rng.standard_normal(theta.shape)
    X = rng.standard_normal((B, sizes[0]))
    return net, theta, X, make_targets(net, B, rng)


@settings(max_examples=60, deadline=None)
@given(problems(), st.floats(0.01, 10.0))
def test_naive_and_batched_agree_on_random_architectures(problem, max_norm):
    net, theta, X, y = problem
    inp = check_inputs(net, theta, X, y)
    need = frozenset(quantities.RAW) - {"clipped_sum"}  # clipped_sum comes with max_norm
    a = reference.run_naive(net, inp, need, max_norm)
    b = reference.run_batched(net, inp, need, max_norm)
    B, P = X.shape[0], net.num_params
    assert b["per_sample"].shape == (B, P) and b["grad"].shape == (P,) and b["sq_mean"].shape == (P,)
    assert b["norms"].shape == (B,) and b["layer_norms"].shape == (B, net.num_layers)
    for key in sorted(need | {"clipped_sum"}):
        ref = np.asarray(a[key])
        np.testing.assert_allclose(
            b[key], ref, rtol=1e-10, atol=1e-12 * max(1.0, np.abs(ref).max()), err_msg=key
        )
    # each clipped per-sample gradient has norm ≤ C, so their sum has norm ≤ B C
    assert np.linalg.norm(b["clipped_sum"]) <= B * max_norm * (1 + 1e-12)


@settings(max_examples=40, deadline=None)
@given(problems())
def test_public_results_have_the_contract_shapes_and_dtypes(problem):
    net, theta, X, y = problem
    theta32 = theta.astype(np.float32)
    r = fastgrad.backprop(net, theta32, X, y, fastgrad.QUANTITIES)
    dims = {"B": X.shape[0], "P": net.num_params, "L": net.num_layers}
    for name in fastgrad.QUANTITIES:  # the shapes the registry declares, in θ's dtype
        value, shape = getattr(r, name), quantities.REGISTRY[name].shape
        if shape == "scalar":
            assert isinstance(value, float), name
        else:
            want = tuple(dims[d.strip()] for d in shape.strip("()").split(",") if d.strip())
            assert value.shape == want and value.dtype == np.float32, name
    assert np.all(r.variance >= 0) and np.isfinite(r.loss)
    np.testing.assert_allclose(r.norms, np.linalg.norm(r.per_sample, axis=1), rtol=1e-5, atol=1e-30)
