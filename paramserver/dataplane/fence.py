"""A full hardware memory fence for the shared-memory seqlock (``paramserver.dataplane.shm``), portable.

A seqlock over memory shared between processes needs two orderings that plain NumPy stores and
loads do not promise on every CPU: the writer's stores become visible in program order (sequence
odd -> data -> version -> sequence even), and the reader's loads happen in program order
(sequence -> data -> sequence). x86-64 (TSO) gives both for free; Arm (e.g. Grace Hopper's
Neoverse cores) and POWER reorder them. ``memory_fence()`` is LLVM's ``fence seq_cst``, compiled
by numba for the machine it runs on: ``mfence`` on x86-64, ``dmb ish`` on AArch64, ``sync`` on
POWER (the C11 ``atomic_thread_fence(memory_order_seq_cst)``; Boehm, "Can seqlocks get along with
programming language memory models?", MSPC 2012, for where a seqlock needs its fences).

Where the fence cannot be built, ``require_fence()`` raises FenceUnavailable naming the machine,
and shared-memory serving is refused instead of risking torn reads.
"""

from __future__ import annotations

import platform
from typing import Callable


class FenceUnavailable(RuntimeError):
    """No memory fence on this machine: shared-memory serving would not be safe."""


_FENCE: Callable[[], None] | None = None
FENCE_ERROR: str | None = None


def _build() -> Callable[[], None]:
    from numba import njit, types
    from numba.extending import intrinsic

    @intrinsic
    def _fence(typingctx):  # noqa: ANN001, ANN202 - numba's intrinsic protocol
        def codegen(context, builder, signature, args):  # noqa: ANN001, ANN202
            builder.fence("seq_cst")
            return context.get_dummy_value()

        return types.none(), codegen

    @njit(nogil=True)
    def fence() -> None:
        _fence()

    fence()  # compile now (once per process, ~1 s): a machine without it fails here, not in the middle of a write
    return fence


def require_fence() -> Callable[[], None]:
    """The fence (built on first use), or FenceUnavailable saying why and what to do instead."""
    global _FENCE, FENCE_ERROR
    if _FENCE is None and FENCE_ERROR is None:
        try:
            _FENCE = _build()
        except Exception as exc:  # noqa: BLE001 - any failure to build it means: no fence here
            FENCE_ERROR = f"{type(exc).__name__}: {exc}"
    if _FENCE is None:
        raise FenceUnavailable(f"shared-memory serving needs a hardware memory fence, which could not be built on this "
                               f"{platform.machine()} machine ({FENCE_ERROR}); set server.shared_memory: false "
                               "(blocks are then served over gRPC only)")
    return _FENCE
