"""Matplotlib for the tools' plots, headless (the Agg backend), or a clear error naming the extra;
and the file a plot is written to, checked before the work that draws it."""

from __future__ import annotations

import os

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


def plot_path(path: str | os.PathLike) -> str:
    """The file a plot saved to ``path`` goes to: ``path`` itself, or ``path + ".png"`` when it has
    no extension (what matplotlib's ``savefig`` would do, made explicit so it can be reported)."""
    path = os.fspath(path)
    return path if os.path.splitext(path)[1].strip(".") else path.rstrip(".") + ".png"


def check_plot_destination(path: str | os.PathLike) -> str:
    """:func:`plot_path` of ``path``, once it is known that a plot can be written there.

    Checks, before any work: matplotlib is installed, it can write the extension, the
    destination is not a folder, and the file can be created (it is created and removed
    again when it did not exist; an existing file is opened for appending, not changed).

    Raises
    ------
    fastgrad.extras.MissingExtraError
        Without matplotlib.
    ValueError
        Saying why the destination cannot be written.
    """
    plt = pyplot()
    for folder_like in (os.fspath(path), plot_path(path)):
        if os.path.isdir(folder_like):
            example = os.path.join(folder_like, "plot.png")
            raise ValueError(f"{folder_like!r} is a folder; give a file name, such as {example!r}")
    target = plot_path(path)
    folder = os.path.dirname(os.path.abspath(target))
    if not os.path.isdir(folder):
        raise ValueError(f"folder {folder!r} does not exist")
    suffix = os.path.splitext(target)[1].lstrip(".").lower()
    fig = plt.figure()
    formats = fig.canvas.get_supported_filetypes()
    plt.close(fig)
    if suffix not in formats:
        raise ValueError(f"matplotlib cannot write .{suffix}; use one of {', '.join(formats)}")
    existed = os.path.exists(target)
    try:
        with open(target, "ab"):
            pass
    except OSError as exc:
        raise ValueError(f"cannot write {target!r}: {exc.strerror or exc}") from None
    if not existed:
        os.remove(target)
    return target
