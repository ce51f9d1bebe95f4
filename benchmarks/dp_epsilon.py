"""ε of DP-SGD from fastgrad.privacy next to Opacus's own accountants; print a Markdown table.

    python benchmarks/dp_epsilon.py

For each setting (σ, q, steps, δ): fastgrad's RDP and PLD figures (Google's dp-accounting),
Opacus's ``RDPAccountant`` and ``PRVAccountant`` (its default) for the same history, and the
σ each side calibrates for the RDP figure (``calibrate_noise_multiplier`` vs Opacus's
``get_noise_multiplier``, whose ε tolerance is 0.01). A script, not a test: the 1 % agreement
of the RDP figures is tested in tests/test_dp_opacus.py.
"""

from __future__ import annotations

import sys
import warnings

SETTINGS = [  # (label, σ, q, steps, δ)
    ("MNIST-like: N=60000, B=256, 15 epochs", 1.1, 256 / 60000, 15 * 234, 1e-5),
    ("MNIST-like: N=60000, B=256, 60 epochs", 1.1, 256 / 60000, 60 * 234, 1e-5),
    ("CIFAR-like: N=50000, B=512, 50 epochs", 1.0, 512 / 50000, 50 * 97, 1e-5),
    ("q=0.01, 1000 steps", 0.8, 0.01, 1000, 1e-5),
    ("q=0.05, 500 steps", 2.0, 0.05, 500, 1e-6),
    ("q=0.1, 50 steps", 4.0, 0.1, 50, 1e-5),
]


def main() -> int:
    from importlib.metadata import version

    import opacus
    from opacus.accountants import PRVAccountant, RDPAccountant
    from opacus.accountants.utils import get_noise_multiplier

    from fastgrad import privacy

    warnings.simplefilter("ignore")  # Opacus warns when the optimal order is an end of its range
    print(f"# ε: fastgrad.privacy (dp-accounting {version('dp-accounting')}) vs Opacus {opacus.__version__}")
    print()
    print("| setting | σ | fastgrad RDP | Opacus RDP | RDP diff | fastgrad PLD | Opacus PRV |")
    print("|---|---|---|---|---|---|---|")
    for label, sigma, q, steps, delta in SETTINGS:
        ours_rdp = privacy.epsilon(sigma, q, steps, delta, "rdp")
        ours_pld = privacy.epsilon(sigma, q, steps, delta, "pld")
        rdp, prv = RDPAccountant(), PRVAccountant()
        rdp.history = prv.history = [(sigma, q, steps)]
        theirs_rdp, theirs_prv = rdp.get_epsilon(delta), prv.get_epsilon(delta)
        diff = 100 * (ours_rdp / theirs_rdp - 1)
        print(f"| {label}, δ={delta:g} | {sigma:g} | {ours_rdp:.4f} | {theirs_rdp:.4f} | {diff:+.4f} % | "
              f"{ours_pld:.4f} | {theirs_prv:.4f} |")  # fmt: skip
    print()
    print("| target ε (RDP) | q, steps, δ | fastgrad σ | its ε | Opacus σ | its ε (fastgrad RDP) |")
    print("|---|---|---|---|---|---|")
    for target, q, steps, delta in [
        (1.0, 256 / 60000, 60 * 234, 1e-5),
        (3.0, 0.01, 1000, 1e-5),
        (8.0, 0.05, 500, 1e-5),
    ]:
        ours = privacy.calibrate_noise_multiplier(target, delta, q, steps, "rdp")
        theirs = get_noise_multiplier(target_epsilon=target, target_delta=delta, sample_rate=q, steps=steps)
        print(f"| {target:g} | {q:.4g}, {steps}, {delta:g} | {ours:.4f} | "
              f"{privacy.epsilon(ours, q, steps, delta):.4f} | {theirs:.4f} | "
              f"{privacy.epsilon(theirs, q, steps, delta):.4f} |")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
