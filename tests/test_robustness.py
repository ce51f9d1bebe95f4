"""fastgrad inside other people's processes (docs/design.md §8): inputs that could give silently wrong
answers or run out of memory get a clear error or the right answer on every host backend."""

import numpy as np
import pytest
from problems import make_problem, overflowing_problem

import fastgrad

HOST = ["naive", "numpy", "numba"]
SMALL = make_problem([3, 4, 2], "tanh", "cross_entropy", B=5)


# ------------------------------------------------------------------ input types (10.9, 10.11)


@pytest.mark.parametrize("arg", ["theta", "X", "y"])
def test_masked_arrays_are_refused_naming_the_argument(arg):
    # a masked NaN used to pass validation: naive/numpy returned loss=nan, numba a finite number
    net, theta, X, y = SMALL
    args = {"theta": theta, "X": X, "y": y}
    a = args[arg].copy()
    if a.dtype.kind == "f":
        a[0] = np.nan
    args[arg] = np.ma.masked_array(
        a, mask=np.zeros(a.shape, bool) | (np.arange(a.size) == 0).reshape(a.shape)
    )
    with pytest.raises(TypeError, match=f"{arg}: a NumPy masked array"):
        fastgrad.backprop(net, args["theta"], args["X"], args["y"], backend="numpy")


def test_masked_out_is_refused():
    net, theta, X, y = SMALL
    out = np.ma.masked_array(np.empty((5, net.num_params)))
    with pytest.raises(TypeError, match="out: a NumPy masked array"):
        fastgrad.backprop(net, theta, X, y, ("per_sample",), out=out)


@pytest.mark.parametrize(
    ("arg", "bad"),
    [
        ("X", np.zeros((5, 3), "m8[s]")),
        ("X", np.zeros((5, 3), "M8[D]")),
        ("X", np.zeros((5, 3), np.complex128)),
        ("X", np.zeros((5, 3), object)),
        ("y", np.zeros(5, "m8[s]")),
        ("y", np.zeros(5, "M8[D]")),
        ("y", np.zeros(5, "U1")),
    ],
)
def test_time_complex_object_and_string_inputs_are_refused(arg, bad):
    net, theta, X, y = SMALL
    args = {"X": X, "y": y, arg: bad}
    with pytest.raises(TypeError, match=f"{arg}: expected real"):
        fastgrad.backprop(net, theta, args["X"], args["y"])


def test_timedelta_targets_of_a_float_loss_are_refused():
    net = fastgrad.MLP([3, 4, 2], loss="mse")
    with pytest.raises(TypeError, match="y: expected real"):
        fastgrad.backprop(net, net.init(), np.ones((5, 3)), np.zeros((5, 2), "m8[s]"))


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_big_endian_theta_x_and_y_are_accepted_and_give_the_native_result(dtype):
    net, theta, X, y = make_problem([3, 4, 2], "tanh", "mse", B=5, dtype=dtype)
    want = fastgrad.backprop(net, theta, X, y, ("loss", "grad"), backend="numpy")
    big = [a.astype(a.dtype.newbyteorder(">")) for a in (theta, X, y)]
    for backend in HOST:
        got = fastgrad.backprop(net, *big, ("loss", "grad"), backend=backend)
        assert got.grad.dtype == np.dtype(dtype) and got.grad.dtype.isnative
        np.testing.assert_allclose(got.grad, want.grad, rtol=1e-5 if dtype == np.float32 else 1e-12)


def test_big_endian_labels_bool_and_integer_x_are_accepted():
    net, theta, X, y = SMALL
    want = fastgrad.backprop(net, theta, (X > 0).astype(np.float64), y).grad
    for Xb in ((X > 0), (X > 0).astype(">i2"), (X > 0).astype(np.uint8)):
        got = fastgrad.backprop(net, theta, Xb, y.astype(">i8")).grad
        np.testing.assert_array_equal(got, want)


# ---------------------------------------------------------------------- out= (10.8)


@pytest.mark.parametrize("backend", HOST)
@pytest.mark.parametrize("victim", ["theta", "X", "y"])
def test_out_sharing_memory_with_an_input_is_refused(backend, victim):
    net, theta, X, y = make_problem([3, 4, 2], "tanh", "mse", B=5)
    P = net.num_params
    buf = np.zeros(5 * P + theta.size + X.size + y.size)
    out = buf[: 5 * P].reshape(5, P)
    # each input is either a separate array or placed inside out's memory
    args = {"theta": theta, "X": X, "y": y}
    at = {"theta": 0, "X": theta.size, "y": theta.size + X.size}[victim]
    inside = buf[at : at + args[victim].size].reshape(args[victim].shape)
    inside[...] = args[victim]
    args[victim] = inside
    with pytest.raises(ValueError, match=f"out: shares memory with {victim}"):
        fastgrad.backprop(net, args["theta"], args["X"], args["y"], ("per_sample",), backend, out=out)
    # a separate out of the same buffer's other half is fine
    fine = np.zeros((5, P))
    r = fastgrad.backprop(net, args["theta"], args["X"], args["y"], ("per_sample",), backend, out=fine)
    assert r.per_sample is fine


# ------------------------------------------------------------------ cancellation (10.10)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_one_sample_has_exactly_zero_variance_and_noise_scale_and_copies_none_below_zero(dtype):
    # B = 1 gave variance 3e-8 and noise scales of either sign (-6e-8); identical samples too
    for seed in range(3):
        net, theta, X, y = make_problem([3, 8, 2], "tanh", "cross_entropy", B=1, dtype=dtype, seed=seed)
        for backend in HOST:
            one = fastgrad.backprop(net, theta, X, y, ("variance", "noise_scale"), backend=backend)
            assert not one.variance.any() and one.variance.dtype == dtype
            assert one.noise_scale == 0.0
            copies = fastgrad.backprop(
                net, theta, np.repeat(X, 4, 0), np.repeat(y, 4), ("variance", "noise_scale"), backend=backend
            )
            assert copies.noise_scale >= 0.0 and (copies.variance >= 0).all()


NOISE_SCALE_SCRIPT = """
import numpy as np
from fastgrad.quantities import noise_scale
rng = np.random.default_rng(0)
grad = rng.standard_normal(300_000).astype(np.float32)  # long enough for OpenBLAS to split a dot
print(float(noise_scale(grad, 600 * rng.standard_normal(64))).hex())
"""


def test_noise_scale_bits_do_not_depend_on_openblas_threads():
    import os
    import subprocess
    import sys

    bits = set()
    for threads in ("1", "4"):
        env = dict(os.environ, OPENBLAS_NUM_THREADS=threads, PYTHONPATH=os.pathsep.join(sys.path))
        run = subprocess.run(
            [sys.executable, "-c", NOISE_SCALE_SCRIPT], env=env, capture_output=True, text=True
        )
        assert run.returncode == 0, run.stderr
        bits.add(run.stdout.strip())
    assert len(bits) == 1, bits


# ------------------------------------------------------------------ memory (10.4, 10.5)


def _no_kernels(monkeypatch):
    import fastgrad.cpu
    import fastgrad.reference

    def fail(*args, **kwargs):
        raise AssertionError("a kernel ran")

    for module, name in (
        (fastgrad.reference, "run_naive"),
        (fastgrad.reference, "run_batched"),
        (fastgrad.cpu, "run"),
    ):
        monkeypatch.setattr(module, name, fail)


@pytest.mark.parametrize("backend", HOST)
def test_per_sample_larger_than_memory_is_refused_before_any_work(backend, monkeypatch):
    # B x P x 8 = 200k x 3M x 8 B = 4.8 TB: NumPy's MemoryError used to come after 13 s of work
    net = fastgrad.MLP([1, 1_000_000, 1], activation="relu", loss="mse")
    theta = np.zeros(net.num_params)
    X, y = np.zeros((200_000, 1)), np.zeros(200_000)
    _no_kernels(monkeypatch)
    with pytest.raises(
        fastgrad.api.PerSampleMemoryError, match=r"per_sample.*GiB.*out=.*np.memmap.*fewer samples"
    ):
        fastgrad.backprop(net, theta, X, y, ("grad", "per_sample"), backend=backend)
    assert issubclass(fastgrad.api.PerSampleMemoryError, MemoryError)
    assert issubclass(fastgrad.api.PerSampleMemoryError, ValueError)


def test_per_sample_size_check_reads_the_available_memory_and_is_skipped_with_out(monkeypatch):
    import fastgrad._validation as validation

    net, theta, X, y = SMALL
    need = 5 * net.num_params * 8
    monkeypatch.setattr(validation, "available_memory", lambda: need - 1)
    with pytest.raises(MemoryError, match="at most ~4 fit"):
        fastgrad.backprop(net, theta, X, y, ("per_sample",))
    out = np.empty((5, net.num_params))
    assert fastgrad.backprop(net, theta, X, y, ("per_sample",), out=out).per_sample is out
    monkeypatch.setattr(validation, "available_memory", lambda: need)
    assert fastgrad.backprop(net, theta, X, y, ("per_sample",)).per_sample.shape == (5, net.num_params)


def test_available_memory_is_a_positive_byte_count_here():
    free = fastgrad._validation.available_memory()
    assert free is None or free > 2**20


def _peak_bytes(fn) -> int:
    import tracemalloc

    tracemalloc.start()
    try:
        fn()
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


@pytest.mark.parametrize("backend", ["naive", "numpy"])
def test_out_memmap_is_written_in_bounded_blocks(backend, tmp_path, monkeypatch):
    # a 42 MB per_sample into a memmap, blocks of 1 MiB: the numpy backend used to hold a B x n_l x n_{l-1}
    # temporary (20 MB here) and naive G * G (42 MB), i.e. ~B x P of RAM besides the memmap
    import fastgrad.reference

    monkeypatch.setattr(fastgrad.reference, "ROWS_BYTES", 2**20)
    net, theta, X, y = make_problem([50, 100, 50, 10], "tanh", "cross_entropy", B=1000, dtype=np.float32)
    out = np.lib.format.open_memmap(tmp_path / "g.npy", "w+", np.float32, (1000, net.num_params))
    compute = ("per_sample", "grad", "norms", "variance")
    peak = _peak_bytes(lambda: fastgrad.backprop(net, theta, X, y, compute, backend, out=out))
    assert peak < 8 * 2**20, peak
    want = fastgrad.backprop(net, theta, X[:3], y[:3], ("per_sample",), backend).per_sample
    np.testing.assert_allclose(out[:3], want, rtol=0, atol=1e-5 * np.abs(want).max())


def test_naive_without_per_sample_keeps_no_b_by_p_matrix(monkeypatch):
    # grad alone used to build the (B, P) matrix (3.7 GiB at B = 200k); here 42 MB against a 1 MiB block
    import fastgrad.reference

    monkeypatch.setattr(fastgrad.reference, "ROWS_BYTES", 2**20)
    net, theta, X, y = make_problem([50, 100, 50, 10], "tanh", "cross_entropy", B=1000, dtype=np.float32)
    compute = ("grad", "norms", "layer_norms", "sq_mean", "variance", "noise_scale")
    peak = _peak_bytes(lambda: fastgrad.backprop(net, theta, X, y, compute, "naive"))
    assert peak < 8 * 2**20, peak


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_naive_in_blocks_of_rows_is_the_naive_in_one_block(dtype, monkeypatch):
    import fastgrad.reference as reference

    net, theta, X, y = make_problem([4, 6, 3], "tanh", "cross_entropy", B=10, dtype=dtype, seed=4)
    inp = fastgrad.api.check_inputs(net, theta, X, y)
    everything = frozenset(fastgrad.QUANTITIES)
    whole = reference.run_naive(net, inp, everything, max_norm=0.3)
    monkeypatch.setattr(reference, "ROWS_BYTES", 3 * net.num_params * np.dtype(dtype).itemsize)
    assert len(reference.row_blocks(10, net.num_params, dtype)) == 4  # 3 + 3 + 3 + 1 rows
    for need in (everything, everything - {"per_sample"}):
        blocks = reference.run_naive(net, inp, need, max_norm=0.3)
        for name in sorted(need | {"clipped_sum"}):
            tol = 1e-5 if dtype == np.float32 else 1e-13
            np.testing.assert_allclose(
                blocks[name], whole[name], rtol=tol, atol=tol * np.abs(whole[name]).max(), err_msg=name
            )


# ------------------------------------------------------------- norms and clipping (10.7)


def _huge_inputs_problem():
    # identity net, linear loss (Δ_L = -1): the weight gradients δ xᵀ are ~1e20, so the norms (~1e20) fit
    # float32 and their squares do not
    net, theta, X, y = make_problem([3, 4, 2], "identity", "linear", B=6, dtype=np.float32, seed=2)
    return net, theta, (X * np.float32(1e20)).astype(np.float32), y


def _tiny_gradient_problem():
    # mse with y = 0 and a tiny last layer: δ_L = z_L ~ 1e-25, gradient entries ~1e-25, their squares
    # below float32's range
    net, theta, X, _ = make_problem([3, 4, 1], "tanh", "mse", B=6, dtype=np.float32, seed=2)
    W2, b2 = net.unpack(theta)[1]
    W2 *= np.float32(1e-25)
    b2[...] = 0
    return net, theta, X, np.zeros(6, np.float32)


@pytest.mark.parametrize("problem", [_huge_inputs_problem, _tiny_gradient_problem])
@pytest.mark.parametrize("backend", HOST)
def test_float32_norms_neither_overflow_nor_underflow_when_representable(problem, backend):
    net, theta, X, y = problem()
    G64 = fastgrad.backprop(
        net, theta.astype(np.float64), X.astype(np.float64), y, ("per_sample",), "naive"
    ).per_sample
    want = np.linalg.norm(G64, axis=1)
    assert np.isfinite(want).all() and (want > 0).all() and (want < 1e30).all() and (want > 1e-30).all()
    r = fastgrad.backprop(net, theta, X, y, ("norms", "layer_norms"), backend)
    np.testing.assert_allclose(r.norms, want, rtol=1e-5)
    np.testing.assert_allclose(np.sqrt((r.layer_norms.astype(np.float64) ** 2).sum(axis=1)), want, rtol=1e-5)


def _saturated_problem():
    # tanh saturates at inputs ~1e20: Δ_1 = 0 and ‖x‖² overflows float32, so Goodfellow's term 0·inf was NaN
    net, theta, X, y = make_problem([3, 4, 2], "tanh", "cross_entropy", B=6, dtype=np.float32, seed=2)
    return net, theta, (X * np.float32(1e20)).astype(np.float32), y


@pytest.mark.parametrize("problem", [_huge_inputs_problem, _saturated_problem])
@pytest.mark.parametrize("backend", HOST)
def test_clipped_grad_clips_float32_samples_whose_squared_norm_overflows(backend, problem):
    # such samples used to get a NaN norm and go through unclipped: 11x the bound
    net, theta, X, y = problem()
    W2 = net.unpack(theta)[1][0]
    W2 *= 100  # gradients well above max_norm
    g = fastgrad.clipped_grad(net, theta, X, y, max_norm=1.0, backend=backend)
    assert np.isfinite(g).all() and np.linalg.norm(g.astype(np.float64)) <= 1.0 + 1e-5


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # NumPy reports the overflow it is made to do
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("backend", HOST)
def test_a_nan_or_inf_norm_is_never_left_unclipped(backend, dtype):
    net, theta, X, y = overflowing_problem(dtype)
    with pytest.raises(FloatingPointError, match="gradient norm of sample 1 is (nan|inf)"):
        fastgrad.clipped_grad(net, theta, X, y, max_norm=1.0, backend=backend)
    # a finite gradient whose norm overflows float64: inf
    net, theta, X, y = make_problem([3, 4, 2], "identity", "cross_entropy", B=3, dtype=np.float64, seed=1)
    X[2] *= 1e200
    with pytest.raises(FloatingPointError, match="sample 2 is inf"):
        fastgrad.clipped_grad(net, theta, X, y, max_norm=1.0, backend=backend)


# ---------------------------------------------------------------------- NaN (10.9)


@pytest.mark.parametrize("activation", fastgrad.ACTIVATIONS)
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_a_nan_in_a_pre_activation_propagates_through_every_activation(activation, dtype):
    # the numba float32 tanh clamped NaN to 1.0 (a finite loss where the others gave NaN); relu's max
    # dropped it. Inputs are validated finite, so the NaN (as an overflow would make one) goes in past
    # the checks: into W_1's first row, i.e. the first hidden unit's pre-activation of every sample
    import dataclasses

    net, theta, X, y = make_problem([3, 4, 2], activation, "cross_entropy", B=5, dtype=dtype, seed=1)
    inp = fastgrad.api.check_inputs(net, theta, X, y)
    bad = inp.theta.copy()
    bad[:3] = np.nan
    inp = dataclasses.replace(inp, theta=bad)
    for backend in HOST:
        with np.errstate(all="ignore"):
            raw = fastgrad.api.run_backend(backend, net, inp, frozenset({"loss"}))
        assert np.isnan(raw["loss"]), (backend, raw["loss"])


def test_the_scalar_activations_map_nan_to_nan():
    import math

    from fastgrad import activations

    for code in range(len(fastgrad.ACTIVATIONS)):
        assert math.isnan(activations.activate(code, math.nan)), fastgrad.ACTIVATIONS[code]
        assert math.isnan(activations.activate(code, np.float32("nan"))), fastgrad.ACTIVATIONS[code]
