"""fastgrad.torch: p.grad as torch autograd leaves it, optimizers and state_dict unchanged, and the
DP step against Opacus. Gradients are compared by the relative error of the whole vector,
‖g − g_torch‖ / ‖g_torch‖: 1e-6 in float32, 1e-12 in float64 (a wrong scale or a missing layer
is off by far more)."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

import fastgrad

torch = pytest.importorskip("torch")
ft = pytest.importorskip("fastgrad.torch")
nn = torch.nn

TOL = {np.float32: 1e-6, np.float64: 1e-12}
TORCH_LOSS = {  # every loss with a PyTorch counterpart (the registry's torch module)
    q.name: getattr(nn, q.torch) for q in fastgrad.losses.REGISTRY.values() if q.torch
}


def rel(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def model_and_batch(
    activation="tanh", loss="cross_entropy", dtype=np.float32, sizes=(6, 9, 7, 4), B=24, seed=0
):
    net = fastgrad.MLP(list(sizes), activation=activation, loss=loss)
    theta = net.init(seed=seed, dtype=dtype)
    theta += np.random.default_rng(seed + 1).normal(0, 0.1, theta.shape).astype(dtype)  # non-zero biases
    rng = np.random.default_rng(seed + 2)
    X = torch.from_numpy(rng.standard_normal((B, sizes[0])).astype(dtype))
    entry = fastgrad.losses.REGISTRY[loss]
    y = entry.random_targets(rng, B, sizes[-1])
    y = torch.from_numpy(y if entry.labels else y.astype(dtype))
    return fastgrad.to_torch(net, theta), X, y


def flat_grad(model) -> np.ndarray:
    return torch.cat([p.grad.reshape(-1) for p in model.parameters()]).detach().numpy().copy()


def flat_params(model) -> np.ndarray:
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()]).numpy().copy()


def clone(model):
    twin = fastgrad.to_torch(*fastgrad.from_torch(model))
    twin.load_state_dict(model.state_dict())
    return twin


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("loss", list(TORCH_LOSS))
@pytest.mark.parametrize("activation", fastgrad.ACTIVATIONS)
def test_p_grad_and_loss_are_what_torch_autograd_gives(activation, loss, dtype):
    model, X, y = model_and_batch(activation, loss, dtype)
    ref = clone(model)
    step = ft.GradStep(model, TORCH_LOSS[loss]())
    got_loss = step(X, y)
    ref_loss = TORCH_LOSS[loss]()(ref(X), y)
    ref_loss.backward()
    assert got_loss == pytest.approx(ref_loss.item(), rel=TOL[dtype] * 10)
    assert rel(flat_grad(model), flat_grad(ref)) < TOL[dtype]
    for p, q in zip(model.parameters(), ref.parameters()):  # per tensor too: no layer mixed up
        assert p.grad.shape == q.grad.shape
        assert rel(p.grad.numpy(), q.grad.numpy()) < 10 * TOL[dtype]


def test_the_parameters_are_views_of_one_flat_theta_in_fastgrads_layout():
    model, X, y = model_and_batch()
    before = flat_params(model)
    step = ft.GradStep(model, "cross_entropy")
    np.testing.assert_array_equal(step.theta.numpy(), before)  # W_l (out, in) row-major, then b_l
    with torch.no_grad():
        model[0].weight[0, 0] = 5.0
    assert step.theta[0].item() == 5.0
    step(X, y)
    assert model[0].weight.grad.data_ptr() == step.grad.data_ptr()


def run_training(model, make_opt, make_sched, batches, use_fastgrad, loss="cross_entropy"):
    opt = make_opt(model.parameters())
    sched = make_sched(opt) if make_sched else None
    step = ft.GradStep(model, loss) if use_fastgrad else None
    for X, y in batches:
        opt.zero_grad()
        if use_fastgrad:
            step(X, y)
        else:
            TORCH_LOSS[loss]()(model(X), y).backward()
        opt.step()
        if sched:
            sched.step()
    return flat_params(model), opt


OPTIMIZERS = {
    "sgd-momentum": (lambda ps: torch.optim.SGD(ps, lr=0.1, momentum=0.9, weight_decay=1e-3), None),
    "adam-steplr": (
        lambda ps: torch.optim.Adam(ps, lr=0.01),
        lambda opt: torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.5),
    ),
}


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_optimizers_and_schedulers_train_to_the_same_parameters_as_torch_autograd(name, dtype):
    model, _, _ = model_and_batch(dtype=dtype)
    ref = clone(model)
    batches = [model_and_batch(dtype=dtype, seed=s)[1:] for s in range(5)]
    make_opt, make_sched = OPTIMIZERS[name]
    ours, _ = run_training(model, make_opt, make_sched, batches, True)
    theirs, _ = run_training(ref, make_opt, make_sched, batches, False)
    start = flat_params(model_and_batch(dtype=dtype)[0])
    assert rel(ours - start, theirs - start) < 10 * TOL[dtype]  # the updates, not just the parameters
    assert rel(ours, theirs) < TOL[dtype]


def test_state_dict_save_and_load_round_trip(tmp_path):
    model, _, _ = model_and_batch()
    batches = [model_and_batch(seed=s)[1:] for s in range(6)]
    make_opt = OPTIMIZERS["adam-steplr"][0]
    opt = make_opt(model.parameters())
    step = ft.GradStep(model, "cross_entropy")
    for X, y in batches[:3]:
        opt.zero_grad()
        step(X, y)
        opt.step()
    torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, tmp_path / "ckpt.pt")
    for X, y in batches[3:]:
        opt.zero_grad()
        step(X, y)
        opt.step()
    # a fresh model and step, loaded from the checkpoint after the step was made
    fresh = clone(model)
    fresh_step = ft.GradStep(fresh, "cross_entropy")
    fresh_opt = make_opt(fresh.parameters())
    ckpt = torch.load(tmp_path / "ckpt.pt")
    fresh.load_state_dict(ckpt["model"])
    fresh_opt.load_state_dict(ckpt["opt"])
    assert torch.equal(fresh_step.theta, torch.cat([p.reshape(-1) for p in ckpt["model"].values()]))
    for X, y in batches[3:]:
        fresh_opt.zero_grad()
        fresh_step(X, y)
        fresh_opt.step()
    np.testing.assert_array_equal(flat_params(fresh), flat_params(model))


def test_zero_grad_set_to_none_and_plain_zero_grad_both_work():
    model, X, y = model_and_batch()
    step = ft.GradStep(model, "cross_entropy")
    step(X, y)
    first = flat_grad(model)
    model.zero_grad(set_to_none=True)
    assert model[0].weight.grad is None
    step(X, y)
    np.testing.assert_array_equal(flat_grad(model), first)
    model.zero_grad(set_to_none=False)
    step(X, y)
    np.testing.assert_array_equal(flat_grad(model), first)


def test_non_contiguous_X_int32_labels_and_numpy_inputs_give_the_same_gradient():
    model, X, y = model_and_batch()
    step = ft.GradStep(model, "cross_entropy")
    step(X, y)
    expect = flat_grad(model)
    Xt = X.t().contiguous().t()  # same values, column-major strides
    assert not Xt.is_contiguous()
    for args in ((Xt, y), (X, y.to(torch.int32)), (X.numpy(), y.numpy()), (X.requires_grad_(True), y)):
        step(*args)
        np.testing.assert_array_equal(flat_grad(model), expect)


def test_a_moved_or_cast_model_is_refused_at_the_next_call():
    model, X, y = model_and_batch()
    step = ft.GradStep(model, "cross_entropy")
    model.double()
    with pytest.raises(RuntimeError, match="no longer lies in the step's flat theta"):
        step(X.double(), y)


@pytest.mark.parametrize(
    ("loss", "error", "message"),
    [
        (nn.CrossEntropyLoss(reduction="sum"), ValueError, "reduction='sum'"),
        (nn.CrossEntropyLoss(label_smoothing=0.1), ValueError, "label_smoothing"),
        (nn.CrossEntropyLoss(weight=torch.ones(4)), ValueError, "weight="),
        (nn.L1Loss(), TypeError, "got L1Loss"),
        ("linear", ValueError, "PyTorch counterpart"),
    ],
)
def test_unsupported_losses_are_refused_naming_loss(loss, error, message):
    model, _, _ = model_and_batch()
    with pytest.raises(error, match="loss: .*" + message.replace("(", r"\(").replace(")", r"\)")):
        ft.GradStep(model, loss)


def test_unsupported_modules_are_refused_before_any_parameter_is_touched():
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Dropout(0.1), nn.Linear(4, 2))
    ptr = model[0].weight.data_ptr()
    with pytest.raises(TypeError, match="module: layer 2 is Dropout"):
        ft.GradStep(model)
    assert model[0].weight.data_ptr() == ptr


def test_bad_batches_are_refused_naming_the_argument():
    model, X, y = model_and_batch()
    step = ft.GradStep(model, "cross_entropy")
    with pytest.raises(ValueError, match="y: labels must lie in"):
        step(X, y + 10)
    with pytest.raises(ValueError, match="X: expected 6 columns"):
        step(X[:, :5], y)
    with pytest.raises(TypeError, match="y: cross_entropy expects integer class labels"):
        step(X, y.float())


def test_importing_fastgrad_does_not_import_torch():
    code = "import sys, fastgrad; assert 'torch' not in sys.modules, 'torch imported'"
    subprocess.run([sys.executable, "-c", code], check=True)


# ------------------------------------------------------------------------ DP


def opacus_run(model, loss, data, batch, C, steps):
    """Opacus's make_private on a fixed-order DataLoader (no Poisson sampling), σ = 0: the
    p.grad of each step (flat), the per-sample norms, and the expected batch size. Skips the calling
    test where Opacus is not installed (only the tests against Opacus need it)."""
    pytest.importorskip("opacus")
    from opacus import PrivacyEngine

    X, y = data
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(X, y), batch_size=batch)
    opt = torch.optim.SGD(model.parameters(), lr=0.2)
    engine = PrivacyEngine()
    gsm, opt, loader = engine.make_private(
        module=model, optimizer=opt, data_loader=loader, noise_multiplier=0.0, max_grad_norm=C,
        poisson_sampling=False,
    )  # fmt: skip
    grads, norms = [], []
    for t, (xb, yb) in enumerate(loader):
        if t == steps:
            break
        opt.zero_grad()
        TORCH_LOSS[loss]()(gsm(xb), yb).backward()
        per = torch.cat([p.grad_sample.reshape(len(xb), -1) for p in gsm.parameters()], dim=1)
        norms.append(per.norm(dim=1).detach().numpy())
        opt.step()
        grads.append(torch.cat([p.grad.reshape(-1) for p in gsm.parameters()]).detach().numpy().copy())
    return grads, norms, opt.expected_batch_size


@pytest.mark.filterwarnings("ignore:Full backward hook is firing", "ignore:Secure RNG turned off")
@pytest.mark.parametrize("loss", list(TORCH_LOSS))
def test_dp_step_follows_opacus_make_private_step_for_step_without_noise(loss):
    batch, N, steps = 16, 64, 4
    model, X, y = model_and_batch("tanh", loss, np.float64, B=N)
    net, theta = fastgrad.from_torch(model, loss)
    s = ft.loss_scale(loss, net.n_out)
    C = float(np.median(fastgrad.backprop(net, theta, X, y, ("norms",)).norms / s))  # half are clipped
    ref = clone(model)
    grads, norms, E = opacus_run(ref, loss, (X, y), batch, C, steps)
    dp = ft.DPGradStep(model, loss, num_samples=N, expected_batch_size=E, max_norm=C, noise_multiplier=0.0)
    opt = torch.optim.SGD(model.parameters(), lr=0.2)
    clipped = 0
    for t in range(steps):
        idx = slice(t * batch, (t + 1) * batch)
        stats = dp(X[idx], y[idx])
        # torch-scale norms, equal at the first step; then the parameters drift apart by Opacus's
        # clip factor C/(‖h‖ + 1e-6), ours to a relative 1e-6/C
        np.testing.assert_allclose(stats.norms, norms[t], rtol=1e-12 if t == 0 else 1e-7)
        assert stats.clip_fraction == np.mean(norms[t] > C)
        clipped += stats.clip_fraction
        assert rel(flat_grad(model), grads[t]) < 1e-6 / C
        opt.step()
    assert 0 < clipped < steps  # some samples clipped, some not: both branches compared


def test_dp_step_with_noise_is_reproducible_and_has_the_noise_std_sigma_C_over_E():
    model, X, y = model_and_batch(sizes=(20, 100, 100, 10), B=32, dtype=np.float64)
    twin = clone(model)
    kw = dict(num_samples=320, expected_batch_size=32.0, max_norm=0.5, seed=3)
    quiet = ft.DPGradStep(clone(model), "cross_entropy", **kw, noise_multiplier=0.0)
    a = ft.DPGradStep(model, "cross_entropy", **kw, noise_multiplier=1.3)
    b = ft.DPGradStep(twin, "cross_entropy", **kw, noise_multiplier=1.3)
    quiet(X, y)
    a(X, y)
    b(X, y)
    np.testing.assert_array_equal(flat_grad(model), flat_grad(twin))
    noise = a.grad.numpy() - quiet.grad.numpy()
    expected_std = 1.3 * 0.5 / 32
    assert abs(noise.std() / expected_std - 1) < 0.05  # P = 12,170 normals: 5 % is ~5 standard errors
    assert abs(noise.mean()) < 5 * expected_std / np.sqrt(noise.size)
    a(X, y)
    assert not np.array_equal(a.grad.numpy(), b.grad.numpy())  # a new draw per step


def test_dp_batches_accounting_and_the_empty_batch():
    model, X, y = model_and_batch(B=100, dtype=np.float64)
    dp = ft.DPGradStep(model, "cross_entropy", num_samples=100, expected_batch_size=10, max_norm=1.0,
                       noise_multiplier=0.0, seed=4)  # fmt: skip
    batches = list(dp.batches(epochs=2))
    assert len(batches) == 20 == 2 * dp.steps_per_epoch
    kw = dict(num_samples=100, expected_batch_size=10, max_norm=1.0, noise_multiplier=0.0, seed=4)
    again = ft.DPGradStep(clone(model), "cross_entropy", **kw).batches(epochs=2)
    assert [b.tolist() for b in batches] == [b.tolist() for b in again]  # seeded: the same batches
    assert [b.tolist() for b in batches[:10]] != [
        b.tolist() for b in dp.batches()
    ]  # the next epoch: new ones
    assert 5 < np.mean([len(b) for b in batches]) < 15
    dp(X[:0], y[:0])  # Poisson may take no one: σ = 0 gives a zero gradient
    assert not flat_grad(model).any()
    assert dp.steps == 1
    assert dp.delta == 1e-3  # the power of ten below 1/N = 0.01
    with pytest.raises(TypeError, match="num_samples"):
        ft.DPGradStep(
            clone(model), num_samples=100.0, expected_batch_size=10, max_norm=1.0, noise_multiplier=1.0
        )
    with pytest.raises(ValueError, match="noise_multiplier, target_epsilon: give exactly one"):
        ft.DPGradStep(clone(model), num_samples=100, expected_batch_size=10, max_norm=1.0)
    with pytest.raises(ValueError, match="expected_batch_size: 200 exceeds num_samples"):
        ft.DPGradStep(
            clone(model), num_samples=100, expected_batch_size=200, max_norm=1.0, noise_multiplier=1.0
        )
    pytest.importorskip("dp_accounting")
    calibrated = ft.DPGradStep(clone(model), "cross_entropy", num_samples=100, expected_batch_size=10,
                               max_norm=1.0, target_epsilon=2.0, delta=1e-3, epochs=3, seed=0)  # fmt: skip
    for idx in calibrated.batches(epochs=3):
        calibrated(X[idx], y[idx])
    assert calibrated.steps == 30
    assert calibrated.epsilon() <= 2.0
    assert calibrated.epsilon() == pytest.approx(2.0, rel=0.01)  # calibrated: the budget is spent
    assert calibrated.epsilon() == fastgrad.privacy.epsilon(calibrated.noise_multiplier, 0.1, 30, 1e-3)


@pytest.mark.parametrize("kind", ["tensor", "ndarray"])
def test_dp_loader_gathers_the_batches_draws(kind):
    model, X, y = model_and_batch(B=60, loss="mse", dtype=np.float64)  # y (60, 4): rows are gathered
    if kind == "ndarray":
        X, y = X.numpy(), y.numpy()
    kw = dict(num_samples=60, expected_batch_size=6, max_norm=1.0, noise_multiplier=0.5, seed=9)
    dp = ft.DPGradStep(model, "mse", **kw)
    twin = ft.DPGradStep(clone(model), "mse", **kw)
    pairs = list(dp.loader(X, y, epochs=2))
    batches = list(twin.batches(epochs=2))
    assert len(pairs) == len(batches) == 20
    assert len({len(b) for b in batches}) > 1  # Poisson: sizes vary
    for (Xb, yb), idx in zip(pairs, batches):
        assert type(Xb) is type(X) and type(yb) is type(y)
        np.testing.assert_array_equal(np.asarray(Xb), np.asarray(X)[idx])
        np.testing.assert_array_equal(np.asarray(yb), np.asarray(y)[idx])
    assert [b.tolist() for b in twin.batches()] != [b.tolist() for b in batches[:10]]  # then new draws
    for Xb, yb in pairs[:3]:  # the batches step as X[idx], y[idx] do
        dp(Xb, yb)
    with pytest.raises(ValueError, match=r"X: expected 60 samples \(num_samples\)"):
        dp.loader(X[:59], y)
    with pytest.raises(ValueError, match=r"y: expected 60 samples"):
        dp.loader(X, y[:10])
    with pytest.raises(TypeError, match="y: expected a torch.Tensor or an ndarray, got list"):
        dp.loader(X, [0] * 60)


def _cuda_runs() -> bool:
    if not torch.cuda.is_available():
        return False
    return "cuda" in fastgrad.available_backends()


@pytest.mark.skipif(not _cuda_runs(), reason="needs a CUDA GPU for both torch and fastgrad's cuda backend")
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("loss", list(TORCH_LOSS))
def test_a_cuda_model_gets_p_grad_from_the_cuda_backend_as_autograd_gives(loss, dtype):
    model, X, y = model_and_batch("tanh", loss, dtype)
    ref = clone(model).cuda()
    model = model.cuda()
    X, y = X.cuda(), y.cuda()
    step = ft.GradStep(model, loss)
    assert step.backend == "cuda" and step.theta.is_cuda
    got = step(X, y)
    ref_loss = TORCH_LOSS[loss]()(ref(X), y)
    ref_loss.backward()
    assert got == pytest.approx(ref_loss.item(), rel=10 * TOL[dtype])
    g = torch.cat([p.grad.reshape(-1) for p in model.parameters()]).cpu().numpy()
    r = torch.cat([p.grad.reshape(-1) for p in ref.parameters()]).cpu().numpy()
    assert rel(g, r) < TOL[dtype]
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    opt.step()  # the optimizer updates the flat θ on the device
    assert torch.equal(step.theta[: model[0].weight.numel()].view_as(model[0].weight), model[0].weight)


def test_dp_step_is_clipped_grad_in_torch_scale_bit_for_bit_noise_included():
    # MSE on K = 4 outputs: s = 2, so ÷ s is exact and the bits can be compared
    model, X, y = model_and_batch("tanh", "mse", np.float64, B=20)
    net, theta = fastgrad.from_torch(model, "mse")
    dp = ft.DPGradStep(model, "mse", num_samples=60, expected_batch_size=20, max_norm=0.4,
                       noise_multiplier=0.9, seed=5)  # fmt: skip
    noise_seed = np.random.SeedSequence(5).spawn(3)[1]  # the step's noise stream: the root's 2nd child
    kw = dict(max_norm=2 * 0.4, noise_multiplier=0.9, expected_batch_size=20, return_stats=True)
    grads = []
    for _ in range(2):
        stats = dp(X, y)
        expect = fastgrad.clipped_grad(net, theta, X.numpy(), y.numpy(), seed=noise_seed.spawn(1)[0], **kw)
        np.testing.assert_array_equal(flat_grad(model), expect.grad / 2)
        np.testing.assert_array_equal(stats.norms, expect.norms / 2)
        assert stats.clip_fraction == expect.clip_fraction
        grads.append(flat_grad(model))
    assert not np.array_equal(grads[0], grads[1])  # call k draws the k-th noise
