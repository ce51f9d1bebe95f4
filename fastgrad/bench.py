"""Deprecated: moved to :mod:`fastgrad.tools.bench` (the applications live in ``fastgrad.tools``)."""

import sys
import warnings

from .tools.bench import *  # noqa: F403
from .tools.bench import main

warnings.warn(
    "fastgrad.bench is deprecated; use fastgrad.tools.bench instead",
    DeprecationWarning,
    stacklevel=1 if __name__ == "__main__" else 2,  # python -m fastgrad.bench: shown to the user
)

if __name__ == "__main__":
    sys.exit(main())
