"""Deprecated: moved to :mod:`fastgrad.tools.cli` (the applications live in ``fastgrad.tools``)."""

import sys
import warnings

from .tools.cli import *  # noqa: F403
from .tools.cli import main

warnings.warn(
    "fastgrad.cli is deprecated; import fastgrad.tools.cli instead", DeprecationWarning, stacklevel=2
)

if __name__ == "__main__":
    sys.exit(main())
