"""A ``zoctl up`` run directory: one job (``run.json``), one writer (``.lock``), checked before anything starts.

``check_run_dir`` refuses a run directory that holds another job (any field of the job identity,
``distzo.common.durable``), this job's run without ``--resume``, or one that another ``zoctl up`` (or the
services of one that was killed) still uses: ``wait_for_run_dir`` takes the lock the services inherit.
"""

from __future__ import annotations

import json
from pathlib import Path

from distzo.common.config import JobConfig
from distzo.common.durable import JobMismatch, check_same_job, differences, job_id, job_identity
from distzo.common.errors import BadInput
from distzo.common.locks import DirLock, alive
from distzo.run.runlog import CLUSTER_FILE, RUN, RUN_LOCK, read_history

SURVIVORS_WAIT_S = 30.0  # how long a new zoctl up waits for the services of a killed one to end (they are told at once)


def run_dir_lock(run_dir: Path) -> DirLock:
    return DirLock(run_dir, RUN_LOCK, "the run directory")


def _recorded_pids(run_dir: Path) -> tuple[int | None, list[int]]:
    """The supervisor and service pids cluster.json records (none when it is missing or damaged)."""
    try:
        info = json.loads((run_dir / CLUSTER_FILE).read_bytes())
        pids = [p for p in (info.get("pids") or {}).values() if isinstance(p, int)]
        sup = info.get("supervisor_pid")
        return (sup if isinstance(sup, int) else None), pids
    except (OSError, ValueError, AttributeError):
        return None, []


def wait_for_run_dir(run_dir: Path) -> DirLock:
    """Take the run directory's lock: refused (DirectoryBusy, one line naming the pids) while another
    ``zoctl up`` runs there, or its services are still alive. The services of a ``zoctl up`` that was
    killed end by themselves (``distzo.infra.procs.end_with_supervisor``): waited for, up to SURVIVORS_WAIT_S."""
    supervisor, pids = _recorded_pids(run_dir)
    gone = supervisor is not None and not alive(supervisor)  # a killed zoctl up: its services are ending
    return run_dir_lock(run_dir).acquire(wait_s=SURVIVORS_WAIT_S if gone else 0.0,
                                         holders=lambda: [p for p in [supervisor, *pids] if p])


def check_writable(path: Path, what: str) -> None:
    """BadInput unless ``path`` is, or can be made as, a directory this user writes in (checked on the nearest
    existing parent)."""
    import os

    existing = Path(os.path.abspath(path))
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir() or not os.access(existing, os.W_OK | os.X_OK):
        raise BadInput(f"{what} {path}: {existing} is not a directory this user can write in")


def check_run_dir(run_dir: Path, cfg: JobConfig, resume: bool) -> None:
    """Refuse a run directory that holds another job, or this job's run without ``resume``, or one that
    another ``zoctl up`` (or what is left of one) still uses (BadInput)."""
    if run_dir.exists() and not run_dir.is_dir():
        raise BadInput(f"the run directory {run_dir} is a file: expected a directory (new, or a run to --resume)")
    for path, what in ((run_dir, "the run directory"), (Path(cfg.server.data_dir or run_dir), "server.data_dir")):
        check_writable(path, what)
    if (run_dir / RUN_LOCK).is_file():
        wait_for_run_dir(run_dir).release()  # only a probe: LocalCluster takes it for the run
    claim = run_dir / RUN
    if claim.exists():
        check_same_job(claim, cfg, f"the run directory {run_dir}")
    elif (run_dir / "job.yaml").is_file() and (run_dir / "server").is_dir():
        old = JobConfig.from_yaml(run_dir / "job.yaml")  # a run directory from before run.json existed
        if job_id(job_identity(old)) != job_id(job_identity(cfg)):
            raise JobMismatch(f"the run directory {run_dir} holds another job: "
                              f"{differences(job_identity(old), job_identity(cfg))}. Use a new --run-dir for a new job")
    else:
        return  # nothing there yet
    steps = len(read_history(run_dir).steps)
    if not resume:
        raise BadInput(f"the run directory {run_dir} holds a run of this job ({steps} steps logged): pass --resume to "
                       "continue it, or choose a new --run-dir")
    if cfg.train.steps < steps:  # it would start a cluster to train nothing
        raise BadInput(f"the run in {run_dir} is at step {steps} and train.steps is {cfg.train.steps}: give --steps "
                       f"above {steps} to continue it (its config: {run_dir / 'job.yaml'})")
