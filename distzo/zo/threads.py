"""The CPU kernels' thread pool: work split over threads in pieces that start on Philox-call boundaries.

Every CPU kernel (the generator's, the served copy's rounding, the optimizers' and the update windows')
runs through ``run_split``; results never depend on the thread count, only the speed does.
"""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor

ALIGN = 128  # thread chunks start on Philox-call boundaries of both distributions (the kernels' _ALIGN)

_pool: ThreadPoolExecutor | None = None
_pool_threads = 0


def set_cpu_threads(threads: int) -> None:
    """Threads the CPU kernels split work over (results never depend on it)."""
    global _pool, _pool_threads
    threads = max(1, int(threads))
    if threads == _pool_threads:
        return
    if _pool is not None:
        _pool.shutdown(wait=True)
    _pool = ThreadPoolExecutor(threads, thread_name_prefix="zgen") if threads > 1 else None
    _pool_threads = threads


def cpu_threads() -> int:
    return _pool_threads


set_cpu_threads(min(2, os.cpu_count() or 1))


def _split(n: int, start: int) -> list[tuple[int, int]]:
    """Cut [0, n) into per-thread pieces whose global start is 128-aligned (only for speed)."""
    threads = _pool_threads
    if threads <= 1 or n < 1 << 16:
        return [(0, n)]
    step = -(-n // threads)
    bounds = [0]
    for t in range(1, threads):
        cut = ((start + t * step) // ALIGN) * ALIGN - start
        bounds.append(min(max(cut, bounds[-1]), n))
    bounds.append(n)
    return [(a, b) for a, b in zip(bounds, bounds[1:]) if b > a]


def run_split(fn, n: int, start: int) -> None:  # noqa: ANN001
    """Run ``fn(a, b)`` over 128-aligned pieces of [0, n) on the kernel thread pool (``start``: global offset)."""
    pieces = _split(n, start)
    if len(pieces) == 1:
        fn(*pieces[0])
        return
    assert _pool is not None
    futures = [_pool.submit(fn, a, b) for a, b in pieces]
    for fut in futures:
        fut.result()
