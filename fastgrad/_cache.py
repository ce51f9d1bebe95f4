"""Numba's disk cache for fastgrad's kernels, keyed on the whole package's source.

Numba checks a cached kernel against the source file of the function it compiled, and
nothing else: after an edit to a function it calls in another file (an activation's
derivative in ``activations.py``, a loss in ``losses.py``) or an upgrade that changes only
those, it loads the old machine code. fastgrad's kernels are cached with the *source key*
instead: a SHA-256 over the path and bytes of every module of the package that
``import fastgrad`` can load (everything but ``tools/``, which no kernel imports), so any
edit or upgrade of those recompiles every kernel, once.

Where the cache lives: the first writable one of

1. ``$NUMBA_CACHE_DIR/<fastgrad's folder>_<hash of its path>/`` when ``NUMBA_CACHE_DIR`` is set;
2. ``fastgrad/cpu/__pycache__/`` next to the kernels' module (Numba's usual place);
3. Numba's user-wide cache folder (``~/.cache/numba/...`` on Linux, ``$XDG_CACHE_HOME``).

This is done by three cache locators, Numba's own with the key as the source stamp, which
claim fastgrad's files only: other people's Numba functions keep Numba's behaviour, and
``NUMBA_CACHE_DIR`` is never set by fastgrad. The key's first 16 hex digits are also part of
every cache file's name: Numba unpickles a cached index's signatures before it compares the
stamp, so an index written by other source whose types' modules were since renamed would
raise ``ModuleNotFoundError`` on load instead of missing; with the key in the name, files of
other source are never opened. They are deleted (:func:`prune`) when the cache is first
configured in a process (``import fastgrad``: :mod:`fastgrad.noise` has compiled kernels), so the
folders hold one version's kernels, not one per edit.

When none of the three is writable (a read-only install with a read-only home), the kernels
are compiled without the disk cache, with one warning that says how to set a cache folder.
``FASTGRAD_NUMBA_CACHE=0`` turns the cache off.
"""

from __future__ import annotations

import functools
import hashlib
import os
import warnings

from numba.core import caching, config

PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__))
KERNELS_FILE = os.path.join(PACKAGE_DIR, "cpu", "kernels.py")
"""The module of the numba backend's kernels: their cache folder is found from its path."""
SKIPPED = ("tools",)
"""Sub-packages left out of the key: no kernel imports them (the applications)."""


class CacheWarning(UserWarning):
    """The numba backend runs without its disk cache (see :mod:`fastgrad._cache`)."""


def source_key(package_dir: str = PACKAGE_DIR) -> str:
    """SHA-256 (hex) over the relative path and bytes of every ``.py`` file of the package,
    in sorted order, skipping :data:`SKIPPED` sub-packages and ``__pycache__``."""
    digest = hashlib.sha256()
    for root, dirs, files in os.walk(package_dir):
        rel_root = os.path.relpath(root, package_dir)
        dirs[:] = sorted(d for d in dirs if d != "__pycache__" and not (rel_root == "." and d in SKIPPED))
        for name in sorted(f for f in files if f.endswith(".py")):
            rel = os.path.normpath(os.path.join(rel_root, name)).replace(os.sep, "/")
            digest.update(rel.encode() + b"\0")
            with open(os.path.join(root, name), "rb") as fh:
                digest.update(fh.read() + b"\0")
    return digest.hexdigest()


SOURCE_KEY = source_key()
"""The key of the source this process imported (and compiles its kernels from)."""
KEY_TAG = SOURCE_KEY[:16]
"""The part of the key in every cache file's name (``kernels.<function>-<line>-<KEY_TAG>.py311.nbi``)."""


def _in_package(py_file: str) -> bool:
    path = os.path.abspath(py_file)
    return os.path.commonpath([path, PACKAGE_DIR]) == PACKAGE_DIR


class _PackageSourceStamp:
    """Mixin for Numba's source-file locators: fastgrad's files only, stamped with the source key."""

    @classmethod
    def from_function(cls, py_func, py_file):
        if not _in_package(py_file):
            return None
        return super().from_function(py_func, py_file)

    def get_source_stamp(self):
        return ("fastgrad source", SOURCE_KEY)

    def get_disambiguator(self):
        return f"{super().get_disambiguator()}-{KEY_TAG}"  # the line, then the key: see the module docstring


def _numba_class(name: str) -> type:
    return getattr(caching, name, None) or getattr(caching, "_" + name)  # numba < 0.61: private names


LOCATORS: tuple[type, ...] = tuple(
    type(f"Fastgrad{name}", (_PackageSourceStamp, _numba_class(name)), {"__module__": __name__})
    for name in ("UserProvidedCacheLocator", "InTreeCacheLocator", "UserWideCacheLocator")
)
"""Tried in this order for a kernel of fastgrad (see the module docstring)."""


def install() -> None:
    """Put :data:`LOCATORS` first in Numba's list (once); they decline every other file."""
    classes = _numba_class("CacheImpl")._locator_classes
    if classes[: len(LOCATORS)] != list(LOCATORS):
        classes[:0] = LOCATORS


def _probe():  # stands for a kernel: the locators read only its first line number
    pass


def cache_dir(py_file: str | None = None) -> str | None:
    """The folder where the kernels of ``py_file`` (default: :data:`KERNELS_FILE`) are cached, or
    ``None`` when no candidate is writable."""
    py_file = py_file or KERNELS_FILE
    for cls in LOCATORS:
        locator = cls.from_function(_probe, py_file)
        if locator is not None:
            return locator.get_cache_path()
    return None


def kernel_dirs() -> list[str]:
    """The cache folders of every folder of the package that :func:`source_key` covers (where each
    one's kernels would be cached now; folders with no writable cache are left out)."""
    dirs = []
    for root, subdirs, _ in os.walk(PACKAGE_DIR):
        top = os.path.relpath(root, PACKAGE_DIR) == "."
        subdirs[:] = sorted(d for d in subdirs if d != "__pycache__" and not (top and d in SKIPPED))
        found = cache_dir(os.path.join(root, "__init__.py"))
        if found is not None:
            dirs.append(found)
    return dirs


def prune(directory: str) -> int:
    """Delete the Numba cache files (``.nbi``, ``.nbc``) in ``directory`` whose names lack this source's
    :data:`KEY_TAG`: fastgrad's kernels cached by other source (or before the key was in the name).
    Returns how many were deleted; a file that cannot be deleted is left."""
    try:
        names = os.listdir(directory)
    except OSError:
        return 0
    current = f"-{KEY_TAG}.py"
    removed = 0
    for name in names:
        if name.endswith((".nbi", ".nbc")) and current not in name:
            try:
                os.remove(os.path.join(directory, name))
            except OSError:
                continue
            removed += 1
    return removed


def _candidates(py_file: str) -> list[str]:
    subpath = _numba_class("InTreeCacheLocator").get_suitable_cache_subpath(py_file)
    from numba.misc.appdirs import AppDirs

    places = [os.path.join(os.path.dirname(py_file), "__pycache__")]
    places.append(os.path.join(AppDirs(appname="numba", appauthor=False).user_cache_dir, subpath))
    if config.CACHE_DIR:
        places.insert(0, os.path.join(config.CACHE_DIR, subpath))
    return places


@functools.cache
def configure() -> bool:
    """Whether fastgrad's kernels use Numba's disk cache (``cache=`` of their decorators).

    Called once, by :mod:`fastgrad.cpu` on import: installs the locators and checks that a
    cache folder is writable; if none is, warns once (:class:`CacheWarning`) and returns False."""
    if os.environ.get("FASTGRAD_NUMBA_CACHE", "1").strip().lower() in ("0", "false", "no", "off"):
        return False
    install()
    if cache_dir() is not None:
        for directory in kernel_dirs():
            prune(directory)
        return True
    tried = ", ".join(_candidates(KERNELS_FILE))
    warnings.warn(
        f"fastgrad: no writable folder for Numba's disk cache (tried {tried}); the numba backend "
        "compiles its kernels in every new process (tens of seconds). Set NUMBA_CACHE_DIR to a "
        "writable folder to keep them, or FASTGRAD_NUMBA_CACHE=0 to compile without a cache and "
        "without this warning.",
        CacheWarning,
        stacklevel=2,
    )
    return False


def describe() -> str:
    """One line for reports: whether the kernels are cached, where, and the source key."""
    if not configure():
        return f"numba cache: off (source key {SOURCE_KEY[:12]})"
    return f"numba cache: {cache_dir()} (source key {SOURCE_KEY[:12]})"
