"""Every CUDA kernel against the NumPy reference, on a GPU or under the CUDA simulator.

Under the simulator (about 1-3 ms per simulated thread) the problems are tiny and
the kernels use tiny blocks (see the tunables in ``fastgrad.cuda``); on a GPU the
same tests also run problems large enough for full 64x64 GEMM tiles, split-K and
fused tiles of several samples.
"""

from __future__ import annotations

import numpy as np
import pytest
from problems import make_problem, overflowing_problem

import fastgrad
from fastgrad import cuda as fc
from fastgrad import reference
from fastgrad._validation import check_inputs
from fastgrad.quantities import HOST, RAW, REGISTRY, finish, needed
from fastgrad.tools.validate import quick_combos

cuda = fc.cuda
SIM = fc.SIMULATOR
QUANTITIES = RAW  # every raw quantity of the registry (the clipped sum with MAX_NORM)
ALL = frozenset(name for name in RAW if REGISTRY[name].public)
RTOL = {np.float64: 1e-12, np.float32: 3e-5}
MAX_NORM = 0.5  # below most per-sample norms of these problems, so clipping changes the result

# (sizes, B): a narrow net for the fused path and one for the tiled path; bigger ones on a GPU
CASES = [([3, 5, 4], 6)]
if not SIM:
    CASES += [([20, 64, 33, 5], 5000), ([70, 130, 90, 7], 300)]


def rel_err(got, ref) -> float:
    """max |got - ref| / max |ref|: the error relative to the size of the quantity."""
    got = np.asarray(got, dtype=np.float64)
    ref = np.asarray(ref, dtype=np.float64)
    assert got.shape == ref.shape
    return float(np.abs(got - ref).max() / max(np.abs(ref).max(), 1e-300))


def reference_raw(net, theta, X, y, max_norm=MAX_NORM):
    """Every raw quantity in float64: the naive loop for small batches, the batched form otherwise."""
    inp = check_inputs(net, theta.astype(np.float64), X.astype(np.float64), y)
    run = reference.run_naive if X.shape[0] <= 64 else reference.run_batched
    return run(net, inp, ALL, max_norm)


def run_cuda(net, theta, X, y, path, need=ALL, max_norm=MAX_NORM):
    return fc.run(net, check_inputs(net, theta, X, y), need, max_norm, None, path=path)


def assert_matches(raw, ref, dtype, names=QUANTITIES):
    for name in names:
        err = rel_err(raw[name], ref[name])
        assert err < RTOL[dtype], f"{name}: relative error {err:.3g} ≥ {RTOL[dtype]:.1g}"


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("path", ["fused", "tiled"])
@pytest.mark.parametrize("sizes,B", CASES)
def test_every_quantity_matches_the_reference(sizes, B, path, dtype):
    if path == "fused" and max(sizes) > fc.FUSED_MAX_WIDTH:
        pytest.skip("wider than the fused path takes")
    net, theta, X, y = make_problem(sizes, "tanh", "cross_entropy", B=B, dtype=dtype, seed=1)
    raw = run_cuda(net, theta, X, y, path)
    for name in QUANTITIES:
        assert raw[name].dtype == dtype, name
    assert_matches(raw, reference_raw(net, theta, X, y), dtype)


@pytest.mark.parametrize("activation", fastgrad.ACTIVATIONS)
@pytest.mark.parametrize("loss", fastgrad.LOSSES)
def test_fused_path_every_activation_and_loss(activation, loss):
    net, theta, X, y = make_problem([3, 4, 3], activation, loss, B=5, dtype=np.float64, seed=2)
    raw = run_cuda(net, theta, X, y, "fused", need=frozenset({"loss", "grad", "norms"}))
    assert_matches(raw, reference_raw(net, theta, X, y), np.float64, ("loss", "grad", "norms", "clipped_sum"))


@pytest.mark.parametrize(
    "activation,loss",
    quick_combos(fastgrad.ACTIVATIONS, fastgrad.LOSSES),  # every activation and every loss at least once
)
def test_tiled_path_every_activation_and_loss(activation, loss):
    net, theta, X, y = make_problem([3, 4, 3], activation, loss, B=5, dtype=np.float64, seed=3)
    raw = run_cuda(net, theta, X, y, "tiled", need=frozenset({"loss", "grad", "norms"}))
    assert_matches(raw, reference_raw(net, theta, X, y), np.float64, ("loss", "grad", "norms", "clipped_sum"))


def test_split_k_weight_gradients_match(monkeypatch):
    # more target blocks than the output tiles give forces the batch into several K chunks
    monkeypatch.setattr(fc.config, "TARGET_BLOCKS", 64)
    B = 24 if SIM else 3000
    net, theta, X, y = make_problem([3, 5, 2], "gelu", "mse", B=B, dtype=np.float64, seed=4)
    raw = run_cuda(net, theta, X, y, "tiled", need=frozenset({"loss", "grad", "sq_mean"}))
    assert_matches(raw, reference_raw(net, theta, X, y), np.float64, ("grad", "sq_mean", "clipped_sum"))


@pytest.mark.parametrize("path", ["fused", "tiled"])
def test_same_inputs_give_the_same_bits(path):
    net, theta, X, y = make_problem([3, 5, 4], "sigmoid", "binary_cross_entropy", B=9, dtype=np.float32)
    first = run_cuda(net, theta, X, y, path)
    second = run_cuda(net, theta, X, y, path)
    for name in QUANTITIES:
        np.testing.assert_array_equal(first[name], second[name], err_msg=name)


def test_single_sample_and_one_output_with_flat_targets():
    net, theta, X, y = make_problem([2, 3, 1], "relu", "mse", B=1, dtype=np.float64, seed=5)
    res = fastgrad.backprop(net, theta, X, y[:, 0], compute=("grad", "norms"), backend="cuda")
    ref = reference_raw(net, theta, X, y)
    assert rel_err(res.grad, ref["grad"]) < 1e-12
    assert rel_err(res.norms, ref["norms"]) < 1e-12


def test_public_api_with_host_arrays_and_out():
    net, theta, X, y = make_problem([3, 4, 2], "softplus", "cross_entropy", B=5, dtype=np.float32, seed=6)
    out = np.full((5, net.num_params), np.nan, dtype=np.float32)
    res = fastgrad.backprop(
        net, theta, X, y, compute=("per_sample", "variance", "noise_scale"), backend="cuda", out=out
    )
    want = fastgrad.backprop(net, theta, X, y, compute=("per_sample", "variance", "noise_scale"))
    assert res.per_sample is out
    assert rel_err(out, want.per_sample) < 3e-5
    assert rel_err(res.variance, want.variance) < 1e-4
    assert abs(res.noise_scale - want.noise_scale) < 1e-3 * abs(want.noise_scale)
    got = fastgrad.clipped_grad(net, theta, X, y, 0.3, noise_multiplier=1.5, seed=7, backend="cuda")
    ref = fastgrad.clipped_grad(net, theta, X, y, 0.3, noise_multiplier=1.5, seed=7, backend="numpy")
    assert rel_err(got, ref) < 3e-5


# ------------------------------------------------------------ device arrays


def device_problem(dtype=np.float64, loss="cross_entropy"):
    net, theta, X, y = make_problem([3, 4, 2], "tanh", loss, B=5, dtype=dtype, seed=8)
    y = y.astype(np.int64) if loss == "cross_entropy" else y.astype(dtype)
    return net, theta, X, y, cuda.to_device(theta), cuda.to_device(X), cuda.to_device(y)


def backprop_on_device(net, theta_d, X_d, y_d, compute):
    """fastgrad.backprop on device arrays (the simulator's arrays lack the interface api.py checks)."""
    if SIM:  # as fastgrad.backprop does for device results: the registry finishes them with fc.ARRAYS
        raw = fc.backprop_device(net, theta_d, X_d, y_d, needed(compute))
        return finish(compute, raw, X_d.shape[0], fc.ARRAYS)
    res = fastgrad.backprop(net, theta_d, X_d, y_d, compute=compute, backend="cuda")
    return {name: getattr(res, name) for name in compute}


def test_device_arrays_stay_on_the_device_and_match():
    net, theta, X, y, theta_d, X_d, y_d = device_problem()
    compute = ("grad", "per_sample", "norms", "variance", "noise_scale", "grad_cosine")
    got = backprop_on_device(net, theta_d, X_d, y_d, compute)
    want = fastgrad.backprop(net, theta, X, y, compute=compute, backend="naive")
    for name in ("grad", "per_sample", "norms", "variance", "grad_cosine"):
        assert fc.is_device_array(got[name]), f"{name} came back as {type(got[name]).__name__}"
        assert rel_err(got[name].copy_to_host(), getattr(want, name)) < 1e-12, name
    assert abs(got["noise_scale"] - want.noise_scale) < 1e-9 * abs(want.noise_scale)


def test_clipped_grad_on_device_matches_host():
    net, theta, X, y, theta_d, X_d, y_d = device_problem(np.float32, "mse")
    if SIM:
        got = fc.clipped_grad_device(net, theta_d, X_d, y_d, 0.2, 0.7, 11)
    else:
        got = fastgrad.clipped_grad(net, theta_d, X_d, y_d, 0.2, 0.7, seed=11, backend="cuda")
    want = fastgrad.clipped_grad(net, theta, X, y, 0.2, noise_multiplier=0.7, seed=11)
    assert rel_err(got.copy_to_host(), want) < 3e-5


def test_bad_device_inputs_are_rejected_before_any_kernel():
    net, theta, X, y, theta_d, X_d, y_d = device_problem()
    bad_X = X.copy()
    bad_X[2, 1] = np.nan
    with pytest.raises(ValueError, match="X: contains NaN"):
        fc.check_device_inputs(net, theta_d, cuda.to_device(bad_X), y_d)
    with pytest.raises(ValueError, match=r"y: labels must lie in \[0, 2\)"):
        fc.check_device_inputs(net, theta_d, X_d, cuda.to_device(np.array([0, 1, 2, 0, 1])))
    with pytest.raises(TypeError, match="X: .*dtype"):
        fc.check_device_inputs(net, theta_d, cuda.to_device(X.astype(np.float32)), y_d)
    with pytest.raises(ValueError, match="theta: expected shape"):
        fc.check_device_inputs(net, cuda.to_device(theta[:-1]), X_d, y_d)
    with pytest.raises(TypeError, match="y: expected a device array"):
        fc.check_device_inputs(net, theta_d, X_d, y)


@pytest.mark.parametrize(
    "arg,bad",
    [
        ("theta", lambda theta, X, y: theta[:-1]),
        ("theta", lambda theta, X, y: theta.astype(np.int64)),
        ("X", lambda theta, X, y: X[:, :2]),
        ("X", lambda theta, X, y: X[0]),
        ("X", lambda theta, X, y: X[:0]),
        ("y", lambda theta, X, y: y[:4]),
    ],
)
def test_device_and_host_shape_errors_are_the_same_message(arg, bad):
    # one shape/dtype checker for both: the device error is the host error, word for word
    net, theta, X, y, *_ = device_problem()
    host = {"theta": theta, "X": X, "y": y}
    host[arg] = np.ascontiguousarray(bad(theta, X, y))
    if arg == "X" and host["X"].ndim == 2 and host["X"].shape[0] == 0:
        host["y"] = y[:0]
    with pytest.raises((TypeError, ValueError)) as on_host:
        check_inputs(net, host["theta"], host["X"], host["y"])
    dev = {k: cuda.to_device(v) for k, v in host.items()}
    with pytest.raises(type(on_host.value)) as on_device:
        fc.check_device_inputs(net, dev["theta"], dev["X"], dev["y"])
    assert str(on_device.value) == str(on_host.value)


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # the simulator computes with the inf on the host
@pytest.mark.parametrize("path", ["fused", "tiled"])
def test_bad_values_found_by_the_pass_itself_raise_and_leave_no_trace(path):
    # device inputs: the fused kernel checks the values it reads; the tiled path runs a check kernel
    net, theta, X, y, theta_d, X_d, y_d = device_problem()
    bad_X = X.copy()
    bad_X[4, 0] = np.inf
    bad_theta = theta.copy()
    bad_theta[-1] = np.nan
    need = frozenset({"loss", "grad"})
    with pytest.raises(ValueError, match="X: contains NaN or Inf"):
        fc.backprop_device(net, theta_d, cuda.to_device(bad_X), y_d, need, path=path)
    with pytest.raises(ValueError, match="theta: contains NaN or Inf"):
        fc.backprop_device(net, cuda.to_device(bad_theta), X_d, y_d, need, path=path)
    with pytest.raises(ValueError, match=r"y: labels must lie in \[0, 2\)"):
        fc.backprop_device(net, theta_d, X_d, cuda.to_device(np.array([0, 1, -1, 0, 1])), need, path=path)
    good = fc.backprop_device(net, theta_d, X_d, y_d, need, path=path)  # the flags were reset
    assert rel_err(good["grad"].copy_to_host(), fastgrad.backprop(net, theta, X, y).grad) < 1e-12
    net_bce, theta, X, y, theta_d, X_d, _ = device_problem(loss="binary_cross_entropy")
    with pytest.raises(ValueError, match=r"binary_cross_entropy targets must lie in \[0, 1\]"):
        fc.backprop_device(net_bce, theta_d, X_d, cuda.to_device(y + 1.5), need, path=path)


@pytest.mark.skipif(SIM, reason="CuPy and PyTorch arrays need a real GPU")
@pytest.mark.parametrize("lib", ["torch", "cupy"])
def test_cuda_array_interface_of_other_libraries(lib):
    mod = pytest.importorskip(lib)
    net, theta, X, y = make_problem([3, 4, 2], "tanh", "cross_entropy", B=5, dtype=np.float32, seed=9)
    y = y.astype(np.int64)
    if lib == "torch":
        to_dev = lambda a: mod.from_numpy(a).cuda()  # noqa: E731
    else:
        to_dev = mod.asarray
    res = fastgrad.backprop(net, to_dev(theta), to_dev(X), to_dev(y), compute=("grad",), backend="cuda")
    assert fc.is_device_array(res.grad)
    want = fastgrad.backprop(net, theta, X, y, compute=("grad",))
    assert rel_err(res.grad.copy_to_host(), want.grad) < 3e-5


# ----------------------------------------------- norms beyond float32's squares (issue 10.7)


def _huge_and_tiny_problems():
    # gradients ~1e20 (their squares overflow float32) and ~1e-25 (their squares underflow): the norms fit
    net, theta, X, y = make_problem([3, 4, 2], "identity", "linear", B=4, dtype=np.float32, seed=2)
    yield net, theta, (X * np.float32(1e20)).astype(np.float32), y
    net, theta, X, _ = make_problem([3, 4, 1], "tanh", "mse", B=4, dtype=np.float32, seed=2)
    W2, b2 = net.unpack(theta)[1]
    W2 *= np.float32(1e-25)
    b2[...] = 0
    yield net, theta, X, np.zeros((4, 1), np.float32)


@pytest.mark.parametrize("path", ["fused", "tiled"])
def test_float32_norms_neither_overflow_nor_underflow_when_representable(path):
    for net, theta, X, y in _huge_and_tiny_problems():
        G64 = reference.per_sample_gradients(net, theta.astype(np.float64), X.astype(np.float64), y)
        want = np.linalg.norm(G64, axis=1)
        got = run_cuda(
            net, theta, X, y, path, need=frozenset({"loss", "norms", "layer_norms"}), max_norm=None
        )
        assert rel_err(got["norms"], want) < 3e-5
        assert rel_err(np.linalg.norm(got["layer_norms"].astype(np.float64), axis=1), want) < 3e-5


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # the simulator computes the overflow on the host
@pytest.mark.parametrize("path", ["fused", "tiled"])
def test_a_nan_norm_is_never_left_unclipped_on_the_device(path):
    net, theta, X, y = overflowing_problem(np.float32)  # inf − inf = NaN in sample 1's forward pass
    with pytest.raises(FloatingPointError, match="gradient norm of sample 1 is (nan|inf)"):
        fc.clipped_grad_device(
            net, cuda.to_device(theta), cuda.to_device(X), cuda.to_device(y), 1.0, 0.0, 0, path=path
        )
    raw = run_cuda(net, theta, X, y, path, need=frozenset({"loss", "norms"}), max_norm=1.0)
    assert np.isfinite(raw["norms"][0]) and not np.isfinite(raw["norms"][1])


@pytest.mark.parametrize("dtype,tol", [(np.float32, 2e-6), (np.float64, 1e-13)])
def test_derived_quantities_of_device_results_are_finished_by_the_registry(dtype, tol):
    # grad_cosine from a row-dot kernel on the device, variance from the kernel the registry declares,
    # and one sample's variance exactly 0 (the registry's rule, on device arrays)
    net, theta, X, y, theta_d, X_d, y_d = device_problem(dtype)
    got = backprop_on_device(net, theta_d, X_d, y_d, ("grad_cosine", "variance"))
    want = fastgrad.backprop(net, theta, X, y, compute=("grad_cosine", "variance"), backend="naive")
    cos = got["grad_cosine"].copy_to_host()
    assert cos.dtype == dtype and cos.shape == (X.shape[0],)
    np.testing.assert_allclose(cos, want.grad_cosine, rtol=0, atol=tol)
    one = backprop_on_device(net, theta_d, cuda.to_device(X[:1]), cuda.to_device(y[:1]), ("variance",))
    assert not one["variance"].copy_to_host().any()


def test_device_arrays_have_the_host_operations():
    # its own (row_dot: a compensated kernel in θ's dtype) and, for the rest, the host's operation on
    # host copies, returned on the device
    rng = np.random.default_rng(3)
    M, v = rng.standard_normal((5, 300)), rng.standard_normal(300)
    for dt, tol in ((np.float32, 2e-7), (np.float64, 1e-15)):
        got = fc.ARRAYS.row_dot(cuda.to_device(M.astype(dt)), cuda.to_device(v.astype(dt)))
        assert fc.is_device_array(got) and got.dtype == dt
        want = HOST.row_dot(M.astype(dt), v.astype(dt))  # float64 sums of the same products
        np.testing.assert_allclose(got.copy_to_host(), want, rtol=0, atol=tol * (np.abs(M) @ np.abs(v)).max())
    neg = fc.ARRAYS.map(np.negative, cuda.to_device(v))
    assert fc.is_device_array(neg)
    np.testing.assert_array_equal(neg.copy_to_host(), -v)
