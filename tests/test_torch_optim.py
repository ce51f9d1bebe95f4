"""fastgrad.torch.SGD: the parameters and momentum buffers of torch.optim.SGD, bit for bit, from one
compiled pass over the flat θ; schedulers, state_dict and the fall-backs to torch's update."""

from __future__ import annotations

import copy
import itertools
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
ft = pytest.importorskip("fastgrad.torch")
pytest.importorskip("numba")
nn = torch.nn
ROOT = Path(__file__).resolve().parent.parent

OPTIONS = [  # torch.optim.SGD's options, each path of the update
    dict(lr=0.1),
    dict(lr=0.1, momentum=0.9),
    dict(lr=0.03, momentum=0.9, dampening=0.1, weight_decay=1e-3),
    dict(lr=0.05, momentum=0.8, nesterov=True, weight_decay=1e-4),
    dict(lr=0.1, momentum=0.9, maximize=True),
    dict(lr=0.02, weight_decay=1e-2, maximize=True),
]


def twins(dtype, sizes=(200, 90, 5), seed=0):
    """Two identical models, each with its own GradStep. P = 18,545 > UPDATE_BLOCK: the first layer's
    weight spans two of the update's blocks."""
    torch.manual_seed(seed)
    layers = []
    for a, b in itertools.pairwise(sizes):
        layers += [nn.Linear(a, b), nn.Tanh()]
    model = nn.Sequential(*layers[:-1]).to(dtype)
    a, b = model, copy.deepcopy(model)
    return a, ft.GradStep(a, nn.CrossEntropyLoss()), b, ft.GradStep(b, nn.CrossEntropyLoss())


def batch(dtype, k, sizes=(200, 90, 5), B=16):
    g = torch.Generator().manual_seed(100 + k)
    return torch.randn(B, sizes[0], generator=g, dtype=dtype), torch.randint(0, sizes[-1], (B,), generator=g)


def side_by_side(step_a, step_b, opt_a, opt_b, dtype, ks, between=lambda: None, check=lambda k: None):
    """For each k in ks: both steps on batch k, ``between()``, both optimizers' steps, ``check(k)``."""
    for k in ks:
        X, y = batch(dtype, k)
        step_a(X, y)
        step_b(X, y)
        between()
        opt_a.step()
        opt_b.step()
        check(k)


def same(model_a, model_b) -> bool:
    return all(torch.equal(p, q) for p, q in zip(model_a.parameters(), model_b.parameters()))


def same_buffers(opt_a, opt_b, model_a, model_b) -> bool:
    return all(
        torch.equal(opt_a.state[p]["momentum_buffer"], opt_b.state[q]["momentum_buffer"])
        for p, q in zip(model_a.parameters(), model_b.parameters())
    )


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("options", OPTIONS, ids=lambda o: ",".join(f"{k}={v}" for k, v in o.items()))
def test_the_bits_of_torch_sgd_with_a_scheduler(dtype, options):
    ma, sa, mb, sb = twins(dtype)
    ref = torch.optim.SGD(ma.parameters(), **options)
    opt = ft.SGD(sb, **options)
    sched_a, sched_b = (torch.optim.lr_scheduler.StepLR(o, 2, gamma=0.5) for o in (ref, opt))
    for k in range(5):
        X, y = batch(dtype, k)
        ref.zero_grad()
        opt.zero_grad()  # p.grad = None: the next GradStep call hands the views back
        sa(X, y)
        sb(X, y)
        ref.step()
        opt.step()
        sched_a.step()
        sched_b.step()
        assert same(ma, mb), f"step {k}"
    assert opt.fused_steps == 5
    assert not same(ma, twins(dtype)[0])  # the steps moved the parameters
    if options.get("momentum"):
        assert same_buffers(ref, opt, ma, mb)
        assert opt.state[next(mb.parameters())]["momentum_buffer"].data_ptr() == opt._flat_buf.ctypes.data
    else:
        assert all("momentum_buffer" not in opt.state[p] for p in mb.parameters())


@pytest.mark.parametrize("direction", ["torch to fastgrad", "fastgrad to torch"])
def test_state_dict_moves_between_torch_sgd_and_fastgrad_sgd(direction):
    dt, options = torch.float32, dict(lr=0.05, momentum=0.9, weight_decay=1e-3)
    ma, sa, mb, sb = twins(dt)
    first = (
        torch.optim.SGD(ma.parameters(), **options)
        if direction == "torch to fastgrad"
        else ft.SGD(sa, **options)
    )
    for k in range(3):
        sa(*batch(dt, k))
        first.step()
    mb.load_state_dict(ma.state_dict())  # copies into mb's flat θ: still its GradStep's views
    state = copy.deepcopy(first.state_dict())
    second = (
        ft.SGD(sb, **options)
        if direction == "torch to fastgrad"
        else torch.optim.SGD(mb.parameters(), **options)
    )
    second.load_state_dict(state)

    def check(k):
        assert same(ma, mb) and same_buffers(first, second, ma, mb), f"step {k}"

    side_by_side(sa, sb, first, second, dt, range(3, 6), check=check)


def test_falls_back_to_torch_where_the_pass_cannot_stand_for_it():
    dt, options = torch.float64, dict(lr=0.1, momentum=0.9)
    ma, sa, mb, sb = twins(dt)
    ref, opt = torch.optim.SGD(ma.parameters(), **options), ft.SGD(sb, **options)

    def check(k):
        assert same(ma, mb) and same_buffers(ref, opt, ma, mb), f"step {k}"

    def both(k, between=lambda: None):
        side_by_side(sa, sb, ref, opt, dt, [k], between, check)

    both(0)
    assert opt.fused_steps == 1
    last = list(mb.parameters())[-1]
    last_a = list(ma.parameters())[-1]

    def own_grad():  # a gradient that is not the step's view: torch's update reads it
        last.grad = last.grad.clone()
        last_a.grad = last_a.grad.clone()

    both(1, own_grad)
    assert opt.fused_steps == 1

    def no_grad():  # a parameter without a gradient is skipped, by both
        last.grad = None
        last_a.grad = None

    both(2, no_grad)
    assert opt.fused_steps == 2
    opt._update = None  # as without Numba
    both(3)
    assert opt.fused_steps == 2
    both(4)


def test_closure_and_bad_arguments():
    ma, sa, mb, _ = twins(torch.float32)
    opt = ft.SGD(sa, lr=0.1)
    X, y = batch(torch.float32, 0)
    assert opt.step(lambda: sa(X, y)) == pytest.approx(nn.CrossEntropyLoss()(mb(X), y).item(), rel=1e-6)
    assert opt.fused_steps == 1
    with pytest.raises(TypeError, match="step: expected a fastgrad.torch.GradStep"):
        ft.SGD(ma.parameters(), lr=0.1)
    with pytest.raises(ValueError, match="learning rate"):
        ft.SGD(sa, lr=-1.0)
    with pytest.raises(ValueError, match="Nesterov"):
        ft.SGD(sa, lr=0.1, nesterov=True)


def test_autograd_sees_the_update_as_in_place():
    """As after torch's in-place update, a graph that saved the old parameters is refused."""
    _, _, mb, sb = twins(torch.float32)
    opt = ft.SGD(sb, lr=0.1)
    X, y = batch(torch.float32, 0)
    sb(X, y)
    out = nn.CrossEntropyLoss()(mb(X), y)  # saves the second layer's weight
    opt.step()
    assert opt.fused_steps == 1
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        out.backward()


def test_dp_step_with_fastgrad_sgd_matches_torch_sgd():
    dt = torch.float32
    ma, _, mb, _ = twins(dt)
    kw = dict(num_samples=64, expected_batch_size=16, max_norm=1.0, noise_multiplier=1.0, seed=3)
    da, db = ft.DPGradStep(ma, "cross_entropy", **kw), ft.DPGradStep(mb, "cross_entropy", **kw)
    ref, opt = torch.optim.SGD(ma.parameters(), lr=0.1, momentum=0.9), ft.SGD(db, lr=0.1, momentum=0.9)
    side_by_side(da, db, ref, opt, dt, range(3))
    assert same(ma, mb) and opt.fused_steps == 3
    for k in range(3, 6):  # the closure: the update in the noise's pass
        X, y = batch(dt, k)
        stats_a = da(X, y)
        ref.step()
        stats_b = opt.step(db.closure(X, y))
        assert isinstance(stats_b, ft.StepStats) and stats_b.loss == stats_a.loss
        assert np.array_equal(stats_b.norms, stats_a.norms)
        assert same(ma, mb) and same_buffers(ref, opt, ma, mb), f"step {k}"
    assert opt.fused_steps == 6 and da.steps == db.steps == 6
    X, y = batch(dt, 6)
    empty = X[:0], y[:0]  # a Poisson batch of no one: the noise alone, then the separate pass
    da(*empty)
    ref.step()
    opt.step(db.closure(*empty))
    assert same(ma, mb) and opt.fused_steps == 7


@pytest.mark.parametrize("loss", ["cross_entropy", "mse"])
@pytest.mark.parametrize("sigma", [0.0, 1.0])
@pytest.mark.parametrize("backend", ["numba", "numpy"])
def test_the_dp_closure_updates_in_the_noise_pass(loss, sigma, backend):
    """A DPGradStep's closure with fastgrad.torch.SGD: the update in the kernels' last pass with the noised
    step (numba), or in dp_step's pass (numpy; σ > 0: the compiled noise pass, σ = 0: after the division);
    the gradient scaled by 1/s first; torch.optim.SGD's bits."""
    dt = torch.float64 if backend == "numpy" else torch.float32
    ma, _, mb, _, data = closure_twins(dt, loss)
    kw = dict(
        num_samples=280, expected_batch_size=70, max_norm=0.5, noise_multiplier=sigma, seed=4, backend=backend
    )
    da, db = ft.DPGradStep(ma, loss, **kw), ft.DPGradStep(mb, loss, **kw)
    options = dict(lr=0.05, momentum=0.9, weight_decay=1e-3)
    ref, opt = torch.optim.SGD(ma.parameters(), **options), ft.SGD(db, **options)
    for k in range(3):
        X, y = data(k)
        stats_a = da(X, y)
        ref.step()
        stats_b = opt.step(db.closure(X, y))
        assert stats_b.loss == stats_a.loss and np.array_equal(stats_b.norms, stats_a.norms)
        assert torch.equal(da.grad, db.grad) and same(ma, mb) and same_buffers(ref, opt, ma, mb), f"step {k}"
    assert opt.fused_steps == 3


PLAIN_BUILD_CHECK = """
import torch, fastgrad.torch as ft
from tests.test_torch_optim import same, same_buffers, side_by_side, twins
assert not ft._torch_fuses_alpha_add(torch.zeros(1).numpy().dtype)
for dtype in (torch.float32, torch.float64):
    ma, sa, mb, sb = twins(dtype)
    options = dict(lr=0.05, momentum=0.8, dampening=0.1, nesterov=False, weight_decay=1e-3)
    ref, opt = torch.optim.SGD(ma.parameters(), **options), ft.SGD(sb, **options)
    side_by_side(sa, sb, ref, opt, dtype, range(3))
    assert same(ma, mb) and same_buffers(ref, opt, ma, mb) and opt.fused_steps == 3, dtype
print("ok")
"""


def test_the_bits_of_torch_sgd_in_torchs_plain_build():
    """Torch's plain CPU kernels (ATEN_CPU_CAPABILITY=default) round alpha-adds twice, not once: the
    probe sees it and the pass rounds the same way."""
    env = {**os.environ, "ATEN_CPU_CAPABILITY": "default"}
    command = [sys.executable, "-c", PLAIN_BUILD_CHECK]
    out = subprocess.run(command, env=env, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0 and out.stdout.strip().endswith("ok"), out.stderr[-2000:]


# ------------------------------------------- opt.step(step.closure(X, y)): the update in the kernels


def closure_twins(dtype, loss="cross_entropy", sizes=(200, 90, 5)):
    """Two identical models with GradSteps for ``loss``; ``data(k)`` gives batch k (70 rows: two tiles)."""
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(sizes[0], sizes[1]), nn.Tanh(), nn.Linear(sizes[1], sizes[2])).to(dtype)
    a, b = model, copy.deepcopy(model)

    def data(k):
        g = torch.Generator().manual_seed(200 + k)
        X = torch.randn(70, sizes[0], generator=g, dtype=dtype)
        if loss == "cross_entropy":
            return X, torch.randint(0, sizes[-1], (70,), generator=g)
        if loss == "binary_cross_entropy":  # targets in [0, 1]
            return X, torch.rand(70, sizes[-1], generator=g, dtype=dtype)
        return X, torch.randn(70, sizes[-1], generator=g, dtype=dtype)

    return a, ft.GradStep(a, loss), b, ft.GradStep(b, loss), data


def run_closure_against_torch(dtype, options, loss="cross_entropy", steps=4):
    """torch.optim.SGD after ``step(X, y)`` against ``opt.step(step.closure(X, y))``, with a scheduler and a
    zero_grad(set_to_none) half-way: parameters, buffers, gradients and losses compared at every step."""
    ma, sa, mb, sb, data = closure_twins(dtype, loss)
    ref, opt = torch.optim.SGD(ma.parameters(), **options), ft.SGD(sb, **options)
    sched_a, sched_b = (torch.optim.lr_scheduler.StepLR(o, 2, gamma=0.5) for o in (ref, opt))
    for k in range(steps):
        if k == steps // 2:
            ref.zero_grad()
            opt.zero_grad()
        X, y = data(k)
        loss_a = sa(X, y)
        ref.step()
        loss_b = opt.step(sb.closure(X, y))
        sched_a.step()
        sched_b.step()
        assert loss_a == loss_b and same(ma, mb), f"step {k}"
        assert all(torch.equal(p.grad, q.grad) for p, q in zip(ma.parameters(), mb.parameters())), f"step {k}"
        if options.get("momentum"):
            assert same_buffers(ref, opt, ma, mb), f"step {k}"
    assert opt.fused_steps == steps
    assert not same(ma, closure_twins(dtype, loss)[0])
    return ma, mb, opt


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("options", OPTIONS, ids=lambda o: ",".join(f"{k}={v}" for k, v in o.items()))
def test_the_closure_updates_in_the_kernels_with_the_bits_of_torch_sgd(dtype, options):
    run_closure_against_torch(dtype, options)


@pytest.mark.parametrize("loss", ["mse", "binary_cross_entropy"])
def test_the_closure_scales_the_gradient_before_the_update(loss):
    """MSE and BCE: p.grad is fastgrad's gradient / s, made in the kernels' last pass too (s = K/2, K)."""
    run_closure_against_torch(torch.float32, dict(lr=0.05, momentum=0.9, weight_decay=1e-3), loss)


@pytest.mark.parametrize("how", ["chunks", "phase 2"])
def test_the_closure_updates_after_the_last_chunk_and_after_phase_2(monkeypatch, how):
    """A batch in three chunks (the update on the last only), or the gradient made by phase 2's GEMMs
    (no per-tile sums): the same bits."""
    from fastgrad.cpu import config

    if how == "chunks":
        monkeypatch.setattr(config, "WORKSPACE_BYTES", 16 * 1024)
    else:
        monkeypatch.setattr(config, "PARTIALS_BYTES", 0)
    _, _, opt = run_closure_against_torch(torch.float64, dict(lr=0.1, momentum=0.9, nesterov=True))
    call = opt._grad_step._step._prepared_call(70)
    if how == "chunks":
        assert call.chunk < 70 / 2
    else:
        assert call.partial.size == 0


def test_the_closure_refuses_bad_input_before_the_update():
    _, _, _, sb, data = closure_twins(torch.float32)
    opt = ft.SGD(sb, lr=0.1, momentum=0.9)
    opt.step(sb.closure(*data(0)))
    theta, buf = sb.theta.clone(), torch.from_numpy(opt._flat_buf).clone()
    X, y = data(1)
    X[3, 4] = float("nan")
    with pytest.raises(ValueError, match="X: contains NaN or Inf"):
        opt.step(sb.closure(X, y))
    y[0] = 7
    with pytest.raises(ValueError, match="y"):
        opt.step(sb.closure(data(1)[0], y))
    assert torch.equal(sb.theta, theta) and torch.equal(torch.from_numpy(opt._flat_buf), buf)
    assert opt.fused_steps == 1


def test_the_dp_closure_refuses_a_nonfinite_norm_before_the_update():
    """A sample whose gradient norm overflows: dp_step's FloatingPointError, and neither θ, the momentum
    buffers nor p.grad moves (the kernels make neither the noised step nor the update)."""
    _, _, mb, _, data = closure_twins(torch.float64)
    dp = ft.DPGradStep(mb, "cross_entropy", num_samples=280, expected_batch_size=70, max_norm=0.5,
                       noise_multiplier=1.0, seed=4)  # fmt: skip
    opt = ft.SGD(dp, lr=0.1, momentum=0.9)
    opt.step(dp.closure(*data(0)))
    theta, buf, grad = dp.theta.clone(), torch.from_numpy(opt._flat_buf).clone(), dp.grad.clone()
    X, y = data(1)
    X[3] *= 1e200
    with pytest.raises(FloatingPointError, match="sample 3 is (nan|inf)"):
        opt.step(dp.closure(X, y))
    with pytest.raises(FloatingPointError, match="sample 3 is (nan|inf)"):
        dp(X, y)
    assert torch.equal(dp.theta, theta) and torch.equal(dp.grad, grad)
    assert torch.equal(torch.from_numpy(opt._flat_buf), buf) and opt.fused_steps == 1
    assert dp.steps == 1  # a refused call released nothing: ε counts the one step taken


def test_the_closure_runs_hooks_and_falls_back_where_it_must():
    ma, sa, mb, sb, data = closure_twins(torch.float32)
    options = dict(lr=0.1, momentum=0.9)
    ref, opt = torch.optim.SGD(ma.parameters(), **options), ft.SGD(sb, **options)
    calls = []
    opt.register_step_pre_hook(lambda o, args, kwargs: calls.append("pre"))
    opt.register_step_post_hook(lambda o, args, kwargs: calls.append("post"))
    X, y = data(0)
    assert sa.closure(X, y)() == sa(X, y)  # a plain closure: any optimizer may call it
    ref.step()
    opt.step(sb.closure(X, y))
    assert calls == ["pre", "post"] and opt.fused_steps == 1 and same(ma, mb)
    other = ft.GradStep(copy.deepcopy(ma), "cross_entropy")
    X, y = data(1)
    sa(X, y)
    ref.step()
    sb(X, y)
    opt.step(other.closure(X, y))  # another step's closure: called as torch calls a closure, then the pass
    assert same(ma, mb) and opt.fused_steps == 2
    opt._update = None  # as without Numba: the closure, then torch's update
    X, y = data(2)
    sa(X, y)
    ref.step()
    opt.step(sb.closure(X, y))
    assert same(ma, mb) and opt.fused_steps == 2


def test_step_hooks_and_the_profiler_see_the_step_as_torch_shows_it():
    """Without hooks or a profiler the step skips torch's wrapper (its cost); with either, it goes through
    it: global and own hooks run once per step, and the profiler records ``Optimizer.step#SGD.step``."""
    from torch.optim.optimizer import register_optimizer_step_post_hook

    _, _, _, sb, data = closure_twins(torch.float32)
    opt = ft.SGD(sb, lr=0.1, momentum=0.9)
    assert not ft._step_hooks_or_profiler(opt)
    seen = []
    handle = register_optimizer_step_post_hook(lambda o, args, kwargs: seen.append(type(o).__name__))
    try:
        assert ft._step_hooks_or_profiler(opt)
        opt.step(sb.closure(*data(0)))
        sb(*data(1))
        opt.step()
    finally:
        handle.remove()
    assert seen == ["SGD", "SGD"] and opt.fused_steps == 2
    assert not ft._step_hooks_or_profiler(opt)
    with torch.profiler.profile() as prof:
        assert ft._step_hooks_or_profiler(opt)
        opt.step(sb.closure(*data(2)))
    assert "Optimizer.step#SGD.step" in {e.key for e in prof.key_averages()}
    assert opt.fused_steps == 3


def test_a_tensor_learning_rate_that_a_scheduler_fills_in_place():
    """torch's schedulers fill a tensor lr in place: each step must read its new value."""
    ma, sa, mb, sb, data = closure_twins(torch.float32)
    ref = torch.optim.SGD(ma.parameters(), lr=torch.tensor(0.1), momentum=0.9)
    opt = ft.SGD(sb, lr=torch.tensor(0.1), momentum=0.9)
    sched_a, sched_b = (torch.optim.lr_scheduler.StepLR(o, 1, gamma=0.5) for o in (ref, opt))
    for k in range(4):
        X, y = data(k)
        sa(X, y)
        ref.step()
        if k % 2:
            opt.step(sb.closure(X, y))
        else:
            sb(X, y)
            opt.step()
        sched_a.step()
        sched_b.step()
        assert same(ma, mb) and same_buffers(ref, opt, ma, mb), f"step {k}"
    assert opt.fused_steps == 4 and float(opt.param_groups[0]["lr"]) == pytest.approx(0.1 / 16)
