"""The local cache (``~/.cache/distzo`` or ``runtime.cache_dir``) and atomic builds into it."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
from typing import Callable


def cache_root(cache_dir: str | None = None) -> Path:
    """``cache_dir``, or ``~/.cache/distzo`` when it is None; created if missing."""
    root = Path(cache_dir) if cache_dir else Path(os.path.expanduser("~")) / ".cache" / "distzo"
    root.mkdir(parents=True, exist_ok=True)
    return root


def atomic_build(target: Path, build: Callable[[Path], None]) -> Path:
    """Run ``build(tmp)`` in a temporary sibling directory and rename it to ``target`` once complete.

    A ``target`` that already holds ``.complete`` is returned as it is; when two processes
    build at once, the first rename wins and both use that copy.
    """
    if (target / ".complete").is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=target.name + ".tmp-", dir=target.parent))
    try:
        build(tmp)
        (tmp / ".complete").write_text("ok\n")
        try:
            os.rename(tmp, target)
        except OSError:  # another process finished first: use its copy
            if not (target / ".complete").is_file():
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return target


def shared_kernel_cache_env(cache_dir: str | None = None) -> dict[str, str]:
    """Environment for service processes: one Triton kernel cache for all of them (a kernel compiled
    by one worker, or by the warm-up before the clock, is loaded by the others instead of compiled
    again). An explicit TRITON_CACHE_DIR wins."""
    if os.environ.get("TRITON_CACHE_DIR"):
        return {}
    return {"TRITON_CACHE_DIR": str(cache_root(cache_dir) / "triton")}
