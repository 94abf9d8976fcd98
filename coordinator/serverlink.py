"""The job's link to the parameter server: connect, check that its shards may run this job, the journaled step
and records a resumed job starts from, and each step's update, sent.

A parameter server holding another job's journal is never resumed by this job; the job's identity goes with its
first update, which claims the server's data directory (or must match the job that did).
"""

from __future__ import annotations

import json
import logging
import threading
import time

import grpc
from tenacity import Retrying, retry_if_exception, stop_after_delay, stop_when_event_set, wait_exponential

from distzo.common.config import JobConfig
from distzo.common.durable import differences, job_id
from distzo.infra.logs import kv
from distzo.infra.rpc import Credentials
from distzo.zo.mezo import base_version
from distzo.zo.record import UpdateRecord
from paramserver.dataplane.client import FetchError, ParamServerClient

log = logging.getLogger("distzo.coordinator.job")

# the server may be restarting: these errors are waited out (coordinator.server_timeout_s)
TRANSIENT_FETCH = (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.UNKNOWN, grpc.StatusCode.CANCELLED,
                   grpc.StatusCode.DEADLINE_EXCEEDED)
UNAVAILABLE = (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED)


class JobFailed(RuntimeError):
    pass


class ServerLink:
    """The parameter-server shards of one job (``addresses``), as the coordinator's job uses them.

    ``identity``: the job's identity (``distzo.common.durable.job_identity``); ``stop``: set when the job stops
    (waits for the server end then)."""

    def __init__(self, cfg: JobConfig, addresses: list[str], creds: Credentials, identity: dict,
                 stop: threading.Event):
        self.cfg = cfg
        self.addresses = addresses
        self.creds = creds
        self.identity = identity
        self.job_id = job_id(identity)
        self.stop = stop
        self.client: ParamServerClient | None = None
        self._claimed = False

    def connect(self) -> ParamServerClient:
        """Connect to every shard, retrying each second for coordinator.server_timeout_s (FetchError after it)."""
        deadline = time.monotonic() + self.cfg.coordinator.server_timeout_s
        while True:
            try:
                self.client = ParamServerClient(self.addresses, self.creds, connect_timeout_s=10).connect()
                return self.client
            except FetchError:
                if time.monotonic() > deadline or self.stop.is_set():
                    raise
                time.sleep(1.0)

    def journaled_step(self) -> int:
        """Check that the server runs this job's trajectory, and return its journaled step (the steps applied).

        Raises JobFailed when a trajectory setting differs from the server's or it holds another job's journal."""
        cfg, client = self.cfg, self.client
        assert client is not None, "connect first"
        server_cfg = JobConfig.from_yaml_text(client.config_yaml, "the parameter server's job config")
        for name, ours, theirs in (("train.distribution", cfg.train.distribution, server_cfg.train.distribution),
                                   ("model.source", cfg.model.source, server_cfg.model.source),
                                   ("server.update_window", cfg.server.update_window, client.update_window)):
            if ours != theirs:
                raise JobFailed(f"{name} is {ours!r} here but {theirs!r} on the parameter server")
        status = client.status()
        for shard in status:  # a server holding another job's journal is never resumed by this one
            if shard.job_id and shard.job_id != self.job_id:
                theirs = json.loads(shard.job_identity_json or "{}")
                raise JobFailed(f"the parameter server holds the state of another job ({differences(theirs, self.identity)}); "
                                "give this job a fresh data directory (zoctl up: a new --run-dir)")
        return min(s.journaled_steps for s in status)

    def window_records(self, step: int) -> list[UpdateRecord]:
        """The records of steps base_version(step, K) .. step-1 that the next steps' workers replay (update
        windows), retried while the server is restarting (FetchError after coordinator.server_timeout_s)."""
        assert self.client is not None, "connect first"
        # resuming mid-window: the records after the base the next steps read (the server may be restarting too)
        return Retrying(retry=retry_if_exception(lambda e: isinstance(e, FetchError) and e.code in TRANSIENT_FETCH),
                        wait=wait_exponential(multiplier=0.1, max=2.0), stop=stop_after_delay(self.cfg.coordinator.server_timeout_s),
                        reraise=True)(self.client.records, base_version(step, self.cfg.server.update_window), step)

    def send_update(self, record: UpdateRecord) -> None:
        """Send step ``record.step``'s update to every shard, retried while the server is unavailable (until
        coordinator.server_timeout_s or the job stops). Raises JobFailed when the server refuses it."""
        assert self.client is not None, "connect first"

        def send() -> None:
            # the job's identity goes with the first update: it claims (or must match) the server's data directory
            self.client.apply_update(record, job_id=self.job_id,  # type: ignore[union-attr]
                                     job_identity_json="" if self._claimed else json.dumps(self.identity))
            self._claimed = True

        try:
            Retrying(retry=retry_if_exception(lambda e: isinstance(e, grpc.RpcError) and e.code() in UNAVAILABLE),
                     wait=wait_exponential(multiplier=0.05, max=1.0),
                     stop=stop_after_delay(self.cfg.coordinator.server_timeout_s) | stop_when_event_set(self.stop),
                     reraise=True,
                     before_sleep=lambda _: log.warning("parameter server unavailable, retrying the update",
                                                        extra=kv(step=record.step)))(send)
        except grpc.RpcError as exc:
            raise JobFailed(f"the parameter server refused step {record.step}: {exc.details()}") from None
