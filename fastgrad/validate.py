"""Deprecated: moved to :mod:`fastgrad.tools.validate` (the applications live in ``fastgrad.tools``)."""

import sys
import warnings

from .tools.validate import *  # noqa: F403
from .tools.validate import main

warnings.warn(
    "fastgrad.validate is deprecated; use fastgrad.tools.validate instead",
    DeprecationWarning,
    stacklevel=1 if __name__ == "__main__" else 2,  # python -m fastgrad.validate: shown to the user
)

if __name__ == "__main__":
    sys.exit(main())
