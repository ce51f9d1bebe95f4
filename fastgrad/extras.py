"""Optional packages (the ``extras`` of pyproject.toml): import one, or say which extra to install.

Part of the core: used by :mod:`fastgrad.interop` (PyTorch) and by the tools (plots, the
digits dataset). It imports nothing else of fastgrad.
"""

from __future__ import annotations

import importlib


class MissingExtraError(ImportError):
    """An optional package is not installed; the message names the extra that provides it."""

    def __init__(self, package: str, extra: str, purpose: str):
        super().__init__(
            f"{purpose} needs the optional package {package!r}, which is not installed; "
            f'install it with: pip install "fastgrad[{extra}]"'
        )
        self.package = package
        self.extra = extra


def require(package: str, extra: str, purpose: str):
    """Import and return ``package``, or raise :class:`MissingExtraError` naming ``extra``."""
    try:
        importlib.import_module(package.split(".")[0])
        return importlib.import_module(package)
    except ImportError:
        raise MissingExtraError(package.split(".")[0], extra, purpose) from None
