"""Deprecated: moved to :mod:`fastgrad.tools.datasets` (the applications live in ``fastgrad.tools``)."""

import warnings

from .tools.datasets import *  # noqa: F403

warnings.warn(
    "fastgrad.datasets is deprecated; use fastgrad.tools.datasets instead",
    DeprecationWarning,
    stacklevel=2,
)
