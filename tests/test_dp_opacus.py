"""fastgrad against Opacus (the ``peers``): one DPOptimizer step reproduced, and ε from Opacus's
own RDP accountant. The conventions used here are docs/dp.md's: fastgrad's loss is s × torch's
mean loss (s = 1 for cross-entropy, K/2 for MSE, K for BCE), so Opacus's clipping norm C is
fastgrad's s·C and Opacus's step is fastgrad's ÷ s, with the expected batch size as denominator.
"""

from __future__ import annotations

import numpy as np
import pytest
from problems import make_problem

import fastgrad
from fastgrad import privacy

torch = pytest.importorskip("torch")
opacus = pytest.importorskip("opacus")
pytest.importorskip("dp_accounting")

from opacus.accountants import RDPAccountant  # noqa: E402
from opacus.optimizers import DPOptimizer  # noqa: E402

LOSSES = {  # fastgrad loss -> (torch loss, scale s as a function of K outputs), for those with one
    q.name: (getattr(torch.nn, q.torch), q.scale) for q in fastgrad.losses.REGISTRY.values() if q.torch
}


def opacus_step(net, theta, X, y, C, sigma, E, seed):
    """Opacus's DPOptimizer step on (X, y): its gradient p.grad, flat in fastgrad's layout (float64),
    and its per-sample gradients grad_sample (B, P)."""
    model = opacus.GradSampleModule(fastgrad.to_torch(net, theta))
    opt = DPOptimizer(
        torch.optim.SGD(model.parameters(), lr=0.1),
        noise_multiplier=sigma,
        max_grad_norm=C,
        expected_batch_size=E,
        generator=torch.Generator().manual_seed(seed),
    )
    target = torch.from_numpy(y)
    target = target if fastgrad.losses.REGISTRY[net.loss].labels else target.double()
    opt.zero_grad()
    LOSSES[net.loss][0]()(model(torch.from_numpy(X)), target).backward()
    per_sample = torch.cat([p.grad_sample.reshape(len(X), -1) for p in model.parameters()], dim=1).numpy()
    opt.step()
    return torch.cat([p.grad.reshape(-1) for p in model.parameters()]).numpy(), per_sample


def opacus_noise(net, theta, std, seed):
    """The noise Opacus's DPOptimizer drew, replayed from its generator (per parameter, in order)."""
    g = torch.Generator().manual_seed(seed)
    shapes = [p.shape for p in fastgrad.to_torch(net, theta).parameters()]
    return torch.cat(
        [torch.normal(0, std, size=s, generator=g, dtype=torch.float64).reshape(-1) for s in shapes]
    ).numpy()


@pytest.mark.filterwarnings("ignore:Full backward hook is firing")  # X needs no gradient here
@pytest.mark.parametrize("loss", list(LOSSES))
@pytest.mark.parametrize("sigma", [0.0, 0.7])
def test_one_opacus_dp_optimizer_step_is_fastgrads_clipped_grad(loss, sigma):
    net, theta, X, y = make_problem([6, 8, 4], "tanh", loss, B=16, seed=7)
    s = LOSSES[loss][1](net.n_out)
    G = fastgrad.backprop(net, theta, X, y, ("per_sample",), backend="naive").per_sample
    torch_norms = np.linalg.norm(G, axis=1) / s
    C = float(np.median(torch_norms))  # Opacus's clipping norm: half the batch is clipped
    E, seed = 20, 3  # expected batch size ≠ B, as with Poisson sampling

    got, grad_sample = opacus_step(net, theta, X, y, C, sigma, E, seed)
    np.testing.assert_allclose(grad_sample, G / s, rtol=1e-10, atol=1e-14)  # Opacus's grad_sample = g_i / s
    noise = opacus_noise(net, theta, sigma * C, seed) / E if sigma > 0 else 0.0
    ours = fastgrad.clipped_grad(net, theta, X, y, s * C, expected_batch_size=E) / s + noise

    # Opacus clips with C / (‖h_i‖ + 1e-6), fastgrad with C / ‖h_i‖: each clipped factor differs
    # by less than 1e-6 / C relative, so each coordinate by less than that share of Σ_i c_i |g_i|
    fastgrad_c = np.minimum(1.0, C / torch_norms)
    scale = (fastgrad_c[:, None] * np.abs(G)).sum(axis=0) / (s * E)
    assert np.all(np.abs(got - ours) <= (1e-6 / C + 1e-12) * scale)
    assert np.abs(got - ours).max() > 0  # and the 1e-6 is really there
    # with the 1e-6 accounted for exactly, the two agree to rounding
    opacus_c = np.minimum(1.0, C / (torch_norms + 1e-6))
    accounted = ours + ((opacus_c - fastgrad_c)[:, None] * G).sum(axis=0) / (s * E)
    np.testing.assert_allclose(got, accounted, rtol=1e-10, atol=1e-13)


@pytest.mark.parametrize(
    "sigma, q, steps, delta",
    [
        (1.1, 256 / 60000, 60 * 234, 1e-5),
        (0.8, 0.01, 1000, 1e-5),
        (2.0, 0.05, 500, 1e-6),
        (4.0, 0.1, 50, 1e-5),
    ],
)
def test_opacus_rdp_accountant_agrees_with_fastgrads_rdp_epsilon(sigma, q, steps, delta):
    acc = RDPAccountant()
    acc.history = [(sigma, q, steps)]
    theirs = acc.get_epsilon(delta)
    ours = privacy.epsilon(sigma, q, steps, delta, "rdp")
    assert ours == pytest.approx(theirs, rel=0.01)
