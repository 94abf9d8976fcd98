"""Durable metadata: what a job is, and small files that carry their own checksum.

**Job identity.** Two configs describe the same training trajectory when the fields that
decide the weights agree: the model, the training data and its encoding, every training
setting, the layout's arithmetic, the served dtype. ``job_identity`` derives them from the
config schema (each section says which of its fields do: ``distzo.common.configsections.Section``; eval
cadence, timeouts, threads and paths do not change the weights); ``job_id`` is its digest. A run directory, a run log and a parameter server's data directory record the
identity of the job they hold, so a different job is refused instead of silently resuming
someone else's state.

**Checked JSON.** ``write_checked_json`` writes ``{"sha256": ..., "body": {...}}`` atomically
(temporary file, fsync, rename, fsync of the directory) and private to the user;
``read_checked_json`` returns the body or raises ``CorruptFile`` naming the file: a flipped
bit anywhere in such a file is detected, not believed.
"""

from __future__ import annotations

import hashlib
import json
import os
import uuid
from pathlib import Path
from typing import Any

from distzo.common.errors import BadInput

FILE_MODE = 0o600


class CorruptFile(BadInput):
    """A metadata file that does not pass its own checksum."""


class JobMismatch(BadInput):
    """State of one job met the config of another."""


def fsync_dir(d: Path) -> None:
    """Make a rename or a new file in ``d`` durable."""
    fd = os.open(d, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _canonical(obj: Any) -> bytes:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), allow_nan=False).encode()


def write_atomic(path: Path, data: bytes, mode: int = FILE_MODE) -> None:
    """Replace ``path`` with ``data`` whole: written to a temporary file of a name no other writer uses
    (several processes may write the same file at once), fsync'd, renamed into place, the directory
    fsync'd. A reader sees the old content or the new, never a mix; a failed write leaves nothing."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}-{uuid.uuid4().hex[:8]}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def write_checked_json(path: Path, body: dict[str, Any]) -> None:
    write_atomic(Path(path), _canonical({"sha256": hashlib.sha256(_canonical(body)).hexdigest(), "body": body}))


def read_checked_json(path: Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():  # a directory, a device, a dangling link: not a file this module wrote
        raise CorruptFile(f"{path} is not a regular file: expected the checksummed JSON file distzo writes there")
    try:
        doc = json.loads(path.read_bytes())
        body, digest = doc["body"], doc["sha256"]
        ok = isinstance(body, dict) and hashlib.sha256(_canonical(body)).hexdigest() == digest
    except (ValueError, KeyError, TypeError, UnicodeDecodeError):
        ok = False
    if not ok:
        raise CorruptFile(f"{path} is damaged: it does not pass its own checksum")
    return body


# ----------------------------------------------------------------------------- job identity
def job_identity(cfg: Any) -> dict[str, Any]:
    """The config fields that decide the weights (dotted names -> JSON values), from a ``JobConfig``.

    Derived from the schema, not listed here: every field of every section, by its section's identity
    roles (``distzo.common.configsections.Section``): the trajectory's fields are in, at their default only when they
    were always recorded (older job ids stay valid) or their condition holds; the rest (threads, ports,
    paths, timeouts, evaluation cadence) are out, so a resume may change them."""
    from distzo.common.configsections import NOT, When  # pydantic, only here: zoctl's light commands read run files

    ident: dict[str, Any] = {}
    for name in type(cfg).model_fields:
        section = getattr(cfg, name)
        cls = type(section)
        values = section.model_dump(mode="json")
        for field, info in cls.model_fields.items():
            role = cls.IDENTITY.get(field, None if cls.TRAJECTORY else NOT)
            if role == NOT or (isinstance(role, When) and not role.applies(section)):
                continue
            if role is None and values[field] == _default(info):
                continue  # at its default: absent, so that a field added later changes no existing job id
            ident[f"{name}.{field}"] = values[field]
    return ident


def _default(info: Any) -> Any:
    value = info.default_factory() if info.default_factory is not None else info.default
    return json.loads(json.dumps(value))  # as model_dump(mode="json") gives it


def identity_default(key: str) -> Any:
    """The default value of identity field ``key`` ("train.lora_alpha"): what its absence means."""
    from distzo.common.config import JobConfig  # pydantic, only here (see job_identity)

    section, _, field = key.partition(".")
    try:
        return _default(JobConfig.model_fields[section].annotation.model_fields[field])
    except (KeyError, AttributeError):
        return None


def job_id(identity: dict[str, Any]) -> str:
    return hashlib.sha256(_canonical(identity)).hexdigest()[:16]


def differences(recorded: dict[str, Any], ours: dict[str, Any], limit: int = 3) -> str:
    """'train.seed is 0 there and 1 here; ...' (at most ``limit`` fields, values shortened)."""
    def short(v: Any) -> str:
        text = repr(v)
        return text if len(text) <= 60 else text[:57] + "..."

    diff = []
    for k in sorted(set(recorded) | set(ours)):  # an absent field is at its default (or does not apply)
        there, here = (short(d.get(k, identity_default(k))) for d in (recorded, ours))
        if recorded.get(k) != ours.get(k) and there != here:
            diff.append(f"{k} is {there} there and {here} here")
    more = f" (and {len(diff) - limit} more)" if len(diff) > limit else ""
    return "; ".join(diff[:limit]) + more


def check_same_job(path: Path, cfg: Any, what: str) -> None:
    """Raise JobMismatch if the identity recorded at ``path`` is not ``cfg``'s (CorruptFile if damaged)."""
    recorded = read_checked_json(path).get("identity", {})
    ours = job_identity(cfg)
    if job_id(recorded) != job_id(ours):
        raise JobMismatch(f"{what} holds another job: {differences(recorded, ours)}. Use a new directory for a new "
                          "job, or the same config to resume")


def record_job(path: Path, cfg: Any) -> None:
    ident = job_identity(cfg)
    write_checked_json(path, {"job_id": job_id(ident), "identity": ident})
