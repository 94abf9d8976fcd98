"""The parameter server's state machine: recover, journal, apply, snapshot, export.

An update is validated, appended to the journal (fsync) and acknowledged; an applier
thread then applies queued updates in step order, block by block, each block's version
advancing as soon as it is updated. Recovery loads the newest valid snapshot and replays
the journal behind it (``durability/recovery.py``), so the weights are bitwise those
acknowledged before a crash. The data directory's checks and claim: ``durability/datadir.py``.
"""

from __future__ import annotations

import hashlib
import logging
import queue
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from distzo.common.config import JobConfig
from distzo.common.dtypes import ITEMSIZE
from distzo.data.catalog import base_model_name, resolve_model
from distzo.infra.logs import kv
from distzo.model.adapters import adapter_from_train
from distzo.model.export import export_model_dir, remove_leftovers
from distzo.model.families import load_model
from distzo.zo import generator
from distzo.zo.generator import Distribution
from distzo.zo.mezo import apply_window, base_version
from distzo.zo.optim import Optimizer
from distzo.zo.record import UpdateRecord
from paramserver import metrics
from paramserver.dataplane.shm import reap_stale_segments
from paramserver.durability.datadir import (UpdateRejected, check_data_dir, claim_data_dir, export_path, lock_data_dir,
                                            manifest_digest, remove_history)
from paramserver.durability.journal import Journal
from paramserver.durability.recovery import find_recovery_point, install
from paramserver.durability.snapshot import SnapshotJob, list_snapshots, prune_snapshots, remove_temporaries
from paramserver.store import BlockStore

log = logging.getLogger("distzo.paramserver")
KEEP_SNAPSHOTS = 2


@dataclass
class Marker:
    """A request queued behind the updates so it sees a consistent version."""

    kind: str  # "snapshot" | "export" | "stop"
    arg: object = None
    done: threading.Event | None = None
    result: object = None
    error: BaseException | None = None


class ServerState:
    """One parameter server's state for its blocks [first, end) of the model: the fp32 masters and served copies
    (``BlockStore``), the optimizer's state, the update journal, snapshots, and the job that claimed the data directory
    (held with an OS lock for the object's whole life).

    ``recover`` loads the newest valid snapshot and replays the journal behind it; ``start`` starts the applier thread.
    ``submit`` validates an update, journals it (fsync) and queues it; the applier applies the queue in step order,
    block by block. ``snapshot_now`` and ``export`` write the weights at one version while training goes on; ``close``
    stops the applier and lets the data directory go. Process-wide settings (the kernels' threads) are the caller's:
    ``server.run``."""

    def __init__(self, cfg: JobConfig, data_dir: str | Path, blocks: tuple[int, int] | None = None,
                 name: str | None = None, role: str = "primary"):
        self.cfg = cfg
        self.data_dir = Path(data_dir)
        self._lock = lock_data_dir(self.data_dir)  # one server per data directory, for the object's whole life
        try:
            self._init(cfg, blocks, name, role)
        except BaseException:
            self._lock.release()
            raise

    def _init(self, cfg: JobConfig, blocks: tuple[int, int] | None, name: str | None, role: str) -> None:
        self.role = role
        self.dist = Distribution(cfg.train.distribution)
        self.optimizer = Optimizer.from_config(cfg.train)
        generator.warm_up()
        self.model_dir = resolve_model(cfg.model.source, cfg.runtime.cache_dir)
        self.model = load_model(self.model_dir, adapter_from_train(cfg.train))
        self.manifest = self.model.manifest
        self.manifest_json = self.manifest.to_json()
        nblocks = len(self.manifest.blocks)
        first, end = blocks if blocks is not None else (0, nblocks)
        if not 0 <= first < end <= nblocks:
            raise ValueError(f"block range {first}:{end} is not inside the model's {nblocks} blocks (0:{nblocks})")
        self.first, self.end = first, end
        self.owned = range(first, end)
        digest = manifest_digest(self.manifest_json + f"|{first}:{end}")
        self.digest = digest
        self.server_id = name or f"distzo-{digest[:8]}-{hashlib.sha256(str(self.data_dir.resolve()).encode()).hexdigest()[:8]}"
        self.job: dict | None = None  # {"job_id", "identity"} of the job whose updates this data directory holds
        self._check_data_dir()
        shm_dir = cfg.server.shm_dir if cfg.server.shared_memory else None
        if shm_dir:
            reaped = reap_stale_segments(shm_dir)
            if reaped:
                log.info("removed shared-memory segments of dead servers", extra=kv(segments=",".join(reaped)))
        self.window = cfg.server.update_window
        self.store = BlockStore(self.manifest, first, end, cfg.server.served_dtype, shm_dir, self.server_id, self.optimizer,
                                self.window)
        # update windows: the records after the master's version, not yet materialized (fewer than K), and the
        # version they bring the weights to (eval, export, snapshot read exactly this one)
        self.pending: list[UpdateRecord] = []
        self.processed_version = -1
        self.journal = Journal(self.data_dir, rotate_every=cfg.server.snapshot_every)
        self._submit_lock = threading.Lock()
        self._queue: queue.Queue[UpdateRecord | Marker] = queue.Queue()
        self._snapshot: SnapshotJob | None = None
        self.snapshot_version = -1
        self.served_bytes = 0
        self._applier: threading.Thread | None = None
        self.failed: BaseException | None = None

    # ------------------------------------------------------------------ start
    def _check_data_dir(self) -> None:
        """The data directory must hold this model and block range (state.json); record them if it is new."""
        ours = {"model.source": self.cfg.model.source, "train.distribution": self.cfg.train.distribution,
                "blocks": f"{self.first}:{self.end}", "manifest_sha256": self.digest}
        if self.optimizer.width:  # its state is in the snapshots and the journal replays through its rule
            ours["train.optimizer"] = self.optimizer.describe()
        self.job = check_data_dir(self.data_dir, ours)

    def recover(self) -> int:
        """Load a snapshot and replay the journal; returns the version reached (the next step's).

        With update windows (K > 1) the next steps read base ``base_version(J, K)`` of the journal's end J:
        recovery starts from the newest valid snapshot at or before it (pruning keeps one), materializes that
        base, and queues the records after it for the applier, exactly as if they had just arrived."""
        remove_temporaries(self.data_dir)
        remove_leftovers(self.data_dir / "exports")  # exports and uploads of a server killed midway
        point = find_recovery_point(self.data_dir, self.journal, self.window, self.digest,
                                    {b: self.manifest.blocks[b].numel for b in self.owned}, self.optimizer.width,
                                    list(self.store.opt_state), self._initial_blocks)
        base, replay, had_snapshots = point.base, point.replay, point.had_snapshots
        last_step = point.records[-1].step if point.records else None
        self.snapshot_version = base if had_snapshots else -1
        t0 = time.perf_counter()
        self.processed_version, queued = install(point, self.store, self.manifest, self.owned, self.window, self.dist)
        del point  # the snapshot's arrays: the store holds the weights now
        for r in queued:
            self._queue.put(r)
        version = base + len(replay)
        self.journal.open(version, last_step=last_step)
        for r in replay[-self.journal.recent.maxlen:]:
            self.journal.recent.append(r)
        log.info("recovered", extra=kv(snapshot=base, replayed=len(replay), version=version, materialized=self.store.applied_version(),
                                       seconds=round(time.perf_counter() - t0, 3)))
        if not had_snapshots and self.cfg.server.snapshot_at_start:
            self._start_snapshot(self.processed_version)  # never depend on the model directory again
        return version

    def _initial_blocks(self, records: int) -> dict[int, np.ndarray]:
        """The owned blocks' fp32 weights from the model directory: recovery without a snapshot."""
        if records:  # crashed before the first snapshot completed: replay onto the initial weights
            log.warning("no snapshot yet: replaying the journal onto the model's initial weights",
                        extra=kv(model=str(self.model_dir), records=records))
        buffers = self.model.load_block_buffers()
        return {b: buffers[b].numpy() for b in self.owned}

    def start(self) -> None:
        self._applier = threading.Thread(target=self._apply_loop, name="applier", daemon=True)
        self._applier.start()
        metrics.watch(lambda: self.processed_version, self.store.applied_version, lambda: self.journal.next_step,
                      self.journal.total_bytes)
        metrics.MODEL_BYTES.set(sum(self.manifest.blocks[b].numel * ITEMSIZE["float32"] for b in self.owned))
        metrics.OPTIMIZER_STATE_BYTES.set(self.store.state_nbytes())
        master = sum(self.store.master[b].nbytes for b in self.owned)
        metrics.SERVED_COPY_BYTES.set(self.store.served_nbytes() - (master if self.cfg.server.served_dtype == "float32" else 0))

    # ------------------------------------------------------------------ updates
    def submit(self, record: UpdateRecord, job_id: str = "", identity_json: str = "") -> tuple[bool, int]:
        """Journal and queue an update; returns (duplicate, journal bytes).

        Raises ValueError (bad or absurd update: nothing journaled), UpdateRejected (gap,
        conflicting duplicate, another job's update) or JournalWriteError (the append failed
        and was undone). ``job_id``: the sender's job; the first one claims the data directory.
        """
        record.check_bounds(self.cfg.server.max_update_step)
        if self.failed is not None:
            raise RuntimeError(f"the server stopped applying updates: {self.failed}")
        with self._submit_lock:
            if job_id:
                self.job = claim_data_dir(self.data_dir, self.job, job_id, identity_json)
            expected = self.journal.next_step
            if record.step < expected:
                known = next((r for r in self.journal.recent if r.step == record.step), None)
                if known is not None and known != record:
                    raise UpdateRejected(f"step {record.step} was already applied with different directions/lr")
                return True, self.journal.bytes_written
            if record.step > expected:
                raise UpdateRejected(f"update for step {record.step} arrived before step {expected}: "
                                     f"the server applies steps in order (next expected: {expected})")
            with metrics.JOURNAL_FSYNC_SECONDS.time():
                size = self.journal.append(record)
            self._queue.put(record)
            return False, size

    def _apply_loop(self) -> None:
        every = self.cfg.server.snapshot_every
        while True:
            item = self._queue.get()
            if isinstance(item, Marker):
                if self._handle_marker(item):
                    return
                continue
            self.pending.append(item)
            if len(self.pending) == self.window:  # a whole window: one pass over every block (K = 1: every update)
                try:
                    job = self._snapshot if self._snapshot is not None and not self._snapshot.done.is_set() else None
                    with metrics.UPDATE_SECONDS.time():
                        self.store.materialize(self.pending, self.dist, before_modify=job.before_modify if job else None)
                except BaseException as exc:  # the state is no longer trustworthy: stop taking updates
                    self.failed = exc
                    log.critical("applying an update failed", extra=kv(step=item.step, error=repr(exc)))
                    return
                self.pending = []
            self.processed_version = version = item.step + 1
            if every and version % every == 0 and version > self.snapshot_version:
                self._start_snapshot(version)

    def _handle_marker(self, m: Marker) -> bool:
        try:
            if m.kind == "stop":
                return True
            if m.kind == "snapshot":
                job = self._start_snapshot(self.processed_version, force=True)
                m.result = job
            elif m.kind == "export":
                self._wait_snapshot()
                path, merge, card = m.arg  # type: ignore[misc]
                version = self.processed_version  # the master plus the open window's pending records
                buffers = [self._block_tensor(b) for b in range(len(self.manifest.blocks))]
                export_model_dir(self.model, buffers, path, merge=merge, card=card(version) if card else None, owned=True,
                                 base_name=base_model_name(self.cfg.model.source))
                m.result = (str(path), version)
        except BaseException as exc:  # reported to the caller
            m.error = exc
        finally:
            if m.done is not None:
                m.done.set()
        return False

    def _block_tensor(self, b: int):  # noqa: ANN202
        """Block ``b``'s fp32 weights at the server's version, as a new tensor (a copy, never a view of the
        master: whatever an export does to it, e.g. peft's in-place merge, cannot reach the weights being
        trained): the master's copy with the open update window's pending records applied. Every export path
        takes its buffers from here. Call from the applier thread. Raises ValueError for a block of another shard."""
        import torch

        if b not in self.owned:
            raise ValueError(f"this shard holds blocks {self.first}:{self.end}; export needs the whole model")
        return torch.from_numpy(self._block_at(b, self.store.master[b], self.pending))

    def _block_at(self, b: int, master: np.ndarray, pending: list[UpdateRecord]) -> np.ndarray:
        with self.store.master_lock(b).read():
            data = master.copy()
        if pending:
            apply_window(self.manifest.blocks[b], data, data, pending, self.dist)
        return data

    # ------------------------------------------------------------------ snapshots
    def _start_snapshot(self, version: int, force: bool = False) -> SnapshotJob | None:
        if self._snapshot is not None and not self._snapshot.done.is_set():
            if not force:
                log.warning("snapshot skipped: the previous one is still being written", extra=kv(version=version))
                return None
            self._snapshot.done.wait()
        pending = list(self.pending)
        if self.store.applied_version() + len(pending) != version:
            raise RuntimeError(f"snapshot at version {version}: the master is at {self.store.applied_version()} with "
                               f"{len(pending)} pending records")
        masters = {b: self.store.master[b] for b in self.owned}  # the arrays at the master's version (a float32
        # copy with K > 1 moves to the other slot at the next pass: this one is copied before it is overwritten)
        job = SnapshotJob(self.data_dir, version, list(self.owned), {b: self.manifest.blocks[b].numel for b in self.owned},
                          masters.__getitem__, self.digest,
                          self.store.opt_state.get if self.optimizer.width else None,  # None for a frozen block
                          finish=(lambda b, data: self._block_at(b, data, pending)) if pending else None)
        self._snapshot = job
        threading.Thread(target=self._run_snapshot, args=(job,), name="snapshot", daemon=True).start()
        return job

    def _run_snapshot(self, job: SnapshotJob) -> None:
        try:
            with metrics.SNAPSHOT_SECONDS.time():
                job.run()
            if job.error is None:
                self.snapshot_version = job.version
                metrics.SNAPSHOT_BYTES.set(job.bytes)
                metrics.SNAPSHOT_VERSION.set(job.version)
                # recovery needs one at or before the base the next step reads (update windows)
                prune_snapshots(self.data_dir, KEEP_SNAPSHOTS, keep_at_or_before=base_version(self.journal.next_step, self.window))
                kept = list_snapshots(self.data_dir)
                if kept:
                    self.journal.drop_before(kept[0].version)  # keep what the oldest kept snapshot needs
        except OSError as exc:
            log.error("pruning after a snapshot failed: %s", exc)
        finally:
            job.done.set()

    def _wait_snapshot(self) -> None:
        if self._snapshot is not None:
            self._snapshot.done.wait()

    def snapshot_now(self, timeout_s: float = 600.0) -> SnapshotJob:
        job: SnapshotJob = self._request(Marker("snapshot", done=threading.Event()), timeout_s, "start")  # type: ignore[assignment]
        if not job.done.wait(timeout_s):
            raise TimeoutError("snapshot did not finish in time")
        if job.error is not None:
            raise job.error
        return job

    def export(self, path: str | Path, timeout_s: float = 600.0, merge: bool = False,
               card: Callable[[int], str] | None = None, staged: bool = False) -> tuple[str, int]:
        """Export the weights to ``path`` (``datadir.export_path``; ``staged``: a ``datadir.staging_dir``, not checked
        against the export root); ``merge``: a LoRA run's merged model; ``card(version)``: the model card written
        with it. Returns (path, version). Raises ValueError for ``merge`` on a run that is not LoRA, and
        what ``export_path`` raises, before anything is written."""
        p = Path(path) if staged else export_path(str(path), self.data_dir, self.cfg.server.export_root)
        if merge and getattr(self.model.adapter, "kind", "full") != "lora":
            raise ValueError("export --merge merges a LoRA adapter into the base: this run's train.target is "
                             f"{getattr(self.model.adapter, 'kind', 'full')}")
        return self._request(Marker("export", arg=(p, merge, card), done=threading.Event()), timeout_s, "finish")  # type: ignore[return-value]

    def _request(self, m: Marker, timeout_s: float, within: str) -> object:
        """``m``'s result once the applier has handled it; TimeoutError when it did not ``within`` (start, finish)
        ``timeout_s``, or the error it met."""
        self._queue.put(m)
        if not m.done.wait(timeout_s):
            raise TimeoutError(f"{m.kind} did not {within} in time")
        if m.error is not None:
            raise m.error
        return m.result

    def discard_history(self) -> None:
        """Delete the journal and the snapshots (a replica that cannot recover starts over from its primary)."""
        self.journal.close()
        remove_history(self.data_dir, self.journal)

    def restart_history(self) -> int:
        """Make the blocks' current version this server's new starting point, after they were installed
        from elsewhere (a replica's re-sync): the old journal and snapshots go, the journal restarts at
        that version, and a snapshot of it is taken now (what recovery starts from). Returns the version."""
        version = self.store.applied_version()
        remove_history(self.data_dir, self.journal)
        self.journal.close()
        self.journal.open(version)
        self.journal.recent.clear()
        self.pending = []
        self.processed_version = version
        self._start_snapshot(version, force=True)
        return version

    # ------------------------------------------------------------------ queries
    def drain(self, timeout_s: float = 60.0) -> int:
        """Wait until the applier has taken up every journaled update (materialized, or pending in the open
        window); returns that version."""
        deadline = time.monotonic() + timeout_s
        while self.processed_version < self.journal.next_step:
            if self.failed is not None or time.monotonic() > deadline:
                break
            time.sleep(0.002)
        return self.processed_version

    def close(self) -> None:
        metrics.freeze()  # the store the gauges read is going away
        self._queue.put(Marker("stop"))
        if self._applier is not None:
            self._applier.join(timeout=30)
        self._wait_snapshot()
        self.journal.close()
        self.store.close()
        self._lock.release()  # last: nothing of this server writes the data directory any more
