"""GPU-only: fetch a block with no host copy, by DMA straight out of the server's shared memory.

The worker's read-only mapping of the server's data segment is registered with the CUDA driver
as page-locked host memory (``cudaHostRegister`` with ``cudaHostRegisterReadOnly``, the mapping
being PROT_READ, through torch's cudart binding). A block is then one ``cudaMemcpyAsync`` from
the mapping to the device on the feed's copy stream; the prefetch thread waits for it to complete
and checks the seqlock (``SharedView.read_with``), so a block the server rewrote meanwhile is
copied again. Where the driver refuses the registration, ``DirectFetch.fetch`` returns None and
the feed falls back to pinned buffers filled by ``hostcopy.parallel_copy``.

Nothing here runs without a GPU; tests/test_gpu.py checks it on one.
"""

from __future__ import annotations

import logging
import time
import warnings

import numpy as np
import torch

from distzo.infra.logs import kv
from paramserver.dataplane.client import FetchResult, ParamServerClient
from paramserver.dataplane.shm import SharedView

log = logging.getLogger("distzo.worker.hostreg")
HOST_REGISTER_PORTABLE = 0x01
HOST_REGISTER_READ_ONLY = 0x08  # CUDA >= 11.1: the driver only reads the range (the mapping is read-only)


class RegistrationRefused(RuntimeError):
    pass


class RegisteredSegment:
    """A SharedView's data mapping, registered as page-locked memory for as long as the view lives."""

    def __init__(self, view: SharedView):
        data = view.data
        self.base = int(data.ctypes.data)
        self.nbytes = int(data.nbytes)
        cudart = torch.cuda.cudart()
        err = cudart.cudaHostRegister(self.base, self.nbytes, HOST_REGISTER_PORTABLE | HOST_REGISTER_READ_ONLY)
        code = int(getattr(err, "value", err))
        if code != 0:
            raise RegistrationRefused(f"cudaHostRegister of {self.nbytes} bytes of shared memory failed (cudaError {code})")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # torch warns that the array is read-only: we only read it
            self.host = torch.from_numpy(data)
        self.view = view
        self.closed = False
        view.on_close.append(self.close)  # unregister before the client unmaps it (server restart, close)

    def tensor(self, src: np.ndarray) -> torch.Tensor:
        """The pinned host tensor over ``src`` (a slice of the registered mapping)."""
        off = int(src.ctypes.data) - self.base
        if not 0 <= off <= self.nbytes - src.nbytes:
            raise ValueError("source bytes are outside the registered segment")
        return self.host[off : off + src.nbytes]

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        torch.cuda.synchronize()  # no copy may still read the range
        del self.host
        torch.cuda.cudart().cudaHostUnregister(self.base)


class DirectFetch:
    """The fetch path with no host copy: registered shared memory -> device, on one copy stream."""

    def __init__(self, client: ParamServerClient, device: torch.device, stream: torch.cuda.Stream):
        self.client = client
        self.device = device
        self.stream = stream
        self.segments: dict[int, RegisteredSegment] = {}  # id(SharedView) -> registration
        self.refused = False

    def _segment(self, block: int) -> RegisteredSegment | None:
        view = self.client.shared_view(block)
        if view is None or self.refused:
            return None
        seg = self.segments.get(id(view))
        if seg is None or seg.closed or seg.view is not view:
            t0 = time.perf_counter()
            try:
                seg = RegisteredSegment(view)
            except (RegistrationRefused, RuntimeError, AttributeError) as exc:
                self.refused = True
                log.warning("cannot register shared memory with the GPU driver; copying into pinned buffers instead",
                            extra=kv(reason=str(exc)))
                return None
            self.segments[id(view)] = seg
            log.info("registered shared memory", extra=kv(bytes=seg.nbytes, seconds=round(time.perf_counter() - t0, 3)))
        return seg

    def warm(self) -> bool:
        """Register every segment now (pinning takes time: before the clock). True when the path is usable."""
        return all(self._segment(b) is not None for b in range(len(self.client.manifest.blocks)))

    def fetch(self, block: int, version: int, dest: torch.Tensor, timeout_s: float) -> tuple[FetchResult, float] | None:
        """Block ``block`` at ``version`` into the device tensor ``dest`` (uint8, the block's bytes):
        (result, seconds of DMA), or None when this path cannot be used (fall back)."""
        seg = self._segment(block)
        if seg is None:
            return None
        dma = [0.0]
        event = torch.cuda.Event()

        def copy(src: np.ndarray) -> None:
            t0 = time.perf_counter()
            with torch.cuda.stream(self.stream):
                dest.copy_(seg.tensor(src), non_blocking=True)
                event.record(self.stream)
            event.synchronize()  # complete before the seqlock is checked again
            dma[0] += time.perf_counter() - t0

        res = self.client.fetch_with(block, version, copy, timeout_s=timeout_s)
        return (res, dma[0]) if res is not None else None

    def close(self) -> None:
        for seg in self.segments.values():
            seg.close()
        self.segments.clear()
