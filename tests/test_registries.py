"""The registries of activations and losses: consistent, true, and what the docs list.

Each entry's facts are read elsewhere (``MLP.init``, interop, ``fastgrad.torch``, input checks), so
here each fact is checked against something independent of it: the initialisation's spread, torch's
own module against the NumPy reference, the scale s against torch's loss, and the docs' lists.
"""

import re
from pathlib import Path

import numpy as np
import pytest

import fastgrad
from fastgrad import activations, losses, reference
from fastgrad.activations import GLOROT, HE

DOCS = Path(__file__).resolve().parents[1] / "docs"
ACTS = activations.REGISTRY
LOSS = losses.REGISTRY


def _bullet(text: str, start: str) -> str:
    """The Markdown list item of ``text`` that begins with ``start`` (up to the next item or blank line)."""
    i = text.index(start)
    end = re.search(r"\n(- |\n)", text[i:])
    return text[i : i + end.start()] if end else text[i:]


def test_codes_are_the_positions_and_the_public_tuples_are_the_registries():
    assert fastgrad.ACTIVATIONS == tuple(ACTS) and fastgrad.LOSSES == tuple(LOSS)
    assert [a.code for a in ACTS.values()] == list(range(len(ACTS)))
    assert [q.code for q in LOSS.values()] == list(range(len(LOSS)))
    for name, a in ACTS.items():
        assert a.name == name and a.init in (HE, GLOROT)
        assert activations.activation_code(name) == a.code
    for name, q in LOSS.items():
        assert q.name == name and q.target in (losses.LABELS, losses.REAL)
        assert losses.loss_code(name) == q.code
        assert (q.torch is None) == (q.scale is None)


@pytest.mark.parametrize("name", fastgrad.ACTIVATIONS)
def test_init_draws_the_weights_with_the_spread_of_the_entrys_family(name):
    net = fastgrad.MLP([400, 300, 2], activation=name)
    W1 = net.unpack(net.init(seed=0, dtype=np.float64))[0][0]
    he, glorot = np.sqrt(2 / 400), np.sqrt(2 / 700)  # 0.071 against 0.053: the sample std is within 0.5 %
    assert W1.std() == pytest.approx(he if ACTS[name].init == HE else glorot, rel=0.01)


@pytest.mark.parametrize("name", fastgrad.ACTIVATIONS)
def test_the_entrys_torch_module_computes_the_references_phi(name):
    torch = pytest.importorskip("torch")
    z = np.concatenate([np.linspace(-30, 30, 241), [-1e-3, 0.0, 1e-3]])
    got = ACTS[name].torch_module(torch.nn)(torch.from_numpy(z)).numpy()
    # atol: gelu's tail, where 1 + tanh cancels; torch.nn.Softplus() (threshold 20) is 7.6e-10 off at z = 21
    np.testing.assert_allclose(got, reference.phi(name, z), rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("name", [q.name for q in LOSS.values() if q.torch])
def test_the_entrys_scale_is_fastgrads_loss_over_torchs(name):
    torch = pytest.importorskip("torch")
    q, rng = LOSS[name], np.random.default_rng(0)
    K, B = 5, 7
    Z = rng.standard_normal((B, K))
    y = q.random_targets(rng, B, K)
    ours = reference.loss_and_delta(name, Z, y if q.labels else None, None if q.labels else y)[0].mean()
    target = torch.from_numpy(y) if q.labels else torch.from_numpy(y).double()
    theirs = getattr(torch.nn, q.torch)()(torch.from_numpy(Z), target).item()
    assert ours == pytest.approx(q.scale(K) * theirs, rel=1e-13)


def test_a_target_outside_the_domain_is_refused_naming_it():
    for q in LOSS.values():
        if q.bounded:
            lo, hi = q.domain
            net = fastgrad.MLP([2, 3], loss=q.name)
            X = np.zeros((1, 2))
            for bad in (lo - 0.5, hi + 0.5):
                with pytest.raises(
                    ValueError, match=re.escape(f"y: {q.name} targets must lie in [{lo:g}, {hi:g}]")
                ):
                    fastgrad.backprop(net, net.init(), X.astype(np.float32), np.full((1, 3), bad))
            assert q.random_targets(np.random.default_rng(0), 50, 3).min() >= lo
            assert q.random_targets(np.random.default_rng(0), 50, 3).max() <= hi


# ------------------------------------------------------------------ the docs list every entry


def test_api_md_lists_every_activation_and_loss_and_the_he_family():
    text = (DOCS / "api.md").read_text()
    network = _bullet(text, "- **Network**")
    for name in (*ACTS, *LOSS):
        assert re.search(rf"(?<![\w`]){name}(?!\w)", network), name
    family = re.search(r"He-normal\s+for the ReLU family: ([^;]*);", text).group(1)
    assert {n.strip() for n in family.split(",")} == {n for n, a in ACTS.items() if a.init == HE}
    data = _bullet(text, "- **Data**")
    for q in LOSS.values():
        if q.bounded:  # its domain, next to its name
            assert re.search(rf"\[{q.domain[0]:g}, {q.domain[1]:g}\] for\s+{q.name}", data), q.name


@pytest.mark.parametrize(("page", "start"), [("api.md", "- `from_torch("), ("training.md", "- **Models**")])
def test_the_torch_pages_list_every_activations_torch_module(page, start):
    bullet = _bullet((DOCS / page).read_text(), start)
    for a in ACTS.values():
        assert f"`{a.torch}" in bullet, (page, a.torch)


def test_training_md_lists_every_loss_with_a_torch_counterpart():
    bullet = _bullet((DOCS / "training.md").read_text(), "- **Losses**")
    for q in LOSS.values():
        if q.torch:
            assert f"`{q.torch}()`" in bullet and f'`"{q.name}"`' in bullet, q.name


def test_dp_md_table_of_torch_scales_is_the_registry():
    text = (DOCS / "dp.md").read_text()
    rows = re.findall(r"^\| `(\w+)` \| `(\w+)` \| ([^|]+) \|$", text, re.M)
    table = {name: (torch_name, s.strip()) for name, torch_name, s in rows}
    assert set(table) == {q.name for q in LOSS.values() if q.torch}
    for name, (torch_name, s) in table.items():
        assert torch_name == LOSS[name].torch
        for K in (1, 4, 7):
            assert eval(s, {"K": K}) == LOSS[name].scale(K), (name, s)  # "1", "K/2", "K"
