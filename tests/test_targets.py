"""zoctl finds the right cluster: per run directory or named context, never a machine-wide "latest" one."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from coordinator.zoctl import targets
from coordinator.zoctl.targets import TargetError, resolve

ROOT = Path(__file__).resolve().parents[1]


def record(run_dir: Path, port: int, supervisor: int | None = None, coordinator: int | None = None) -> Path:
    """A cluster record as `zoctl up` writes it; the pids default to this (live) test process."""
    run_dir.mkdir(parents=True, exist_ok=True)
    info = {"coordinator": f"127.0.0.1:{port}", "token_file": str(run_dir / "token"), "run_dir": str(run_dir),
            "pids": {"coordinator": coordinator or os.getpid()}, "supervisor_pid": supervisor or os.getpid()}
    (run_dir / "token").write_text("t0ken\n")
    (run_dir / targets.CLUSTER_FILE).write_text(json.dumps(info))
    return run_dir


def dead_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


def zoctl(*args: str, cwd: Path, home: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "HOME": str(home), "XDG_CONFIG_HOME": str(home / ".config"),
           "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    return subprocess.run([sys.executable, "-m", "coordinator.zoctl.cli", *args], capture_output=True, text=True, timeout=120,
                          cwd=cwd, env=env)


@pytest.fixture
def home(tmp_path, monkeypatch):
    h = tmp_path / "home"
    # a global record as earlier versions wrote it, of someone else's cluster: never read
    latest = h / ".cache" / "distzo" / "clusters" / "latest.json"
    latest.parent.mkdir(parents=True)
    latest.write_text(json.dumps({"coordinator": "127.0.0.1:9", "token_file": None}))
    monkeypatch.setenv("HOME", str(h))
    monkeypatch.setenv("XDG_CONFIG_HOME", str(h / ".config"))
    return h


def test_two_running_clusters_are_never_chosen_between_silently(tmp_path, home):
    work = tmp_path / "work"
    record(work / "runs" / "a", 1)
    record(work / "runs" / "b", 2)
    with pytest.raises(TargetError) as exc:
        resolve(cwd=work)
    assert exc.value.code == 2 and "runs/a, runs/b" in str(exc.value) and "--run-dir" in str(exc.value)
    r = zoctl("status", cwd=work, home=home)
    assert r.returncode == 2 and "2 local clusters are running here (runs/a, runs/b)" in r.stderr, r.stderr
    assert r.stderr.count("\n") == 1 and "Traceback" not in r.stderr
    # naming one reaches that one, and says so
    for name, port in (("a", 1), ("b", 2)):
        t = resolve(run_dir=str(work / "runs" / name))
        assert t.address == f"127.0.0.1:{port}" and t.token_file == str(work / "runs" / name / "token")
        r = zoctl("status", "--run-dir", f"runs/{name}", cwd=work, home=home)
        assert r.returncode == 3, r.stderr
        assert f"zoctl: coordinator 127.0.0.1:{port} (the local cluster of runs/{name})" in r.stderr
        assert f"cannot reach the coordinator at 127.0.0.1:{port}" in r.stderr
    # inside a run directory, that run's cluster
    t = resolve(cwd=work / "runs" / "b")
    assert t.address == "127.0.0.1:2" and t.source == "the local cluster of this run directory"


def test_a_finished_or_foreign_cluster_is_not_picked(tmp_path, home, monkeypatch):
    work = tmp_path / "work"
    record(work / "runs" / "old", 5, supervisor=dead_pid())  # killed `zoctl up`: its record stayed
    record(work / "runs" / "live", 6)
    t = resolve(cwd=work)
    assert t.address == "127.0.0.1:6" and t.source == "the local cluster of runs/live"
    with pytest.raises(TargetError) as exc:
        resolve(run_dir=str(work / "runs" / "old"))
    assert exc.value.code == 3 and "no longer running" in str(exc.value)
    record(work / "runs" / "old2", 7, coordinator=dead_pid())
    assert resolve(cwd=work).address == "127.0.0.1:6"
    # another user's record (file owner): refused by name, never used
    monkeypatch.setattr(targets.os, "getuid", lambda: os.stat(work).st_uid + 1)
    with pytest.raises(TargetError) as exc:
        resolve(run_dir=str(work / "runs" / "live"))
    assert "belongs to another user" in str(exc.value)
    with pytest.raises(TargetError) as exc:
        resolve(cwd=work)
    assert exc.value.code == 3 and "none running here" in str(exc.value)


def test_nothing_named_and_nothing_here_is_an_error_not_the_global_record(tmp_path, home):
    empty = tmp_path / "empty"
    empty.mkdir()
    r = zoctl("eval", cwd=empty, home=home)
    assert r.returncode == 3 and r.stderr.count("\n") == 1, r.stderr
    assert "pass --run-dir DIR" in r.stderr and "127.0.0.1:9" not in r.stderr
    r = zoctl("status", "--run-dir", "nowhere", cwd=empty, home=home)
    assert r.returncode == 3 and "no local cluster is running in nowhere" in r.stderr, r.stderr


def test_named_contexts_as_kubectl_has_them(tmp_path, home):
    work = tmp_path / "work"
    work.mkdir()
    (work / "tok").write_text("x\n")
    r = zoctl("context", "set", "lab", "--coordinator", "127.0.0.1:3", "--token-file", "tok", cwd=work, home=home)
    assert r.returncode == 0, r.stderr
    saved = json.loads((home / ".config" / "distzo" / "contexts.json").read_text())
    assert saved["contexts"]["lab"] == {"coordinator": "127.0.0.1:3", "token_file": str(work / "tok")}
    assert oct((home / ".config" / "distzo" / "contexts.json").stat().st_mode & 0o777) == "0o600"
    r = zoctl("status", "--context", "lab", cwd=tmp_path, home=home)
    assert r.returncode == 3 and "zoctl: coordinator 127.0.0.1:3 (context lab)" in r.stderr, r.stderr
    r = zoctl("status", "--context", "nope", cwd=tmp_path, home=home)
    assert r.returncode == 2 and "unknown context 'nope' (known: lab" in r.stderr, r.stderr
    # the current context is used when nothing else names a cluster; a cluster running here comes first
    assert zoctl("context", "use", "lab", cwd=work, home=home).returncode == 0
    assert resolve(cwd=tmp_path).source == "context lab"
    record(work / "runs" / "a", 4)
    assert resolve(cwd=work).address == "127.0.0.1:4"
    listed = zoctl("context", "list", cwd=work, home=home)
    assert listed.returncode == 0 and "* lab" in listed.stdout and "127.0.0.1:3" in listed.stdout
    r = zoctl("context", "use", "nope", cwd=work, home=home)
    assert r.returncode == 2 and "unknown context 'nope'" in r.stderr
    assert zoctl("context", "delete", "lab", cwd=work, home=home).returncode == 0
    with pytest.raises(TargetError):
        resolve(cwd=tmp_path)


def test_concurrent_context_edits_all_land_and_damaged_files_are_one_line(tmp_path, home, capsys, monkeypatch):
    work = tmp_path / "work"
    work.mkdir()
    env = {**os.environ, "HOME": str(home), "XDG_CONFIG_HOME": str(home / ".config"),
           "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    procs = [subprocess.Popen([sys.executable, "-m", "coordinator.zoctl.cli", "context", "set", f"c{i}", "--coordinator",
                               f"127.0.0.1:{i + 1}"], cwd=work, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True) for i in range(8)]
    outs = [p.communicate(timeout=120) for p in procs]
    assert [p.returncode for p in procs] == [0] * 8, [err for _, err in outs]
    path = home / ".config" / "distzo" / "contexts.json"
    assert sorted(json.loads(path.read_text())["contexts"]) == [f"c{i}" for i in range(8)]  # no write lost
    from coordinator.zoctl.cli import main

    monkeypatch.chdir(work)
    assert sorted(p.name for p in path.parent.iterdir()) == ["contexts.json", "contexts.json.lock"]  # no temporaries
    # a contexts file of the wrong shape, or not a file: one line naming it, exit 2, from every command reading it
    for bad in ("[]", '{"contexts": []}', '{"contexts": {"a": 1}}', '{"contexts": {"a": {"coordinator": 5}}}',
                '{"current": 3, "contexts": {}}', '{"contexts": {"a": {"coordinator": "h:1", "token_file": ["x"]}}}', None):
        path.unlink()
        if bad is None:
            path.mkdir()
        else:
            path.write_text(bad)
        for cmd in (["context", "list"], ["context", "set", "x", "--coordinator", "h:1"], ["status"]):
            assert main(cmd) == 2, (bad, cmd)  # in process (fast): these fail before any network
            err = capsys.readouterr().err
            assert err.count("\n") == 1 and f"{path} (zoctl's named contexts) is damaged" in err, (bad, cmd, err)
        if bad is None:
            path.rmdir()
    # a cluster record of the wrong shape: named, exit 2 (not "unreachable")
    for info in ([], {"coordinator": "127.0.0.1:1", "pids": [1]}, {"coordinator": "127.0.0.1:1", "token_file": 7}):
        run = work / "runs" / "r"
        run.mkdir(parents=True, exist_ok=True)
        (run / targets.CLUSTER_FILE).write_text(json.dumps(info))
        assert main(["status", "--run-dir", str(run)]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and f"{run / targets.CLUSTER_FILE} is damaged" in err, err
