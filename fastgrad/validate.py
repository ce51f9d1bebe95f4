"""Deprecated: moved to :mod:`fastgrad.tools.validate` (the applications live in ``fastgrad.tools``)."""

import sys
import warnings

from .tools.validate import *  # noqa: F403
from .tools.validate import main

warnings.warn(
    "fastgrad.validate is deprecated; import fastgrad.tools.validate instead",
    DeprecationWarning,
    stacklevel=2,
)

if __name__ == "__main__":
    sys.exit(main())
