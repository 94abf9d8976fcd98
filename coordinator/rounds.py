"""One round of forwards (a training step or an eval): dispatch, collect, re-assign.

Each forward has a key. Forwards are grouped into *pieces* (the layout's per-worker role
lists); a unit (a worker, or a whole node group) receives pieces as assignments. When a
worker is lost, misses its deadline or reports a transient error, its unfinished forwards
go to a live unit; since seeds and data are deterministic, whoever runs a forward gets the
same loss, so a failure never changes the trajectory. Reports for forwards no longer
pending (a re-assigned straggler, an old step) are ignored and counted.
"""

from __future__ import annotations

import itertools
import logging
import threading
import time
from dataclasses import dataclass, field
from typing import Hashable, Sequence

from coordinator.registry import Registry, WorkerConn
from distzo.common.configsections import CoordinatorSection
from distzo.common.wire_sizes import MAX_MESSAGE_BYTES
from distzo.data.tasks import Batch
from distzo.infra.logs import kv
from distzo.zo.record import UpdateRecord
from paramserver.dataplane.wire import record_to_pb
from protos import coordinator_pb2 as cpb

log = logging.getLogger("distzo.coordinator.round")
_ids = itertools.count(1)
TRANSIENT = {"version_timeout", "fetch", "stale", "internal", "gather", "lost", "deadline"}
# the parameter server could not be reached: not the forward's fault. Such failures do not use up the
# forward's attempts; it is sent again with backoff until the server is back (coordinator.server_timeout_s)
SERVER_DOWN = {"fetch"}


class RoundFailed(RuntimeError):
    pass


class BadInput(RoundFailed):
    """A deterministic failure: the same forward fails the same way on any worker, so it is not retried."""


@dataclass
class Sent:
    assignment_id: int
    worker: WorkerConn
    keys: list[Hashable]
    at: float = field(default_factory=time.monotonic)


class Round:
    def __init__(self, registry: Registry, policy: CoordinatorSection, step: int, version: int, kind: str,
                 forwards: dict[Hashable, cpb.ForwardSpec], batches: dict[int, Batch], stopping: threading.Event,
                 pending: Sequence[UpdateRecord] = ()):
        """``version``: the materialized base the workers fetch; ``pending``: the records of steps version .. step-1
        they replay on it (update windows; empty when the base is the step's own version)."""
        self.registry = registry
        self.policy = policy
        self.step, self.version, self.kind = step, version, kind
        if [r.step for r in pending] != list(range(version, step)):
            raise ValueError(f"step {step} reads base {version}: it needs the records of steps {version}..{step - 1}, "
                             f"got {[r.step for r in pending]}")
        self.pending = [record_to_pb(r) for r in pending]
        self.forwards = forwards
        self.batches = {s: self._wire(s, b) for s, b in batches.items()}
        self.results: dict[Hashable, cpb.ForwardResult] = {}
        self.errors: dict[Hashable, str] = {}  # bad input: the forward cannot give a loss
        self.last_error: dict[Hashable, str] = {}  # the latest transient failure of each forward (for the message)
        self.attempts: dict[Hashable, int] = {k: 0 for k in forwards}
        self.sent: dict[int, Sent] = {}
        self.pending_on: dict[Hashable, int] = {}  # key -> assignment id
        self.cond = threading.Condition()
        self.stopping = stopping
        self.reassignments = 0
        self.late = 0
        self.timings: list[cpb.Timing] = []
        self.phase = {"assign_s": 0.0, "wait_s": 0.0}
        self._requeue: list[Hashable] = []  # failed forwards to re-assign (filled by on_result)
        self._server_down: dict[Hashable, tuple[float, int]] = {}  # key -> (first such failure, failures in a row)
        self._later: list[tuple[float, Hashable]] = []  # (when, key): re-sent after a backoff
        self._fatal: str | None = None  # why the round cannot finish

    @staticmethod
    def _wire(shard: int, b: Batch) -> cpb.BatchData:
        arrays = b.to_arrays()
        rows, cols = arrays["shape"]
        return cpb.BatchData(shard=shard, rows=rows, cols=cols, input_ids=arrays["input_ids"],
                             attention_mask=arrays["attention_mask"], labels=arrays["labels"])

    # ------------------------------------------------------------------ dispatch
    def _send(self, worker: WorkerConn, keys: list[Hashable]) -> None:
        aid = next(_ids)
        specs = [self.forwards[k] for k in keys]
        shards = sorted({s.shard for s in specs})
        a = cpb.Assignment(assignment_id=aid, step=self.step, version=self.version,
                           kind=self.kind if keys else "gather", forwards=specs,
                           batches=[self.batches[s] for s in shards], deadline_s=self.policy.assignment_timeout_s,
                           pending=self.pending)
        size = a.ByteSize()
        if size > MAX_MESSAGE_BYTES:  # the worker's channel would refuse it and the session would drop, again and again
            shapes = ", ".join(f"{self.batches[s].rows} x {self.batches[s].cols}" for s in shards)
            raise BadInput(f"step {self.step}: the {self.kind} assignment of {shapes} tokens is {size / 1e6:.1f} MB, over "
                           f"the {MAX_MESSAGE_BYTES >> 20} MiB gRPC message limit: lower train.batch_size or "
                           "data.max_seq_len")
        with self.cond:
            self.sent[aid] = Sent(aid, worker, keys)
            for k in keys:
                self.pending_on[k] = aid
                self.attempts[k] += 1
            worker.inflight.add(aid)
            worker.state = "busy"
        worker.send(cpb.CoordinatorMessage(assignment=a))

    def dispatch_to_unit(self, unit: list[WorkerConn], pieces: list[list[Hashable]]) -> None:
        """Every member of the unit gets an assignment (members without forwards only gather)."""
        per_member: list[list[Hashable]] = [[] for _ in unit]
        for i, piece in enumerate(pieces):
            per_member[i % len(unit)].extend(piece)
        if len(unit) == 1 and not per_member[0]:
            return
        for member, keys in zip(unit, per_member):
            self._send(member, keys)

    def start(self, pieces: list[list[Hashable]]) -> None:
        """Piece i to the i-th live worker (node groups whole); what is left over goes round-robin."""
        t0 = time.perf_counter()
        units = self._wait_for_units(lambda: self.registry.units(), f"{len(pieces)} pieces of work")
        queue = list(pieces)
        for unit in units:
            if not queue:
                break
            take, queue = queue[: len(unit)], queue[len(unit):]
            self.dispatch_to_unit(unit, take)
        i = 0
        while queue:
            unit = units[i % len(units)]
            take, queue = queue[: len(unit)], queue[len(unit):]
            self.dispatch_to_unit(unit, take)
            i += 1
        self.phase["assign_s"] += time.perf_counter() - t0

    # ------------------------------------------------------------------ collect
    def on_result(self, worker: WorkerConn, r: cpb.WorkResult) -> bool:
        """A worker's report; returns False when it was late (no longer pending)."""
        with self.cond:
            sent = self.sent.pop(r.assignment_id, None)
            worker.inflight.discard(r.assignment_id)
            if not worker.inflight and worker.live:
                worker.state = "idle"
            worker.assignments_done += 1
            if sent is None or r.step != self.step:
                self.late += 1
                return False
            self.timings.append(r.timing)
            if r.error:
                for k in sent.keys:
                    if self.pending_on.get(k) == r.assignment_id:
                        del self.pending_on[k]
                        if r.error_kind in SERVER_DOWN:
                            self._wait_for_server(k, r.error)
                        elif r.error_kind in TRANSIENT:
                            self._server_down.pop(k, None)
                            self._requeue.append(k)
                            self.last_error[k] = f"{r.error_kind} on {worker.worker_id}: {r.error}"
                        else:
                            self.errors[k] = f"{r.error_kind or 'error'} on {worker.worker_id}: {r.error}"
                log.warning("forwards failed", extra=kv(step=self.step, worker=worker.worker_id, kind=r.error_kind, error=r.error))
            else:
                for res in r.results:
                    k = self._key_of(res.spec)
                    if self.pending_on.get(k) == r.assignment_id:
                        del self.pending_on[k]
                        self.results[k] = res
            self.cond.notify_all()
            return True

    def _wait_for_server(self, k: Hashable, error: str) -> None:
        """Send ``k`` again after a backoff, without using up an attempt (called under the lock)."""
        now = time.monotonic()
        first, n = self._server_down.get(k, (now, 0))
        if now - first > self.policy.server_timeout_s:
            self._fatal = (f"step {self.step}: the parameter server was unreachable for {now - first:.0f}s "
                           f"(coordinator.server_timeout_s): {error[:500]}")
            return
        self._server_down[k] = (first, n + 1)
        self.attempts[k] -= 1
        self._later.append((now + min(5.0, 0.25 * 2**n), k))

    def _key_of(self, spec: cpb.ForwardSpec) -> Hashable:
        for k, s in self.forwards.items():
            if s == spec:
                return k
        raise KeyError(spec)

    def done(self) -> bool:
        return len(self.results) + len(self.errors) == len(self.forwards)

    def wait(self) -> None:
        """Until every forward has a result (or a permanent error), re-assigning as needed."""
        t0 = time.perf_counter()
        while True:
            with self.cond:
                if self.done():
                    break
                self.cond.wait(0.2)
                requeue, self._requeue = self._requeue, []
                now = time.monotonic()
                requeue += [k for when, k in self._later if when <= now]
                self._later = [(when, k) for when, k in self._later if when > now]
            if self.stopping.is_set():
                raise RoundFailed("stopping")
            if self._fatal is not None:
                raise RoundFailed(self._fatal)
            for w in self.registry.expire(self.policy.heartbeat_timeout_s):
                log.info("worker expired", extra=kv(worker=w.worker_id))
            requeue += self._orphans()
            if requeue:
                self._reassign(requeue)
        self.phase["wait_s"] += time.perf_counter() - t0

    def _orphans(self) -> list[Hashable]:
        """Forwards pending on lost workers or past their deadline."""
        now = time.monotonic()
        out = []
        with self.cond:
            for aid, sent in list(self.sent.items()):
                gone = not sent.worker.live
                late = now - sent.at > self.policy.assignment_timeout_s
                if gone or late:
                    del self.sent[aid]
                    sent.worker.inflight.discard(aid)
                    for k in sent.keys:
                        if self.pending_on.get(k) == aid:
                            del self.pending_on[k]
                            out.append(k)
                    for k in sent.keys:
                        self.last_error[k] = (f"worker {sent.worker.worker_id} was lost" if gone else
                                              f"worker {sent.worker.worker_id} missed the deadline")
                    if late and not gone:
                        log.warning("assignment missed its deadline", extra=kv(step=self.step, worker=sent.worker.worker_id))
        return out

    def _reassign(self, keys: list[Hashable]) -> None:
        for k in keys:
            if self.attempts[k] >= self.policy.max_attempts:
                last = self.last_error.get(k)
                raise RoundFailed(f"step {self.step}: forward {k} failed {self.attempts[k]} times"
                                  + (f"; the last time: {last}" if last else ""))
        busy_ids = {s.worker.worker_id for s in self.sent.values()}

        def candidates() -> list[list[WorkerConn]]:
            units = self.registry.units()
            if self.policy.on_worker_loss == "wait":  # only a worker with nothing of this round takes it
                units = [u for u in units if not any(m.worker_id in busy_ids for m in u)]
            return units

        units = self._wait_for_units(candidates, f"{len(keys)} re-assigned forwards")
        unit = min(units, key=lambda u: sum(len(m.inflight) for m in u))
        self.reassignments += len(keys)
        log.info("re-assigning forwards", extra=kv(step=self.step, forwards=len(keys), to=unit[0].worker_id))
        by_shard: dict[int, list[Hashable]] = {}
        for k in keys:  # one assignment per shard: each stays one batch's size, under the message limit
            by_shard.setdefault(self.forwards[k].shard, []).append(k)
        for group in by_shard.values():
            self.dispatch_to_unit(unit, [group])

    def _wait_for_units(self, units, what: str) -> list[list[WorkerConn]]:  # noqa: ANN001 - () -> units
        """The units ``units()`` gives, waiting while there are none: a worker lost at any moment (running,
        paused, evaluating, between steps) is replaced by its supervisor, and a replacement registers.
        Raises RoundFailed when stopping, or when none comes within coordinator.assignment_timeout_s (the
        time an assignment may take: no worker for that long is a cluster that lost its workers)."""
        found = units()
        if found:
            return found
        log.warning("no live worker for this round; waiting for one to register", extra=kv(step=self.step, kind=self.kind,
                                                                                          work=what))
        limit = self.policy.assignment_timeout_s
        deadline = time.monotonic() + limit
        while not found:
            if self.stopping.is_set():
                raise RoundFailed("stopping")
            if time.monotonic() > deadline:
                raise RoundFailed(f"step {self.step}: no live worker for {limit:g}s (coordinator.assignment_timeout_s) "
                                  f"to run {what}")
            self.registry.wait_for(lambda: bool(units()) or self.stopping.is_set(), min(1.0, limit))
            found = units()
        return found

