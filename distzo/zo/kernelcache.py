"""Numba's on-disk cache for distzo's CPU kernels, keyed by the source of every kernel module.

Numba re-validates a cached kernel against its own file only (modification time and size). Our
kernels inline functions from other modules (``served.bf16_bits`` into ``zkernels``, ``zkernels``'
helpers into ``optim``), so after an edit of ``served.py`` alone numba would load a fused update
compiled from the old rounding, silently: the bits would no longer be the ones the tests check.
``install()`` (every kernel module calls it before its first ``@njit(cache=True)``) puts the
caches of those modules one folder below where numba would put them (``NUMBA_CACHE_DIR``, else
``__pycache__``, else the user-wide cache), in ``numba-<hash of all of them>``, so any edit of one of
them starts from a clean cache. Old folders stay until removed (a few MB each).
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

from numba.core.caching import (FunctionCache, InTreeCacheLocator, UserProvidedCacheLocator, UserWideCacheLocator,
                                 _CacheLocator)

HERE = Path(__file__).resolve().parent
KERNEL_MODULES = ("served.py", "zkernels.py", "generator.py", "optim.py", "windowkernels.py", "threads.py")  # those that compile or inline kernels


def source_hash(folder: Path = HERE) -> str:
    """sha256 (16 hex digits) of the kernel modules' source in ``folder``, in a fixed order."""
    h = hashlib.sha256()
    for name in KERNEL_MODULES:
        path = folder / name
        h.update(name.encode() + b"\0" + (path.read_bytes() if path.is_file() else b""))
    return h.hexdigest()[:16]


class KernelSourceLocator(_CacheLocator):
    """Where numba's own locator would cache a distzo kernel (``NUMBA_CACHE_DIR``, else the package's
    ``__pycache__``, else the user-wide cache), one folder down: ``numba-<source_hash()>``."""

    subdir = "numba-" + source_hash()

    def __init__(self, inner: _CacheLocator):
        self._inner = inner
        self._cache_path = os.path.join(inner.get_cache_path(), self.subdir)

    def get_cache_path(self) -> str:
        return self._cache_path

    def get_source_stamp(self):  # noqa: ANN201 - numba's (mtime, size) of the kernel's own file
        return self._inner.get_source_stamp()

    def get_disambiguator(self) -> str:
        return self._inner.get_disambiguator()

    @classmethod
    def from_function(cls, py_func, py_file):  # noqa: ANN001, ANN206 - numba's locator signature
        if Path(py_file).resolve().parent != HERE:
            return None  # not ours: numba's own locators
        for base in (UserProvidedCacheLocator, InTreeCacheLocator, UserWideCacheLocator):
            inner = base.from_function(py_func, py_file)
            if inner is None:
                continue
            locator = cls(inner)
            try:
                locator.ensure_cache_path()
            except OSError:
                continue  # not writable: the next place
            return locator
        return None


def install() -> None:
    """Put ``KernelSourceLocator`` first among numba's cache locators (idempotent)."""
    locators = FunctionCache._impl_class._locator_classes
    if KernelSourceLocator not in locators:
        locators.insert(0, KernelSourceLocator)
