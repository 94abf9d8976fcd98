"""train.target lora with momentum/adam: optimizer state for the trainable blocks only, on the
server (memory, snapshots, recovery, replicas) and in the reference. (zoctl up == zoctl reference with LoRA and
momentum or adam: tests/test_matrix.py; a killed server with adam state: tests/test_cluster_faults.py.)"""

from __future__ import annotations

import time

import numpy as np
import pytest
from safetensors import safe_open

from distzo.train.reference import ReferenceTrainer
from distzo.zo.generator import Distribution
from distzo.zo.mezo import apply_update
from distzo.zo.optim import Optimizer
from paramserver import metrics
from paramserver.durability.snapshot import list_snapshots, load_snapshot_state

from conftest import small_config
from pshelpers import Servers, server_config
from test_lora import LORA
from test_paramserver import records


@pytest.fixture
def servers():
    s = Servers()
    yield s
    s.close()


def expected(model, opt: Optimizer, n: int) -> tuple[list[np.ndarray], list[np.ndarray]]:  # noqa: ANN001 - a BlockModel
    """Master and state after records(n), applied in process with a state for *every* block (frozen ones
    included): what keeping state for the trainable blocks only must reproduce, bit for bit."""
    master = model.load_block_buffers()
    states = [opt.new_state(spec.numel) for spec in model.manifest.blocks]
    for r in records(n):
        for spec, buf, st in zip(model.manifest.blocks, master, states):
            apply_update(spec, buf, r, Distribution.RADEMACHER, optimizer=opt, state=st)
    return [m.numpy() for m in master], states


def assert_same(srv, master, states) -> None:  # noqa: ANN001
    store = srv.state.store
    for b in srv.state.owned:
        assert np.array_equal(store.master[b].view(np.uint32), master[b].view(np.uint32)), f"master of block {b}"
        if b in store.opt_state:
            assert np.array_equal(store.opt_state[b].view(np.uint32), states[b].view(np.uint32)), f"state of block {b}"
        else:  # a frozen block: the state it would have had never moved from zero
            assert not states[b].any(), f"block {b} has no state but its state would have changed"


@pytest.mark.parametrize("name", ["momentum", "adam"])
def test_the_server_keeps_state_for_the_trainable_blocks_only_and_recovers_it_bitwise(servers, cache_dir, tmp_path, name):
    cfg = server_config(cache_dir, train={"target": "lora", "optimizer": name}, server={"snapshot_every": 3})
    opt = Optimizer.from_config(cfg.train)
    d = tmp_path / "d"
    s1 = servers.start(cfg, d)
    man = s1.state.manifest
    trainable = [b.index for b in man.blocks if b.trainable]
    assert trainable and len(trainable) < len(man.blocks)
    store = s1.state.store
    assert sorted(store.opt_state) == trainable
    want_bytes = sum(man.blocks[b].numel for b in trainable) * 4 * opt.width
    assert store.state_nbytes() == want_bytes == metrics.OPTIMIZER_STATE_BYTES._value.get()
    assert want_bytes * 20 < man.numel * 4 * opt.width  # the adapters' size, not the model's

    c = servers.client(s1.address)
    for r in records(7):
        s1.state._wait_snapshot()  # no periodic snapshot skipped: the one at 6 is checked below
        c.apply_update(r)
        s1.state.drain()
    s1.state._wait_snapshot()
    master, states = expected(s1.state.model, opt, 7)
    assert_same(s1, master, states)
    # a frozen block has no state to fetch (a replica never asks for one)
    with pytest.raises(Exception, match="keeps no optimizer state"):
        c.fetch_state(next(b.index for b in man.blocks if not b.trainable), -1, opt.width)
    s1.stop()

    snap = list_snapshots(d)[-1]
    assert snap.version == 6
    assert sorted(snap.meta["state"], key=int) == [str(b) for b in trainable]
    with safe_open(str(snap.path), framework="numpy") as f:
        assert sorted(k for k in f.keys() if k.startswith("state.")) == sorted(f"state.{b}" for b in trainable)
    blocks, snap_states = load_snapshot_state(snap, s1.state.digest, None, opt.width, trainable)
    m6, s6 = expected(s1.state.model, opt, 6)
    assert sorted(snap_states) == trainable
    for b in blocks:
        assert np.array_equal(blocks[b].view(np.uint32), m6[b].view(np.uint32))
    for b in trainable:
        assert np.array_equal(snap_states[b].view(np.uint32), s6[b].view(np.uint32))

    s2 = servers.start(cfg, d)  # recovery: snapshot 6 (master + state) + journal step 6
    assert servers.client(s2.address).applied_version() == 7
    assert sorted(s2.state.store.opt_state) == trainable
    assert_same(s2, master, states)
    c2 = servers.client(s2.address)
    c2.apply_update(records(1, start=7)[0])  # and training goes on from the recovered state
    s2.state.drain()
    master8, states8 = expected(s2.state.model, opt, 8)
    assert_same(s2, master8, states8)


def test_replicas_copy_state_only_for_the_trainable_blocks(servers, cache_dir, tmp_path):
    cfg = server_config(cache_dir, train={"target": "lora", "optimizer": "momentum"}, server={"snapshot_every": 2})
    primary = servers.start(cfg, tmp_path / "p")
    early = servers.start(cfg, tmp_path / "r1", follow=primary.address, name="replica-early")
    pc = servers.client(primary.address)
    for r in records(5):
        primary.state._wait_snapshot()
        pc.apply_update(r)
        primary.state.drain()
    primary.state._wait_snapshot()
    # joins after the journal's start was dropped: it re-syncs from blocks (master, and state where there is one)
    late = servers.start(cfg, tmp_path / "r2", follow=primary.address, name="replica-late")
    assert not (tmp_path / "p" / "journal-000000000000.log").exists()
    for r in records(2, start=5):
        pc.apply_update(r)
    master, states = expected(primary.state.model, Optimizer.from_config(cfg.train), 7)
    nblocks = len(primary.state.manifest.blocks)
    for rep in (primary, early, late):
        rc = servers.client(rep.address)
        deadline = time.monotonic() + 60
        while rc.applied_version() < 7 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert rc.applied_version() == 7
        assert sorted(rep.state.store.opt_state) == sorted(primary.state.store.opt_state)
        assert_same(rep, master, states)
        assert [rc.digest(b).xxh3 for b in range(nblocks)] == [pc.digest(b).xxh3 for b in range(nblocks)]


def test_the_reference_keeps_state_for_the_trainable_blocks_only(cache_dir):
    tr = ReferenceTrainer(small_config(cache_dir, train={**LORA, "optimizer": "adam"}))
    blocks = tr.model.manifest.blocks
    assert [s is not None for s in tr.opt_state] == [b.trainable for b in blocks]
    assert all(tuple(s.shape) == (b.numel, 2) for s, b in zip(tr.opt_state, blocks) if s is not None)


def test_a_snapshot_that_also_holds_frozen_blocks_states_still_recovers(tmp_path):
    """Snapshots written before frozen blocks went without state hold theirs too: only the trainable ones are read."""
    from paramserver.durability.snapshot import SnapshotCorrupt, SnapshotJob

    numels = {0: 6, 1: 4, 2: 5}
    master = {b: np.arange(n, dtype=np.float32) + b for b, n in numels.items()}
    state = {b: np.full((n, 2), 0.5 * b, dtype=np.float32) for b, n in numels.items()}
    job = SnapshotJob(tmp_path, 3, list(numels), numels, master.__getitem__, "digest", state.__getitem__)
    job.run()
    assert job.error is None
    snap = list_snapshots(tmp_path)[-1]
    blocks, states = load_snapshot_state(snap, "digest", numels, 2, [1])  # block 1 trainable, 0 and 2 frozen
    assert sorted(blocks) == [0, 1, 2] and sorted(states) == [1] and np.array_equal(states[1], state[1])
    # a snapshot lacking a trainable block's state is refused, naming both lists
    job = SnapshotJob(tmp_path, 4, list(numels), numels, master.__getitem__, "digest",
                      lambda b: state[b] if b == 1 else None)
    job.run()
    with pytest.raises(SnapshotCorrupt, match=r"lists optimizer states for blocks \['1'\], not for the server's "
                                              r"trainable blocks \['1', '2'\]"):
        load_snapshot_state(list_snapshots(tmp_path)[-1], "digest", numels, 2, [1, 2])
