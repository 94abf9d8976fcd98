"""The coordinator's RPC handlers: worker sessions and job control."""

from __future__ import annotations

import logging
import queue
import threading
from typing import Callable, Iterator

import grpc

from coordinator.job import Job
from coordinator.registry import Registry
from distzo.common.config import ConfigError, JobConfig
from distzo.common.errors import BadInput
from distzo.infra.rpc import Credentials, has_token
from distzo.run.modelcard import model_card
from distzo.run.report import eval_summary
from paramserver.dataplane.client import FetchError, ParamServerClient
from protos import coordinator_pb2 as cpb
from protos import coordinator_pb2_grpc as cpb_grpc

log = logging.getLogger("distzo.coordinator.rpc")
SERVICE = "distzo.v1.Coordinator"
STATE_CHANGING = ("Session", "StartJob", "Pause", "Resume", "Stop", "Snapshot", "Export", "Eval", "Shutdown")
CONTROL_WAIT_S = 30.0  # how long Pause and Resume wait for the job to reach the state they ask for


class CoordinatorService(cpb_grpc.CoordinatorServicer):
    def __init__(self, param_servers: list[str], creds: Credentials, on_shutdown: Callable[[], None],
                 worker_servers: list[str] | None = None, run_dir: str | None = None):
        self.registry = Registry()
        self.run_dir = run_dir
        self.param_servers = param_servers
        self.worker_servers = worker_servers or param_servers
        self.creds = creds
        self.on_shutdown = on_shutdown
        self.job: Job | None = None
        self._lock = threading.Lock()

    # ------------------------------------------------------------------ jobs
    def start_job(self, cfg: JobConfig) -> Job:
        with self._lock:
            if self.job is not None and self.job.state not in ("done", "failed", "stopped"):
                raise RuntimeError(f"a job is already {self.job.state}")
            self.job = Job(cfg, self.registry, self.param_servers, self.creds, run_dir=self.run_dir)
            self.job.start()
            welcome = self._welcome(self.job.cfg, "")  # the job's config: its defaults resolved
            for w in self.registry.live():  # workers that came before the job learn its config
                w.ready = False  # until they say they are set up for this one
                w.send(cpb.CoordinatorMessage(welcome=cpb.Welcome(worker_id=w.worker_id, job_config_yaml=welcome.job_config_yaml,
                                                                  param_servers=welcome.param_servers)))
            return self.job

    def _welcome(self, cfg: JobConfig | None, worker_id: str) -> cpb.Welcome:
        return cpb.Welcome(worker_id=worker_id, job_config_yaml=cfg.to_yaml(redact=True) if cfg else "",
                           param_servers=self.worker_servers)

    def _need_job(self, context: grpc.ServicerContext) -> Job:
        if self.job is None:
            context.abort(grpc.StatusCode.FAILED_PRECONDITION, "no job: start one with `zoctl train --config FILE`")
        return self.job  # type: ignore[return-value]

    # ------------------------------------------------------------------ worker sessions
    def Session(self, request_iterator: Iterator[cpb.WorkerMessage], context: grpc.ServicerContext) -> Iterator[cpb.CoordinatorMessage]:
        try:
            first = next(request_iterator)
        except StopIteration:
            return
        if first.WhichOneof("kind") != "hello":
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, "a worker session must start with a hello")
        hello = first.hello
        if hello.node_size < 1 or not 0 <= hello.node_rank < max(1, hello.node_size):
            context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                          f"node rank {hello.node_rank} does not fit a node group of {hello.node_size}")
        with self._lock:  # against start_job: every worker gets the welcome of the job, and before anything else
            job = self.job
            conn = self.registry.register(hello, first=lambda wid: cpb.CoordinatorMessage(
                welcome=self._welcome(job.cfg, wid)) if job is not None else None)

        def read() -> None:
            try:
                for msg in request_iterator:
                    kind = msg.WhichOneof("kind")
                    self.registry.heartbeat(conn, ready=kind == "heartbeat" and msg.heartbeat.ready)
                    if kind == "result" and self.job is not None:
                        self.job.on_result(conn, msg.result)
            except grpc.RpcError:
                pass
            finally:
                self.registry.lose(conn, "session closed")

        threading.Thread(target=read, name=f"session-{conn.worker_id}", daemon=True).start()
        while context.is_active():
            try:
                msg = conn.outbox.get(timeout=1.0)
            except queue.Empty:
                continue
            if msg is None:
                return
            yield msg

    # ------------------------------------------------------------------ control
    def GetStatus(self, request: cpb.StatusQuery, context: grpc.ServicerContext) -> cpb.JobStatus:
        return self._status(context)

    def _status(self, context: grpc.ServicerContext) -> cpb.JobStatus:
        """The job's status with its workers: what every reply that shows the job carries (status, pause, ...)."""
        st = self.job.status() if self.job is not None else cpb.JobStatus(state="idle")
        if st.error and self.creds.token and not has_token(context, self.creds.token):
            # an error may name files of the services' hosts (a full disk, a data directory): for token holders only
            st.error = "the job failed; its error is shown to clients with the token (zoctl status --token-file)"
        import time

        now = time.monotonic()
        for w in sorted(self.registry.workers.values(), key=lambda w: w.worker_id):
            st.workers.add(worker_id=w.worker_id, host=w.hello.host, pid=w.hello.pid, state=w.state, node_id=w.node_id,
                           node_rank=w.hello.node_rank, device=w.hello.device, assignments_done=w.assignments_done,
                           last_seen_s=now - w.last_seen)
        return st

    def StartJob(self, request: cpb.StartJobRequest, context: grpc.ServicerContext) -> cpb.JobStatus:
        try:
            cfg = JobConfig.from_yaml_text(request.config_yaml)
        except ConfigError as exc:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        try:
            job = self.start_job(cfg)
        except BadInput as exc:  # a model that names nothing (its defaults are chosen by its size)
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        except RuntimeError as exc:
            context.abort(grpc.StatusCode.FAILED_PRECONDITION, str(exc))
        return job.status()

    def Pause(self, request: cpb.ControlRequest, context: grpc.ServicerContext) -> cpb.JobStatus:
        """Pause after the current step; the reply is the state after the command (paused, or still finishing
        its step or evaluation when that takes longer than CONTROL_WAIT_S)."""
        self._need_job(context).pause(CONTROL_WAIT_S)
        return self._status(context)

    def Resume(self, request: cpb.ControlRequest, context: grpc.ServicerContext) -> cpb.JobStatus:
        self._need_job(context).resume(CONTROL_WAIT_S)
        return self._status(context)

    def Stop(self, request: cpb.ControlRequest, context: grpc.ServicerContext) -> cpb.JobStatus:
        job = self._need_job(context)
        job.stop()
        job.join(timeout=60)
        return self._status(context)

    def _servers(self) -> ParamServerClient:
        return ParamServerClient(self.param_servers, self.creds, connect_timeout_s=10).connect()

    def Snapshot(self, request: cpb.ControlRequest, context: grpc.ServicerContext) -> cpb.ControlReply:
        try:
            with self._servers() as c:
                replies = c.snapshot()
        except grpc.RpcError as exc:
            context.abort(exc.code(), exc.details())
        except FetchError as exc:
            context.abort(grpc.StatusCode.UNAVAILABLE, str(exc))
        return cpb.ControlReply(message=f"snapshot at version {replies[0].version}", path=replies[0].path, version=replies[0].version)

    def Export(self, request: cpb.ExportJobRequest, context: grpc.ServicerContext) -> cpb.ControlReply:
        if not request.path:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, "export needs a directory path")
        try:
            with self._servers() as c:
                reply = c.export(request.path, model_card=self._model_card(request.merge), merge=request.merge)
        except grpc.RpcError as exc:
            context.abort(exc.code(), exc.details())
        except FetchError as exc:
            context.abort(grpc.StatusCode.UNAVAILABLE, str(exc))
        return cpb.ControlReply(message=f"exported version {reply.version}", path=reply.path, version=reply.version)

    def _model_card(self, merged: bool = False) -> str:
        """The job's model card with its metrics (the server writes its own when there is no job);
        ``merged``: the export is an adapter merged into the base."""
        job = self.job
        if job is None:
            return ""

        st = job.status()
        evals = [{"step": e.step, "dev_loss": e.dev_loss, "dev_accuracy": e.dev_accuracy} for e in st.evals]
        last = evals[-1] if evals and evals[-1]["step"] == st.step else {}  # never an older eval's figures as final
        metrics = {**eval_summary(evals), "final_loss": st.final_loss, "dev_loss": last.get("dev_loss"),
                   "dev_accuracy": last.get("dev_accuracy")}
        return model_card(job.cfg, metrics, st.step, merged=merged)

    def Eval(self, request: cpb.ControlRequest, context: grpc.ServicerContext) -> cpb.EvalResult:
        job = self._need_job(context)
        if job.state not in ("running", "paused"):
            context.abort(grpc.StatusCode.FAILED_PRECONDITION, f"the job is {job.state}; eval runs between training steps")
        result = job.request_eval()
        return cpb.EvalResult(step=result["step"], dev_loss=result["dev_loss"], dev_accuracy=result["dev_accuracy"],
                              dev_examples=result["dev_examples"])

    def Shutdown(self, request: cpb.ControlRequest, context: grpc.ServicerContext) -> cpb.ControlReply:
        if self.job is not None:
            self.job.stop()
        self.registry.shutdown_all("coordinator shutting down")
        threading.Timer(0.2, self.on_shutdown).start()
        log.info("shutdown requested")
        return cpb.ControlReply(message="shutting down")

