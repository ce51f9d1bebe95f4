"""fastgrad.torch.SGD: the parameters and momentum buffers of torch.optim.SGD, bit for bit, from one
compiled pass over the flat θ; schedulers, state_dict and the fall-backs to torch's update."""

from __future__ import annotations

import copy
import itertools
import os
import subprocess
import sys
from pathlib import Path

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
