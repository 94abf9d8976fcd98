"""The workers of one node: a torch.distributed group that all-gathers block slices.

Worker ``r`` of ``k`` fetches slice ``r`` of each block from the parameter server; the
group all-gathers the slices into the whole block. NCCL on GPUs, gloo on CPU, same code.
Every member must gather the same blocks in the same order: assignments to a node group
keep its members in lockstep (a member without forwards still gathers).
"""

from __future__ import annotations

import datetime
import logging

import torch
import torch.distributed as dist

from distzo.infra.logs import kv

log = logging.getLogger("distzo.worker.node")


class GatherError(RuntimeError):
    """A collective failed (a member died or timed out): the group must be re-formed."""


class NodeGroup:
    def __init__(self, rank: int, size: int, master: str, device: torch.device, timeout_s: float = 120.0):
        if size < 2:
            raise ValueError("a node group needs at least 2 workers")
        if not 0 <= rank < size:
            raise ValueError(f"node rank {rank} is out of range for a group of {size}")
        self.rank, self.size = rank, size
        self.device = device
        backend = "nccl" if device.type == "cuda" else "gloo"
        # host:port (a TCP store rank 0 listens on) or a URL, e.g. file:///path: a store in a file that no
        # other process can take from us between choosing it and binding it, as it can a free port
        init_method = master if "://" in master else f"tcp://{master}"
        dist.init_process_group(backend=backend, init_method=init_method, rank=rank, world_size=size,
                                timeout=datetime.timedelta(seconds=timeout_s))
        self.backend = backend
        log.info("node group formed", extra=kv(rank=rank, size=size, backend=backend, master=master))

    def gather(self, part: torch.Tensor, out: torch.Tensor) -> None:
        """All-gather equal-sized ``part`` tensors (uint8) into ``out`` (size * len(part))."""
        n = part.numel()
        try:
            dist.all_gather([out[i * n : (i + 1) * n] for i in range(self.size)], part)
        except (RuntimeError, dist.DistBackendError) as exc:  # type: ignore[attr-defined]
            raise GatherError(f"all-gather across the node group failed: {exc}") from exc

    def close(self) -> None:
        if dist.is_initialized():
            dist.destroy_process_group()
