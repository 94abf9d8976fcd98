"""The job: the step protocol, from seeds to the parameter server's update.

    for t from the server's journaled step to train.steps:
        plan    = seeds and examples of step t            (distzo.plan, as the reference)
        round   = each layout worker's forwards, version t  (rounds.Round: dispatch, collect)
        outcome = g per direction from the losses          (distzo.mezo.make_update)
        send UpdateRecord(t, (seed, g)..., lr) to every parameter-server shard
        eval every N steps on the dev split

A restarted coordinator resumes from the parameter server's journaled step: plans are
pure functions of (master seed, t), so the run continues exactly where it was.
"""

from __future__ import annotations

import json
import logging
import math
import threading
import time
from dataclasses import dataclass, field
from typing import Any

import grpc
from tenacity import Retrying, retry_if_exception, stop_after_delay, wait_exponential

from distzo.config import JobConfig
from distzo.durable import CorruptFile, JobMismatch, differences, job_id, job_identity
from distzo.job import EvalTally, JobData
from distzo.logs import kv
from distzo.mezo import UpdateRecord, make_update
from distzo.plan import step_plan, worker_roles
from distzo.reference import TrainingStopped, TrainLog, check_skip_policy
from distzo.runlog import RunLog
from distzo.rpc import Credentials
from coordinator import metrics as m
from coordinator.registry import Registry
from coordinator.rounds import BadInput, Round, RoundFailed
from paramserver.client import FetchError, ParamServerClient
from protos import coordinator_pb2 as cpb

log = logging.getLogger("distzo.coordinator.job")


class JobFailed(RuntimeError):
    pass


def _nan(value: float | None) -> float:
    return math.nan if value is None else float(value)


@dataclass
class Progress(TrainLog):
    """The reference trainer's log plus what only a distributed run has."""

    reassignments: int = 0
    late_reports: int = 0
    train_seconds: float = 0.0
    phase: dict[str, float] = field(default_factory=lambda: {
        "assign_s": 0.0, "wait_s": 0.0, "update_s": 0.0, "worker_fetch_s": 0.0, "worker_compute_s": 0.0,
        "worker_wait_s": 0.0, "worker_gather_s": 0.0, "worker_h2d_s": 0.0, "worker_peak_memory_bytes": 0.0, "bytes": 0.0})
    timed_steps: int = 0


class Job:
    def __init__(self, cfg: JobConfig, registry: Registry, param_servers: list[str], creds: Credentials,
                 run_dir: str | None = None):
        self.cfg = cfg
        self.registry = registry
        self.param_servers = param_servers
        self.creds = creds
        self._state = "idle"
        self.error = ""
        self.error_kind = ""  # "bad_input": a deterministic error in the job's input (zoctl exits 2)
        self.step = 0
        self.resumed_from = 0
        self.progress = Progress()
        self.round: Round | None = None
        self._next: Round | None = None  # the next step's round, dispatched before this step's update
        self._stop = threading.Event()
        self._paused = threading.Event()
        self._eval_requests: list[threading.Event] = []
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self.client: ParamServerClient | None = None
        self.data: JobData | None = None
        self.started_at = time.monotonic()
        self.finished_at: float | None = None
        self.run_log = RunLog(run_dir) if run_dir else None
        self.identity = job_identity(cfg)
        self.job_id = job_id(self.identity)
        self._claimed = False
        self.elapsed_before = 0.0  # training seconds of the run before this coordinator resumed it

    @property
    def state(self) -> str:
        return self._state

    @state.setter
    def state(self, value: str) -> None:
        self._state = value
        for name in m.JOB_STATES:
            m.JOB_STATE.labels(name).set(1 if name == value else 0)

    # ------------------------------------------------------------------ control
    def start(self) -> None:
        self._thread = threading.Thread(target=self._main, name="job", daemon=True)
        self._thread.start()

    def pause(self) -> None:
        self._paused.set()

    def resume(self) -> None:
        self._paused.clear()

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
        self.client = self._connect_servers()
        served = self.client.shards[0].manifest
        import yaml

        server_cfg = JobConfig.from_dict(yaml.safe_load(served.config_yaml))
        for name, ours, theirs in (("train.distribution", cfg.train.distribution, server_cfg.train.distribution),
                                   ("model.source", cfg.model.source, server_cfg.model.source)):
            if ours != theirs:
                raise JobFailed(f"{name} is {ours!r} here but {theirs!r} on the parameter server")
        status = self.client.status()
        for shard in status:  # a server holding another job's journal is never resumed by this one
            if shard.job_id and shard.job_id != self.job_id:
                theirs = json.loads(shard.job_identity_json or "{}")
                raise JobFailed(f"the parameter server holds the state of another job ({differences(theirs, self.identity)}); "
                                "give this job a fresh data directory (zoctl up: a new --run-dir)")
        self.resumed_from = self.step = min(s.journaled_steps for s in status)
        m.STEP.set(self.step)
        m.PLANNED_STEPS.set(cfg.train.steps)
        itemsize = {"float32": 4, "bfloat16": 2, "float16": 2}[self.client.served_dtype]
        m.MODEL_BYTES.set(self.client.manifest.numel * itemsize)
        if self.resumed_from:
            log.info("resuming from the parameter server's journal", extra=kv(step=self.resumed_from))
        if self.run_log is not None:  # the whole run's history, also from before a restart
            try:
                history = self.run_log.resume(self.step, cfg)
            except (JobMismatch, CorruptFile) as exc:
                raise JobFailed(str(exc)) from None
            self.progress.losses = [r["loss"] if r.get("loss") is not None else math.nan for r in history.steps]
            self.progress.evals = [{**e, "dev_loss": _nan(e["dev_loss"]), "dev_accuracy": _nan(e["dev_accuracy"])}
                                   for e in history.evals]
            self.elapsed_before = history.elapsed_s
        self.state = "waiting_for_workers"
        need = cfg.layout.workers
        ok = self.registry.wait_for(lambda: sum(len(u) for u in self.registry.units()) >= need or self._stop.is_set(),
                                    cfg.coordinator.worker_wait_s)
        if not ok:
            raise JobFailed(f"only {sum(len(u) for u in self.registry.units())} of the layout's {need} workers were ready "
                            f"in {cfg.coordinator.worker_wait_s:.0f}s")
        self.state = "running"

    def _connect_servers(self) -> ParamServerClient:
        deadline = time.monotonic() + self.cfg.coordinator.server_timeout_s
        while True:
            try:
                return ParamServerClient(self.param_servers, self.creds, connect_timeout_s=10).connect()
            except FetchError:
                if time.monotonic() > deadline or self._stop.is_set():
                    raise
                time.sleep(1.0)

    def _train(self) -> None:
        cfg = self.cfg
        if self.step == 0 and cfg.train.eval_at_start:
            self._evaluate()  # the zero-shot figures
        for t in range(self.step, cfg.train.steps):
            self._between_steps()
            if self._stop.is_set():
                return
            t0 = time.perf_counter()
            self._train_step(t)
            elapsed = time.perf_counter() - t0
            self.progress.train_seconds += elapsed
            self.step = t + 1
            m.STEP.set(self.step)
            m.STEP_SECONDS.observe(elapsed)
            self._worker_gauges()
            if cfg.train.eval_every and self.step % cfg.train.eval_every == 0 and self.step < cfg.train.steps:
                self._evaluate()

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

    def _step_round(self, t: int) -> tuple[Any, dict, dict, list]:
        """Step t's plan and its round's forwards, batches and per-worker pieces."""
        cfg = self.cfg
        assert self.data is not None
        plan = step_plan(cfg, t, len(self.data.train))
        batches = dict(enumerate(self.data.shard_batches(plan)))
        forwards: dict[tuple[int, int, int], cpb.ForwardSpec] = {}
        pieces = []
        for roles in worker_roles(cfg.layout):
            piece = []
            for r in roles:
                key = (r.direction, r.shard, r.sign)
                forwards[key] = cpb.ForwardSpec(direction=r.direction, shard=r.shard, sign=r.sign,
                                                seed=plan.seeds[r.direction], coef=r.sign * cfg.train.eps)
                piece.append(key)
            pieces.append(piece)
        return plan, forwards, batches, pieces

    def _prestart(self, t: int) -> None:
        """Send step t's assignments now, before step t-1's update goes to the server: the workers start
        waiting for block 0 of version t while the server applies the update, and fetch it the moment
        it is served (no round trip between steps). Only for a plain training step: not when an eval,
        a pause, a stop or the end of the run comes first."""
        cfg = self.cfg
        due_eval = cfg.train.eval_every and t % cfg.train.eval_every == 0
        with self._lock:
            evals_waiting = bool(self._eval_requests)
        if t >= cfg.train.steps or due_eval or evals_waiting or self._paused.is_set() or self._stop.is_set():
            return
        _, forwards, batches, pieces = self._step_round(t)
        rnd = Round(self.registry, cfg.coordinator, t, t, "train", forwards, batches, self._stop)
        self._next = rnd
        rnd.start(pieces)

    def _train_step(self, t: int) -> None:
        s0 = time.perf_counter()
        cfg = self.cfg
        plan, forwards, batches, pieces = self._step_round(t)
        for attempt in range(cfg.train.nonfinite_retries + 1):
            started, self._next = self._next, None
            if attempt == 0 and started is not None and started.step == t:
                rnd = self._run_round(t, "train", forwards, batches, pieces, started=started)
            else:
                rnd = self._run_round(t, "train", forwards, batches, pieces)
            for k, err in sorted(rnd.errors.items()):  # the same input fails the same way anywhere: no retry
                raise BadInput(f"step {t}: forward (direction, shard, sign) = {k} cannot run: {err}")
            losses = {k: rnd.loss(k) for k in forwards}
            outcome = make_update(t, plan.seeds, losses, cfg.layout.ddp, cfg.train.eps, plan.lr,
                                  cfg.train.weight_decay, cfg.train.grad_clip)
            if not outcome.nonfinite:
                break
            if attempt < cfg.train.nonfinite_retries:
                self.progress.nonfinite_retries += 1
                m.NONFINITE_RETRIES.inc()
                log.warning("non-finite loss, re-running the step", extra=kv(step=t))
        tokens = sum(r.tokens for r in rnd.results.values())
        self.progress.tokens += tokens
        m.TOKENS.inc(tokens)
        m.LEARNING_RATE.set(plan.lr)
        m.LOSS.labels("plus").set(outcome.loss_plus)
        m.LOSS.labels("minus").set(outcome.loss_minus)
        m.LOSS.labels("mean").set(outcome.loss)
        if outcome.record.directions:
            m.GRADIENT.set(outcome.record.directions[0].g)
            for d in outcome.record.directions:
                m.GRADIENT_ABS.observe(abs(d.g))
        if outcome.record.skipped:
            m.SKIPPED.inc()
            self.progress.skipped_steps += 1
            self.progress.consecutive_skips += 1
            log.warning("step skipped: non-finite loss", extra=kv(step=t))
            check_skip_policy(cfg, t, self.progress.consecutive_skips)
        else:
            self.progress.consecutive_skips = 0
        if self.run_log is not None:  # before the update: a step journaled is a step logged
            self.run_log.step(t, outcome.loss, outcome.loss_plus, outcome.loss_minus, [d.g for d in outcome.record.directions],
                              plan.lr, tokens, self.elapsed_before + self.progress.train_seconds + time.perf_counter() - s0,
                              outcome.record.skipped)
        self._prestart(t + 1)
        u0 = time.perf_counter()
        self._send_update(outcome.record)
        update_s = time.perf_counter() - u0
        self.progress.phase["update_s"] += update_s
        m.PHASE_SECONDS.labels("update").observe(update_s)
        self.progress.losses.append(outcome.loss)
        self._account(rnd)

    def _run_round(self, step: int, kind: str, forwards: dict, batches: dict, pieces: list,
                   started: Round | None = None) -> Round:
        rnd = started or Round(self.registry, self.cfg.coordinator, step, step, kind, forwards, batches, self._stop)
        self.round = rnd
        try:
            if started is None:
                rnd.start(pieces)
            rnd.wait()
        finally:
            self.round = None
            self.progress.reassignments += rnd.reassignments
            self.progress.late_reports += rnd.late
            m.REASSIGNMENTS.inc(rnd.reassignments)
            m.LATE_REPORTS.inc(rnd.late)
        return rnd

    def on_result(self, worker, result: cpb.WorkResult) -> None:  # noqa: ANN001
        # the round that sent the assignment: the current one, or the next step's, already dispatched
        rnd = next((r for r in (self.round, self._next) if r is not None and result.assignment_id in r.sent), self.round)
        if rnd is None or not rnd.on_result(worker, result):
            if rnd is None:
                self.progress.late_reports += 1
                m.LATE_REPORTS.inc()
            worker.inflight.discard(result.assignment_id)
            if not worker.inflight and worker.live:
                worker.state = "idle"

    def _send_update(self, record: UpdateRecord) -> None:
        assert self.client is not None

        def send() -> None:
            # the job's identity goes with the first update: it claims (or must match) the server's data directory
            self.client.apply_update(record, job_id=self.job_id,  # type: ignore[union-attr]
                                     job_identity_json="" if self._claimed else json.dumps(self.identity))
            self._claimed = True

        unavailable = (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED)
        try:
            Retrying(retry=retry_if_exception(lambda e: isinstance(e, grpc.RpcError) and e.code() in unavailable),
                     wait=wait_exponential(multiplier=0.05, max=1.0),
                     stop=stop_after_delay(self.cfg.coordinator.server_timeout_s), reraise=True,
                     before_sleep=lambda _: log.warning("parameter server unavailable, retrying the update",
                                                        extra=kv(step=record.step)))(send)
        except grpc.RpcError as exc:
            raise JobFailed(f"the parameter server refused step {record.step}: {exc.details()}") from None

    def _account(self, rnd: Round) -> None:
        p = self.progress.phase
        p["assign_s"] += rnd.phase["assign_s"]
        p["wait_s"] += rnd.phase["wait_s"]
        m.PHASE_SECONDS.labels("assign").observe(rnd.phase["assign_s"])
        m.PHASE_SECONDS.labels("wait").observe(rnd.phase["wait_s"])
        for tm in rnd.timings:
            p["worker_fetch_s"] += tm.fetch_s
            p["worker_compute_s"] += tm.compute_s
            p["worker_wait_s"] += tm.wait_s
            p["worker_gather_s"] += tm.gather_s
            p["worker_h2d_s"] += tm.h2d_s
            p["worker_peak_memory_bytes"] = max(p["worker_peak_memory_bytes"], tm.peak_memory_bytes)
            p["bytes"] += tm.bytes_received
            for phase in ("fetch", "h2d", "gather", "compute", "wait"):
                m.WORKER_PHASE_SECONDS.labels(phase).inc(getattr(tm, f"{phase}_s"))
            m.BYTES_RECEIVED.inc(tm.bytes_received)
        self.progress.timed_steps += 1

    def _worker_gauges(self) -> None:
        counts = {"idle": 0, "busy": 0, "lost": 0}
        for w in list(self.registry.workers.values()):
            counts[w.state] = counts.get(w.state, 0) + 1
        for state, n in counts.items():
            m.WORKERS.labels(state).set(n)

    # ------------------------------------------------------------------ eval
    def _evaluate(self) -> dict[str, Any]:
        assert self.data is not None
        chunks = self.data.eval_chunks()
        forwards = {i: cpb.ForwardSpec(shard=i, sign=0, want_scores=True, candidates=c) for i, (_, _, c) in enumerate(chunks)}
        batches = {i: b for i, (_, b, _) in enumerate(chunks)}
        units = max(1, sum(len(u) for u in self.registry.units()))
        pieces = [[i for i in range(len(chunks)) if i % units == w] for w in range(units)]
        rnd = self._run_round(self.step, "eval", forwards, batches, [p for p in pieces if p])
        tally = EvalTally(len(self.cfg.data.label_words))
        import torch

        for i, (examples, batch, candidates) in enumerate(chunks):
            if i in rnd.errors:
                raise BadInput(f"eval at step {self.step}: dev chunk {i} cannot run: {rnd.errors[i]}")
            tally.add(i, examples, batch, torch.tensor(list(rnd.results[i].scores), dtype=torch.float64), bool(candidates))
        result = {"step": self.step, **tally.result()}
        self.progress.evals.append(result)
        if self.run_log is not None:
            self.run_log.eval(**result)
        m.DEV_LOSS.set(result["dev_loss"])
        m.DEV_ACCURACY.set(result["dev_accuracy"])
        log.info("eval", extra=kv(**{k: (round(v, 4) if isinstance(v, float) else v) for k, v in result.items()}))
        return result

    # ------------------------------------------------------------------ status
    def status(self) -> cpb.JobStatus:
        p = self.progress
        n = max(1, p.timed_steps)
        now = self.finished_at or time.monotonic()
        st = cpb.JobStatus(
            state=self.state, step=self.step, total_steps=self.cfg.train.steps,
            loss=p.losses[-1] if p.losses else math.nan, final_loss=p.final_loss(),
            tokens_per_second=p.tokens / p.train_seconds if p.train_seconds else 0.0,
            train_tokens=p.tokens, train_seconds=p.train_seconds, skipped_steps=p.skipped_steps,
            reassignments=p.reassignments, late_reports=p.late_reports, nonfinite_retries=p.nonfinite_retries,
            error=self.error, error_kind=self.error_kind, layout=self.cfg.layout.name, layout_workers=self.cfg.layout.workers,
            resumed_from=self.resumed_from, model=self.cfg.model.source, wall_seconds=now - self.started_at,
            assign_s=p.phase["assign_s"] / n, wait_s=p.phase["wait_s"] / n, update_s=p.phase["update_s"] / n,
            worker_fetch_s=p.phase["worker_fetch_s"] / n, worker_compute_s=p.phase["worker_compute_s"] / n,
            worker_wait_s=p.phase["worker_wait_s"] / n, worker_gather_s=p.phase["worker_gather_s"] / n,
            bytes_per_step=p.phase["bytes"] / n, worker_h2d_s=p.phase["worker_h2d_s"] / n,
            worker_peak_memory_bytes=int(p.phase["worker_peak_memory_bytes"]),
        )
        for e in p.evals:
            st.evals.add(step=e["step"], dev_loss=e["dev_loss"], dev_accuracy=e["dev_accuracy"], dev_examples=e["dev_examples"])
        return st
