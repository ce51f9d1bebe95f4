"""The peer comparison in one command (the same as ``python -m fastgrad.bench``):

    python benchmarks/peers.py            # all configurations, 7 interleaved rounds
    python benchmarks/peers.py --quick    # narrow and mnist, 3 rounds
    python benchmarks/peers.py --help

fastgrad's backends, the NumPy reference, PyTorch and JAX (when installed) and the
measured floors; prints a table of medians and ratios and writes peers.json. Not an asv
benchmark: asv imports this module, so it only runs under ``__main__``.
"""

if __name__ == "__main__":
    import os
    import sys

    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    from fastgrad.bench import main

    sys.exit(main())
