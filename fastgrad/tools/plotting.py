"""Matplotlib for the tools' plots, headless (the Agg backend), or a clear error naming the extra."""

from __future__ import annotations

from ..extras import require


def pyplot():
    """``matplotlib.pyplot`` on the Agg backend (files only, no window).

    Raises
    ------
    fastgrad.extras.MissingExtraError
        When matplotlib is not installed (extra: ``plot``).
    """
    mpl = require("matplotlib", "plot", "plotting")
    mpl.use("Agg")
    return require("matplotlib.pyplot", "plot", "plotting")
