"""The run log: one JSON line per training step and per evaluation, in the run directory.

``steps.jsonl``: ``{"step", "loss", "loss_plus", "loss_minus", "g", "lr", "tokens", "time_s", "skipped"}``
(``g``: the projected gradient of each direction; ``time_s``: training seconds since the run
began, across restarts). ``evals.jsonl``: ``{"step", "dev_loss", "dev_accuracy", "dev_examples"}``,
where step 0 is the zero-shot model. Non-finite numbers are written as ``null`` (strict JSON).
``run.json``: the identity of the job (``distzo.common.durable``); another job's log is never continued.

Written by whoever runs the step protocol (the coordinator, or the reference trainer). A run
that resumes at step ``t`` keeps the records of steps before ``t`` and of evaluations up to
``t``, and rewrites the rest as it re-runs them: seeds and data are pure functions of the
step, so the re-run records equal the lost ones and the log covers the whole run.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

from distzo.common.durable import check_same_job, record_job, write_atomic


def loss_window(steps: int) -> int:
    """Steps in a run's start and final training-loss means: 10, or half of a shorter run, so the two windows
    never overlap from 2 steps on (a 1-step run's start and final loss are its one step)."""
    return max(1, min(10, steps // 2))


def mean_finite(xs: Sequence[float]) -> float:
    """The mean of the finite values of ``xs``; nan when there are none (a run's start and final loss)."""
    kept = [x for x in xs if math.isfinite(x)]
    return sum(kept) / len(kept) if kept else math.nan
from distzo.common.errors import BadInput
from distzo.common.strictjson import strict_json

STEPS = "steps.jsonl"
EVALS = "evals.jsonl"
RUN = "run.json"  # the identity of the job whose log this is (distzo.common.durable)
CLUSTER_FILE = "cluster.json"  # a running zoctl up's cluster (its addresses and pids): coordinator.zoctl.targets reads it
RUN_LOCK = ".lock"  # held by whoever writes the run directory: zoctl up (and its services), zoctl reference (distzo.common.locks)


class RunLogError(BadInput):
    """A run log that is not the UTF-8 JSON lines this module writes."""


def make_run_dir(run_dir: str | Path) -> Path:
    """``run_dir``, created if missing; RunLogError when it is a file (or cannot be made)."""
    d = Path(run_dir)
    if d.exists() and not d.is_dir():
        raise RunLogError(f"the run directory {d} is a file: expected a directory")
    try:
        d.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise RunLogError(f"the run directory {d} cannot be made: {exc.strerror}") from None
    return d


NUMBERS = ("loss", "loss_plus", "loss_minus", "lr", "time_s", "dev_loss", "dev_accuracy")  # float or null
COUNTS = ("tokens", "dev_examples")


def _check(rec: dict[str, Any]) -> str | None:
    """What is wrong with a record's types (None: nothing); the run's history and report read these fields."""
    def number(v: Any) -> bool:
        return v is None or (isinstance(v, (int, float)) and not isinstance(v, bool))

    if rec["step"] < 0:
        return f"step {rec['step']} is negative"
    for k in NUMBERS:
        if not number(rec.get(k)):
            return f"{k} is {type(rec[k]).__name__}, expected a number or null"
    for k in COUNTS:
        if rec.get(k) is not None and (not isinstance(rec[k], int) or isinstance(rec[k], bool)):
            return f"{k} is {type(rec[k]).__name__}, expected an integer"
    g = rec.get("g")
    if g is not None and not (isinstance(g, list) and all(number(x) for x in g)):
        return "g is not a list of numbers"
    if not isinstance(rec.get("skipped", False), bool):
        return "skipped is not true or false"
    return None


def _read(path: Path) -> list[dict[str, Any]]:
    """Records of one file; a torn last line (a process killed mid-write) is ignored. Raises RunLogError
    naming the file (and line) for anything this module never writes: not a file, not UTF-8, a record
    of the wrong types."""
    out = []
    if not path.exists():
        return out
    if not path.is_file():
        raise RunLogError(f"{path} is not a regular file: expected the run log distzo writes there")
    data = path.read_bytes()
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise RunLogError(f"{path} is not UTF-8 text (byte 0x{data[exc.start]:02x} at offset {exc.start}): "
                          "not a run log written by distzo") from None
    for n, line in enumerate(text.splitlines(), 1):
        try:
            rec = json.loads(line)
        except ValueError:
            continue
        if isinstance(rec, dict) and isinstance(rec.get("step"), int) and not isinstance(rec["step"], bool):
            why = _check(rec)
            if why:
                raise RunLogError(f"{path}:{n}: {why}: not a run log written by distzo")
            out.append(rec)
    return out


@dataclass
class RunHistory:
    steps: list[dict[str, Any]] = field(default_factory=list)
    evals: list[dict[str, Any]] = field(default_factory=list)

    @property
    def elapsed_s(self) -> float:
        return float(self.steps[-1].get("time_s") or 0.0) if self.steps else 0.0


def read_history(run_dir: str | Path) -> RunHistory:
    d = Path(run_dir)
    return RunHistory(_read(d / STEPS), _read(d / EVALS))


class RunLog:
    """Appends step and eval records to ``run_dir``; ``resume(t)`` first drops what step t re-creates."""

    def __init__(self, run_dir: str | Path):
        self.dir = make_run_dir(run_dir)

    def resume(self, step: int, cfg: Any = None) -> RunHistory:
        """Keep steps < ``step`` and evals <= ``step``; return them (the run's history so far).

        ``cfg``: the job writing the log. The directory records its identity (``run.json``); a log
        of another job is refused (``distzo.common.durable.JobMismatch``), never continued or overwritten.
        """
        if cfg is not None:
            claim = self.dir / RUN
            if claim.exists():
                check_same_job(claim, cfg, f"the run directory {self.dir}")
            else:
                record_job(claim, cfg)
        old = read_history(self.dir)
        kept = RunHistory([r for r in old.steps if r["step"] < step], [r for r in old.evals if r["step"] <= step])
        for name, records in ((STEPS, kept.steps), (EVALS, kept.evals)):
            write_atomic(self.dir / name, "".join(json.dumps(r) + "\n" for r in records).encode("utf-8"), 0o666)
        return kept

    def _append(self, name: str, record: dict[str, Any]) -> None:
        line = json.dumps(strict_json(record), allow_nan=False)
        with (self.dir / name).open("a", encoding="utf-8") as f:
            f.write(line + "\n")

    def step(self, step: int, loss: float, loss_plus: float, loss_minus: float, g: list[float], lr: float,
             tokens: int, time_s: float, skipped: bool) -> None:
        self._append(STEPS, {"step": step, "loss": loss, "loss_plus": loss_plus, "loss_minus": loss_minus, "g": g,
                             "lr": lr, "tokens": tokens, "time_s": round(time_s, 4), "skipped": skipped})

    def eval(self, step: int, dev_loss: float, dev_accuracy: float, dev_examples: int) -> None:
        self._append(EVALS, {"step": step, "dev_loss": dev_loss, "dev_accuracy": dev_accuracy,
                             "dev_examples": dev_examples})
