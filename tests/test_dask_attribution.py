"""fastgrad.dask's per-sample inner products (gram, grad_dot, tracin) against the in-memory
functions on the concatenated rows and the naive definition from the (B, P) matrix, on Dask's
threads, the synchronous scheduler and a LocalCluster of two worker processes; tiles of bounded
size; the same bits on any scheduler."""

import numpy as np
import pytest

dask = pytest.importorskip("dask")
da = pytest.importorskip("dask.array")
distributed = pytest.importorskip("distributed")

import fastgrad  # noqa: E402
import fastgrad.dask as fdask  # noqa: E402
from problems import two_worker_client  # noqa: E402

N, M = 230, 150  # X in chunks of 64 (64, 64, 64, 38), X2 in chunks of 48 (48, 48, 48, 6)


def _naive_gram(net, theta, X, y, X2=None, y2=None, *, per_layer=False, backend="numpy"):
    P1 = fastgrad.backprop(net, theta, X, y, ("per_sample",), backend="naive").per_sample
    P2 = (
        P1
        if X2 is None
        else fastgrad.backprop(net, theta, X2, y2, ("per_sample",), backend="naive").per_sample
    )
    if per_layer:
        return np.stack([P1[:, s.w_start : s.end] @ P2[:, s.w_start : s.end].T for s in net.layers])
    return P1 @ P2.T


def _naive_dot(net, theta, X, y, v, *, backend="numpy"):
    return fastgrad.backprop(net, theta, X, y, ("per_sample",), backend="naive").per_sample @ v.astype(
        theta.dtype
    )


def _naive_tracin(net, checkpoints, X, y, X2=None, y2=None, *, backend="numpy"):
    return sum(eta * _naive_gram(net, th, X, y, X2, y2) for th, eta in checkpoints)


def problem(dtype=np.float64, loss="cross_entropy", seed=0):
    n_out = 3
    net = fastgrad.MLP([5, 7, 6, n_out], activation="tanh", loss=loss)
    rng = np.random.default_rng(seed)
    theta = net.init(seed=seed, dtype=dtype) + rng.normal(0, 0.1, net.num_params).astype(dtype)
    X, X2 = rng.standard_normal((N, 5)).astype(dtype), rng.standard_normal((M, 5)).astype(dtype)
    if loss == "cross_entropy":
        y, y2 = rng.integers(0, n_out, N), rng.integers(0, n_out, M)
    else:
        y, y2 = rng.standard_normal((N, n_out)).astype(dtype), rng.standard_normal((M, n_out)).astype(dtype)
    return net, theta, X, y, X2, y2


def chunked(X, y, rows):
    return da.from_array(X, chunks=(rows, -1)), da.from_array(y, chunks=(rows, *y.shape[1:]))


def rel_error(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def same_bits(a, b) -> bool:
    a, b = np.asarray(a), np.asarray(b)
    return a.dtype == b.dtype and a.shape == b.shape and a.tobytes() == b.tobytes()


def checkpoints(net, dtype, k=3):
    rng = np.random.default_rng(5)
    return [(net.init(seed=s, dtype=dtype) + rng.normal(0, 0.05, net.num_params).astype(dtype), 0.1 / (s + 1))
            for s in range(k)]  # fmt: skip


TOL = {np.float64: 1e-12, np.float32: 1e-5}


@pytest.fixture(scope="module")
def client():
    with two_worker_client() as c:
        yield c


# ---------------------------------------------------- agreement with the core


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("loss", ["cross_entropy", "mse"])
def test_cross_gram_tiles_match_the_in_memory_gram(dtype, loss):
    net, theta, X, y, X2, y2 = problem(dtype, loss)
    G = fdask.gram(net, theta, *chunked(X, y, 64), *chunked(X2, y2, 48), backend="numpy")
    assert G.shape == (N, M) and G.chunks == ((64, 64, 64, 38), (48, 48, 48, 6)) and G.dtype == dtype
    got = G.compute(scheduler="threads")
    assert got.dtype == dtype
    assert rel_error(got, fastgrad.gram(net, theta, X, y, X2, y2, backend="numpy")) <= TOL[dtype]
    assert rel_error(got, _naive_gram(net, theta, X, y, X2, y2)) <= TOL[dtype]


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_gram_of_a_dataset_against_itself_is_symmetric_and_matches(dtype):
    net, theta, X, y, _, _ = problem(dtype)
    G = fdask.gram(net, theta, *chunked(X, y, 64), backend="numpy")
    got = G.compute(scheduler="sync")
    assert got.shape == (N, N) and G.chunks == ((64, 64, 64, 38),) * 2
    assert same_bits(got, got.T)  # the lower blocks are the upper ones transposed
    assert rel_error(got, fastgrad.gram(net, theta, X, y, backend="numpy")) <= TOL[dtype]
    # the diagonal is the self-influence ‖∇ℓ_i‖²
    norms = fastgrad.backprop(net, theta, X, y, ("norms",), backend="numpy").norms
    assert rel_error(np.diag(got), norms.astype(np.float64) ** 2) <= 10 * TOL[dtype]


def test_per_layer_gram_tiles_are_the_layers_terms():
    net, theta, X, y, X2, y2 = problem()
    G = fdask.gram(net, theta, *chunked(X, y, 64), *chunked(X2, y2, 48), per_layer=True, backend="numpy")
    assert G.shape == (net.num_layers, N, M)
    got = G.compute(scheduler="threads")
    ref = fastgrad.gram(net, theta, X, y, X2, y2, per_layer=True, backend="numpy")
    assert rel_error(got, ref) <= 1e-12
    total = fdask.gram(net, theta, *chunked(X, y, 64), *chunked(X2, y2, 48), backend="numpy").compute()
    assert rel_error(got.sum(axis=0), total) <= 1e-12
    self_layers = fdask.gram(net, theta, *chunked(X, y, 64), per_layer=True, backend="numpy").compute()
    assert same_bits(self_layers, np.swapaxes(self_layers, 1, 2))


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_grad_dot_matches_and_keeps_X_row_chunks(dtype):
    net, theta, X, y, _, _ = problem(dtype, "mse")
    v = np.random.default_rng(3).standard_normal(net.num_params).astype(dtype)
    d = fdask.grad_dot(net, theta, *chunked(X, y, 64), v, backend="numpy")
    assert d.chunks == ((64, 64, 64, 38),) and d.dtype == dtype
    got = d.compute(scheduler="threads")
    assert rel_error(got, fastgrad.grad_dot(net, theta, X, y, v, backend="numpy")) <= TOL[dtype]
    assert rel_error(got, _naive_dot(net, theta, X, y, v)) <= TOL[dtype]


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_tracin_tiles_match_the_in_memory_tracin(dtype):
    net, _, X, y, X2, y2 = problem(dtype)
    ck = checkpoints(net, dtype)
    got = fdask.tracin(net, ck, *chunked(X, y, 64), *chunked(X2, y2, 48), backend="numpy").compute()
    assert got.shape == (N, M) and got.dtype == dtype
    assert rel_error(got, fastgrad.tracin(net, ck, X, y, X2, y2, backend="numpy")) <= TOL[dtype]
    assert rel_error(got, _naive_tracin(net, ck, X, y, X2, y2)) <= TOL[dtype]
    own = fdask.tracin(net, ck, *chunked(X, y, 64), backend="numpy").compute(scheduler="sync")
    assert rel_error(own, fastgrad.tracin(net, ck, X, y, backend="numpy")) <= TOL[dtype]


def test_empty_chunks_give_empty_blocks():
    net, theta, X, y, X2, y2 = problem()
    dX, dy = chunked(X, y, 64)
    dX, dy = da.concatenate([dX[:0], dX]), da.concatenate([dy[:0], dy])
    got = fdask.gram(net, theta, dX, dy, *chunked(X2, y2, 48), backend="numpy").compute(scheduler="sync")
    assert rel_error(got, fastgrad.gram(net, theta, X, y, X2, y2, backend="numpy")) <= 1e-12
    own = fdask.gram(net, theta, dX, dy, backend="numpy").compute(scheduler="sync")
    assert own.shape == (N, N)


def test_one_block_holds_two_chunks_only():
    # each task of the graph makes one block: its size is set by the chunks, not by N or M
    net, theta, X, y, X2, y2 = problem()
    G = fdask.gram(net, theta, *chunked(X, y, 64), *chunked(X2, y2, 48), backend="numpy")
    sizes = [np.prod(b) for b in (np.array([r, c]) for r in G.chunks[0] for c in G.chunks[1])]
    assert max(sizes) == 64 * 48
    assert len([k for k in dict(G.__dask_graph__()) if "inner_block" in str(k)]) == 16


def test_theta_and_v_are_one_key_each():
    import pickle

    net, theta, X, y, X2, y2 = problem()
    v = np.random.default_rng(3).standard_normal(net.num_params)
    dXY, dXY2 = chunked(X, y, 64), chunked(X2, y2, 48)
    for arr in (fdask.grad_dot(net, theta, *dXY, v, backend="numpy"), fdask.gram(net, theta, *dXY, *dXY2)):
        graph = dict(arr.__dask_graph__())
        assert len([k for k, t in graph.items() if theta.tobytes() in pickle.dumps(t)]) == 1
    graph = dict(fdask.grad_dot(net, theta, *chunked(X, y, 64), v, backend="numpy").__dask_graph__())
    assert len([k for k, t in graph.items() if v.tobytes() in pickle.dumps(t)]) == 1


# ------------------------------------------------------ on a LocalCluster


def test_the_same_bits_on_two_workers_one_worker_threads_and_sync(client):
    net, theta, X, y, X2, y2 = problem(np.float32)
    v = np.random.default_rng(3).standard_normal(net.num_params).astype(np.float32)
    ck = checkpoints(net, np.float32)
    dXY, dXY2 = chunked(X, y, 64), chunked(X2, y2, 48)
    lazy = {
        "gram": fdask.gram(net, theta, *dXY, *dXY2),
        "self gram": fdask.gram(net, theta, *dXY),
        "grad_dot": fdask.grad_dot(net, theta, *dXY, v),
        "tracin": fdask.tracin(net, ck, *dXY, *dXY2),
    }
    runs = {"two workers": dask.compute(*lazy.values(), scheduler=client)}
    with (
        distributed.LocalCluster(
            n_workers=1, threads_per_worker=1, processes=False, dashboard_address=":0"
        ) as one,
        distributed.Client(one, set_as_default=False) as c1,
    ):
        runs["one worker"] = dask.compute(*lazy.values(), scheduler=c1)
    for scheduler in ("threads", "sync"):
        runs[scheduler] = dask.compute(*lazy.values(), scheduler=scheduler)
    first = runs["two workers"]
    for label, values in runs.items():
        for name, a, b in zip(lazy, values, first):
            assert same_bits(a, b), (label, name)
    assert rel_error(first[0], fastgrad.gram(net, theta, X, y, X2, y2, backend="numba")) <= 1e-5


# ------------------------------------------------------------------ errors


def test_bad_arguments_are_refused_before_any_task():
    net, theta, X, y, X2, y2 = problem()
    dXY = chunked(X, y, 64)
    with pytest.raises(ValueError, match=r"y2: X2 was given without it"):
        fdask.gram(net, theta, *dXY, chunked(X2, y2, 48)[0])
    with pytest.raises(ValueError, match=r"X2: expected 5 columns"):
        fdask.gram(net, theta, *dXY, *chunked(X2[:, :4], y2, 48))
    with pytest.raises(TypeError, match=r"X2: expected a dask.array.Array"):
        fdask.gram(net, theta, *dXY, X2, y2)
    with pytest.raises(ValueError, match=r"y2: row chunks .* do not line up with X2's"):
        fdask.gram(net, theta, *dXY, chunked(X2, y2, 48)[0], da.from_array(y2, chunks=50))
    with pytest.raises(TypeError, match=r"per_layer: expected a bool"):
        fdask.gram(net, theta, *dXY, per_layer="yes")
    with pytest.raises(ValueError, match=r"v: expected shape \(111,\)"):
        fdask.grad_dot(net, theta, *dXY, np.zeros(92))
    with pytest.raises(TypeError, match=r"v: expected θ's dtype float64"):
        fdask.grad_dot(net, theta, *dXY, np.zeros(net.num_params, np.float32))
    with pytest.raises(ValueError, match=r"v: contains NaN"):
        fdask.grad_dot(net, theta, *dXY, np.full(net.num_params, np.nan))
    with pytest.raises(ValueError, match=r"checkpoints: empty"):
        fdask.tracin(net, [], *dXY)
    with pytest.raises(TypeError, match=r"checkpoints\[1\]: expected a pair \(theta_k, eta_k\)"):
        fdask.tracin(net, [(theta, 0.1), theta], *dXY)
    with pytest.raises(ValueError, match=r"checkpoints\[0\]: eta must be a finite real number"):
        fdask.tracin(net, [(theta, np.inf)], *dXY)
    with pytest.raises(TypeError, match=r"checkpoints\[1\]: theta has dtype float32"):
        fdask.tracin(net, [(theta, 0.1), (theta.astype(np.float32), 0.1)], *dXY)
    with pytest.raises(ValueError, match=r"checkpoints\[0\]: theta: contains NaN"):
        fdask.tracin(net, [(np.full_like(theta, np.nan), 0.1)], *dXY)


def test_a_bad_chunk_names_the_rows_of_its_block():
    net, theta, X, y, X2, y2 = problem()
    X2_nan = X2.copy()
    X2_nan[100, 1] = np.nan  # X2's third chunk, rows 96:144
    G = fdask.gram(net, theta, *chunked(X, y, 64), *chunked(X2_nan, y2, 48), backend="numpy")
    with pytest.raises(ValueError, match=r"against rows 96:144 of X2, y2 .*contains NaN"):
        G.compute(scheduler="sync")


def test_numba_blocks_match_the_in_memory_numba_gram_and_numpy_labels_are_split_like_X2():
    net, theta, X, y, X2, y2 = problem()
    dX, _ = chunked(X, y, 64)
    dX2, _ = chunked(X2, y2, 48)
    got = fdask.gram(net, theta, dX, y, dX2, y2).compute(scheduler="threads")  # y, y2 NumPy
    assert rel_error(got, fastgrad.gram(net, theta, X, y, X2, y2, backend="numba")) <= 1e-12
    ck = checkpoints(net, np.float64)
    got = fdask.tracin(net, ck, dX, y).compute(scheduler="threads")
    assert rel_error(got, fastgrad.tracin(net, ck, X, y, backend="numba")) <= 1e-12


def test_a_gram_far_larger_than_memory_allows_is_reduced_a_block_at_a_time():
    import tracemalloc

    net = fastgrad.MLP([20, 32, 10], activation="tanh", loss="cross_entropy")
    theta = net.init(seed=0, dtype=np.float64)
    rng = np.random.default_rng(0)
    n = 12_000  # the whole Gram: 1.07 GiB; a block of 1000 × 1000: 7.6 MiB
    X, y = chunked(rng.standard_normal((n, 20)), rng.integers(0, 10, n), 1000)
    fdask.gram(net, theta, X[:10], y[:10], backend="numpy").sum().compute(scheduler="sync")  # imports
    tracemalloc.start()
    try:
        fdask.gram(net, theta, X, y, backend="numpy").sum(axis=1).compute(scheduler="sync")
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 4 * 1000 * 1000 * 8, peak / 2**20  # measured 16-18 MiB: two blocks and the graph


def test_a_bad_chunk_of_a_self_gram_names_its_rows_in_X():
    net, theta, X, y, _, _ = problem()
    y_bad = y.copy()
    y_bad[70] = 5  # X's second chunk, rows 64:128
    G = fdask.gram(net, theta, *chunked(X, y_bad, 64), backend="numpy")
    with pytest.raises(ValueError, match=r"rows 0:64 of X, y against rows 64:128 of X, y .*labels must lie"):
        G[:64].compute(scheduler="sync")
