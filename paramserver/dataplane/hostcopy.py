"""Host-memory copies split over threads: the fetch path's copy out of the server's shared memory.

One core's memcpy moves about 8 GB/s; a host's DRAM gives several times that to several cores.
``parallel_copy`` cuts the bytes into page-aligned pieces and copies them on a small thread
pool (``np.copyto`` releases the GIL for the copy). Used where registration of the shared
segment with the GPU driver is refused (the pinned-buffer fallback) and on CPU workers.
"""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor

import numpy as np

PAGE = 4096
MIN_PIECE = 1 << 20  # below this per thread, a single memcpy is faster than the hand-off
MAX_AUTO_THREADS = 8

_pool: ThreadPoolExecutor | None = None
_threads = 1


def auto_threads() -> int:
    """The default: one per core, at most 8 (a few cores saturate a socket's DRAM)."""
    return max(1, min(MAX_AUTO_THREADS, os.cpu_count() or 1))


def set_copy_threads(threads: int) -> None:
    """Threads ``parallel_copy`` uses (0: ``auto_threads()``). Results never depend on it."""
    global _pool, _threads
    threads = auto_threads() if threads == 0 else int(threads)
    if threads < 1:
        raise ValueError(f"copy threads must be >= 1 (or 0 for one per core), got {threads}")
    if threads == _threads:
        return
    if _pool is not None:
        _pool.shutdown(wait=True)
    _pool = ThreadPoolExecutor(threads - 1, thread_name_prefix="hostcopy") if threads > 1 else None
    _threads = threads


def copy_threads() -> int:
    return _threads


def pieces(nbytes: int, threads: int) -> list[tuple[int, int]]:
    """[a, b) byte ranges, page-aligned cuts, at most ``threads`` of them, none under MIN_PIECE (but one)."""
    if nbytes <= 0:
        return [(0, 0)]
    count = max(1, min(threads, nbytes // MIN_PIECE))
    step = -(-nbytes // count)
    step = -(-step // PAGE) * PAGE
    return [(a, min(nbytes, a + step)) for a in range(0, nbytes, step)]


def parallel_copy(dest: np.ndarray, src: np.ndarray) -> None:
    """``dest[:] = src`` (same dtype and length, both 1-D contiguous), split over the copy threads."""
    if dest.shape != src.shape or dest.dtype != src.dtype:
        raise ValueError(f"copy between different buffers: {dest.dtype}{dest.shape} <- {src.dtype}{src.shape}")
    d = dest.view(np.uint8)
    s = src.view(np.uint8)
    parts = pieces(d.nbytes, _threads)
    if len(parts) == 1 or _pool is None:
        np.copyto(d, s)
        return
    futures = [_pool.submit(np.copyto, d[a:b], s[a:b]) for a, b in parts[1:]]
    a, b = parts[0]
    np.copyto(d[a:b], s[a:b])  # the caller's thread takes the first piece
    for f in futures:
        f.result()


set_copy_threads(0)
