"""Deprecated: moved to :mod:`fastgrad.tools.train` (the applications live in ``fastgrad.tools``)."""

import warnings

from .tools.train import *  # noqa: F403

warnings.warn(
    "fastgrad.train is deprecated; use fastgrad.tools.train instead", DeprecationWarning, stacklevel=2
)
