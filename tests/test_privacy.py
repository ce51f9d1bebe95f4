"""fastgrad.privacy and clipped_grad's DP options: the accountant wrapper against dp-accounting
itself, calibration, Poisson sampling, the secure noise, the denominator and the statistics."""

from __future__ import annotations

import math
import sys

import numpy as np
import pytest
from problems import make_problem
from scipy import stats

import fastgrad
from fastgrad import api, noise, privacy
from fastgrad._validation import check_inputs
from fastgrad.extras import MissingExtraError

dpa = pytest.importorskip("dp_accounting")

# ------------------------------------------------------------------ accounting

SETTINGS = [  # (σ, q, steps, δ): short runs, so the PLD accountant stays fast
    (1.1, 0.01, 200, 1e-5),
    (1.5, 0.05, 50, 1e-6),
    (3.0, 0.2, 10, 1e-3),
]


@pytest.mark.parametrize("accountant", ["rdp", "pld"])
@pytest.mark.parametrize("sigma, q, steps, delta", SETTINGS)
def test_epsilon_is_dp_accounting_called_directly(accountant, sigma, q, steps, delta):
    event = dpa.SelfComposedDpEvent(dpa.PoissonSampledDpEvent(q, dpa.GaussianDpEvent(sigma)), steps)
    direct = (dpa.rdp.RdpAccountant() if accountant == "rdp" else dpa.pld.PLDAccountant()).compose(event)
    assert privacy.epsilon(sigma, q, steps, delta, accountant) == direct.get_epsilon(delta)


def test_epsilon_grows_with_steps_and_sampling_rate_and_falls_with_noise():
    eps = privacy.epsilon(1.0, 0.01, 100, 1e-5)
    assert 0 < eps < math.inf
    assert privacy.epsilon(1.0, 0.01, 400, 1e-5) > eps
    assert privacy.epsilon(1.0, 0.04, 100, 1e-5) > eps
    assert privacy.epsilon(2.0, 0.01, 100, 1e-5) < eps
    assert privacy.epsilon(1.0, 0.01, 0, 1e-5) == 0.0
    assert privacy.epsilon(0.0, 0.01, 1, 1e-5) == math.inf
    # the PLD accountant is tighter than RDP's conversion
    assert privacy.epsilon(1.0, 0.01, 100, 1e-5, "pld") < eps


@pytest.mark.parametrize(
    "kwargs, exc, match",
    [
        (dict(noise_multiplier=-1.0), ValueError, "noise_multiplier"),
        (dict(noise_multiplier="1"), TypeError, "noise_multiplier"),
        (dict(noise_multiplier=math.inf), ValueError, "noise_multiplier"),
        (dict(sampling_rate=0.0), ValueError, "sampling_rate"),
        (dict(sampling_rate=1.5), ValueError, "sampling_rate"),
        (dict(sampling_rate=math.nan), ValueError, "sampling_rate"),
        (dict(steps=-1), ValueError, "steps"),
        (dict(steps=2.5), TypeError, "steps"),
        (dict(steps=True), TypeError, "steps"),
        (dict(delta=0.0), ValueError, "delta"),
        (dict(delta=1.0), ValueError, "delta"),
        (dict(accountant="prv"), ValueError, "accountant"),
    ],
)
def test_epsilon_bad_arguments_name_the_argument(kwargs, exc, match):
    args = dict(noise_multiplier=1.0, sampling_rate=0.01, steps=10, delta=1e-5) | kwargs
    with pytest.raises(exc, match=match):
        privacy.epsilon(**args)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(target_epsilon=0.0), "target_epsilon"),
        (dict(target_epsilon=math.inf), "target_epsilon"),
        (dict(steps=0), "steps"),
        (dict(delta=2.0), "delta"),
        (dict(tol=0.0), "tol"),
        (dict(accountant="gdp"), "accountant"),
    ],
)
def test_calibration_bad_arguments_name_the_argument(kwargs, match):
    args = dict(target_epsilon=1.0, delta=1e-5, sampling_rate=0.01, steps=10) | kwargs
    with pytest.raises(ValueError, match=match):
        privacy.calibrate_noise_multiplier(**args)


def test_a_missing_dp_accounting_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "dp_accounting", None)  # import dp_accounting now fails
    with pytest.raises(MissingExtraError, match=r'pip install "fastgrad\[dp\]"'):
        privacy.epsilon(1.0, 0.01, 10, 1e-5)
    with pytest.raises(MissingExtraError, match="dp"):
        privacy.calibrate_noise_multiplier(1.0, 1e-5, 0.01, 10)
    # sampling and noise do not need the extra
    assert len(list(privacy.poisson_batches(10, 0.5, 3, seed=0))) == 3


@pytest.mark.parametrize(
    "accountant, target, q, steps, delta",
    [("rdp", 1.0, 0.01, 500, 1e-5), ("rdp", 3.0, 0.05, 100, 1e-5), ("pld", 0.3, 0.05, 20, 1e-5)],
)
def test_calibration_round_trips(accountant, target, q, steps, delta):
    tol = 1e-3  # (a PLD evaluation costs 0.2-2 s: the PLD case is a short, noisy run)
    sigma = privacy.calibrate_noise_multiplier(target, delta, q, steps, accountant, tol=tol)
    eps = privacy.epsilon(sigma, q, steps, delta, accountant)
    assert eps <= target  # never over budget
    assert eps > 0.99 * target  # and not much noisier than needed
    assert privacy.epsilon(sigma - 2 * tol, q, steps, delta, accountant) > target  # within tol of the least σ


# ------------------------------------------------------------ Poisson sampling


def test_poisson_batch_sizes_are_binomial_and_every_sample_equally_likely():
    N, q, steps = 400, 0.05, 3000
    batches = list(privacy.poisson_batches(N, q, steps, seed=123))
    sizes = np.array([len(b) for b in batches])
    assert abs(sizes.mean() - N * q) < 4 * math.sqrt(N * q * (1 - q) / steps)
    # chi-square of the size histogram against Binomial(N, q), tails pooled
    edges = np.arange(10, 31)  # bins: < 10, 10..29 one each, ≥ 30
    observed = np.array([(sizes < 10).sum(), *[(sizes == k).sum() for k in edges[:-1]], (sizes >= 30).sum()])
    pmf = stats.binom(N, q)
    expected = steps * np.array([pmf.cdf(9), *pmf.pmf(edges[:-1]), pmf.sf(29)])
    assert observed.sum() == steps
    assert stats.chisquare(observed, expected).pvalue > 1e-3
    # each sample's inclusion count is Binomial(steps, q)
    counts = np.bincount(np.concatenate(batches), minlength=N)
    assert stats.chisquare(counts).pvalue > 1e-3
    for b in batches[:50]:
        assert b.dtype == np.int64 and np.all(np.diff(b) > 0) and (b.size == 0 or 0 <= b[0] <= b[-1] < N)


def test_poisson_batches_are_reproducible_with_a_seed_and_secure_ones_are_not_seeded():
    a = list(privacy.poisson_batches(100, 0.3, 5, seed=7))
    b = list(privacy.poisson_batches(100, 0.3, 5, seed=7))
    c = list(privacy.poisson_batches(100, 0.3, 5, seed=8))
    assert all(np.array_equal(x, y) for x, y in zip(a, b))
    assert not all(np.array_equal(x, y) for x, y in zip(a, c))
    sizes = [len(b) for b in privacy.poisson_batches(1000, 0.3, 40, secure=True)]
    assert abs(np.mean(sizes) - 300) < 4 * math.sqrt(1000 * 0.3 * 0.7 / 40)
    with pytest.raises(ValueError, match="seed"):
        privacy.poisson_batches(100, 0.3, 5, seed=1, secure=True)


@pytest.mark.parametrize(
    "kwargs, exc, match",
    [
        (dict(num_samples=0), ValueError, "num_samples"),
        (dict(sampling_rate=0), ValueError, "sampling_rate"),
        (dict(steps=-2), ValueError, "steps"),
        (dict(seed=-1), ValueError, "seed"),
        (dict(seed=0.5), TypeError, "seed"),
        (dict(secure="yes"), TypeError, "secure"),
    ],
)
def test_poisson_batches_check_their_arguments_at_the_call(kwargs, exc, match):
    args = dict(num_samples=10, sampling_rate=0.5, steps=3) | kwargs
    with pytest.raises(exc, match=match):
        privacy.poisson_batches(**args)  # no iteration needed


# ----------------------------------------------------------------------- noise


def test_secure_noise_is_standard_normal_unseeded_and_fresh():
    z = privacy.standard_normal(200_001, secure=True)
    assert z.shape == (200_001,) and z.dtype == np.float64
    assert abs(z.mean()) < 4 / math.sqrt(z.size)
    assert z.std() == pytest.approx(1.0, abs=0.01)
    assert stats.kstest(z, "norm").pvalue > 1e-3
    assert not np.array_equal(
        privacy.standard_normal(16, secure=True), privacy.standard_normal(16, secure=True)
    )
    assert privacy.standard_normal(5, np.float32, secure=True).dtype == np.float32
    with pytest.raises(ValueError, match="seed"):
        privacy.standard_normal(5, seed=0, secure=True)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_default_noise_is_the_counter_based_generator_keyed_by_the_seed_sequence(dtype):
    words = tuple(int(w) for w in np.random.SeedSequence((3, 1, 4)).generate_state(3, np.uint32))
    np.testing.assert_array_equal(
        privacy.standard_normal(50, dtype, seed=(3, 1, 4)), noise.standard_normal_reference(50, dtype, words)
    )
    ss = np.random.SeedSequence(9, spawn_key=(2,))  # a SeedSequence is used as it is
    np.testing.assert_array_equal(
        privacy.standard_normal(7, dtype, ss), privacy.standard_normal(7, dtype, ss)
    )
    g1, g2 = np.random.default_rng(4), np.random.default_rng(4)  # a Generator advances
    first = privacy.standard_normal(7, dtype, g1)
    np.testing.assert_array_equal(first, privacy.standard_normal(7, dtype, g2))
    assert not np.array_equal(first, privacy.standard_normal(7, dtype, g1))


# ------------------------------------------------------------- clipped_grad


@pytest.fixture(scope="module")
def problem():
    return make_problem([5, 7, 3], "tanh", "cross_entropy", B=12, seed=2)


def _old_formula(net, theta, X, y, C, sigma, seed, backend):
    """clipped_grad's step spelt out: (clipped sum + dt(σC) ξ) / dt(B), each operation in θ's dtype,
    ξ = privacy.standard_normal(P, dt, seed)."""
    inp = check_inputs(net, theta, X, y)
    dt = inp.dtype
    total = api.run_backend(backend, net, inp, frozenset({"loss"}), C)["clipped_sum"]
    if sigma > 0:
        total = total + dt.type(sigma * C) * privacy.standard_normal(net.num_params, dt, seed)
    return total / dt.type(inp.batch_size)


@pytest.mark.parametrize("backend", ["naive", "numpy", "numba"])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("sigma", [0.0, 1.3])
def test_the_default_call_keeps_its_bits(problem, backend, dtype, sigma):
    net, theta, X, y = problem
    theta = theta.astype(dtype)
    got = fastgrad.clipped_grad(net, theta, X, y, 0.2, sigma, seed=5, backend=backend)
    np.testing.assert_array_equal(got, _old_formula(net, theta, X, y, 0.2, sigma, 5, backend))
    stats_ = fastgrad.clipped_grad(net, theta, X, y, 0.2, sigma, seed=5, backend=backend, return_stats=True)
    np.testing.assert_array_equal(stats_.grad, got)  # the statistics change nothing


@pytest.mark.parametrize("backend", ["naive", "numpy", "numba"])
def test_stats_are_backprops_norms_and_a_direct_count(problem, backend):
    net, theta, X, y = problem
    G = fastgrad.backprop(net, theta, X, y, ("per_sample",), backend="naive").per_sample
    direct = np.linalg.norm(G, axis=1)
    s = np.sort(direct)
    C = float((s[4] + s[5]) / 2)  # 7 of the 12 samples lie above C, none within rounding of it
    res = fastgrad.clipped_grad(net, theta, X, y, C, 0.5, seed=0, backend=backend, return_stats=True)
    assert isinstance(res, fastgrad.ClippedGrad)
    np.testing.assert_array_equal(
        res.norms, fastgrad.backprop(net, theta, X, y, ("norms",), backend=backend).norms
    )
    np.testing.assert_allclose(res.norms, direct, rtol=1e-12)
    assert res.clip_fraction == np.count_nonzero(direct > C) / len(X) == 7 / 12
    assert res.noise_std == 0.5 * C
    assert res.denominator == len(X) == res.batch_size
    assert "clip_fraction=0.5833" in repr(res)


def test_expected_batch_size_is_the_denominator(problem):
    net, theta, X, y = problem
    C, sigma, B, E = 0.3, 0.9, len(X), 20.5
    by_b = fastgrad.clipped_grad(net, theta, X, y, C, sigma, seed=3)
    by_e = fastgrad.clipped_grad(net, theta, X, y, C, sigma, seed=3, expected_batch_size=E, return_stats=True)
    np.testing.assert_allclose(by_e.grad * E, by_b * B, rtol=1e-13)
    assert by_e.denominator == E
    np.testing.assert_array_equal(
        fastgrad.clipped_grad(net, theta, X, y, C, expected_batch_size=B),
        fastgrad.clipped_grad(net, theta, X, y, C),
    )


def test_secure_noise_in_clipped_grad_has_the_stated_scale():
    net, theta, X, y = make_problem([20, 30, 10], "relu", "mse", B=8, seed=5)
    C, sigma, B = 0.7, 1.3, len(X)
    clean = fastgrad.clipped_grad(net, theta, X, y, C)
    a = fastgrad.clipped_grad(net, theta, X, y, C, sigma, secure_noise=True)
    b = fastgrad.clipped_grad(net, theta, X, y, C, sigma, secure_noise=True)
    assert not np.array_equal(a, b)
    xi = (a - clean) * B / (sigma * C)
    assert abs(xi.mean()) < 4 / math.sqrt(xi.size)
    assert xi.std() == pytest.approx(1.0, abs=0.1)


@pytest.mark.parametrize(
    "kwargs, exc, match",
    [
        (dict(seed=1.5), TypeError, "seed"),
        (dict(seed=-3), ValueError, "seed"),
        (dict(seed=(1, "a")), TypeError, "seed"),
        (dict(seed=[]), ValueError, "seed"),
        (dict(seed=4, secure_noise=True), ValueError, "seed"),
        (dict(secure_noise=1), TypeError, "secure"),
        (dict(expected_batch_size=0), ValueError, "expected_batch_size"),
        (dict(expected_batch_size=math.nan), ValueError, "expected_batch_size"),
        (dict(expected_batch_size="8"), TypeError, "expected_batch_size"),
        (dict(return_stats="yes"), TypeError, "return_stats"),
    ],
)
def test_bad_dp_arguments_fail_before_any_kernel_runs(problem, monkeypatch, kwargs, exc, match):
    net, theta, X, y = problem

    def no_kernel(*args, **kw):
        raise AssertionError("a kernel ran before the arguments were checked")

    monkeypatch.setattr("fastgrad.reference.run_batched", no_kernel)
    with pytest.raises(exc, match=match):
        fastgrad.clipped_grad(net, theta, X, y, 1.0, 0.5, **kwargs)


def test_good_seeds_of_every_documented_kind(problem):
    net, theta, X, y = problem
    for seed in (None, 0, np.int64(3), (1, 2), [4], np.random.SeedSequence(5), np.random.default_rng(6)):
        assert fastgrad.clipped_grad(net, theta, X, y, 1.0, 0.5, seed=seed).shape == (net.num_params,)


# ------------------------------------------------------- training and the CLI


def test_dp_training_is_a_hand_written_poisson_dp_sgd_loop():
    from fastgrad.tools.datasets import make_spirals
    from fastgrad.tools.train import evaluate, train_compare

    train = make_spirals(num_samples=120, seed=1)
    net = fastgrad.MLP([2, 6, 3], activation="tanh", loss="cross_entropy")
    B, lr, C, sigma, seed = 20, 0.3, 0.5, 0.8, 4
    res = train_compare(
        net,
        train,
        methods=("dp_sgd",),
        epochs=2,
        batch_size=B,
        lr=lr,
        seed=seed,
        dtype=np.float64,
        max_norm=C,
        noise_multiplier=sigma,
    )
    theta = net.init(seed=seed, dtype=np.float64)
    steps = train.num_samples // B
    batches = list(
        privacy.poisson_batches(train.num_samples, B / train.num_samples, 2 * steps, seed=(seed, 0, 1))
    )
    losses, fractions = [evaluate(net, theta, train)[0]], []
    for epoch in (1, 2):
        clipped = seen = 0
        for s in range(steps):
            idx = batches[(epoch - 1) * steps + s]
            G = fastgrad.backprop(net, theta, train.X[idx], train.y[idx], ("per_sample",), "naive").per_sample
            clipped, seen = clipped + np.count_nonzero(np.linalg.norm(G, axis=1) > C), seen + len(idx)
            theta -= lr * fastgrad.clipped_grad(
                net, theta, train.X[idx], train.y[idx], C, sigma, (seed, epoch, s), expected_batch_size=B
            )
        losses.append(evaluate(net, theta, train)[0])
        fractions.append(clipped / seen)
    h = res.histories["dp_sgd"]
    np.testing.assert_allclose(h.train_loss, losses, rtol=1e-10)
    assert h.clip_fraction[1:] == pytest.approx(fractions, abs=1e-12)
    q, dp = B / train.num_samples, res.dp
    assert (dp.noise_multiplier, dp.sampling_rate, dp.steps_per_epoch) == (sigma, q, steps)
    assert h.epsilon == [
        0.0,
        privacy.epsilon(sigma, q, steps, 1e-5),
        privacy.epsilon(sigma, q, 2 * steps, 1e-5),
    ]
    assert "ε spent" in res.dp_table()


def _epsilons(stdout: str) -> list[float]:
    rows = stdout[stdout.index("ε spent") :].splitlines()[2:]
    return [float(r.split()[1]) for r in rows if r.split() and r.split()[0].isdigit()]


def test_cli_with_epsilon_reports_an_epsilon_within_the_target(capsys):
    from fastgrad.tools import cli

    argv = [
        "train",
        "--backend",
        "numpy",
        "--epochs",
        "3",
        "--hidden",
        "6",
        "--batch-size",
        "40",
        "--dp",
        "--epsilon",
        "2.5",
        "--delta",
        "1e-4",
        "--no-progress",
    ]
    assert cli.main(argv) == 0
    out = capsys.readouterr().out
    eps = _epsilons(out)
    assert len(eps) == 3 and eps == sorted(eps)
    assert 0.99 * 2.5 < eps[-1] <= 2.5
    assert "calibrated for ε = 2.5" in out and "clipped" in out


def test_cli_dp_without_dp_accounting_trains_but_epsilon_needs_the_extra(capsys, monkeypatch):
    from fastgrad.tools import cli

    monkeypatch.setitem(sys.modules, "dp_accounting", None)
    argv = [
        "train",
        "--backend",
        "numpy",
        "--epochs",
        "1",
        "--hidden",
        "4",
        "--batch-size",
        "80",
        "--dp",
        "--no-progress",
    ]
    assert cli.main(argv) == 0
    assert "ε not computed: privacy accounting needs the optional package" in capsys.readouterr().out
    assert cli.main([*argv, "--epsilon", "1"]) == 2
    assert 'pip install "fastgrad[dp]"' in capsys.readouterr().err


def test_cli_refuses_dp_settings_without_dp(capsys):
    from fastgrad.tools import cli

    assert cli.main(["train", "--epsilon", "1", "--no-progress"]) == 2
    assert "--dp" in capsys.readouterr().err


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("how", ["seeded", "no noise", "secure"])
def test_dp_step_with_an_update_gives_the_bits_of_the_step_then_sgd_update(dtype, how):
    """``dp_step(..., update=(θ, pack))``: in the compiled noise pass (seeded), else after the step; the same
    θ, momentum and step as dp_step followed by the separate pass, the step first scaled as the pack says."""
    from fastgrad.update import FRESH, KEEP, LR, MOMENTUM, NESTEROV, SCALE, WEIGHT_DECAY, sgd_update

    P, B = 9000, 6  # blocks of 4096 (the noise's) and a part block
    rng = np.random.default_rng(3)
    total = rng.standard_normal(P).astype(dtype)
    norms = rng.uniform(0.5, 2.0, B).astype(dtype)
    theta0 = rng.standard_normal(P).astype(dtype)
    segments = np.array([[0, 5000, 1], [5000, P, 0]], np.int64)
    coef = np.zeros(5, dtype)
    coef[[LR, MOMENTUM, KEEP, WEIGHT_DECAY, SCALE]] = (0.1, 0.9, 1.0, 1e-3, 0.5)
    modes = np.zeros(4, np.int64)
    modes[NESTEROV] = 1
    sigma, seed, secure = {
        "seeded": (1.0, 7, False),
        "no noise": (0.0, None, False),
        "secure": (1.0, None, True),
    }[how]
    buf0 = rng.standard_normal(P).astype(dtype)
    theta_a, buf_a, out_a = theta0.copy(), buf0.copy(), np.empty(P, dtype)
    theta_b, buf_b, out_b = theta0.copy(), buf0.copy(), np.empty(P, dtype)
    step_a = privacy.dp_step(total, norms, 1.0, sigma, 5.0, seed, secure=secure, out=out_a)
    sgd_update(theta_a, step_a, (buf_a, segments, coef, modes))
    step_b = privacy.dp_step(
        total,
        norms,
        1.0,
        sigma,
        5.0,
        seed,
        secure=secure,
        out=out_b,
        update=(theta_b, (buf_b, segments, coef, modes)),
    )
    assert step_b is out_b and not np.array_equal(theta_b, theta0) and segments[0, FRESH] == 1
    if how != "secure":  # a secure draw is not reproducible: compare the update of the step it drew
        assert (
            np.array_equal(out_a, out_b) and np.array_equal(theta_a, theta_b) and np.array_equal(buf_a, buf_b)
        )
    else:
        theta_c, buf_c = theta0.copy(), buf0.copy()
        sgd_update(theta_c, out_b / dtype(0.5), (buf_c, segments, coef, modes))  # out_b was scaled in place
        assert np.allclose(theta_c, theta_b, rtol=1e-6) and np.allclose(buf_c, buf_b, rtol=1e-6)
    with pytest.raises(ValueError, match="update: θ must be a writeable C-contiguous"):
        privacy.dp_step(
            total, norms, 1.0, sigma, 5.0, seed, update=(theta0[::2], (buf_b, segments, coef, modes))
        )
