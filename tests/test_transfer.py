"""Weights in and out through fsspec, verified by SHA-256 (distzo.model.transfer), and a coordinator that
runs its job as a unit that completes (--exit-when-done) and pushes the export to a URL."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from distzo.model.transfer import SUMS, TransferError, pull, push, write_sums
from paramserver.server import ParamServer

from clusterhelpers import wait_until
from test_cluster import base_config, same_weights


def model_dir(root: Path) -> Path:
    d = root / "src"
    (d / "sub").mkdir(parents=True)
    (d / "config.json").write_text('{"a": 1}')
    (d / "model.safetensors").write_bytes(bytes(range(256)) * 1000)
    (d / "sub" / "tokenizer.json").write_text("{}")
    write_sums(d)
    return d


def transfer(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "distzo.model.transfer", *args], capture_output=True, text=True, timeout=120)


def test_pull_verifies_every_file_and_keeps_what_is_already_there(tmp_path):
    src = model_dir(tmp_path)
    said: list[str] = []
    sums = pull(src.as_uri(), tmp_path / "dst", say=said.append)  # file:// through fsspec
    assert set(sums) == {"config.json", "model.safetensors", "sub/tokenizer.json"} and len(said) == 3
    for name in sums:
        assert (tmp_path / "dst" / name).read_bytes() == (src / name).read_bytes()
    said.clear()
    pull(str(src), tmp_path / "dst", say=said.append)  # a plain path works too; nothing fetched again
    assert said == []
    # a damaged file at the source: refused, naming it, and nothing half-written left behind
    (src / "model.safetensors").write_bytes(b"\0" * 10)
    (tmp_path / "dst" / "model.safetensors").unlink()
    with pytest.raises(TransferError, match=r"model.safetensors: sha256 [0-9a-f]{64} does not match"):
        pull(src.as_uri(), tmp_path / "dst")
    assert not (tmp_path / "dst" / "model.safetensors").exists()
    assert not list((tmp_path / "dst").glob("*.tmp-*"))


@pytest.mark.parametrize("sums,needle", [
    (None, "has no SHA256SUMS"),
    ("not a line\n", "not a sha256sum line"),
    ("0" * 64 + "  ../etc/passwd\n", "unsafe path '../etc/passwd'"),
    ("0" * 64 + "  /abs\n", "unsafe path '/abs'"),
])
def test_a_source_without_valid_checksums_is_refused(tmp_path, sums, needle):
    src = tmp_path / "m"
    src.mkdir()
    (src / "config.json").write_text("{}")
    if sums is not None:
        (src / SUMS).write_text(sums)
    with pytest.raises(TransferError, match=needle.replace("(", r"\(").replace(".", r"\.")):
        pull(src.as_uri(), tmp_path / "dst")
    r = transfer("pull", src.as_uri(), str(tmp_path / "dst"))
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and needle in r.stderr, r.stderr


def test_push_then_pull_round_trip(tmp_path):
    src = model_dir(tmp_path)
    (src / SUMS).unlink()
    url = (tmp_path / "store" / "run1").as_uri()
    r = transfer("push", str(src), url)
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "store" / "run1" / SUMS).is_file()
    r = transfer("pull", url, str(tmp_path / "back"))
    assert r.returncode == 0 and "3 files" in r.stderr, r.stderr
    assert (tmp_path / "back" / "sub" / "tokenizer.json").read_text() == "{}"


@pytest.mark.cluster
@pytest.mark.timeout(900)
def test_a_batch_coordinator_ends_with_the_job_and_pushes_the_export(cache_dir, tmp_path, references):
    cfg = base_config(cache_dir, steps=4)
    server = ParamServer(cfg, tmp_path / "server").start()
    cfg_path = tmp_path / "job.yaml"
    cfg_path.write_text(cfg.to_yaml())
    url = (tmp_path / "bucket" / "run1").as_uri()
    ready = tmp_path / "coordinator.json"
    coordinator = subprocess.Popen(
        [sys.executable, "-m", "coordinator", "--config", str(cfg_path), "--param-server", server.address,
         "--listen", "127.0.0.1:0", "--metrics-port", "-1", "--ready-file", str(ready), "--exit-when-done",
         "--export-to", url], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    worker = None
    try:
        wait_until(lambda: ready.is_file() or coordinator.poll() is not None, timeout=300, what="coordinator up")
        address = json.loads(ready.read_text())["address"]
        worker = subprocess.Popen([sys.executable, "-m", "gpuworker", "--coordinator", address, "--device", "cpu",
                                   "--worker-id", "w0", "--metrics-port", "-1"],
                                  stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        code = coordinator.wait(timeout=600)  # the run ends by itself: the process's exit is its outcome
        assert code == 0, coordinator.stderr.read()[-3000:]
    finally:
        for p in (worker, coordinator):
            if p is not None and p.poll() is None:
                p.kill()
                p.wait()
        server.stop(grace=0.5)
    back = tmp_path / "back"
    pull(url, back)  # the pushed export, verified against the SHA256SUMS it carries
    assert "Fine-tuned by distzo (distributed)" in (back / "README.md").read_text()
    assert same_weights(back, references.get(cfg).out)


def test_an_export_url_cannot_escape_the_export_root_or_use_other_protocols(cache_dir, tmp_path):
    import grpc

    from paramserver.dataplane.client import ParamServerClient

    cfg = base_config(cache_dir, server={"export_root": str(tmp_path / "exports")})
    server = ParamServer(cfg, tmp_path / "server").start()
    try:
        with ParamServerClient(server.address).connect() as c:
            for url, code, needle in (((tmp_path / "elsewhere").as_uri(), grpc.StatusCode.PERMISSION_DENIED, "outside server.export_root"),
                                      ("http://example.invalid/x", grpc.StatusCode.INVALID_ARGUMENT, "scheme 'http'")):
                with pytest.raises(grpc.RpcError) as exc:
                    c.export(url)
                assert exc.value.code() == code and needle in exc.value.details(), exc.value.details()
            assert not (tmp_path / "elsewhere").exists()
            reply = c.export((tmp_path / "exports" / "pushed").as_uri())  # under the root: allowed
            assert reply.path.endswith("/exports/pushed") and (tmp_path / "exports" / "pushed" / SUMS).is_file()
    finally:
        server.stop(grace=0.5)
