"""Deprecated: moved to :mod:`fastgrad.tools.cli` (the applications live in ``fastgrad.tools``)."""

import sys
import warnings

from .tools.cli import *  # noqa: F403
from .tools.cli import main

warnings.warn(
    "fastgrad.cli is deprecated; use fastgrad.tools.cli instead",
    DeprecationWarning,
    stacklevel=1 if __name__ == "__main__" else 2,  # python -m fastgrad.cli: shown to the user
)

if __name__ == "__main__":
    sys.exit(main())
