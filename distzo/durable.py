"""Durable metadata: what a job is, and small files that carry their own checksum.

**Job identity.** Two configs describe the same training trajectory when the fields that
decide the weights agree: the model, the training data and its encoding, the seeds, the
optimizer settings and the layout's arithmetic. ``job_identity`` lists exactly those (eval
cadence, timeouts, threads and paths of logs do not change the weights); ``job_id`` is its
digest. A run directory, a run log and a parameter server's data directory record the
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
from pathlib import Path
from typing import Any

from distzo.errors import BadInput

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


def write_checked_json(path: Path, body: dict[str, Any]) -> None:
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, FILE_MODE)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(_canonical({"sha256": hashlib.sha256(_canonical(body)).hexdigest(), "body": body}))
            f.flush()
            os.fsync(f.fileno())
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    os.replace(tmp, path)
    fsync_dir(path.parent)


def read_checked_json(path: Path) -> dict[str, Any]:
    path = Path(path)
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
    """The config fields that decide the weights (dotted names), from a ``JobConfig``."""
    t, d, lay = cfg.train, cfg.data, cfg.layout
    ident: dict[str, Any] = {
        "model.source": cfg.model.source,
        "data.train": d.train, "data.dev": d.dev, "data.dev_examples": d.dev_examples,
        "data.template": d.template, "data.label_words": list(d.label_words), "data.max_seq_len": d.max_seq_len,
        "train.batch_size": t.batch_size, "train.eps": t.eps, "train.lr": t.lr, "train.lr_schedule": t.lr_schedule,
        "train.warmup_steps": t.warmup_steps, "train.min_lr_ratio": t.min_lr_ratio,
        "train.weight_decay": t.weight_decay, "train.distribution": t.distribution, "train.seed": t.seed,
        "train.grad_clip": t.grad_clip,
        "layout.name": lay.name, "layout.workers": lay.workers, "layout.q": lay.q,
        "server.served_dtype": cfg.server.served_dtype,
    }
    if t.optimizer != "sgd":  # the state's update rule decides the weights (absent for sgd: older job ids unchanged)
        ident["train.optimizer"] = t.optimizer
        ident.update({f"train.{k}": getattr(t, k) for k in
                      (("momentum",) if t.optimizer == "momentum" else ("adam_beta1", "adam_beta2", "adam_eps"))})
    if t.objective != "loss":
        ident["train.objective"] = t.objective
    if t.lr_schedule != "constant":  # the decay spans the run: its length is part of the trajectory
        ident["train.steps"] = t.steps
    if cfg.server.update_window != 1:  # which base a step reads decides its 16-bit forward weights
        ident["server.update_window"] = cfg.server.update_window
    return ident


def job_id(identity: dict[str, Any]) -> str:
    return hashlib.sha256(_canonical(identity)).hexdigest()[:16]


def differences(recorded: dict[str, Any], ours: dict[str, Any], limit: int = 3) -> str:
    """'train.seed is 0 there and 1 here; ...' (at most ``limit`` fields, values shortened)."""
    def short(v: Any) -> str:
        text = repr(v)
        return text if len(text) <= 60 else text[:57] + "..."

    keys = sorted(set(recorded) | set(ours))
    diff = [f"{k} is {short(recorded.get(k))} there and {short(ours.get(k))} here" for k in keys
            if recorded.get(k) != ours.get(k)]
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
