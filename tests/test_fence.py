"""The shared-memory seqlock's memory fences: a real fence instruction for this CPU, at the four
places a seqlock needs one, and a clear refusal where none can be built."""

from __future__ import annotations

import platform

import numpy as np
import pytest

from paramserver.dataplane import fence as fence_mod
from paramserver.dataplane.fence import FenceUnavailable, require_fence
from paramserver.dataplane.shm import ServedSegments, SharedView


def test_the_fence_is_a_hardware_barrier_on_this_machine():
    f = require_fence()
    f()  # runs
    asm = f.inspect_asm(f.signatures[0])
    wanted = {"x86_64": ("mfence", "lock"), "aarch64": ("dmb",), "arm64": ("dmb",), "ppc64le": ("sync",)}
    needles = wanted.get(platform.machine())
    if needles is None:
        pytest.skip(f"no expected fence instruction recorded for {platform.machine()}")
    assert any(n in line for line in asm.splitlines() for n in needles), asm[-2000:]


def test_the_seqlock_fences_sit_where_a_seqlock_needs_them(tmp_path):
    seg = ServedSegments(tmp_path, "distzo-t", [256])
    events: list[tuple] = []
    seg.fence = lambda: events.append(("fence", int(seg.table[0, 0]), int(seg.table[0, 1]), int(seg.block(0)[0])))
    seg.begin_write(0)
    seg.block(0)[:] = 7
    seg.end_write(0, 5)
    # writer: the odd sequence is stored before the fence that precedes the data; the data before the
    # fence that precedes the version and the even sequence
    assert events == [("fence", 1, -1, 0), ("fence", 1, -1, 7)]
    assert (int(seg.table[0, 0]), int(seg.table[0, 1])) == (2, 5)

    view = SharedView(str(seg.data_path), str(seg.versions_path), seg.nonce)
    order: list[str] = []
    view.fence = lambda: order.append("fence")
    out = np.zeros(256, np.uint8)
    copies = view.read_with(0, 5, 0, 256, lambda src: (order.append("copy"), np.copyto(out, src)))
    # reader: sequence, fence, bytes, fence, sequence again
    assert copies == 1 and order == ["fence", "copy", "fence"] and (out == 7).all()
    view.close()
    seg.close()


def test_without_a_fence_shared_memory_is_refused_by_name(tmp_path, monkeypatch):
    seg = ServedSegments(tmp_path, "distzo-ok", [64])  # made while the fence exists
    monkeypatch.setattr(fence_mod, "_FENCE", None)
    monkeypatch.setattr(fence_mod, "FENCE_ERROR", "LoweringError: no fence on this target")
    with pytest.raises(FenceUnavailable) as exc:
        ServedSegments(tmp_path, "distzo-x", [64])
    msg = str(exc.value)
    assert platform.machine() in msg and "no fence on this target" in msg and "server.shared_memory: false" in msg
    assert not (tmp_path / "distzo-x.data").exists()  # nothing created
    with pytest.raises(FenceUnavailable):
        SharedView(str(seg.data_path), str(seg.versions_path), seg.nonce)  # clients fall back to gRPC on this
    seg.close()
