"""A DP-SGD training run on scikit-learn's digits, two ways, with the same ε: held-out accuracy of each.

    python benchmarks/dp_digits.py [--epsilon 3] [--epochs 20] [--seeds 0,1,2,3,4,5,6,7]

1. ``fastgrad train --dataset digits --dp --epsilon 3 --epochs 20``'s DP-SGD run
   (:func:`fastgrad.tools.train.train_compare` with its defaults: [64, 32, 32, 10] tanh,
   cross-entropy, float32, expected batch 32, SGD lr 0.2, C = 1, δ = 1e-5, an 80/20 split);
2. the same network as a PyTorch ``nn.Sequential`` from the same θ₀, trained by a plain torch
   loop through :class:`fastgrad.torch.DPGradStep` (Poisson batches, clipping, noise, σ
   calibrated for the same ε, δ and epochs) and ``torch.optim.SGD(lr=0.2)``.

Both runs spend the same ε (the same σ, q and number of steps); their noise and batches come
from different seeds, so their accuracies are two draws of the same experiment: the script runs
``--seeds`` of each and prints every accuracy and the means. A script, not a test.
"""

from __future__ import annotations

import argparse
import os
import sys

os.environ.setdefault("NUMBA_NUM_THREADS", "2")

import numpy as np

HIDDEN, B, LR, C, DELTA = (32, 32), 32, 0.2, 1.0, 1e-5


def run_cli_way(net, train, test, epsilon: float, epochs: int, seed: int) -> tuple[float, float, float]:
    from fastgrad import resolve_backend
    from fastgrad.tools.train import train_compare

    res = train_compare(net, train, test, methods=("dp_sgd",), epochs=epochs, batch_size=B, lr=LR,
                        seed=seed, dtype=np.float32, backend=resolve_backend("auto"), max_norm=C,
                        target_epsilon=epsilon, delta=DELTA)  # fmt: skip
    h = res.histories["dp_sgd"]
    return h.test_accuracy[-1], h.epsilon[-1], res.dp.noise_multiplier


def run_torch_way(net, train, test, epsilon: float, epochs: int, seed: int) -> tuple[float, float, float]:
    import torch

    import fastgrad
    import fastgrad.torch as ft

    model = fastgrad.to_torch(net, net.init(seed=seed, dtype=np.float32))
    X = torch.from_numpy(train.X.astype(np.float32))
    y = torch.from_numpy(train.y)
    dp = ft.DPGradStep(model, torch.nn.CrossEntropyLoss(), num_samples=len(X), expected_batch_size=B,
                       max_norm=C, target_epsilon=epsilon, delta=DELTA, epochs=epochs, seed=seed)  # fmt: skip
    opt = torch.optim.SGD(model.parameters(), lr=LR)
    for _ in range(epochs):
        for Xb, yb in dp.loader(X, y):  # Poisson batches, gathered
            dp(Xb, yb)
            opt.step()
    with torch.no_grad():
        pred = model(torch.from_numpy(test.X.astype(np.float32))).argmax(dim=1).numpy()
    return float(np.mean(pred == test.y)), dp.epsilon(), dp.noise_multiplier


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--epsilon", type=float, default=3.0)
    ap.add_argument("--epochs", type=int, default=20)
    ap.add_argument("--seeds", default="0,1,2,3,4,5,6,7")
    args = ap.parse_args(argv)

    import torch

    from fastgrad import MLP
    from fastgrad.tools import datasets

    torch.set_num_threads(2)
    data = datasets.load_dataset("digits")
    train, test = data.split(0.2, seed=0)
    net = MLP([data.num_features, *HIDDEN, data.num_outputs], activation="tanh", loss="cross_entropy")
    print(f"# digits: {train.num_samples} train / {test.num_samples} held out, {list(net.sizes)} tanh, "
          f"expected batch {B}, lr {LR}, C = {C}, ε = {args.epsilon:g} at δ = {DELTA:g}, "
          f"{args.epochs} epochs")  # fmt: skip
    print("| seed | fastgrad train --dp: accuracy (ε, σ) | fastgrad.torch DPGradStep: accuracy (ε, σ) |")
    print("|---|---|---|")
    acc = {"cli": [], "torch": []}
    for seed in (int(s) for s in args.seeds.split(",")):
        a = run_cli_way(net, train, test, args.epsilon, args.epochs, seed)
        b = run_torch_way(net, train, test, args.epsilon, args.epochs, seed)
        acc["cli"].append(a[0])
        acc["torch"].append(b[0])
        cells = [f"{100 * r[0]:.2f} % ({r[1]:.3f}, {r[2]:.4f})" for r in (a, b)]
        print(f"| {seed} | {cells[0]} | {cells[1]} |", flush=True)
    m_cli, m_torch = 100 * np.mean(acc["cli"]), 100 * np.mean(acc["torch"])
    print(f"| mean | {m_cli:.2f} % | {m_torch:.2f} % |")
    print(f"# difference of the means: {m_torch - m_cli:+.2f} points")
    return 0


if __name__ == "__main__":
    sys.exit(main())
