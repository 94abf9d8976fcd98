"""Streaming blocks from the parameter server, a bounded number ahead of the compute.

A background thread fetches block 0, 1, 2, ... at the step's version. On a GPU next to the
server, with no host copy: DMA straight from the server's shared memory registered with the
driver (``hostreg.DirectFetch``). Otherwise into buffers from a small pool (pinned host memory
on GPU hosts; a memcpy split over threads, or gRPC chunks written in place), all-gathered
inside a node group, and, on a GPU, copied to the device on its own stream with an event the
compute waits on.
At most ``depth`` blocks (plus blocks the forward keeps for a tied head) are held at once:
resident memory is a few blocks, whatever the model's size.

Frozen blocks (``BlockSpec.trainable`` False: train.target lora/prefix's base weights) never change,
so with a ``kept`` cache (``FrozenBlocks``) the first assignment fetches each once and keeps its own
copy (in GPU memory while it fits the budget, else in pinned host memory, copied to the GPU at each
use; in host memory on CPU workers), and later assignments fetch only the trainable blocks. Not in node
groups: their members' all-gathers must pair, and a replaced member would start with an empty cache.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Sequence

import torch

from distzo.model.blocks import DTYPES, ITEMSIZE, Manifest
from distzo.zo.forwardweights import replay_block
from distzo.zo.generator import Distribution
from distzo.zo.record import UpdateRecord
from gpuworker.node import NodeGroup
from paramserver.dataplane.client import ParamServerClient
from paramserver.dataplane.wire import checksum

if TYPE_CHECKING:
    from gpuworker.hostreg import DirectFetch


@dataclass
class FeedTimers:
    fetch_s: float = 0.0
    gather_s: float = 0.0
    h2d_s: float = 0.0
    wait_s: float = 0.0
    replay_s: float = 0.0  # a node group member rebuilding its slice at the step's version
    bytes_received: int = 0
    pool_bytes: int = 0
    transport: str = ""


class BufferPool:
    """Reusable host buffers big enough for any (padded) block; pinned when a GPU is used."""

    def __init__(self, count: int, nbytes: int, pinned: bool):
        self.nbytes = nbytes
        self.free = [torch.empty(nbytes, dtype=torch.uint8, pin_memory=pinned) for _ in range(count)]
        self.lock = threading.Lock()

    @property
    def total_bytes(self) -> int:
        return self.nbytes * len(self.free)

    def take(self) -> torch.Tensor:
        with self.lock:
            return self.free.pop()

    def give(self, buf: torch.Tensor) -> None:
        with self.lock:
            self.free.append(buf)


@dataclass
class FrozenBlocks:
    """A worker's frozen blocks, kept across assignments: block -> its own copy (device or pinned host).

    ``gpu_budget``: bytes still allowed in GPU memory (None: decided at the first block kept on a GPU,
    from the memory free then, less a fifth of the device for activations and the streamed blocks)."""

    blocks: dict[int, torch.Tensor] = field(default_factory=dict)
    gpu_budget: int | None = None

    def fits_on(self, device: torch.device, nbytes: int) -> bool:
        """Whether a block of ``nbytes`` is kept in ``device``'s memory (and charge it to the budget)."""
        if self.gpu_budget is None:
            free, total = torch.cuda.mem_get_info(device)
            self.gpu_budget = max(0, free - total // 5)
        if nbytes > self.gpu_budget:
            return False
        self.gpu_budget -= nbytes
        return True


class PrefetchFeed:
    """A ``BlockFeed`` over the parameter server for one assignment (one version)."""

    def __init__(self, client: ParamServerClient, manifest: Manifest, version: int, device: torch.device,
                 pool: BufferPool, depth: int, pinned_blocks: frozenset[int], node: NodeGroup | None = None,
                 timeout_s: float = 120.0, digests: bool = False, copy_stream: "torch.cuda.Stream | None" = None,
                 direct: "DirectFetch | None" = None, kept: FrozenBlocks | None = None,
                 pending: Sequence[UpdateRecord] = (), dist: Distribution | str = Distribution.RADEMACHER):
        """``version``: the (materialized) base fetched. ``pending`` (a node group's update windows): the records
        each member replays on its own slice before the gather, so the group gathers the served copy of the
        step's version (``forwardweights.replay_block``); a single worker replays in its forward engine instead."""
        self.client = client
        self.pending = tuple(pending) if node is not None else ()
        self.dist = Distribution(dist)
        self.frozen = kept if node is None else None  # frozen blocks' own copies, across assignments
        self.manifest = manifest
        self.version = version
        self.device = device
        self.node = node
        self.timeout_s = timeout_s
        self.dtype_name = client.served_dtype
        self.dtype = DTYPES[self.dtype_name]
        self.itemsize = ITEMSIZE[self.dtype_name]
        self.pool = pool
        self.timers = FeedTimers(pool_bytes=pool.total_bytes)
        self.digests: dict[int, int] | None = {} if digests else None
        self._slots = threading.Semaphore(depth + len(pinned_blocks))
        self._ready = [threading.Event() for _ in manifest.blocks]
        self._host: dict[int, torch.Tensor] = {}
        self._data: dict[int, torch.Tensor] = {}
        self._events: dict[int, object] = {}
        self._error: BaseException | None = None
        self._stop = threading.Event()
        self._copy_stream = None
        if device.type == "cuda":  # GPU-only: host-to-device copies on their own stream, overlapping the compute
            self._copy_stream = copy_stream or torch.cuda.Stream(device)
        self.direct = direct if node is None else None  # GPU-only: DMA from registered shared memory
        self._thread = threading.Thread(target=self._run, name="prefetch", daemon=True)
        self._thread.start()

    # ------------------------------------------------------------------ producer
    def _run(self) -> None:
        for b in range(len(self.manifest.blocks)):
            while not self._slots.acquire(timeout=0.1):
                if self._stop.is_set():
                    return
            if self._stop.is_set():
                return
            try:
                self._data[b] = self._fetch_or_keep(b)
                if self.digests is not None:  # of exactly the bytes the compute will use
                    self.digests[b] = checksum(memoryview(self._data[b].view(torch.uint8).cpu().numpy()))
            except BaseException as exc:  # handed to the compute thread in get()
                self._error = exc
                for ev in self._ready[b:]:
                    ev.set()
                return
            self._ready[b].set()

    def _fetch_direct(self, b: int, nbytes: int) -> torch.Tensor | None:
        # GPU-only: no host copy; the device buffer is allocated on the copy stream (get() records
        # the compute stream's use, so the allocator does not hand it out while compute reads it)
        assert self.direct is not None and self._copy_stream is not None
        t0 = time.perf_counter()
        with torch.cuda.stream(self._copy_stream):
            dev = torch.empty(nbytes, dtype=torch.uint8, device=self.device)
        got = self.direct.fetch(b, self.version, dev, self.timeout_s)
        if got is None:
            return None
        res, dma_s = got
        self.timers.bytes_received += res.nbytes
        self.timers.transport = "shm-direct"
        self.timers.h2d_s += dma_s
        self.timers.fetch_s += time.perf_counter() - t0 - dma_s
        return dev.view(self.dtype)

    def _fetch_or_keep(self, b: int) -> torch.Tensor:
        """A frozen block from the cache (fetched and kept there the first time), any other fetched."""
        if self.frozen is None or self.manifest.blocks[b].trainable:
            return self._fetch(b)
        kept = self.frozen.blocks
        if b in kept:
            return self._from_cache(b, kept[b])
        data = self._fetch(b)
        kept[b] = self._cache_copy(data)
        self._events.pop(b, None)  # the copy waited for the host-to-device copy: nothing left to wait for
        self._give_back(b)
        # this use reads the copy where it computes: the cached one on its device, else the one just fetched
        return kept[b] if kept[b].device == data.device else data

    def _cache_copy(self, data: torch.Tensor) -> torch.Tensor:
        """The frozen cache's own copy of a fetched block (the fetch's pool buffer goes back after it): on the
        compute device, or, on a GPU without room for it, a pinned host copy brought over at each use."""
        if self._copy_stream is None:
            return data.clone()
        # GPU-only: copy on the copy stream, after the host-to-device copy, and wait for it
        with torch.cuda.stream(self._copy_stream):
            if self.frozen.fits_on(self.device, data.numel() * data.element_size()):  # type: ignore[union-attr]
                copy = data.clone()
            else:
                copy = torch.empty(data.shape, dtype=data.dtype, pin_memory=True)
                copy.copy_(data)
        self._copy_stream.synchronize()
        return copy

    def _from_cache(self, b: int, kept: torch.Tensor) -> torch.Tensor:
        """A cached frozen block where the compute reads it (GPU-only for a pinned host copy: brought over on
        the side stream, its event waited for in get())."""
        if self._copy_stream is None or kept.is_cuda:
            return kept
        t0 = time.perf_counter()
        with torch.cuda.stream(self._copy_stream):
            dev = kept.to(self.device, non_blocking=True)
            ev = torch.cuda.Event()
            ev.record(self._copy_stream)
        self._events[b] = ev
        self.timers.h2d_s += time.perf_counter() - t0
        return dev

    def _give_back(self, b: int) -> None:
        buf = self._host.pop(b, None)
        if buf is not None:
            if self._copy_stream is not None:
                self._copy_stream.synchronize()  # the H2D copy read this buffer
            self.pool.give(buf)

    def _fetch(self, b: int) -> torch.Tensor:
        spec = self.manifest.blocks[b]
        nbytes = spec.numel * self.itemsize
        if self.direct is not None:
            dev = self._fetch_direct(b, nbytes)
            if dev is not None:
                return dev
        buf = self.pool.take()
        self._host[b] = buf
        t0 = time.perf_counter()
        if self.node is None:
            dest = buf[:nbytes]
            res = self.client.fetch_into(b, self.version, dest.numpy(), timeout_s=self.timeout_s)
            self.timers.bytes_received += res.nbytes
            self.timers.transport = res.transport
            self.timers.fetch_s += time.perf_counter() - t0
        else:
            # slice r into its place, then gather the padded slices of all members
            k, r = self.node.size, self.node.rank
            per = -(-spec.numel // k) * self.itemsize
            start, end = self.client.slice_bytes(b, r, k)
            part = buf[r * per : r * per + per]
            res = self.client.fetch_into(b, self.version, part[: end - start].numpy(), rank=r, parts=k, timeout_s=self.timeout_s)
            self.timers.bytes_received += res.nbytes
            self.timers.transport = res.transport
            t1 = time.perf_counter()
            self.timers.fetch_s += t1 - t0
            if self.node.device.type == "cuda":  # GPU-only: gather on the device over NVLink
                part_dev = part.to(self.node.device, non_blocking=True)
                self._replay_slice(spec, part_dev, start, end)
                out_dev = torch.empty(k * per, dtype=torch.uint8, device=self.node.device)
                self.node.gather(part_dev, out_dev)
                self.timers.gather_s += time.perf_counter() - t1
                return out_dev[:nbytes].view(self.dtype)
            self._replay_slice(spec, part, start, end)
            self.node.gather(part.clone(), buf[: k * per])  # the input overlaps the output: copy it
            self.timers.gather_s += time.perf_counter() - t1
        host = buf[:nbytes].view(self.dtype)
        if self._copy_stream is None:
            return host
        t2 = time.perf_counter()  # GPU-only: copy on the side stream, compute waits on the event
        with torch.cuda.stream(self._copy_stream):
            dev = host.to(self.device, non_blocking=True)
            ev = torch.cuda.Event()
            ev.record(self._copy_stream)
        self._events[b] = ev
        self.timers.h2d_s += time.perf_counter() - t2
        return dev

    def _replay_slice(self, spec, part: torch.Tensor, start: int, end: int) -> None:  # noqa: ANN001
        """Rebuild this member's slice (bytes start..end of the block, in ``part``) at the step's version, in place:
        replayed on the 1/k slice before the gather, not on the whole block after it (bench/NOTES.md, section 9)."""
        if not self.pending or not spec.trainable:
            return
        t0 = time.perf_counter()
        x = part[: end - start].view(self.dtype)
        x.copy_(replay_block(spec, x, self.pending, self.dist, start=start // self.itemsize)[0])
        self.timers.replay_s += time.perf_counter() - t0

    # ------------------------------------------------------------------ consumer (BlockFeed)
    def get(self, block: int) -> torch.Tensor:
        t0 = time.perf_counter()
        if not self._ready[block].wait(self.timeout_s + 5):
            raise TimeoutError(f"block {block} did not arrive in {self.timeout_s:.0f}s")
        self.timers.wait_s += time.perf_counter() - t0
        if block not in self._data:
            assert self._error is not None
            raise self._error
        ev = self._events.pop(block, None)
        data = self._data[block]
        if self._copy_stream is not None:  # GPU-only
            compute = torch.cuda.current_stream(self.device)
            if ev is not None:
                compute.wait_event(ev)  # type: ignore[arg-type]
            if data.is_cuda:
                data.record_stream(compute)  # allocated on the copy stream, read on this one
        return data

    def release(self, block: int) -> None:
        self._data.pop(block, None)
        self._give_back(block)
        self._slots.release()

    def drain(self) -> None:
        """Fetch (and gather) every block without computing: a node-group member with no forwards."""
        for b in range(len(self.manifest.blocks)):
            self.get(b)
            self.release(b)

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=self.timeout_s + 10)
        for b in list(self._host):
            self.release(b)
