"""The training demo and the sweep: what they record must follow from the gradients they use."""

import numpy as np
import pytest

import fastgrad
from fastgrad.tools.datasets import make_spirals
from fastgrad.tools.train import evaluate, sweep_shortcut, train_compare


@pytest.fixture(scope="module")
def spirals():
    return make_spirals(num_samples=240, seed=0).split(0.25, seed=0)


def test_true_gradient_training_reproduces_a_hand_written_sgd_loop(spirals):
    train, _ = spirals
    net = fastgrad.MLP([2, 8, 3], activation="tanh", loss="cross_entropy")
    res = train_compare(
        net, train, methods=("true",), epochs=2, batch_size=30, lr=0.3, seed=5, dtype=np.float64
    )
    theta = net.init(seed=5, dtype=np.float64)
    rng = np.random.default_rng(5)
    orders = [rng.permutation(train.num_samples) for _ in range(2)]
    losses = [evaluate(net, theta, train)[0]]
    for order in orders:
        for s in range(train.num_samples // 30):
            idx = order[s * 30 : (s + 1) * 30]
            theta -= 0.3 * fastgrad.backprop(net, theta, train.X[idx], train.y[idx], backend="naive").grad
        losses.append(evaluate(net, theta, train)[0])
    np.testing.assert_allclose(res.histories["true"].train_loss, losses, rtol=1e-10)


def test_all_methods_start_from_the_same_theta_and_the_true_gradient_wins(spirals):
    train, test = spirals
    net = fastgrad.MLP([2, 16, 16, 3], activation="tanh", loss="cross_entropy")
    res = train_compare(
        net,
        train,
        test,
        methods=("true", "mean_error", "mean_input", "dp_sgd"),
        epochs=20,
        batch_size=20,
        lr=0.3,
        seed=0,
    )
    h = res.histories
    starts = {m: h[m].train_loss[0] for m in h}
    assert len(set(starts.values())) == 1
    for m in h:
        assert len(h[m].train_loss) == len(h[m].test_accuracy) == 21
    assert h["true"].train_loss[-1] < 0.5 * h["mean_error"].train_loss[-1]
    assert h["true"].train_loss[-1] < 0.5 * h["mean_input"].train_loss[-1]
    assert h["true"].test_accuracy[-1] > h["mean_error"].test_accuracy[-1]
    table = res.table()
    for m in h:
        assert m in table


def test_divergence_is_recorded_not_raised(spirals):
    train, _ = spirals
    net = fastgrad.MLP([2, 8, 3], activation="relu", loss="mse")
    res = train_compare(net, train, methods=("true",), epochs=3, batch_size=10, lr=1e30, seed=0)
    h = res.histories["true"]
    assert h.diverged_at == 1 and h.train_loss[-1] == np.inf
    assert "diverged" in res.table()


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"methods": ("sgd",)}, "methods"),
        ({"epochs": 0}, "epochs"),
        ({"batch_size": 10_000}, "batch_size"),
        ({"lr": -1.0}, "lr"),
    ],
)
def test_train_compare_rejects_bad_arguments(spirals, kwargs, message):
    net = fastgrad.MLP([2, 4, 3])
    with pytest.raises(ValueError, match=message):
        train_compare(net, spirals[0], **kwargs)


def test_train_compare_rejects_a_network_that_does_not_fit_the_data(spirals):
    with pytest.raises(ValueError, match="features"):
        train_compare(fastgrad.MLP([5, 4, 3]), spirals[0])
    with pytest.raises(ValueError, match="outputs"):
        train_compare(fastgrad.MLP([2, 4, 2]), spirals[0])


def test_sweep_finds_the_shortcut_exact_at_batch_one_and_wrong_at_larger_batches(spirals):
    train, _ = spirals
    res = sweep_shortcut(
        train, batch_sizes=(1, 32), depths=(0, 2), activations=("identity", "tanh"), width=8, seeds=2
    )
    by = {(p.axis, p.value): p for p in res.points}
    assert len(res.points) == 6
    for m in fastgrad.METHODS:
        assert by["batch_size", 1].rel_error[m] < 1e-12
        assert by["batch_size", 32].rel_error[m] > 0.1
    assert by["depth", 2].sizes == (2, 8, 8, 3)
    # the sweep's numbers are compare_shortcut's: recompute one point
    p = by["activation", "tanh"]
    net = fastgrad.MLP(p.sizes, activation="tanh", loss="cross_entropy")
    errs = []
    for s in range(2):
        idx = np.random.default_rng(1000 + s).choice(train.num_samples, size=64, replace=False)
        rep = fastgrad.compare_shortcut(net, net.init(seed=s, dtype=np.float64), train.X[idx], train.y[idx])
        errs.append(rep.row("mean_error").rel_error)
    assert p.rel_error["mean_error"] == pytest.approx(np.median(errs), rel=1e-12)


def test_sweep_with_linear_loss_and_identity_is_exact():
    # docs/design.md §4: identity network + linear loss: both shortcuts are exact
    data = make_spirals(num_samples=200)
    res = sweep_shortcut(
        data,
        loss="linear",
        batch_sizes=(16,),
        depths=(2,),
        activations=(),
        base_activation="identity",
        width=8,
        seeds=1,
    )
    for p in res.points:
        for m in fastgrad.METHODS:
            assert p.rel_error[m] < 1e-10


def test_plots_are_written_when_matplotlib_is_installed(spirals, tmp_path):
    pytest.importorskip("matplotlib")
    train, test = spirals
    net = fastgrad.MLP([2, 4, 3])
    train_compare(net, train, test, epochs=1, batch_size=60).plot(str(tmp_path / "t.png"))
    sweep_shortcut(train, batch_sizes=(4,), depths=(1,), activations=("relu",), width=4, seeds=1).plot(
        str(tmp_path / "s.png")
    )
    for name in ("t.png", "s.png"):
        assert (tmp_path / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_plots_return_the_path_written_with_png_added_when_there_is_no_extension(tmp_path, spirals):
    pytest.importorskip("matplotlib")
    train, test = spirals
    net = fastgrad.MLP([2, 4, 3], activation="tanh", loss="cross_entropy")
    res = train_compare(net, train, test, methods=("true",), epochs=1, batch_size=60)
    assert res.plot(str(tmp_path / "loss")) == str(tmp_path / "loss.png")
    assert (tmp_path / "loss.png").read_bytes()[:4] == b"\x89PNG" and not (tmp_path / "loss").exists()
    assert res.plot(str(tmp_path / "loss.svg")) == str(tmp_path / "loss.svg")
    sweep = sweep_shortcut(train, batch_sizes=(2,), depths=(), activations=(), width=4, seeds=1)
    assert sweep.plot(str(tmp_path / "sweep")) == str(tmp_path / "sweep.png")
    assert (tmp_path / "sweep.png").is_file()
