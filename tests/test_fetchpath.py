"""The fetch path: threaded copies out of shared memory, the seqlock around any copy, no RPC between steps."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest

from distzo.zo.record import Direction, UpdateRecord
from paramserver.dataplane import hostcopy
from paramserver.dataplane.client import ParamServerClient
from paramserver.dataplane.shm import ServedSegments, SharedView, StaleVersion
from paramserver.server import ParamServer

from conftest import small_config


@pytest.fixture
def copy_threads():
    before = hostcopy.copy_threads()
    yield hostcopy.set_copy_threads
    hostcopy.set_copy_threads(before)


@pytest.mark.parametrize("threads", [1, 2, 3, 5])
@pytest.mark.parametrize("nbytes", [0, 7, 4096, (3 << 20) + 123, (9 << 20) + 4095])
def test_parallel_copy_equals_memcpy(copy_threads, threads, nbytes):
    copy_threads(threads)
    src = np.random.default_rng(nbytes).integers(0, 255, nbytes, dtype=np.uint8)
    dest = np.zeros(nbytes, np.uint8)
    hostcopy.parallel_copy(dest, src)
    assert np.array_equal(dest, src)
    parts = hostcopy.pieces(nbytes, threads)
    assert parts[0][0] == 0 and parts[-1][1] == nbytes
    assert all(b == c for (_, b), (c, _) in zip(parts, parts[1:]))  # contiguous, no gaps or overlaps
    assert all(a % hostcopy.PAGE == 0 for a, _ in parts)
    assert len(parts) <= threads


def test_parallel_copy_refuses_mismatched_buffers(copy_threads):
    with pytest.raises(ValueError, match="different buffers"):
        hostcopy.parallel_copy(np.zeros(10, np.uint8), np.zeros(11, np.uint8))
    with pytest.raises(ValueError, match="copy threads"):
        copy_threads(-1)


@pytest.fixture
def segments(tmp_path):
    seg = ServedSegments(tmp_path, "t", [1 << 20, 4096])
    for b in range(2):
        seg.begin_write(b)
        seg.block(b)[:] = 1
        seg.end_write(b, 0)
    view = SharedView(str(seg.data_path), str(seg.versions_path), seg.nonce)
    yield seg, view
    view.close()
    seg.close()


def test_a_copy_that_races_a_write_is_made_again(segments):
    """The seqlock is checked after the copy completed: a block rewritten meanwhile is copied again."""
    seg, view = segments
    got = np.zeros(1 << 20, np.uint8)
    calls = []

    def copy(src: np.ndarray) -> None:
        calls.append(int(src[0]))
        got[:] = src
        if len(calls) == 1:  # the server rewrites the block (same version: a replica catching up) mid-copy
            seg.begin_write(0)
            seg.block(0)[:] = 2
            seg.end_write(0, 0)

    assert view.read_with(0, 0, 0, 1 << 20, copy) == 2
    assert calls == [1, 2] and (got == 2).all()


def test_a_block_past_the_version_is_stale_and_an_odd_sequence_times_out(segments):
    seg, view = segments
    seg.begin_write(1)
    seg.end_write(1, 3)
    with pytest.raises(StaleVersion):
        view.read_with(1, 2, 0, 16, lambda src: None)
    seg.begin_write(0)  # a writer that never finishes
    with pytest.raises(TimeoutError):
        view.read_with(0, 0, 0, 16, lambda src: None, timeout_s=0.05)


def test_a_reader_sees_a_version_the_moment_it_is_published(segments):
    seg, view = segments
    assert not view.await_version(1, 1, timeout_s=0.01)
    seen = []
    t = threading.Thread(target=lambda: seen.append(view.await_version(1, 1, timeout_s=30)))
    t.start()
    seg.begin_write(1)
    seg.end_write(1, 1)
    t.join(30)
    assert seen == [True]


def test_a_fetch_of_the_next_version_waits_on_the_mapped_table_not_an_rpc(cache_dir, tmp_path):
    """A worker asked for version t+1 before the server has it polls the mapped version table and copies the
    block as soon as it is published; no WaitVersion round trip (the stub here refuses any)."""
    cfg = small_config(cache_dir)
    server = ParamServer(cfg, tmp_path / "ps").start()
    try:
        client = ParamServerClient(server.address).connect()
        nbytes = client.slice_bytes(0)[1]
        dest = np.empty(nbytes, np.uint8)
        assert client.fetch_into(0, 0, dest).transport == "shm"

        class NoRpc:
            def __getattr__(self, name):  # noqa: ANN001, ANN204
                raise AssertionError(f"{name} RPC on the fetch path")

        real, client.shards[0].stub = client.shards[0].stub, NoRpc()
        out: list = []
        t = threading.Thread(target=lambda: out.append(client.fetch_into(0, 1, dest, timeout_s=0.9)))
        t.start()
        time.sleep(0.05)  # the fetch is waiting now
        with ParamServerClient(server.address) as updater:
            updater.apply_update(UpdateRecord(0, (Direction(3, 0.5),), 1e-3, 0.0))
        t.join(30)
        assert out and out[0].version == 1 and out[0].transport == "shm"
        assert np.array_equal(dest, server.state.store.bytes_of(0, master=False))
        client.shards[0].stub = real
        client.close()
    finally:
        server.stop(grace=0.2)
