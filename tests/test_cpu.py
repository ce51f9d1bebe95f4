"""Numba CPU backend: every quantity against the NumPy references, determinism, threads, workspace.

One compiled kernel per dtype serves every test here (activation, loss and the
requested quantities are run-time arguments), so the compile cost is paid twice.
"""

import os
import subprocess
import sys
import threading

import numba
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from problems import make_problem

import fastgrad
from fastgrad import cpu, quantities, reference
from fastgrad.cpu import config
from fastgrad._validation import check_inputs
from fastgrad.activations import ACTIVATIONS
from fastgrad.losses import LOSSES

# every raw quantity; the clipped sum is made when max_norm is given, not by name
ALL = frozenset(quantities.RAW) - {"clipped_sum"}
RAW = quantities.RAW
# float32 kernels against the float64 definition: rounding of a few hundred terms, far below any real bug
RTOL = {np.float32: 2e-4, np.float64: 1e-10}


def assert_close(got, want, dtype, name):
    want = np.asarray(want, dtype=np.float64)
    got = np.asarray(got)
    assert got.dtype == dtype, name
    assert got.shape == want.shape, name
    scale = max(1.0, float(np.max(np.abs(want)))) if want.size else 1.0
    np.testing.assert_allclose(got, want, rtol=RTOL[dtype], atol=RTOL[dtype] * scale, err_msg=name)


def check_against_naive(sizes, activation, loss, B, dtype, max_norm=0.7, seed=0, scale=1.0):
    """Every raw quantity of the numba backend matches the naive per-sample loop, run in float64."""
    net, theta, X, y = make_problem(sizes, activation, loss, B=B, dtype=dtype, seed=seed, scale=scale)
    got = cpu.run(net, check_inputs(net, theta, X, y), ALL, max_norm, None)
    ref_y = y if loss == "cross_entropy" else np.asarray(y, dtype=np.float64)
    ref_in = check_inputs(net, theta.astype(np.float64), X.astype(np.float64), ref_y)
    want = reference.run_naive(net, ref_in, ALL, max_norm)
    if dtype == np.float32:
        # the clip factor is discontinuous in its derivative at ‖g‖ = C; compare the
        # float32 clipped sum using the kernel's own norms so rounding at the threshold cannot flip it
        G = want["per_sample"]
        c = reference.clip_factors(got["norms"].astype(np.float64), max_norm)
        want["clipped_sum"] = (c[:, None] * G).sum(axis=0)
    for name in RAW:
        assert_close(got[name], want[name], dtype, f"{name} [{activation}, {loss}, {sizes}, B={B}]")


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("loss", LOSSES)
@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_every_quantity_matches_naive_for_every_activation_and_loss(activation, loss, dtype):
    check_against_naive([5, 7, 6, 3], activation, loss, B=9, dtype=dtype)


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize(
    "sizes,B",
    [
        ([3, 4, 2], 1),  # one sample
        ([1, 1, 1], 5),  # width-1 layers everywhere
        ([6, 1, 5, 2], 7),  # a width-1 bottleneck
        ([4, 2], 3),  # no hidden layer
        ([13, 37, 11, 9, 5], config.TILE + 3),  # odd sizes, a partial last tile
        ([7, config.BLOCK + 22, 3], 2 * config.TILE),  # whole tiles; a layer split into phase-2 blocks
        ([13, 37, 11, 9, 5], 3 * config.SMALL_TILE + 5),  # a small batch: smaller tiles, a partial last one
    ],
)
def test_shapes_single_sample_width_one_odd_sizes_partial_tile(sizes, B, dtype):
    check_against_naive(sizes, "tanh", "cross_entropy", B=B, dtype=dtype)
    check_against_naive(sizes, "gelu", "mse", B=B, dtype=dtype, seed=1)


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_batches_longer_than_a_chunk_are_accumulated(monkeypatch, dtype):
    # chunking is a host-side loop; a tiny scratch budget and tile exercise it without a big batch
    monkeypatch.setattr(config, "TILE", 4)
    monkeypatch.setattr(config, "WORKSPACE_BYTES", 1)
    assert cpu.chunk_rows((4, 6, 3), np.float64) == 4
    check_against_naive([4, 6, 3], "sigmoid", "binary_cross_entropy", B=21, dtype=dtype)


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_a_tight_workspace_halves_the_tile_and_chunks_the_batch(monkeypatch, dtype):
    # 70 samples' scratch fit: tiles of 32, chunks of 64 (two tiles), a 300-sample batch in five chunks
    sizes = [13, 37, 11, 9, 5]
    per_row = np.dtype(dtype).itemsize * (2 * (37 + 11 + 9) + (37 + 11 + 9 + 5) + (13 + 37 + 11 + 9))
    monkeypatch.setattr(config, "WORKSPACE_BYTES", 70 * per_row)
    assert cpu._chunking(tuple(sizes), dtype, 300) == (64, 32)
    check_against_naive(sizes, "tanh", "cross_entropy", B=300, dtype=dtype)


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_mean_gradient_by_phase_two_gemms_matches_too(monkeypatch, dtype):
    # small problems sum the gradient per tile; big ones (tiles × P over PARTIALS_BYTES) by GEMM blocks
    monkeypatch.setattr(config, "PARTIALS_BYTES", 0)
    check_against_naive([13, 37, 11, 9, 5], "tanh", "cross_entropy", B=config.TILE + 3, dtype=dtype)
    check_against_naive([7, config.BLOCK + 22, 3], "gelu", "mse", B=9, dtype=dtype)


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_grad_and_sq_per_tile_with_clipped_sum_by_gemm_blocks(monkeypatch, dtype):
    # a budget for two kinds of per-tile sums: grad and sq_mean per tile, the clipped sum in phase 2
    sizes, B = [13, 37, 11, 9, 5], config.TILE + 3
    num_params = fastgrad.MLP(sizes).num_params
    monkeypatch.setattr(config, "PARTIALS_BYTES", 2 * 2 * num_params * np.dtype(dtype).itemsize)
    check_against_naive(sizes, "softplus", "cross_entropy", B=B, dtype=dtype)


@pytest.mark.parametrize("partials_bytes", [config.PARTIALS_BYTES, 0])
def test_a_new_sum_in_the_registry_is_made_without_a_kernel_edit(monkeypatch, partials_bytes):
    # the kernel reads operand and source kinds from the plan the host builds from quantities.SUMS,
    # never quantity names: a squared sum that is not divided by B comes out as B × sq_mean
    monkeypatch.setattr(config, "PARTIALS_BYTES", partials_bytes)
    extra = quantities.Sum("sq_sum", quantities.DELTA_SQUARED, quantities.INPUT_SQUARED, False, "Σ (∇ℓ_i)²")
    monkeypatch.setattr(quantities, "SUMS", (*quantities.SUMS, extra))
    net, theta, X, y = make_problem([13, 37, 11, 9, 5], "tanh", "cross_entropy", B=config.TILE + 3)
    got = cpu.run(net, check_inputs(net, theta, X, y), frozenset({"loss", "sq_mean", "sq_sum"}), None, None)
    np.testing.assert_allclose(got["sq_sum"], got["sq_mean"] * X.shape[0], rtol=1e-12, atol=1e-15)
    assert "grad" not in got


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_variance_into_is_the_registry_formula(dtype):
    rng = np.random.default_rng(0)
    grad = rng.standard_normal(70_000).astype(dtype)
    sq_mean = (grad * grad + rng.uniform(-1e-3, 1.0, grad.shape)).astype(dtype)  # some below grad²
    var = np.empty_like(grad)
    cpu.variance_into(grad, sq_mean, var)
    np.testing.assert_array_equal(var, quantities.variance_from_moments(sq_mean, grad))
    assert var.min() == 0


@pytest.mark.parametrize("transposed_rows", [0, config.TRANSPOSED_ROWS])
@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_forward_of_big_layers_matches_too(monkeypatch, dtype, transposed_rows):
    # small layers are forwarded with a stored Wᵀ; big ones (all, here) read W transposed on tiles of
    # more than TRANSPOSED_ROWS rows (all, with 0), else as the transposed product (W Aᵀ)ᵀ
    monkeypatch.setattr(config, "SMALL_LAYER", 0)
    monkeypatch.setattr(config, "TRANSPOSED_ROWS", transposed_rows)
    want = cpu.driver.READ_WT if transposed_rows == 0 else cpu.driver.PRODUCT_T
    net = fastgrad.MLP([5, 7, 6, 3], activation="relu", loss="cross_entropy")
    assert set(cpu.driver._layout(net, cpu.tile_rows(9))[:, 4]) == {want}
    check_against_naive([5, 7, 6, 3], "relu", "cross_entropy", B=9, dtype=dtype)


def test_large_logits_stay_finite():
    # saturated tanh (the float32 rational form clamps at |z| = 9) and log-sum-exp at large logits
    check_against_naive([3, 8, 4], "tanh", "cross_entropy", B=6, dtype=np.float32, scale=60.0)
    check_against_naive([3, 8, 4], "softplus", "binary_cross_entropy", B=6, dtype=np.float64, scale=60.0)


@settings(max_examples=25, deadline=None)
@given(
    sizes=st.lists(st.integers(1, 9), min_size=2, max_size=5),
    B=st.integers(1, 70),
    activation=st.sampled_from(ACTIVATIONS),
    loss=st.sampled_from(LOSSES),
    dtype=st.sampled_from([np.float32, np.float64]),
    seed=st.integers(0, 2**16),
    max_norm=st.floats(0.01, 10.0),
)
def test_random_architectures_match_naive(sizes, B, activation, loss, dtype, seed, max_norm):
    check_against_naive(sizes, activation, loss, B=B, dtype=dtype, max_norm=max_norm, seed=seed)


def test_float32_tanh_is_within_six_ulp_of_numpy():
    x = np.concatenate([np.linspace(-12, 12, 200_001), [0.0, -0.0, 1e-30, -1e-30, 1e30, -1e30]]).astype(
        np.float32
    )
    got = _tanh_all(x)
    want = np.tanh(x.astype(np.float64))
    ulp = np.spacing(np.abs(want).astype(np.float32)).astype(np.float64)
    assert got.dtype == np.float32
    assert np.max(np.abs(got - want) / ulp) <= 6
    assert np.all(np.abs(got) <= 1)


@numba.njit
def _tanh_all(x):
    out = np.empty_like(x)
    for i in range(x.shape[0]):
        out[i] = cpu.tanh_vectorizable(x[i])
    return out


# -------------------------------------------------------------- public entry


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_public_backprop_and_clipped_grad_agree_with_numpy_backend(dtype):
    net, theta, X, y = make_problem([6, 9, 4], "relu", "cross_entropy", B=17, dtype=dtype, seed=3)
    quantities = ("loss", "grad", "norms", "layer_norms", "sq_mean", "variance", "noise_scale")
    got = fastgrad.backprop(net, theta, X, y, compute=quantities, backend="numba")
    want = fastgrad.backprop(net, theta, X, y, compute=quantities, backend="numpy")
    for name in quantities:
        a, b = getattr(got, name), getattr(want, name)
        if np.ndim(b):
            assert_close(a, b, dtype, name)
        else:  # loss, noise scale: Python floats
            np.testing.assert_allclose(a, b, rtol=10 * RTOL[dtype], err_msg=name)
    for sigma in (0.0, 1.1):
        a = fastgrad.clipped_grad(net, theta, X, y, 0.5, sigma, seed=4, backend="numba")
        b = fastgrad.clipped_grad(net, theta, X, y, 0.5, sigma, seed=4, backend="numpy")
        assert_close(a, b, dtype, f"clipped_grad sigma={sigma}")


def test_per_sample_rows_go_straight_into_a_memmap(tmp_path):
    net, theta, X, y = make_problem([5, 8, 3], "tanh", "mse", B=11, dtype=np.float32)
    shape = (11, net.num_params)
    mm = np.lib.format.open_memmap(tmp_path / "g.npy", mode="w+", dtype=np.float32, shape=shape)
    res = fastgrad.backprop(net, theta, X, y, compute=("per_sample", "grad"), backend="numba", out=mm)
    assert res.per_sample is mm
    mm.flush()
    on_disk = np.load(tmp_path / "g.npy")
    want = reference.per_sample_gradients(net, theta.astype(np.float64), X.astype(np.float64), y)
    assert_close(on_disk, want, np.float32, "per_sample on disk")
    np.testing.assert_allclose(res.grad, on_disk.mean(axis=0), rtol=1e-5, atol=1e-6)


def test_workspace_is_reused_across_calls_and_shapes():
    ws = cpu.Workspace()
    for sizes, B in [([5, 8, 3], 10), ([5, 8, 3], 10), ([4, 3, 2], 33), ([5, 8, 3], 10)]:
        net, theta, X, y = make_problem(sizes, "tanh", "cross_entropy", B=B)
        got = fastgrad.backprop(net, theta, X, y, compute=("grad", "sq_mean"), backend="numba", workspace=ws)
        want = fastgrad.backprop(net, theta, X, y, compute=("grad", "sq_mean"), backend="numpy")
        assert_close(got.grad, want.grad, np.float64, "grad")
        assert_close(got.sq_mean, want.sq_mean, np.float64, "sq_mean")
    bufs = ws.buffers((5, 8, 3), 10, np.dtype(np.float64), True)
    assert ws.buffers((5, 8, 3), 10, np.dtype(np.float64), True)[0] is bufs[0]  # no new allocation


def test_read_only_inputs_reuse_the_compiled_kernel():
    net, theta, X, y = make_problem([5, 8, 3], "tanh", "mse", B=6)
    want = fastgrad.backprop(net, theta, X, y, compute=("grad",), backend="numba").grad
    compiled = len(cpu.fused_backprop.signatures)
    for a in (theta, X, y):
        a.flags.writeable = False
    got = fastgrad.backprop(net, theta, X, y, compute=("grad",), backend="numba").grad
    np.testing.assert_array_equal(got, want)
    assert len(cpu.fused_backprop.signatures) == compiled


def test_bad_workspace_is_rejected_naming_the_argument():
    net, theta, X, y = make_problem([3, 4, 2], B=4)
    with pytest.raises(TypeError, match="workspace"):
        fastgrad.backprop(net, theta, X, y, backend="numba", workspace=object())
    with pytest.raises(ValueError, match="workspace"):
        fastgrad.backprop(net, theta, X, y, backend="numpy", workspace=cpu.Workspace())
    with pytest.raises(TypeError, match="workspace"):
        fastgrad.clipped_grad(net, theta, X, y, 1.0, backend="numba", workspace={})


# --------------------------------------------------------------- determinism


def _all_quantities(net, theta, X, y):
    raw = cpu.run(net, check_inputs(net, theta, X, y), ALL, 0.3, None)
    return {name: np.array(raw[name], copy=True) for name in RAW}


def test_chunks_are_balanced_whole_tiles_within_the_workspace():
    sizes = (1024, 1024, 1024, 10)
    fit = cpu.chunk_rows(sizes, np.float32)  # whole tiles of TILE whose scratch fits
    for B in (1, 255, 256, fit, fit + 1, 2 * fit + 7, 10 * fit - 3):
        chunk, tile = cpu._chunking(sizes, np.float32, B)
        most = cpu.chunk_rows(sizes, np.float32, tile)
        n_chunks = -(-B // chunk)
        assert chunk % tile == 0 and chunk <= max(most, tile) and n_chunks == -(-B // most)
        assert B - (n_chunks - 1) * chunk > chunk - n_chunks * tile  # the last chunk is not much shorter


def test_very_wide_networks_keep_to_the_workspace_budget_in_chunks_of_two_tiles():
    sizes = (20_000, 20_000, 10)  # 400 kB of scratch per float32 sample: 83 samples fit in 32 MiB
    chunk, tile = cpu._chunking(sizes, np.float32, 4096)
    per_row = 4 * (2 * 20_000 + 20_010 + 40_000)
    assert (chunk, tile) == (64, 32) and chunk * per_row <= config.WORKSPACE_BYTES


def test_batches_are_cut_into_an_even_number_of_near_equal_tiles_by_batch_size_alone():
    batches = (1, 63, 64, 72, 100, 127, 128, 255, 256, 511, 512, 600, 768, 1024, 10_000)
    tiles = [cpu.tile_rows(B) for B in batches]
    assert tiles == [32, 32, 32, 36, 50, 64, 64, 128, 128, 256, 256, 300, 192, 256, 250]
    for B, tile in zip(batches, tiles):
        n_tiles = -(-B // tile)
        assert tile >= config.SMALL_TILE
        if B >= 2 * config.SMALL_TILE:  # an even count of tiles that differ by at most one sample per tile
            assert n_tiles % 2 == 0 and n_tiles * tile - B < n_tiles
            assert config.TILE / 2 <= tile <= 3 * config.TILE / 2 or n_tiles == 2


@pytest.mark.parametrize("partials_bytes", [config.PARTIALS_BYTES, 0])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("batch", [5 * config.TILE + 7, 3 * config.SMALL_TILE + 5])  # TILE; SMALL_TILE
def test_bit_identical_across_calls_and_thread_counts(dtype, partials_bytes, batch, monkeypatch):
    monkeypatch.setattr(config, "PARTIALS_BYTES", partials_bytes)
    # enough samples for several tiles and weight rows for several phase-2 blocks
    net, theta, X, y = make_problem([20, 70, 33, 4], "tanh", "cross_entropy", B=batch, dtype=dtype)
    first = _all_quantities(net, theta, X, y)
    again = _all_quantities(net, theta, X, y)
    threads = numba.get_num_threads()
    try:
        numba.set_num_threads(1)
        one = _all_quantities(net, theta, X, y)
        numba.set_num_threads(min(2, numba.config.NUMBA_NUM_THREADS))
        two = _all_quantities(net, theta, X, y)
    finally:
        numba.set_num_threads(threads)
    for name in RAW:
        for other in (again, one, two):
            np.testing.assert_array_equal(first[name], other[name], err_msg=name)


def test_two_python_threads_at_once_give_the_serial_results():
    problems = [make_problem([12, 30, 5], "tanh", "cross_entropy", B=150, seed=s) for s in (0, 1)]
    serial = [_all_quantities(*p) for p in problems]
    results, errors = [None, None], []

    def work(k):
        try:
            for _ in range(5):
                results[k] = _all_quantities(*problems[k])
        except Exception as exc:  # pragma: no cover - reported below
            errors.append(exc)

    workers = [threading.Thread(target=work, args=(k,)) for k in (0, 1)]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    assert not errors
    assert numba.threading_layer() in ("tbb", "omp")
    for k in (0, 1):
        for name in RAW:
            np.testing.assert_array_equal(results[k][name], serial[k][name], err_msg=name)


def test_blas_thread_setting_is_restored_after_a_call():
    from threadpoolctl import threadpool_info

    before = [(i["filepath"], i["num_threads"]) for i in threadpool_info() if i["user_api"] == "blas"]
    net, theta, X, y = make_problem([5, 8, 3], B=10)
    _all_quantities(net, theta, X, y)
    after = [(i["filepath"], i["num_threads"]) for i in threadpool_info() if i["user_api"] == "blas"]
    assert dict(after).items() >= dict(before).items()


def _blas_threads() -> dict:
    from threadpoolctl import threadpool_info

    return {i["filepath"]: i["num_threads"] for i in threadpool_info() if i["user_api"] == "blas"}


def test_kernel_blas_hold_sets_only_the_lp64_libraries_numba_calls():
    from threadpoolctl import threadpool_limits

    from fastgrad._threading import _blas_holds, kernel_blas, single_threaded_blas

    libs = _blas_holds.libraries()
    ilp64 = {lib._lib.filepath for lib in libs if lib.ilp64}
    lp64 = {lib._lib.filepath for lib in libs if not lib.ilp64}
    assert lp64, "no LP64 BLAS found: Numba's np.dot needs SciPy's"
    with threadpool_limits(limits=2, user_api="blas"):
        before = _blas_threads()
        with kernel_blas:
            inside = _blas_threads()
            with single_threaded_blas:  # nested: every library at one thread, then back
                assert set(_blas_threads().values()) == {1}
            assert _blas_threads() == inside
        assert _blas_threads() == before
    assert all(inside[f] == 1 for f in lp64)
    assert all(inside[f] == before[f] for f in ilp64)


def test_pairwise_sum_has_the_bits_of_numpys_add_reduce():
    from fastgrad.cpu import pairwise_sum

    rng = np.random.default_rng(5)
    for dt in (np.float32, np.float64):
        for n in [*range(0, 300), 1000, 1031, 4096, 100_003]:
            a = (rng.standard_normal(n + 3) * rng.uniform(0.1, 1e3)).astype(dt)
            assert pairwise_sum(a, n) == np.add.reduce(a[:n], dtype=dt), (dt, n)


def test_disk_cache_can_be_turned_off_by_environment():
    code = "import fastgrad.cpu as c; print(c.CACHE)"
    for value, expected in (("0", "False"), ("1", "True")):
        env = dict(os.environ, FASTGRAD_NUMBA_CACHE=value)
        out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
        assert out.returncode == 0, out.stderr
        assert out.stdout.strip() == expected
