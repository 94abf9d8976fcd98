"""The job: the step protocol, from seeds to the parameter server's update.

    for t from the server's journaled step to train.steps:
        distzo.train.step.run_step, the reference trainer's step, with
            forwards      = each layout worker's forwards, version t   (rounds.Round: dispatch, collect)
            dispatch next = step t+1's round, sent now: its workers wait for version t+1 while the server
                            applies step t's update                  (roundplan.round_plan, made once)
            update        = send UpdateRecord(t, (seed, g)..., lr) to every parameter-server shard
        eval every N steps on the dev split

A restarted coordinator resumes from the parameter server's journaled step: plans are
pure functions of (master seed, t), so the run continues exactly where it was.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from dataclasses import replace
from typing import Any, Callable

import torch

from coordinator.progress import Progress, set_job_state, set_worker_gauges
from coordinator.registry import Registry
from coordinator.roundplan import RoundPlan, UpdateWindow, round_plan
from coordinator.rounds import BadInput, Round, RoundFailed
from coordinator.serverlink import JobFailed, ServerLink
from distzo.common.config import JobConfig
from distzo.common.durable import CorruptFile, JobMismatch, job_identity
from distzo.data.jobdata import EvalTally, JobData
from distzo.infra.logs import kv
from distzo.infra.rpc import Credentials
from distzo.model.blocks import ITEMSIZE
from distzo.run.runlog import RunLog
from distzo.train.defaults import resolve
from distzo.train.objective import forward_sums
from distzo.train.step import Forwarded, TrainingStopped, run_step
from distzo.zo.record import UpdateRecord
from paramserver.dataplane.client import FetchError
from protos import coordinator_pb2 as cpb

ENDED = ("stopped", "done", "failed")  # a job in one of these states does not change any more

log = logging.getLogger("distzo.coordinator.job")


class Job:
    """One training job on the coordinator, run by its own thread (``start``): from the parameter servers'
    journaled step to ``train.steps``, each step is ``distzo.train.step.run_step`` with the workers' forwards (a
    ``rounds.Round`` over the registry's workers), the next step's round dispatched, and the update sent to every
    parameter-server shard (``serverlink.ServerLink``); the dev split is evaluated when due and at the end. ``progress`` keeps the run's figures and the run log.

    Control comes from the RPC handlers (``service.py``): ``pause`` and ``resume`` (between steps), ``stop``,
    ``request_eval``; ``state`` is idle, starting, waiting_for_workers, running, paused, stopping, and at the end
    one of ``ENDED``; ``status`` is the ``JobStatus`` zoctl shows."""

    def __init__(self, cfg: JobConfig, registry: Registry, param_servers: list[str], creds: Credentials,
                 run_dir: str | None = None):
        if cfg.train.lr is None or cfg.train.eps is None:  # the defaults for the target and the model's size
            cfg, said = resolve(cfg)
            log.info("defaults", extra=kv(settings=said))
        self.cfg = cfg
        self.registry = registry
        self._state = "idle"
        self.error = ""
        self.error_kind = ""  # "bad_input": a deterministic error in the job's input (zoctl exits 2)
        self.step = 0
        self.resumed_from = 0
        self.progress = Progress()
        # the rounds whose results on_result (the RPC threads) routes: the one waited for, and the next step's,
        # dispatched before this step's update
        self.round: Round | None = None
        self._next: Round | None = None
        self._stop = threading.Event()
        self._paused = threading.Event()
        self._changed = threading.Condition()  # notified on every change of state (pause and resume wait for it)
        self.activity = ""  # "evaluating" while the dev split runs (JobStatus.activity)
        self._eval_requests: list[threading.Event] = []
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self.data: JobData | None = None
        self.started_at = time.monotonic()
        self.finished_at: float | None = None
        self.run_log = RunLog(run_dir) if run_dir else None
        self.identity = job_identity(cfg)
        self.server = ServerLink(cfg, param_servers, creds, self.identity, self._stop)
        self.window = UpdateWindow(cfg.server.update_window)  # the records a step's workers replay on their base

    @property
    def state(self) -> str:
        return self._state

    @state.setter
    def state(self, value: str) -> None:
        with self._changed:
            self._state = value
            set_job_state(value)
            self._changed.notify_all()

    def wait_state(self, done: Callable[[str], bool], timeout_s: float) -> str:
        """Wait until ``done(state)`` or the job ends (at most ``timeout_s``); return the state then."""
        with self._changed:
            self._changed.wait_for(lambda: done(self._state) or self._state in ENDED, timeout_s)
            return self._state

    # ------------------------------------------------------------------ control
    def start(self) -> None:
        self._thread = threading.Thread(target=self._main, name="job", daemon=True)
        self._thread.start()

    def pause(self, timeout_s: float = 0.0) -> str:
        """Pause after the current step (or evaluation); wait up to ``timeout_s`` for it and return the state."""
        self._paused.set()
        return self.wait_state(lambda s: s == "paused" or not self._paused.is_set(), timeout_s)

    def resume(self, timeout_s: float = 0.0) -> str:
        """Resume a paused job; wait up to ``timeout_s`` for it to leave the paused state and return the state."""
        self._paused.clear()
        return self.wait_state(lambda s: s != "paused" or self._paused.is_set(), timeout_s)

    def stop(self) -> None:
        self._stop.set()
        self._paused.clear()

    def join(self, timeout: float | None = None) -> None:
        if self._thread is not None:
            self._thread.join(timeout)

    def request_eval(self, timeout_s: float = 600.0) -> dict[str, Any]:
        ev = threading.Event()
        with self._lock:
            self._eval_requests.append(ev)
        if not ev.wait(timeout_s):
            raise TimeoutError("eval did not run in time")
        return self.progress.evals[-1]

    # ------------------------------------------------------------------ the loop
    def _main(self) -> None:
        try:
            self._setup()
            self._train()
            if self._stop.is_set():
                self.state = "stopped"
            else:
                if self._eval_due(self.step):  # the final evaluation (once, also across a restart)
                    self._evaluate()
                self.state = "done"
        except (JobFailed, RoundFailed, TrainingStopped, FetchError) as exc:
            if self._stop.is_set():
                self.state = "stopped"
            else:
                self.state, self.error = "failed", str(exc)
                self.error_kind = "bad_input" if isinstance(exc, BadInput) else ""
                log.error("job failed: %s", exc)
        except Exception as exc:  # noqa: BLE001 - the service stays up and reports it
            self.state, self.error = "failed", f"{type(exc).__name__}: {exc}"
            log.exception("job failed")
        finally:
            self.finished_at = time.monotonic()
            for ev in self._eval_requests:
                ev.set()

    def _setup(self) -> None:
        cfg = self.cfg
        self.state = "starting"
        self.data = JobData.load(cfg)
        client = self.server.connect()
        self.resumed_from = self.step = self.server.journaled_step()
        self.window = UpdateWindow(cfg.server.update_window, self.server.window_records(self.step))
        self.progress.on_start(self.step, cfg.train.steps, client.manifest.numel * ITEMSIZE[client.served_dtype])
        self.progress.measure_perturbation(cfg, client.manifest, self.data.model_dir)  # logged, in status and metrics
        if self.resumed_from:
            log.info("resuming from the parameter server's journal", extra=kv(step=self.resumed_from))
        if self.run_log is not None:  # the whole run's history, also from before a restart
            try:
                history = self.run_log.resume(self.step, cfg)
            except (JobMismatch, CorruptFile) as exc:
                raise JobFailed(str(exc)) from None
            self.progress.on_resume(history)
        self.state = "waiting_for_workers"
        need = cfg.layout.workers
        ok = self.registry.wait_for(lambda: sum(len(u) for u in self.registry.units()) >= need or self._stop.is_set(),
                                    cfg.coordinator.worker_wait_s)
        if not ok:
            raise JobFailed(f"only {sum(len(u) for u in self.registry.units())} of the layout's {need} workers were ready "
                            f"in {cfg.coordinator.worker_wait_s:.0f}s")
        self.state = "running"

    def _train(self) -> None:
        cfg = self.cfg
        if self._eval_due(self.step):  # the zero-shot figures, or the evaluation a coordinator before this one missed
            self._evaluate()
        ahead: RoundPlan | None = None  # step t's round when step t-1 dispatched it
        for t in range(self.step, cfg.train.steps):
            self._between_steps()
            if self._stop.is_set():
                return
            t0 = time.perf_counter()
            ahead = self._train_step(t, ahead)
            self.step = t + 1
            self.progress.on_step_done(self.step, time.perf_counter() - t0)
            set_worker_gauges(w.state for w in list(self.registry.workers.values()))
            if cfg.train.eval_every and self.step % cfg.train.eval_every == 0 and self.step < cfg.train.steps:
                self._evaluate()

    def _eval_due(self, step: int) -> bool:
        """An evaluation is scheduled after ``step`` steps (0: zero-shot) and the run log does not hold it yet."""
        t = self.cfg.train
        if any(e["step"] == step for e in self.progress.evals):  # evaluated before a restart: the same weights
            return False
        if step == 0:
            return t.eval_at_start
        return step == t.steps or (bool(t.eval_every) and step % t.eval_every == 0 and step < t.steps)

    def _between_steps(self) -> None:
        while True:
            with self._lock:
                requests, self._eval_requests = self._eval_requests, []
            if requests:
                self._evaluate()
                for ev in requests:
                    ev.set()
            if not self._paused.is_set() or self._stop.is_set():
                self.state = "running" if not self._stop.is_set() else "stopping"
                return
            self.state = "paused"
            time.sleep(0.05)

    def _train_step(self, t: int, ahead: RoundPlan | None = None) -> RoundPlan | None:
        """Step t through the one step function (``distzo.train.step.run_step``), stage by stage:

            forwards       a round over the workers: ``ahead``'s, sent during step t-1's update, or a new one
            dispatch next  step t+1's round, sent before this step's update (``_dispatch_next``)
            update         the record to every parameter-server shard

        Returns step t+1's round when it was dispatched (None: that step makes its own)."""
        assert self.data is not None
        s0 = time.perf_counter()
        step = ahead if ahead is not None and ahead.plan.step == t else round_plan(self.cfg, t, self.data)
        result = run_step(self.cfg, step, forwards=self._forwards, dispatch_next=self._dispatch_next,
                          update=self._update, train_log=self.progress, run_log=self.run_log,
                          elapsed_s=lambda: self.progress.train_seconds + time.perf_counter() - s0,
                          observe=self.progress.on_outcome)
        self.progress.on_step_round(result.forwarded.ran)
        return result.dispatched

    def _forwards(self, step: RoundPlan, attempt: int) -> Forwarded:
        """One round over the workers (on the first attempt, the one already started when there is one); the
        losses scored by the objective (``forward_sums``), and the round that ran them."""
        started = step.started if attempt == 0 else None
        rnd = self._run_round(step.plan.step, "train", step.forwards, step.shard_batches(), step.pieces, started=started)
        for k, err in sorted(rnd.errors.items()):  # the same input fails the same way anywhere: no retry
            raise BadInput(f"step {step.plan.step}: forward (direction, shard, sign) = {k} cannot run: {err}")
        cands = self.data.train_candidates  # type: ignore[union-attr]
        losses = {}
        for k in step.forwards:
            r = rnd.results[k]
            scores = torch.tensor(list(r.scores), dtype=torch.float64) if cands else None
            losses[k] = forward_sums(self.cfg.train.objective, cands, step.batches[k[1]], r.loss_sum, r.label_tokens,
                                     scores)
        return Forwarded(losses, sum(r.tokens for r in rnd.results.values()), rnd)

    def _dispatch_next(self, record: UpdateRecord) -> RoundPlan | None:
        """Keep step t's record (the next steps' workers replay it until their base passes it), then send step
        t+1's round now, before step t's update goes to the server: the workers start waiting for block 0 of
        version t+1 while the server applies the update, and fetch it the moment it is served (no round trip
        between steps). Only for a plain training step: not when an eval, a pause, a stop or the end of the run
        comes first, nor without a worker (the step's own round waits for one). Returns the round, or None."""
        self.window.keep(record)
        cfg, t = self.cfg, record.step + 1
        assert self.data is not None
        due_eval = cfg.train.eval_every and t % cfg.train.eval_every == 0
        with self._lock:
            evals_waiting = bool(self._eval_requests)
        if t >= cfg.train.steps or due_eval or evals_waiting or self._paused.is_set() or self._stop.is_set():
            return None
        if not self.registry.units():  # no worker now: the step's own round waits for one, after the update
            return None
        step = round_plan(cfg, t, self.data)
        rnd = self._new_round(t, "train", step.forwards, step.shard_batches())
        self._next = rnd
        rnd.start(step.pieces)
        return replace(step, started=rnd)

    def _update(self, record: UpdateRecord) -> None:
        """Send the record to every server shard (timed: the update phase)."""
        u0 = time.perf_counter()
        self.server.send_update(record)
        self.progress.on_update(time.perf_counter() - u0)

    def _new_round(self, step: int, kind: str, forwards: dict, batches: dict) -> Round:
        """A round of step ``step``'s forwards on its base version, with the records the workers replay on it."""
        version, pending = self.window.base(step)
        return Round(self.registry, self.cfg.coordinator, step, version, kind, forwards, batches, self._stop, pending)

    def _run_round(self, step: int, kind: str, forwards: dict, batches: dict, pieces: list,
                   started: Round | None = None) -> Round:
        """Run a round to its end: ``started`` (already sent) or a new one, sent now; the finished round."""
        rnd = started if started is not None else self._new_round(step, kind, forwards, batches)
        self.round = rnd
        if self._next is rnd:  # routed as the current round from now on
            self._next = None
        try:
            if started is None:
                rnd.start(pieces)
            rnd.wait()
        finally:
            self.round = None
            self.progress.on_round(rnd)
        return rnd

    def on_result(self, worker, result: cpb.WorkResult) -> None:  # noqa: ANN001
        # the round that sent the assignment: the current one, or the next step's, already dispatched
        rnd = next((r for r in (self.round, self._next) if r is not None and result.assignment_id in r.sent), self.round)
        if rnd is None or not rnd.on_result(worker, result):
            if rnd is None:
                self.progress.on_late_report()
            worker.inflight.discard(result.assignment_id)
            if not worker.inflight and worker.live:
                worker.state = "idle"

    # ------------------------------------------------------------------ eval
    def _evaluate(self) -> dict[str, Any]:
        self.activity = "evaluating"
        try:
            return self._run_eval()
        finally:
            self.activity = ""

    def _run_eval(self) -> dict[str, Any]:
        assert self.data is not None
        chunks = self.data.eval_chunks()
        forwards = {i: cpb.ForwardSpec(shard=i, sign=0, want_scores=True, candidates=c) for i, (_, _, c) in enumerate(chunks)}
        batches = {i: b for i, (_, b, _) in enumerate(chunks)}
        units = max(1, sum(len(u) for u in self.registry.units()))
        pieces = [[i for i in range(len(chunks)) if i % units == w] for w in range(units)]
        rnd = self._run_round(self.step, "eval", forwards, batches, [p for p in pieces if p])
        tally = EvalTally(len(self.cfg.data.label_words), self.cfg.train.objective)

        for i, (examples, batch, candidates) in enumerate(chunks):
            if i in rnd.errors:
                raise BadInput(f"eval at step {self.step}: dev chunk {i} cannot run: {rnd.errors[i]}")
            tally.add(i, examples, batch, torch.tensor(list(rnd.results[i].scores), dtype=torch.float64), bool(candidates))
        result = {"step": self.step, **tally.result()}
        self.progress.on_eval(result)
        if self.run_log is not None:
            self.run_log.eval(**result)
        log.info("eval", extra=kv(**{k: (round(v, 4) if isinstance(v, float) else v) for k, v in result.items()}))
        return result

    # ------------------------------------------------------------------ status
    def status(self) -> cpb.JobStatus:
        p = self.progress
        now = self.finished_at or time.monotonic()
        st = cpb.JobStatus(
            state=self.state, step=self.step, total_steps=self.cfg.train.steps,
            loss=p.losses[-1] if p.losses else math.nan,
            error=self.error, error_kind=self.error_kind, layout=self.cfg.layout.name, layout_workers=self.cfg.layout.workers,
            resumed_from=self.resumed_from, model=self.cfg.model.source, wall_seconds=now - self.started_at,
            activity=self.activity,
            **p.status_fields(),
        )
        for e in p.evals:
            st.evals.add(step=e["step"], dev_loss=e["dev_loss"], dev_accuracy=e["dev_accuracy"], dev_examples=e["dev_examples"])
        return st
