"""Durability: what was acknowledged is never lost, what is damaged is never believed.

Every file type the parameter server persists (journal segments, snapshot data, snapshot
sidecars, state.json) is damaged one bit at a time at every structural position; recovery
either reproduces a state the server really had or refuses, naming the file, and keeps the
data. A disk that fills up during an append leaves nothing behind.
"""

from __future__ import annotations

import errno
import os
import stat
import subprocess
from pathlib import Path

import grpc
import numpy as np
import pytest

from distzo.common.locks import DirectoryBusy
from distzo.zo.generator import Distribution
from distzo.zo.mezo import apply_update
from paramserver.__main__ import main as paramserver_main
from paramserver.durability.datadir import RecoveryError
from paramserver.durability.journal import END, Journal, JournalCorrupt, parse_record
from paramserver.durability.snapshot import SnapshotCorrupt, list_snapshots, load_snapshot
from paramserver.server import ParamServer

from pshelpers import Servers, server_config
from test_paramserver import master_of, records


@pytest.fixture
def servers():
    s = Servers()
    yield s
    s.close()


def write_journal(d: Path, n: int, rotate: int = 0) -> list:
    j = Journal(d, rotate)
    j.open(0)
    rs = records(n)
    for r in rs:
        j.append(r)
    j.close()
    return rs


def record_offsets(data: bytes) -> list[tuple[int, int]]:
    """(start, end) of each record in a segment."""
    out, pos = [], 0
    while pos < len(data):
        _, end = parse_record(data, pos)
        out.append((pos, end))
        pos = end
    return out


def expected_weights(cache_dir: str, n: int):
    bm, master = master_of(cache_dir)
    for r in records(n):
        for spec, buf in zip(bm.manifest.blocks, master):
            apply_update(spec, buf, r, Distribution.RADEMACHER)
    return master


def server_weights(srv) -> list[np.ndarray]:
    return [srv.state.store.master[b].copy() for b in srv.state.owned]


# ----------------------------------------------------------------------------- journal
def test_every_flipped_bit_in_every_journal_segment_is_refused_and_the_file_kept(tmp_path):
    d = tmp_path / "j"
    write_journal(d, 6, rotate=3)  # two segments: steps 0-2 and 3-5
    segments = sorted(d.glob("journal-*.log"))
    assert len(segments) == 2
    for seg in segments:
        orig = seg.read_bytes()
        for offset in range(len(orig)):
            for bit in range(8):
                bad = bytearray(orig)
                bad[offset] ^= 1 << bit
                seg.write_bytes(bytes(bad))
                with pytest.raises(JournalCorrupt) as err:
                    list(Journal(d, 3).read_all(repair=True))
                assert str(seg) in str(err.value) and "at byte" in str(err.value), (offset, bit, str(err.value))
                assert seg.read_bytes() == bytes(bad)  # kept for an operator, not truncated
        seg.write_bytes(orig)
    assert [r.step for r in Journal(d, 3).read_all()] == list(range(6))


def test_a_torn_tail_is_dropped_at_every_cut_and_every_zero_fill(tmp_path):
    d = tmp_path / "j"
    rs = write_journal(d, 3)
    seg = next(d.glob("journal-*.log"))
    orig = seg.read_bytes()
    bounds = record_offsets(orig)
    last_start, last_end = bounds[-1]
    assert last_end == len(orig) and orig.endswith(END)
    for cut in range(last_start, last_end):  # an append that stopped after `cut` bytes
        seg.write_bytes(orig[:cut])
        assert list(Journal(d, 0).read_all(repair=True)) == rs[:2], cut
        assert seg.read_bytes() == orig[:last_start]  # truncated back to the last complete record
    for zero_from in range(last_start, last_end):  # pages allocated but never written
        seg.write_bytes(orig[:zero_from] + bytes(last_end - zero_from))
        assert list(Journal(d, 0).read_all(repair=True)) == rs[:2], zero_from
        assert seg.read_bytes() == orig[:last_start]
    seg.write_bytes(orig)
    assert list(Journal(d, 0).read_all()) == rs


def test_records_out_of_order_or_under_the_wrong_segment_name_are_refused(tmp_path):
    d = tmp_path / "j"
    write_journal(d, 4, rotate=2)
    first, second = sorted(d.glob("journal-*.log"))
    second.rename(d / "journal-000000000003.log")  # a segment named for a step it does not start at
    with pytest.raises(JournalCorrupt, match="named for step 3 but its first record is step 2"):
        list(Journal(d, 2).read_all())
    (d / "journal-000000000003.log").rename(second)
    data = first.read_bytes()
    a, b = record_offsets(data)
    first.write_bytes(data[a[0]:a[1]] + data[a[0]:a[1]] + data[b[0]:])  # step 0 twice
    with pytest.raises(JournalCorrupt, match="step 0 follows step 0"):
        list(Journal(d, 2).read_all())


def test_a_flipped_length_bit_mid_journal_refuses_to_start_and_keeps_every_record(servers, cache_dir, tmp_path):
    """The reported case: one bit of record 120's length of 150 is not a torn write."""
    cfg = server_config(cache_dir, server={"snapshot_every": 0})
    d = tmp_path / "d"
    srv = servers.start(cfg, d)
    c = servers.client(srv.address)
    for r in records(150):
        c.apply_update(r)
    srv.stop()
    seg = next(d.glob("journal-*.log"))
    data = bytearray(seg.read_bytes())
    start, _ = record_offsets(bytes(data))[120]
    data[start + 4 + 3] ^= 0x10  # the length field's high byte: the record now "runs past the end of the file"
    seg.write_bytes(bytes(data))
    before = {p.name: p.read_bytes() for p in d.iterdir() if p.is_file()}
    with pytest.raises(RecoveryError) as err:
        servers.start(cfg, d)
    assert f"{seg} at byte {start}" in str(err.value) and "header checksum" in str(err.value)
    assert {p.name: p.read_bytes() for p in d.iterdir() if p.is_file()} == before  # nothing deleted or truncated


# ----------------------------------------------------------------------------- disk full
def _fail_writes_after(monkeypatch, first_bytes: int) -> list[int]:
    """os.write in the journal writes ``first_bytes`` of the next record, then the disk is full."""
    import paramserver.durability.journal as journal

    real = os.write
    calls = []

    def write(fd: int, data) -> int:  # noqa: ANN001
        calls.append(len(data))
        if len(calls) == 1:
            return real(fd, bytes(data)[:first_bytes])
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(journal.os, "write", write)
    return calls


def test_a_failed_append_leaves_nothing_behind_and_the_data_dir_recovers(servers, cache_dir, tmp_path, monkeypatch):
    cfg = server_config(cache_dir, server={"snapshot_every": 0})
    d = tmp_path / "d"
    srv = servers.start(cfg, d)
    c = servers.client(srv.address)
    rs = records(6)
    for r in rs[:3]:
        c.apply_update(r)
    seg = next(d.glob("journal-*.log"))
    size = seg.stat().st_size
    for attempt in range(3):  # the reported case: the same step failing, then retried, three times
        calls = _fail_writes_after(monkeypatch, 10)
        with pytest.raises(grpc.RpcError) as err:
            c.apply_update(rs[3])
        assert calls, "the journal was not written"
        assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, err.value
        assert "no space left on the disk holding" in err.value.details() and str(d.resolve()) in err.value.details()
        assert seg.stat().st_size == size  # the partial record is gone
        monkeypatch.undo()
    for r in rs[3:]:
        c.apply_update(r)
    srv.state.drain()
    want = server_weights(srv)
    srv.stop()
    again = servers.start(cfg, d)
    assert [r.step for r in again.state.journal.read_all(repair=False)] == list(range(6))  # each step once
    assert again.state.store.applied_version() == 6
    assert all(np.array_equal(a, b) for a, b in zip(server_weights(again), want))
    assert all(np.array_equal(a, b.numpy()) for a, b in zip(want, expected_weights(cache_dir, 6)))


def _mount_tmpfs(path: Path, size: str) -> bool:
    path.mkdir(parents=True, exist_ok=True)
    if os.geteuid() != 0:
        return False
    return subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
                          capture_output=True).returncode == 0


def test_a_really_full_disk_during_appends(servers, cache_dir, tmp_path):
    """The same on a real filesystem that runs out of space (a small tmpfs; needs root to mount it)."""
    mnt = tmp_path / "small-disk"
    if not _mount_tmpfs(mnt, "3m"):
        pytest.skip("mounting a small tmpfs needs root (the injected-fault test above covers the logic)")
    try:
        cfg = server_config(cache_dir, server={"snapshot_every": 0})
        srv = servers.start(cfg, mnt / "d")
        srv.state._wait_snapshot()  # the initial snapshot (1 MB) is written
        c = servers.client(srv.address)
        rs = records(300)
        c.apply_update(rs[0])
        filler = mnt / "filler"
        fd = os.open(filler, os.O_WRONLY | os.O_CREAT)
        try:  # fill the disk to the last byte
            for size in (1 << 16, 4096, 1):
                try:
                    while True:
                        os.write(fd, bytes(size))
                except OSError as exc:
                    assert exc.errno == errno.ENOSPC
        finally:
            os.close(fd)
        seg = next((mnt / "d").glob("journal-*.log"))
        with pytest.raises(grpc.RpcError) as err:
            for r in rs[1:]:  # the journal's last page still takes records until it is full (~100)
                c.apply_update(r)
        assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and "no space left" in err.value.details()
        done = srv.state.journal.next_step
        assert 1 <= done < 300
        assert len(record_offsets(seg.read_bytes())) == done  # only complete records: nothing of the failed one
        filler.unlink()  # space returns
        for r in rs[done:]:
            c.apply_update(r)
        srv.state.drain()
        want = server_weights(srv)
        srv.stop()
        again = servers.start(cfg, mnt / "d")
        assert [r.step for r in again.state.journal.read_all(repair=False)] == list(range(300))
        assert all(np.array_equal(a, b) for a, b in zip(server_weights(again), want))
        assert all(np.array_equal(a, b.numpy()) for a, b in zip(want, expected_weights(cache_dir, 300)))
        again.stop()
    finally:
        subprocess.run(["umount", "-l", str(mnt)], capture_output=True)


# ----------------------------------------------------------------------------- snapshots
def _two_snapshots(servers, cache_dir, d: Path):
    cfg = server_config(cache_dir, server={"snapshot_every": 2})
    s = servers.start(cfg, d)
    c = servers.client(s.address)
    for r in records(4):
        s.state._wait_snapshot()
        c.apply_update(r)
        s.state.drain()
    s.state._wait_snapshot()
    want = server_weights(s)
    numels = {b: s.state.manifest.blocks[b].numel for b in s.state.owned}
    digest = s.state.digest
    s.stop()
    assert [x.version for x in list_snapshots(d)] == [2, 4]
    return cfg, want, numels, digest


def _structural_offsets(path: Path, numels: dict[int, int]) -> list[int]:
    """The header length, every header byte, and the first, middle and last byte of each block."""
    import json
    import struct

    raw = path.read_bytes()
    n = struct.unpack("<Q", raw[:8])[0]
    header = json.loads(raw[8 : 8 + n])
    out = list(range(8 + n))
    for key, spec in header.items():
        if key == "__metadata__":
            continue
        a, b = spec["data_offsets"]
        out += [8 + n + a, 8 + n + (a + b) // 2, 8 + n + b - 1]
    return out


def test_every_flipped_bit_of_a_snapshot_or_its_sidecar_is_detected(servers, cache_dir, tmp_path):
    d = tmp_path / "d"
    _, want, numels, digest = _two_snapshots(servers, cache_dir, d)
    newest = list_snapshots(d)[-1]
    data = newest.path.read_bytes()
    for offset in _structural_offsets(newest.path, numels):
        for bit in range(8):
            bad = bytearray(data)
            bad[offset] ^= 1 << bit
            newest.path.write_bytes(bytes(bad))
            with pytest.raises(SnapshotCorrupt):
                load_snapshot(list_snapshots(d)[-1], digest, numels)
    newest.path.write_bytes(data)
    sidecar = newest.path.with_suffix(".json")
    meta = sidecar.read_bytes()
    for offset in range(len(meta)):
        for bit in range(8):
            bad = bytearray(meta)
            bad[offset] ^= 1 << bit
            sidecar.write_bytes(bytes(bad))
            infos = [i for i in list_snapshots(d) if i.path == newest.path]
            if infos:  # still named like a sidecar: it must fail its checks
                with pytest.raises(SnapshotCorrupt):
                    load_snapshot(infos[0], digest, numels)
    sidecar.write_bytes(meta)
    restored = load_snapshot(list_snapshots(d)[-1], digest, numels)  # undamaged again: loads, the version-4 weights
    assert all(np.array_equal(restored[b], w) for b, w in zip(sorted(numels), want))


def test_a_damaged_snapshot_falls_back_bitwise_and_all_damaged_refuses(servers, cache_dir, tmp_path):
    d = tmp_path / "d"
    cfg, want, numels, _ = _two_snapshots(servers, cache_dir, d)
    for damage in ("header", "block", "sidecar"):
        newest = list_snapshots(d)[-1]
        target = newest.path.with_suffix(".json") if damage == "sidecar" else newest.path
        orig = target.read_bytes()
        bad = bytearray(orig)
        bad[{"header": 40, "block": len(orig) - 5, "sidecar": 30}[damage]] ^= 0x04
        target.write_bytes(bytes(bad))
        s = servers.start(cfg, d)  # the older snapshot plus the journal behind it
        assert s.state.store.applied_version() == 4, damage
        assert all(np.array_equal(a, b) for a, b in zip(server_weights(s), want)), damage
        s.stop()
        target.write_bytes(orig)
    for info in list_snapshots(d):
        raw = bytearray(info.path.read_bytes())
        raw[-7] ^= 0x01
        info.path.write_bytes(bytes(raw))
    with pytest.raises(RecoveryError, match="fail their checks"):
        servers.start(cfg, d)


def test_state_file_damage_or_another_model_is_refused(servers, cache_dir, tmp_path):
    d = tmp_path / "d"
    cfg = server_config(cache_dir)
    s = servers.start(cfg, d)
    servers.client(s.address).apply_update(records(1)[0])
    s.stop()
    other = server_config(cache_dir, model={"source": "tiny-llama"})
    with pytest.raises(RecoveryError, match="holds the state of another model or layout: .*model.source is 'tiny-opt' there and 'tiny-llama' here"):
        servers.start(other, d)
    state = d / "state.json"
    orig = state.read_bytes()
    for offset in range(len(orig)):
        bad = bytearray(orig)
        bad[offset] ^= 0x01
        state.write_bytes(bytes(bad))
        with pytest.raises(RecoveryError, match="state.json is damaged"):
            servers.start(cfg, d)
    state.write_bytes(orig)
    assert servers.start(cfg, d).state.store.applied_version() == 1


def test_state_files_are_private_to_the_service_user(servers, cache_dir, tmp_path):
    d = tmp_path / "d"
    cfg = server_config(cache_dir, server={"snapshot_every": 2})
    s = servers.start(cfg, d)
    c = servers.client(s.address)
    for r in records(2):
        c.apply_update(r)
    s.state.drain()
    s.state._wait_snapshot()
    s.stop()
    assert stat.S_IMODE(d.stat().st_mode) == 0o700
    files = [p for p in d.iterdir() if p.is_file()]
    assert {p.suffix for p in files} >= {".log", ".safetensors", ".json"}
    for p in files:
        assert stat.S_IMODE(p.stat().st_mode) == 0o600, p


def test_a_server_refuses_the_updates_of_another_job(servers, cache_dir, tmp_path, capsys):
    import json

    from distzo.common.durable import job_id, job_identity

    cfg = server_config(cache_dir)
    s = servers.start(cfg, tmp_path / "d")
    c = servers.client(s.address)
    ours = job_identity(cfg)
    rs = records(2)
    c.apply_update(rs[0], job_id=job_id(ours), job_identity_json=json.dumps(ours))
    for field, value in (("seed", 7), ("max_consecutive_skips", 3)):  # a field of the old list, one it lacked
        theirs = job_identity(cfg.with_overrides({f"train.{field}": value}))
        with pytest.raises(grpc.RpcError) as err:
            c.apply_update(rs[1], job_id=job_id(theirs), job_identity_json=json.dumps(theirs))
        assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION, err.value.details()
        assert "a new job needs a new data directory" in err.value.details()
        assert f"train.{field} is" in err.value.details() and f"there and {value} here" in err.value.details()
    with pytest.raises(grpc.RpcError) as err:  # an id that is not the digest of the identity it comes with
        c.apply_update(rs[1], job_id="0" * 16, job_identity_json=json.dumps(ours))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    st = c.status()[0]
    assert st.job_id == job_id(ours) and json.loads(st.job_identity_json) == ours and st.journaled_steps == 1
    s.stop()
    again = servers.start(cfg, tmp_path / "d")  # the claim survives a restart
    assert servers.client(again.address).status()[0].job_id == job_id(ours)
    # one server per data directory: a second one is refused at once, in one line, exit 2, and takes nothing
    journal = {p: p.read_bytes() for p in (tmp_path / "d").glob("journal-*.log")}
    with pytest.raises(DirectoryBusy, match=f"in use by pid {os.getpid()}"):
        ParamServer(cfg, tmp_path / "d")
    cfg_file = tmp_path / "job.yaml"
    cfg_file.write_text(cfg.to_yaml())
    capsys.readouterr()  # what the servers above logged (their warnings) is not the refusal's output
    code = paramserver_main(["--config", str(cfg_file), "--data-dir", str(tmp_path / "d"), "--listen", "127.0.0.1:0",
                             "--metrics-port", "-1"])
    err_text = capsys.readouterr().err
    assert code == 2 and err_text.count("\n") == 1 and "data directory" in err_text and "is in use by pid" in err_text
    assert {p: p.read_bytes() for p in (tmp_path / "d").glob("journal-*.log")} == journal
    assert servers.client(again.address).status()[0].journaled_steps == 1  # the first one serves on
