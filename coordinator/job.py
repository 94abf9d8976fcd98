"""The job: the step protocol, from seeds to the parameter server's update.

    for t from the server's journaled step to train.steps:
        distzo.train.step.run_step, the reference trainer's step, with
            forwards = each layout worker's forwards, version t   (rounds.Round: dispatch, collect)
            update   = send UpdateRecord(t, (seed, g)..., lr) to every parameter-server shard
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
from typing import Any, Callable, Sequence

import grpc
import torch
from tenacity import Retrying, retry_if_exception, stop_after_delay, stop_when_event_set, wait_exponential

from coordinator.progress import Progress, set_job_state, set_worker_gauges
from coordinator.registry import Registry
from coordinator.rounds import BadInput, Round, RoundFailed
from distzo.common.config import JobConfig
from distzo.common.durable import CorruptFile, JobMismatch, differences, job_id, job_identity
from distzo.data.jobdata import EvalTally, JobData
from distzo.data.tasks import Batch
from distzo.infra.logs import kv
from distzo.infra.rpc import Credentials
from distzo.model.blocks import ITEMSIZE
from distzo.run.runlog import RunLog
from distzo.train.defaults import resolve
from distzo.train.objective import forward_sums
from distzo.train.plan import StepPlan, step_plan, worker_roles
from distzo.train.precision import job_precision
from distzo.train.step import ForwardKey, Losses, TrainingStopped, run_step
from distzo.zo.mezo import base_version
from distzo.zo.record import UpdateRecord
from paramserver.dataplane.client import FetchError, ParamServerClient
from protos import coordinator_pb2 as cpb

ENDED = ("stopped", "done", "failed")  # a job in one of these states does not change any more

log = logging.getLogger("distzo.coordinator.job")


class JobFailed(RuntimeError):
    pass


def _nan(value: float | None) -> float:
    return math.nan if value is None else float(value)


class Job:
    """One training job on the coordinator, run by its own thread (``start``): from the parameter servers'
    journaled step to ``train.steps``, each step is ``distzo.train.step.run_step`` with the workers' forwards (a
    ``rounds.Round`` over the registry's workers) and the update sent to every parameter-server shard; the dev
    split is evaluated when due and at the end. ``progress`` keeps the run's figures and the run log.

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
        self._last_round: Round | None = None  # the round whose losses made the current step's record
        self._stop = threading.Event()
        self._paused = threading.Event()
        self._changed = threading.Condition()  # notified on every change of state (pause and resume wait for it)
        self.activity = ""  # "evaluating" while the dev split runs (JobStatus.activity)
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
        # update windows: the records a step's workers replay on their base (distzo.zo.mezo.base_version)
        self.records: dict[int, UpdateRecord] = {}

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
        self.client = self._connect_servers()
        server_cfg = JobConfig.from_yaml_text(self.client.config_yaml, "the parameter server's job config")
        for name, ours, theirs in (("train.distribution", cfg.train.distribution, server_cfg.train.distribution),
                                   ("model.source", cfg.model.source, server_cfg.model.source),
                                   ("server.update_window", cfg.server.update_window, self.client.update_window)):
            if ours != theirs:
                raise JobFailed(f"{name} is {ours!r} here but {theirs!r} on the parameter server")
        status = self.client.status()
        for shard in status:  # a server holding another job's journal is never resumed by this one
            if shard.job_id and shard.job_id != self.job_id:
                theirs = json.loads(shard.job_identity_json or "{}")
                raise JobFailed(f"the parameter server holds the state of another job ({differences(theirs, self.identity)}); "
                                "give this job a fresh data directory (zoctl up: a new --run-dir)")
        self.resumed_from = self.step = min(s.journaled_steps for s in status)
        base = base_version(self.step, cfg.server.update_window)
        # resuming mid-window: the records after the base the next steps read (the server may be restarting too)
        transient = (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.UNKNOWN, grpc.StatusCode.CANCELLED,
                     grpc.StatusCode.DEADLINE_EXCEEDED)
        records = Retrying(retry=retry_if_exception(lambda e: isinstance(e, FetchError) and e.code in transient),
                           wait=wait_exponential(multiplier=0.1, max=2.0), stop=stop_after_delay(cfg.coordinator.server_timeout_s),
                           reraise=True)(self.client.records, base, self.step)
        self.records = {r.step: r for r in records}
        self.progress.on_start(self.step, cfg.train.steps, self.client.manifest.numel * ITEMSIZE[self.client.served_dtype])
        self.progress.measure_perturbation(cfg, self.client.manifest, self.data.model_dir)  # logged, in status and metrics
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
            # the totals a summary reports are the whole run's: what the coordinator before this one counted too
            self.progress.tokens = sum(int(r.get("tokens") or 0) for r in history.steps)
            self.progress.skipped_steps = sum(1 for r in history.steps if r.get("skipped"))
            self.progress.train_seconds = history.elapsed_s
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
        if self._eval_due(self.step):  # the zero-shot figures, or the evaluation a coordinator before this one missed
            self._evaluate()
        for t in range(self.step, cfg.train.steps):
            self._between_steps()
            if self._stop.is_set():
                return
            t0 = time.perf_counter()
            self._train_step(t)
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

    def _round_spec(self, plan: StepPlan) -> tuple[dict[ForwardKey, cpb.ForwardSpec], list[list[ForwardKey]]]:
        """The layout's forwards of ``plan``, by (direction, shard, sign), and each worker's piece of them."""
        eps = job_precision(self.cfg).eps  # the forwards' (train.eps_bf16 for bfloat16 forwards)
        cands = self.data.train_candidates if self.data is not None else ()  # train.objective accuracy: scored
        forwards: dict[ForwardKey, cpb.ForwardSpec] = {}
        pieces = []
        for roles in worker_roles(self.cfg.layout):
            piece = []
            for r in roles:
                key = (r.direction, r.shard, r.sign)
                forwards[key] = cpb.ForwardSpec(direction=r.direction, shard=r.shard, sign=r.sign,
                                                seed=plan.seeds[r.direction], coef=r.sign * eps,
                                                want_scores=bool(cands), candidates=cands)
                piece.append(key)
            pieces.append(piece)
        return forwards, pieces

    def _prestart(self, t: int) -> None:
        """Send step t's assignments now, before step t-1's update goes to the server: the workers start
        waiting for block 0 of version t while the server applies the update, and fetch it the moment
        it is served (no round trip between steps). Only for a plain training step: not when an eval,
        a pause, a stop or the end of the run comes first."""
        cfg = self.cfg
        assert self.data is not None
        due_eval = cfg.train.eval_every and t % cfg.train.eval_every == 0
        with self._lock:
            evals_waiting = bool(self._eval_requests)
        if t >= cfg.train.steps or due_eval or evals_waiting or self._paused.is_set() or self._stop.is_set():
            return
        if not self.registry.units():  # no worker now: the step's own round waits for one, after the update
            return
        plan = step_plan(cfg, t, len(self.data.train))
        forwards, pieces = self._round_spec(plan)
        version, pending = self._base(t)
        rnd = Round(self.registry, cfg.coordinator, t, version, "train", forwards,
                    dict(enumerate(self.data.shard_batches(plan))), self._stop, pending)
        self._next = rnd
        rnd.start(pieces)

    def _train_step(self, t: int) -> None:
        """Step t through the one step function (distzo.train.step): a round over the workers, then the server."""
        assert self.data is not None
        s0 = time.perf_counter()
        self._last_round = None
        run_step(self.cfg, t, self.data, self._forwards, self._update, self.progress, self.run_log,
                 elapsed_s=lambda: self.progress.train_seconds + time.perf_counter() - s0,
                 observe=self.progress.on_outcome)
        assert self._last_round is not None
        self.progress.on_step_round(self._last_round)

    def _forwards(self, plan: StepPlan, batches: Sequence[Batch], attempt: int) -> tuple[Losses, int]:
        """One round over the workers (the one dispatched early by ``_prestart`` on the first attempt)."""
        forwards, pieces = self._round_spec(plan)
        started, self._next = self._next, None
        if attempt > 0 or started is None or started.step != plan.step:
            started = None
        rnd = self._run_round(plan.step, "train", forwards, dict(enumerate(batches)), pieces, started=started)
        for k, err in sorted(rnd.errors.items()):  # the same input fails the same way anywhere: no retry
            raise BadInput(f"step {plan.step}: forward (direction, shard, sign) = {k} cannot run: {err}")
        self._last_round = rnd
        if not self.data.train_candidates:  # type: ignore[union-attr]
            return {k: rnd.loss(k) for k in forwards}, sum(r.tokens for r in rnd.results.values())
        cands = self.data.train_candidates  # type: ignore[union-attr]
        losses = {}
        for k in forwards:
            r = rnd.results[k]
            losses[k] = forward_sums(self.cfg.train.objective, cands, batches[k[1]], r.loss_sum, r.label_tokens,
                                     torch.tensor(list(r.scores), dtype=torch.float64))
        return losses, sum(r.tokens for r in rnd.results.values())

    def _base(self, step: int) -> tuple[int, list[UpdateRecord]]:
        """The base version step ``step``'s workers fetch and the records they replay on it (update windows)."""
        version = base_version(step, self.cfg.server.update_window)
        return version, [self.records[s] for s in range(version, step)]

    def _update(self, record: UpdateRecord) -> None:
        """Dispatch the next step's round, then send this step's record to every server shard."""
        self.records[record.step] = record  # the next steps' workers replay it until their base passes it
        keep_from = base_version(record.step + 1, self.cfg.server.update_window)
        for s in [s for s in self.records if s < keep_from]:
            del self.records[s]
        self._prestart(record.step + 1)
        u0 = time.perf_counter()
        self._send_update(record)
        self.progress.on_update(time.perf_counter() - u0)

    def _run_round(self, step: int, kind: str, forwards: dict, batches: dict, pieces: list,
                   started: Round | None = None) -> Round:
        rnd = started
        if rnd is None:
            version, pending = self._base(step)
            rnd = Round(self.registry, self.cfg.coordinator, step, version, kind, forwards, batches, self._stop, pending)
        self.round = rnd
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
                     stop=stop_after_delay(self.cfg.coordinator.server_timeout_s) | stop_when_event_set(self._stop),
                     reraise=True,
                     before_sleep=lambda _: log.warning("parameter server unavailable, retrying the update",
                                                        extra=kv(step=record.step)))(send)
        except grpc.RpcError as exc:
            raise JobFailed(f"the parameter server refused step {record.step}: {exc.details()}") from None

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
