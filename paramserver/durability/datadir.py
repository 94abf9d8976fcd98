"""The parameter server's data directory: what it holds, which job claimed it, and letting its history go.

``state.json`` records what the journal and snapshots beside it belong to (the model, the distribution of z,
the block range, the manifest's digest, a stateful optimizer) and the job whose updates the directory takes:
a server refuses a directory of another model or layout (``RecoveryError``) and another job's updates
(``UpdateRejected``). ``LOCK`` is held (flock) by the one server using the directory. Exports go to its
``exports/`` unless ``server.export_root`` says otherwise (``export_path``).
"""

from __future__ import annotations

import errno
import hashlib
import json
import logging
import uuid
from pathlib import Path

from distzo.common.durable import CorruptFile, differences, read_checked_json, write_checked_json
from distzo.common.locks import DirLock
from distzo.infra.logs import kv
from distzo.model.export import ASIDE, check_destination, check_export_root
from paramserver.durability.journal import Journal, JournalWriteError, describe_disk
from paramserver.durability.snapshot import list_snapshots

log = logging.getLogger("distzo.paramserver")
STATE_FILE = "state.json"  # what the data directory holds: model, layout, and the job that journals into it
LOCK_FILE = "LOCK"  # held (flock) by the one server using the data directory (distzo.common.locks)


class UpdateRejected(ValueError):
    """An update the server will not apply (gap, conflicting duplicate, another job's, replica)."""


class RecoveryError(RuntimeError):
    """The data directory cannot be turned back into the weights."""


def manifest_digest(manifest_json: str) -> str:
    """The sha256 hex digest of ``manifest_json`` (the server appends its block range: the digest names its layout)."""
    return hashlib.sha256(manifest_json.encode()).hexdigest()


def lock_data_dir(data_dir: Path) -> DirLock:
    """Create ``data_dir`` (mode 0700) if needed and take its lock, held until the caller releases it; raises
    what ``DirLock.acquire`` raises while another server holds it."""
    data_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    data_dir.chmod(0o700)  # snapshots and journal are private to the service's user
    # one server per data directory, for its whole life: a second one would append to the same journal
    return DirLock(data_dir, LOCK_FILE, "the parameter server's data directory").acquire()


def check_data_dir(data_dir: Path, ours: dict) -> dict | None:
    """The job recorded in ``data_dir``'s state.json (None: no job yet), after checking that the directory holds
    ``ours`` (model.source, train.distribution, blocks, manifest_sha256, train.optimizer when stateful); a new
    directory records ``ours``. Raises RecoveryError for a damaged state.json or another model or layout."""
    path = data_dir / STATE_FILE
    if not path.exists():
        if any(data_dir.glob("journal-*.log")) or any(data_dir.glob("snapshot-*.json")):
            log.warning("adopting a data directory written before state.json existed", extra=kv(dir=str(data_dir)))
        write_checked_json(path, {"server": ours, "job": None})
        return None
    try:
        body = read_checked_json(path)
    except CorruptFile as exc:
        raise RecoveryError(f"{exc}; it records which model and job the data directory holds, so the server "
                            "will not guess") from None
    recorded = body.get("server") or {}
    if recorded != ours:
        raise RecoveryError(f"the data directory {data_dir} holds the state of another model or layout: "
                            f"{differences(recorded, ours)}. Use a new --data-dir (or the config it was made with)")
    return body.get("job")


def claim_data_dir(data_dir: Path, job: dict | None, job_id: str, identity_json: str) -> dict:
    """The job that holds ``data_dir`` once ``job_id`` asked for it: ``job_id``'s, recorded in state.json when
    ``job`` (the one recorded) is None; ``job`` itself when it is ``job_id``'s. Raises UpdateRejected for another
    job's directory (naming what differs in the jobs' identities), JournalWriteError when state.json cannot be
    written (nothing journaled)."""
    if job is None:
        try:
            identity = json.loads(identity_json) if identity_json else None
        except ValueError:
            identity = None
        job = {"job_id": job_id, "identity": identity}
        body = read_checked_json(data_dir / STATE_FILE)
        try:
            write_checked_json(data_dir / STATE_FILE, {**body, "job": job})
        except OSError as exc:
            full = exc.errno in (errno.ENOSPC, errno.EDQUOT)
            raise JournalWriteError(exc.errno or errno.EIO, (f"no space left on {describe_disk(data_dir)}" if full
                                    else f"writing {STATE_FILE} failed: {exc.strerror}") +
                                    "; the update was not journaled") from None
        log.info("data directory claimed by a job", extra=kv(job_id=job_id))
    elif job.get("job_id") != job_id:
        try:
            theirs = json.loads(identity_json) if identity_json else None
        except ValueError:
            theirs = None
        why = (f" ({differences(job.get('identity') or {}, theirs)})" if isinstance(theirs, dict)
               and isinstance(job.get("identity"), dict) else "")
        raise UpdateRejected(f"this parameter server's data directory holds job {job.get('job_id')} "
                             f"(recorded in its {STATE_FILE}), not job {job_id[:32]}{why}: a new job "
                             "needs a new data directory")
    return job


def remove_history(data_dir: Path, journal: Journal) -> None:
    """Delete the journal's segments and the snapshots (with their sidecars) from ``data_dir``."""
    for seg in journal.segments():
        seg.path.unlink()
    for snap in list_snapshots(data_dir):
        snap.path.unlink(missing_ok=True)
        snap.path.with_suffix(".json").unlink(missing_ok=True)


def export_path(path: str, data_dir: Path, export_root: str | None) -> Path:
    """Where an export to ``path`` goes (a relative path: under ``export_root`` (server.export_root), else
    ``data_dir``'s exports/), checked before any work: raises PermissionError outside the export root,
    ExportRefused for a destination that is a file or a directory that is not an earlier export."""
    p = Path(path)
    if not p.is_absolute():
        p = (Path(export_root) if export_root else data_dir / "exports") / p
    check_export_root(p, export_root)
    return check_destination(p)


def staging_dir(data_dir: Path) -> Path:
    """A new private directory path for an export on its way to a URL (removed by the caller; what a
    killed server left there is removed when it starts again)."""
    return data_dir / "exports" / f".upload{ASIDE}{uuid.uuid4().hex[:12]}"
