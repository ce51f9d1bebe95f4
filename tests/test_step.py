"""fastgrad.Step: a prepared call gives the bits of backprop / clipped_grad, checks each call's arrays,
owns its buffers and noise sequence, and refuses to be shared between threads."""

from __future__ import annotations

import threading

import numpy as np
import pytest
from problems import make_problem

import fastgrad

HOST = ("naive", "numpy", "numba")
SUBSETS = [
    ("loss", "grad"),
    ("grad", "norms", "layer_norms"),
    ("grad", "sq_mean", "variance", "noise_scale"),
    fastgrad.QUANTITIES,
]


def _same(a, b, what):
    if isinstance(a, np.ndarray):
        assert a.dtype == b.dtype and a.shape == b.shape, what
        np.testing.assert_array_equal(a, b, err_msg=what)
    else:
        assert a == b or (np.isnan(a) and np.isnan(b)), what


@pytest.mark.parametrize("backend", HOST)
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("loss", ["cross_entropy", "mse", "binary_cross_entropy"])
def test_every_quantity_is_bit_identical_to_backprop(backend, dtype, loss):
    net, theta, X, y = make_problem([5, 9, 7, 3], "tanh", loss, B=11, dtype=dtype)
    for compute in SUBSETS:
        step = fastgrad.Step(net, dtype, compute=compute, backend=backend)
        for B in (11, 4, 11):  # a smaller batch in between reuses the buffers
            got = step(theta, X[:B], y[:B])
            want = fastgrad.backprop(net, theta, X[:B], y[:B], compute=compute, backend=backend)
            for name in fastgrad.QUANTITIES:
                w = getattr(want, name)
                if w is None:
                    assert getattr(got, name) is None, name
                else:
                    _same(getattr(got, name), w, f"{backend} {compute} B={B} {name}")


@pytest.mark.parametrize("backend", HOST)
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("sigma", [0.0, 1.3])
def test_clipped_steps_are_bit_identical_to_clipped_grad_with_the_documented_seeds(backend, dtype, sigma):
    net, theta, X, y = make_problem([6, 10, 4], "relu", "cross_entropy", B=13, dtype=dtype, scale=3.0)
    seed = 1234 if sigma > 0 else None
    step = fastgrad.Step(net, dtype, backend=backend, max_norm=0.5, noise_multiplier=sigma, seed=seed)
    children = np.random.SeedSequence(1234).spawn(3)
    grads = []
    for k in range(3):
        got = step(theta, X, y)
        want = fastgrad.clipped_grad(
            net, theta, X, y, 0.5, sigma, children[k] if sigma > 0 else None, backend, return_stats=True
        )
        for name in ("grad", "norms", "clip_fraction", "noise_std", "denominator", "loss"):
            _same(getattr(got, name), getattr(want, name), f"{backend} call {k} {name}")
        assert 0 < got.clip_fraction < 1
        grads.append(got.grad.copy())
    assert step.calls == 3
    if sigma > 0:  # every call draws new noise
        assert not np.array_equal(grads[0], grads[1])
    else:
        np.testing.assert_array_equal(grads[0], grads[2])


def test_a_seed_gives_the_same_sequence_of_steps_and_expected_batch_size_is_the_denominator():
    net, theta, X, y = make_problem([6, 10, 4], "tanh", "cross_entropy", B=9, dtype=np.float32)
    runs = []
    for _ in range(2):
        step = fastgrad.Step(
            net, np.float32, max_norm=1.0, noise_multiplier=0.8, seed=7, expected_batch_size=12.5
        )
        runs.append([step(theta, X, y, copy=True).grad for _ in range(3)])
    for a, b in zip(*runs):
        np.testing.assert_array_equal(a, b)
    want = fastgrad.clipped_grad(
        net, theta, X, y, 1.0, 0.8, np.random.SeedSequence(7).spawn(1)[0], "numba", expected_batch_size=12.5
    )
    np.testing.assert_array_equal(runs[0][0], want)


@pytest.mark.parametrize("how", ["chunks", "phase 2"])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_the_numba_kernels_noised_step_after_chunks_and_phase_2(monkeypatch, how, dtype):
    """The numba backend makes the noised step in its kernels' last pass (a Step, and clipped_grad): with the
    batch in chunks (the step on the last only, from every chunk's sum) and with the clipped sum from phase
    2's GEMMs, it has the bits of dp_step on the clipped sum the plain kernels make."""
    from fastgrad import cpu, privacy
    from fastgrad.api import check_inputs
    from fastgrad.cpu import config
    from fastgrad.quantities import needed

    if how == "chunks":
        monkeypatch.setattr(config, "WORKSPACE_BYTES", 16 * 1024)
    else:
        monkeypatch.setattr(config, "PARTIALS_BYTES", 0)
    net, theta, X, y = make_problem([6, 40, 4], "tanh", "mse", B=70, dtype=dtype, scale=3.0)
    raw = cpu.run(net, check_inputs(net, theta, X, y), needed(("norms",), clipping=True), 0.5, None)
    total, norms = raw["clipped_sum"].copy(), raw["norms"].copy()
    kw = dict(max_norm=0.5, noise_multiplier=1.1, expected_batch_size=64.5)
    step = fastgrad.Step(net, dtype, backend="numba", seed=5, **kw)
    children = np.random.SeedSequence(5).spawn(2)
    for k in range(2):
        want = privacy.dp_step(total, norms, 0.5, 1.1, 64.5, children[k])
        np.testing.assert_array_equal(step(theta, X, y).grad, want, err_msg=f"{how} Step call {k}")
        got = fastgrad.clipped_grad(net, theta, X, y, seed=children[k], backend="numba", **kw)
        np.testing.assert_array_equal(got, want, err_msg=f"{how} clipped_grad {k}")
    np.testing.assert_array_equal(  # σ = 0: the division alone
        fastgrad.clipped_grad(net, theta, X, y, 0.5, backend="numba"),
        privacy.dp_step(total, norms, 0.5, 0.0, 70),
    )
    call = step._prepared_call(70)
    assert call.chunk < 35 if how == "chunks" else call.partial.size == 0


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # NumPy reports the overflow it is made to do
@pytest.mark.parametrize("backend", HOST)
def test_a_refused_call_draws_no_seed_and_leaves_the_gradient_buffer(backend):
    net, theta, X, y = make_problem([3, 4, 2], "identity", "cross_entropy", B=3, dtype=np.float64, seed=1)
    step = fastgrad.Step(net, np.float64, backend=backend, max_norm=1.0, noise_multiplier=0.7, seed=9)
    first = step(theta, X, y, copy=True).grad
    overflowing = X.copy()
    overflowing[2] *= 1e200  # a finite gradient whose norm overflows float64
    with pytest.raises(FloatingPointError, match="sample 2 is inf"):
        step(theta, overflowing, y)
    np.testing.assert_array_equal(step.grad_buffer, first)  # neither the step nor its noise was made
    nan = X.copy()
    nan[0, 0] = np.nan
    with pytest.raises(ValueError, match="X: contains NaN or Inf"):
        step(theta, nan, y)
    assert step.calls == 1
    want = fastgrad.clipped_grad(net, theta, X, y, 1.0, 0.7, np.random.SeedSequence(9).spawn(2)[1], backend)
    np.testing.assert_array_equal(step(theta, X, y).grad, want)  # call 1's seed, as if nothing was refused


def test_results_are_the_steps_buffers_unless_copied():
    net, theta, X, y = make_problem([5, 8, 3], B=10, dtype=np.float32)
    step = fastgrad.Step(net, np.float32, backend="numba")
    first = step(theta, X, y)
    kept = step(theta, X, y, copy=True)
    second = step(theta * 2, X, y)
    assert second.grad is first.grad or np.shares_memory(second.grad, first.grad)  # overwritten
    assert not np.shares_memory(kept.grad, second.grad)
    np.testing.assert_array_equal(kept.grad, fastgrad.backprop(net, theta, X, y, backend="numba").grad)


def test_max_batch_size_is_allocated_once_and_enforced():
    net, theta, X, y = make_problem([5, 8, 3], B=10, dtype=np.float32)
    step = fastgrad.Step(net, np.float32, backend="numba", max_batch_size=8)
    step(theta, X[:8], y[:8])
    with pytest.raises(ValueError, match="X: 10 samples, more than the step's max_batch_size = 8"):
        step(theta, X, y)


@pytest.mark.parametrize(
    "change, exc, match",
    [
        (lambda t, X, y: (t.astype(np.float64), X, y), TypeError, "theta: expected dtype float32"),
        (lambda t, X, y: (t[:-1], X, y), ValueError, "theta: expected shape"),
        (
            lambda t, X, y: (np.where(np.arange(t.size) == 3, np.nan, t).astype(t.dtype), X, y),
            ValueError,
            "theta: contains NaN",
        ),
        (lambda t, X, y: (t, X[:, :-1], y), ValueError, "X: expected 5 columns"),
        (lambda t, X, y: (t, np.where(X > 0.5, np.inf, X), y), ValueError, "X: contains NaN or Inf"),
        (lambda t, X, y: (t, X, y[:-1]), ValueError, "y: cross_entropy expects labels of shape"),
        (lambda t, X, y: (t, X, y + 3), ValueError, r"y: labels must lie in \[0, 3\)"),
        (lambda t, X, y: (t, X, y - 1), ValueError, r"y: labels must lie in \[0, 3\)"),
        (lambda t, X, y: (t, X, y.astype(np.float32)), TypeError, "y: cross_entropy expects integer"),
        (lambda t, X, y: (list(t), X, y), TypeError, "theta: expected a NumPy array"),
    ],
)
@pytest.mark.parametrize("backend", ["numba", "numpy"])
def test_each_call_checks_its_arrays_naming_the_argument(change, exc, match, backend):
    net, theta, X, y = make_problem([5, 8, 3], B=10, dtype=np.float32)
    step = fastgrad.Step(net, np.float32, backend=backend)
    with pytest.raises(exc, match=match):
        step(*change(theta, X, y))


def test_other_input_types_are_converted_as_backprop_converts_them():
    net, theta, X, y = make_problem([5, 8, 3], B=10, dtype=np.float32)
    step = fastgrad.Step(net, np.float32, backend="numba")
    odd = (theta[::-1].copy()[::-1], np.asfortranarray(X.astype(np.float64)), y.astype(np.int32))
    want = fastgrad.backprop(net, *odd, compute=("loss", "grad"), backend="numba")
    got = step(*odd)
    np.testing.assert_array_equal(got.grad, want.grad)
    assert got.loss == want.loss


@pytest.mark.parametrize("backend", ["numba", "numpy"])
def test_targets_out_of_the_losss_domain_are_refused(backend):
    net, theta, X, y = make_problem([5, 8, 3], "tanh", "binary_cross_entropy", B=10, dtype=np.float32)
    step = fastgrad.Step(net, np.float32, backend=backend)
    with pytest.raises(ValueError, match=r"y: binary_cross_entropy targets must lie in \[0, 1\]"):
        step(theta, X, y + 1)
    with pytest.raises(ValueError, match="y: contains NaN or Inf"):
        step(theta, X, np.full_like(y, np.nan))


@pytest.mark.parametrize(
    "kwargs, exc, match",
    [
        ({"dtype": np.int32}, TypeError, "dtype: expected float32 or float64"),
        ({"backend": "cuda"}, (ValueError, RuntimeError, ImportError), "cuda|GPU|CUDA"),
        ({"backend": "bogus"}, ValueError, "backend: unknown name"),
        ({"compute": ("grad", "bogus")}, ValueError, "compute: unknown quantity"),
        ({"max_norm": 1.0, "compute": ("norms",)}, ValueError, "compute: with max_norm"),
        ({"noise_multiplier": 1.0}, ValueError, "max_norm: noise_multiplier, seed and expected_batch_size"),
        ({"max_norm": -1.0}, ValueError, "max_norm"),
        ({"max_norm": 1.0, "seed": -3}, ValueError, "seed"),
        ({"max_batch_size": 0}, ValueError, "max_batch_size"),
        ({"max_batch_size": 2.5}, TypeError, "max_batch_size"),
    ],
)
def test_bad_step_arguments_are_refused_at_construction(kwargs, exc, match):
    net = fastgrad.MLP([5, 8, 3])
    with pytest.raises(exc, match=match):
        fastgrad.Step(net, **{"dtype": np.float32, **kwargs})


def test_a_step_shared_between_threads_is_refused():
    net, theta, X, y = make_problem([5, 8, 3], B=10, dtype=np.float32)
    step = fastgrad.Step(net, np.float32, backend="numba")
    with step._claimed():  # another call holds it
        with pytest.raises(RuntimeError, match="step: this Step is in use by another call"):
            step(theta, X, y)
    errors = []
    started = threading.Barrier(2)

    def hold():
        with step._claimed():
            started.wait()
            started.wait()

    t = threading.Thread(target=hold)
    t.start()
    started.wait()
    try:
        step(theta, X, y)
    except RuntimeError as exc:
        errors.append(exc)
    started.wait()
    t.join()
    assert len(errors) == 1


def test_one_step_per_thread_gives_the_serial_results():
    net, theta, X, y = make_problem([20, 64, 32, 4], "tanh", "cross_entropy", B=300, dtype=np.float32)
    want = fastgrad.backprop(net, theta, X, y, compute=("loss", "grad", "norms"), backend="numba")
    got, errors = {}, []

    def work(i):
        try:
            step = fastgrad.Step(net, np.float32, compute=("loss", "grad", "norms"), backend="numba")
            got[i] = [step(theta, X, y, copy=True) for _ in range(5)]
        except Exception as exc:  # reported by the assertion below
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    for results in got.values():
        for r in results:
            np.testing.assert_array_equal(r.grad, want.grad)
            np.testing.assert_array_equal(r.norms, want.norms)
            assert r.loss == want.loss


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_the_numba_loss_is_numpys_mean_of_the_per_sample_losses(dtype):
    for B in (1, 37, 300):
        net, theta, X, y = make_problem([5, 9, 3], "tanh", "cross_entropy", B=B, dtype=dtype, scale=2.0)
        step = fastgrad.Step(net, dtype, backend="numba")
        got = step(theta, X, y).loss
        each = step._prepared[B].losses  # the kernel's per-sample losses
        assert got == float(each.mean(dtype=dtype))
        assert got == fastgrad.backprop(net, theta, X, y, backend="numba").loss


def test_batches_of_other_sizes_reuse_the_buffers_and_the_compiled_kernels():
    from fastgrad import cpu

    net, theta, X, y = make_problem([5, 40, 3], "tanh", "cross_entropy", B=600, dtype=np.float32)
    step = fastgrad.Step(net, np.float32, compute=("grad", "sq_mean", "norms"), backend="numba")
    step(theta, X, y)
    compiled = len(cpu.fused_backprop.signatures)
    grad = step._results.sums
    for B in (40, 7, 333, 600):
        got = step(theta, X[:B], y[:B])
        want = fastgrad.backprop(
            net, theta, X[:B], y[:B], compute=("grad", "sq_mean", "norms"), backend="numba"
        )
        np.testing.assert_array_equal(got.grad, want.grad)
        np.testing.assert_array_equal(got.sq_mean, want.sq_mean)
    assert step._results.sums is grad  # no new result buffers
    assert len(cpu.fused_backprop.signatures) == compiled


def test_growing_batches_grow_the_buffers_a_quarter_at_a_time():
    # Poisson batches set a new largest size now and then: the result buffers grow by a quarter at least,
    # so the prepared calls are dropped a few times, not at every new largest batch; results unchanged
    net, theta, X, y = make_problem([5, 8, 3], "tanh", "cross_entropy", B=200, dtype=np.float32)
    step = fastgrad.Step(net, np.float32, max_norm=1.0, backend="numba")
    grows = []
    original = step._grow
    step._grow = lambda rows: (grows.append(rows), original(rows))
    for B in range(100, 201):
        got = step(theta, X[:B], y[:B])
        want = fastgrad.clipped_grad(net, theta, X[:B], y[:B], max_norm=1.0, backend="numba")
        np.testing.assert_array_equal(got.grad, want)
    assert grows == [100, 125, 156, 195, 243]
    capped = fastgrad.Step(net, np.float32, max_batch_size=120, backend="numba")
    for B in (100, 101, 120):
        capped(theta, X[:B], y[:B])
    assert capped._results.rows == 120  # never past max_batch_size (allocated once there)


def test_the_callers_prange_chunk_size_is_restored():
    import numba

    net, theta, X, y = make_problem([5, 8, 3], B=10, dtype=np.float32)
    step = fastgrad.Step(net, np.float32, backend="numba")
    before = numba.set_parallel_chunksize(7)
    try:
        step(theta, X, y)
        fastgrad.backprop(net, theta, X, y, backend="numba")
        assert numba.get_parallel_chunksize() == 7
    finally:
        numba.set_parallel_chunksize(before)
