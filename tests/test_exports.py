"""An export reads the weights and writes only into its destination (issue 28, kind 1), at every entry
point: the parameter server's export (adapter, merged, full; a path or a URL), the reference's, a push.
Copies, never views of the weights trained; one complete export per destination, nothing stale; a
refused or failed export leaves nothing behind. (`zoctl up --out` and `zoctl reference --out` refusing
a destination before any work: tests/test_cli_input.py.)"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import grpc
import numpy as np
import pytest
import torch
from safetensors.numpy import load_file

from distzo.model.export import ASIDE, EXPORT_MARK, ExportRefused, check_destination, export_model_dir
from distzo.model.transfer import SUMS, push
from distzo.train.reference import ReferenceTrainer

from conftest import small_config
from pshelpers import Servers, server_config
from test_lora import LORA
from test_paramserver import records


@pytest.fixture
def servers():
    s = Servers()
    yield s
    s.close()


def files(d: Path) -> dict[str, bytes]:
    return {p.relative_to(d).as_posix(): p.read_bytes() for p in sorted(d.rglob("*")) if p.is_file()}


def master_digest(srv) -> str:  # noqa: ANN001 - a ParamServer
    h = hashlib.sha256()
    for b in srv.state.owned:
        h.update(srv.state.store.master[b].tobytes())
    return h.hexdigest()


def leftovers(d: Path) -> list[str]:
    return [p.name for p in d.iterdir() if ASIDE in p.name] if d.is_dir() else []


def test_server_exports_work_on_copies_and_replace_the_destination_whole(servers, cache_dir, tmp_path):
    cfg = server_config(cache_dir, train=LORA)
    srv = servers.start(cfg, tmp_path / "data")
    c = servers.client(srv.address)
    for r in records(3):  # B is no longer zero: a merge into the master would show
        c.apply_update(r)
    srv.state.drain()
    before = master_digest(srv)
    out = tmp_path / "out"
    c.export(str(out / "a"), merge=True)
    c.export(str(out / "b"), merge=True)  # the same version merged twice: the same model (it was W + 2sBA)
    a, b = load_file(str(out / "a" / "model.safetensors")), load_file(str(out / "b" / "model.safetensors"))
    assert sorted(a) == sorted(b) and all(np.array_equal(a[k].view(np.uint32), b[k].view(np.uint32)) for k in a)
    assert master_digest(srv) == before  # the weights being trained never moved
    # the merged export replaced by the adapter export: exactly the adapter's files, nothing of the merged model
    c.export(str(out / "a"))
    names = set(files(out / "a"))
    assert "adapter_model.safetensors" in names and "model.safetensors" not in names, names
    assert {EXPORT_MARK, "README.md", "adapter_config.json"} <= names
    assert master_digest(srv) == before and not leftovers(out)
    # refused exports leave nothing, here or under the data directory
    (out / "mine").mkdir()
    (out / "mine" / "notes.txt").write_text("keep me")
    (out / "file").write_text("not a directory")
    for dest, code, needle in ((out / "mine", grpc.StatusCode.FAILED_PRECONDITION, "not a distzo export"),
                               (out / "file", grpc.StatusCode.FAILED_PRECONDITION, "is a file")):
        with pytest.raises(grpc.RpcError) as err:
            c.export(str(dest), merge=True)
        assert err.value.code() == code and needle in err.value.details(), err.value.details()
    assert (out / "mine" / "notes.txt").read_text() == "keep me" and (out / "file").read_text() == "not a directory"
    # a URL export goes through a private copy under the data directory, removed once pushed
    url = (tmp_path / "bucket" / "run").as_uri()
    c.export(url, merge=True)
    assert files(tmp_path / "bucket" / "run")["model.safetensors"] == (out / "b" / "model.safetensors").read_bytes()
    assert not [p for p in (tmp_path / "data" / "exports").iterdir()], "the staged upload was left behind"
    assert master_digest(srv) == before and not leftovers(out) and not leftovers(tmp_path / "bucket")


def test_a_full_model_export_that_fails_midway_keeps_the_old_export_and_leaves_nothing(servers, cache_dir, tmp_path,
                                                                                      monkeypatch):
    srv = servers.start(server_config(cache_dir), tmp_path / "data")
    c = servers.client(srv.address)
    out = tmp_path / "out"
    c.export(str(out))
    old = files(out)
    assert "model.safetensors" in old and EXPORT_MARK in old
    import transformers

    def broken(self, *args, **kw):  # noqa: ANN001, ANN002, ANN003 - the disk fails mid-write
        Path(args[0], "model.safetensors").write_bytes(b"half")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(transformers.PreTrainedModel, "save_pretrained", broken)
    with pytest.raises(grpc.RpcError) as err:
        c.export(str(out))
    assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, err.value.details()
    assert files(out) == old and not leftovers(tmp_path)  # the earlier export, whole; no half-written copy


def test_the_reference_exports_copies_and_refuses_a_destination_before_training(cache_dir, tmp_path):
    cfg = small_config(cache_dir, train={**LORA, "steps": 2})
    tr = ReferenceTrainer(cfg)
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "data.csv").write_text("1,2\n")
    with pytest.raises(ExportRefused, match="not a distzo export"):
        tr.train(out_dir=tmp_path / "mine", progress=False)
    assert tr.log.evals == [] and (tmp_path / "mine" / "data.csv").read_text() == "1,2\n"  # nothing ran
    tr.train(out_dir=tmp_path / "a", progress=False, merge=True)
    kept = [b.clone() for b in tr.buffers]
    export_model_dir(tr.model, tr.buffers, tmp_path / "b", merge=True)  # the second merge of the same weights
    assert all(torch.equal(x, y) for x, y in zip(kept, tr.buffers))
    assert files(tmp_path / "a")["model.safetensors"] == files(tmp_path / "b")["model.safetensors"]


def test_a_push_leaves_exactly_the_new_files(tmp_path):
    first, second = tmp_path / "first", tmp_path / "second"
    for d, names in ((first, ("config.json", "model.safetensors", "sub/extra.txt")), (second, ("config.json", "adapter.bin"))):
        for n in names:
            (d / n).parent.mkdir(parents=True, exist_ok=True)
            (d / n).write_text(f"{d.name}:{n}")
    for dest in (str(tmp_path / "local"), (tmp_path / "url").as_uri()):
        where = Path(dest.removeprefix("file://"))
        push(first, dest)
        push(second, dest)
        assert set(files(where)) == {"config.json", "adapter.bin", SUMS}, files(where)
        assert files(where)["config.json"] == b"second:config.json" and not leftovers(tmp_path)
    (tmp_path / "someone").mkdir()
    (tmp_path / "someone" / "x").write_text("x")
    with pytest.raises(ExportRefused):
        push(first, str(tmp_path / "someone"))
    assert files(tmp_path / "someone") == {"x": b"x"}


def test_destinations_an_export_refuses(tmp_path):
    (tmp_path / "f").write_text("x")
    os.symlink(tmp_path / "f", tmp_path / "link")
    (tmp_path / "ro").mkdir(mode=0o500)
    cases = [(tmp_path / "f", "is a file"), (tmp_path / "link", "is a link")]
    if os.geteuid() != 0:  # root writes anywhere
        cases.append((tmp_path / "ro" / "new", "is not a directory this user can write in"))
    try:
        for dest, needle in cases:
            with pytest.raises(ExportRefused, match=needle):
                check_destination(dest)
    finally:
        (tmp_path / "ro").chmod(0o700)
    (tmp_path / "empty").mkdir()
    assert check_destination(tmp_path / "empty") == tmp_path / "empty"
    assert check_destination(tmp_path / "new" / "deeper") == tmp_path / "new" / "deeper"
