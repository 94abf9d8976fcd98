"""Registered workers: their sessions, liveness, and node-group units.

A *unit* is what the coordinator schedules as one: a single worker, or all the workers of
a node group (they gather block slices together, so every member gets an assignment for
the same version at the same time).
"""

from __future__ import annotations

import logging
import queue
import threading
import time
import uuid
from dataclasses import dataclass, field

from distzo.infra.logs import kv
from protos import coordinator_pb2 as cpb

log = logging.getLogger("distzo.coordinator.workers")
MAX_LOST = 256  # lost workers kept for `zoctl status` (workers restarted under new ids would grow it forever)


@dataclass(eq=False)
class WorkerConn:
    worker_id: str
    hello: cpb.WorkerHello
    outbox: queue.Queue = field(default_factory=queue.Queue)
    state: str = "idle"  # idle | busy | lost
    last_seen: float = field(default_factory=time.monotonic)
    assignments_done: int = 0
    inflight: set[int] = field(default_factory=set)
    ready: bool = False  # set up for the current job (it said so after its welcome)

    @property
    def node_id(self) -> str:
        return self.hello.node_id or self.worker_id

    @property
    def live(self) -> bool:
        return self.state != "lost"

    def send(self, msg: cpb.CoordinatorMessage) -> None:
        self.outbox.put(msg)


class Registry:
    def __init__(self) -> None:
        self.lock = threading.RLock()
        self.changed = threading.Condition(self.lock)
        self.workers: dict[str, WorkerConn] = {}
        self.closing = False  # the coordinator told every worker to shut down: sessions ending now are expected

    def register(self, hello: cpb.WorkerHello, first=None) -> WorkerConn:  # noqa: ANN001
        """Add (or replace) a worker's session. ``first(worker_id)``: a message queued before the
        connection is visible to anyone, so nothing sent to the worker can overtake it (its welcome)."""
        with self.lock:
            wid = hello.worker_id or f"worker-{uuid.uuid4().hex[:8]}"
            old = self.workers.get(wid)
            conn = WorkerConn(worker_id=wid, hello=hello)
            message = first(wid) if first is not None else None
            if message is not None:
                conn.send(message)
            if old is not None:
                old.state = "lost"
                old.outbox.put(None)  # ends the old session's stream
                conn.assignments_done = old.assignments_done
            self.workers[wid] = conn
            lost = [w for w in self.workers.values() if not w.live]
            for w in lost[: max(0, len(lost) - MAX_LOST)]:  # status lists every worker: keep it bounded
                del self.workers[w.worker_id]
            self.changed.notify_all()
        log.info("worker registered", extra=kv(worker=wid, host=hello.host, node=hello.node_id, rank=hello.node_rank,
                                                pid=hello.pid, again=old is not None))
        return conn

    def heartbeat(self, conn: WorkerConn, ready: bool = False) -> None:
        conn.last_seen = time.monotonic()
        if ready and not conn.ready:
            with self.lock:
                conn.ready = True
                self.changed.notify_all()

    def lose(self, conn: WorkerConn, reason: str) -> None:
        with self.lock:
            if conn.state == "lost":
                return
            conn.state = "lost"
            conn.outbox.put(None)
            self.changed.notify_all()
        if self.closing:  # a normal shutdown: the worker left because we asked it to
            log.info("worker left", extra=kv(worker=conn.worker_id, reason="shutdown"))
        else:
            log.warning("worker lost", extra=kv(worker=conn.worker_id, reason=reason))

    def expire(self, timeout_s: float) -> list[WorkerConn]:
        now = time.monotonic()
        lost = [w for w in self.live() if now - w.last_seen > timeout_s]
        for w in lost:
            self.lose(w, f"no heartbeat for {timeout_s:.0f}s")
        return lost

    def live(self) -> list[WorkerConn]:
        with self.lock:
            return sorted((w for w in self.workers.values() if w.live), key=lambda w: (w.node_id, w.hello.node_rank, w.worker_id))

    def units(self) -> list[list[WorkerConn]]:
        """Complete, live, ready node groups (and single workers), in a stable order."""
        groups: dict[str, list[WorkerConn]] = {}
        for w in self.live():
            if not w.ready:
                continue
            groups.setdefault(w.node_id, []).append(w)
        out = []
        for node, members in sorted(groups.items()):
            size = max(1, members[0].hello.node_size)
            if len(members) == size and sorted(m.hello.node_rank for m in members) == list(range(size)):
                out.append(sorted(members, key=lambda m: m.hello.node_rank))
        return out

    def wait_for(self, predicate, timeout_s: float) -> bool:  # noqa: ANN001
        deadline = time.monotonic() + timeout_s
        with self.changed:
            while not predicate():
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return False
                self.changed.wait(min(remaining, 0.5))
        return True

    def shutdown_all(self, reason: str) -> None:
        """Tell every live worker to shut down; their sessions ending from now on are not losses."""
        self.closing = True
        self.broadcast(cpb.CoordinatorMessage(shutdown=cpb.ShutdownWorker(reason=reason)))

    def broadcast(self, msg: cpb.CoordinatorMessage) -> None:
        for w in self.live():
            w.send(msg)
