"""The optimizer state on the parameter server: snapshots, recovery, replicas keep it bitwise."""

from __future__ import annotations

import time

import numpy as np
import pytest

from distzo.zo.generator import Distribution
from distzo.zo.mezo import apply_update
from distzo.zo.optim import Optimizer
from paramserver.durability.datadir import RecoveryError
from paramserver.durability.snapshot import SnapshotCorrupt, list_snapshots, load_snapshot_state
from paramserver.state import ServerState

from clusterhelpers import wait_until
from pshelpers import Servers, server_config
from test_paramserver import master_of, records


@pytest.fixture
def servers():
    s = Servers()
    yield s
    s.close()


def expected(cache_dir: str, opt: Optimizer, n: int) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Master and state after records(n), applied in process (the reference trainer's code)."""
    bm, master = master_of(cache_dir)
    states = [opt.new_state(spec.numel) for spec in bm.manifest.blocks]
    for r in records(n):
        for spec, buf, st in zip(bm.manifest.blocks, master, states):
            apply_update(spec, buf, r, Distribution.RADEMACHER, optimizer=opt, state=st)
    return [m.numpy() for m in master], states


def assert_same(srv, master, states) -> None:
    store = srv.state.store
    for b in srv.state.owned:
        assert np.array_equal(store.master[b].view(np.uint32), master[b].view(np.uint32)), f"master of block {b}"
        assert np.array_equal(store.opt_state[b].view(np.uint32), states[b].view(np.uint32)), f"state of block {b}"


@pytest.mark.parametrize("name", ["momentum", "adam"])
def test_a_restarted_server_recovers_master_and_state_bitwise(servers, cache_dir, tmp_path, name):
    cfg = server_config(cache_dir, train={"optimizer": name}, server={"snapshot_every": 3})
    opt = Optimizer.from_config(cfg.train)
    d = tmp_path / "d"
    s1 = servers.start(cfg, d)
    c = servers.client(s1.address)
    for r in records(7):
        s1.state._wait_snapshot()  # no periodic snapshot skipped (a slow disk): the one at 6 is checked below
        c.apply_update(r)
        s1.state.drain()
    s1.state._wait_snapshot()
    master, states = expected(cache_dir, opt, 7)
    assert_same(s1, master, states)
    s1.stop()
    # the newest snapshot (version 6) holds master and state of version 6; the journal replays step 6
    snap = list_snapshots(d)[-1]
    assert snap.version == 6
    blocks, snap_states = load_snapshot_state(snap, s1.state.digest, None, opt.width)
    m6, s6 = expected(cache_dir, opt, 6)
    for b in blocks:
        assert np.array_equal(blocks[b], m6[b]) and np.array_equal(snap_states[b], s6[b])
    s2 = servers.start(cfg, d)
    assert servers.client(s2.address).applied_version() == 7
    assert_same(s2, master, states)
    c2 = servers.client(s2.address)
    c2.apply_update(records(1, start=7)[0])  # and training goes on from the recovered state
    s2.state.drain()
    master8, states8 = expected(cache_dir, opt, 8)
    assert_same(s2, master8, states8)


def test_a_damaged_state_is_never_believed_and_another_optimizer_is_refused(servers, cache_dir, tmp_path):
    cfg = server_config(cache_dir, train={"optimizer": "adam"}, server={"snapshot_every": 2})
    d = tmp_path / "d"
    s1 = servers.start(cfg, d)
    c = servers.client(s1.address)
    for r in records(2):
        s1.state._wait_snapshot()  # no periodic snapshot skipped (the one at start still being written on a busy host)
        c.apply_update(r)
    s1.state.drain()
    # the snapshot at 2 starts after the update is applied, so after drain() may return: wait for it
    wait_until(lambda: any(x.version == 2 for x in list_snapshots(d)), what="the snapshot at version 2")
    s1.state._wait_snapshot()
    digest = s1.state.digest
    s1.stop()
    snap = list_snapshots(d)[-1]
    assert snap.version == 2 and snap.meta["state_width"] == 2 and len(snap.meta["state"]) == 6
    with pytest.raises(SnapshotCorrupt, match="optimizer state of 2 values per parameter; this server's train.optimizer keeps 1"):
        load_snapshot_state(snap, digest, None, 1)
    # flip one byte inside the last block's state: its checksum names it
    data = bytearray(snap.path.read_bytes())
    data[-5] ^= 0x40
    snap.path.write_bytes(bytes(data))
    with pytest.raises(SnapshotCorrupt, match="the optimizer state of block 5 fails its checksum"):
        load_snapshot_state(snap, digest, None, 2)
    # the data directory records the optimizer: a server with another rule (or other betas) refuses it
    for other in ({"optimizer": "momentum"}, {"optimizer": "adam", "adam_beta2": 0.99}, {"optimizer": "sgd"}):
        with pytest.raises(RecoveryError, match="train.optimizer"):
            ServerState(server_config(cache_dir, train=other), d)


def test_replicas_keep_the_optimizer_state_including_one_that_resyncs_from_blocks(servers, cache_dir, tmp_path):
    cfg = server_config(cache_dir, train={"optimizer": "momentum"}, server={"snapshot_every": 2})
    primary = servers.start(cfg, tmp_path / "p")
    early = servers.start(cfg, tmp_path / "r1", follow=primary.address, name="replica-early")
    pc = servers.client(primary.address)
    for r in records(7):
        primary.state._wait_snapshot()
        pc.apply_update(r)
        primary.state.drain()
    primary.state._wait_snapshot()
    late = servers.start(cfg, tmp_path / "r2", follow=primary.address, name="replica-late")
    assert not (tmp_path / "p" / "journal-000000000000.log").exists()  # the late one copies blocks and state
    for r in records(3, start=7):
        pc.apply_update(r)
    master, states = expected(cache_dir, Optimizer.from_config(cfg.train), 10)
    for rep in (primary, early, late):
        rc = servers.client(rep.address)
        deadline = time.monotonic() + 30
        while rc.applied_version() < 10 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert rc.applied_version() == 10
        assert_same(rep, master, states)
        assert [rc.digest(b).xxh3 for b in range(6)] == [pc.digest(b).xxh3 for b in range(6)]
