"""Replicas: state-machine replication over the primary's journal.

A replica holds the same blocks as its primary and applies every update itself, so the
two stay bitwise identical while only journal records (a few bytes per step) cross the
network. It catches up from its own snapshot + journal when it has one; otherwise (or if
the primary's journal no longer reaches back that far) it copies the primary's fp32
blocks, at whatever version each has, and replays records per block until all meet.
Only then does it report SERVING; until a block reaches a version, fetches for it wait.
A follower that stops for good (it cannot apply a record: ``error``) calls ``on_dead``: the
replica then reports NOT_SERVING and its process exits (paramserver.server), never serving
weights that no longer follow the primary.
"""

from __future__ import annotations

import logging
import threading

import grpc
import numpy as np
from tenacity import Retrying, retry_if_exception, stop_when_event_set, wait_exponential

from distzo.infra.logs import kv
from paramserver.dataplane.client import MASTER_DTYPE, ParamServerClient, StaleVersionError
from paramserver.state import ServerState

log = logging.getLogger("distzo.paramserver.replica")


class Follower(threading.Thread):
    def __init__(self, state: ServerState, primary: ParamServerClient, on_caught_up, stop: threading.Event,  # noqa: ANN001
                 on_dead=None):  # noqa: ANN001 - called once, from this thread, when it ends without being stopped
        super().__init__(name="follower", daemon=True)
        self.state = state
        self.primary = primary
        self.on_caught_up = on_caught_up
        self.on_dead = on_dead
        self.stop_event = stop
        self.error: BaseException | None = None

    def run(self) -> None:
        # a lost primary is retried with backoff until it is back or we are stopped (the wait ends at once then)
        retrying = Retrying(retry=retry_if_exception(self._primary_lost), wait=wait_exponential(multiplier=0.1, max=2.0),
                            stop=stop_when_event_set(self.stop_event), sleep=self.stop_event.wait,
                            before_sleep=self._log_lost, reraise=True)
        try:
            retrying(self._follow_until_stopped)
        except grpc.RpcError:
            if not self.stop_event.is_set():
                raise
        except BaseException as exc:  # noqa: BLE001 - a follower that cannot apply must stop loudly
            self.error = exc
            log.critical("replica stopped following", extra=kv(error=repr(exc)))
        finally:
            if not self.stop_event.is_set() and self.on_dead is not None:
                self.on_dead()

    def _primary_lost(self, exc: BaseException) -> bool:
        return isinstance(exc, grpc.RpcError) and not self.stop_event.is_set()

    @staticmethod
    def _log_lost(state) -> None:  # noqa: ANN001 - tenacity's RetryCallState
        exc = state.outcome.exception()
        log.warning("lost the primary, retrying", extra=kv(code=str(exc.code()), detail=exc.details(),
                                                           attempt=state.attempt_number))

    def _follow_until_stopped(self) -> None:
        while not self.stop_event.is_set():
            try:
                self._follow()
            except grpc.RpcError as exc:
                if exc.code() != grpc.StatusCode.OUT_OF_RANGE:
                    raise
                log.warning("primary's journal no longer reaches our position: re-syncing blocks", extra=kv(detail=exc.details()))
                self._resync()

    def _follow(self) -> None:
        st = self.state
        step = st.journal.next_step
        caught_up = False
        target = self.primary.journaled_steps()
        if step >= target:
            self.on_caught_up()
            caught_up = True
        for record in self.primary.follow(step):
            if self.stop_event.is_set():
                return
            st.submit(record)  # journaled and applied exactly as on the primary
            if not caught_up and record.step + 1 >= target:
                st.drain()
                self.on_caught_up()
                caught_up = True

    def _resync(self) -> None:
        """Copy the primary's blocks, bring them to one version with its journal, and take the base before
        it that the primary still serves (update windows: the next steps may read it)."""
        st = self.state
        versions = {}
        for b in st.owned:
            versions[b] = self._copy_block(b)
        low, high = min(versions.values()), max(versions.values())
        if high > low:
            records = self.primary.records(low, high)
            for start in sorted(set(versions.values()) - {high}):  # blocks already at high skip each pass
                st.store.materialize(records[start - low:], st.dist)
        window = st.window
        if window > 1 and high >= window:
            older = high - window
            for b in st.owned:
                try:
                    buf, _ = self.primary.fetch_block(b, older)
                except StaleVersionError:  # the primary moved past it: no step reads it any more
                    break
                st.store.set_served(b, older, buf)
        version = st.restart_history()
        log.info("re-synced from the primary", extra=kv(version=version))

    def _copy_block(self, b: int, attempts: int = 20) -> int:
        """Install the primary's fp32 block b, and its optimizer state at the same version; returns the version.

        The state is fetched at the master's version: when the primary moved on in between, both again."""
        st = self.state
        width = st.optimizer.width
        for _ in range(attempts):
            buf, res = self.primary.fetch_block(b, -1, dtype=MASTER_DTYPE)
            state = None
            if width and st.manifest.blocks[b].trainable:  # a frozen block has no state
                try:
                    state, _ = self.primary.fetch_state(b, res.version, width)
                except StaleVersionError:
                    continue
            st.store.set_block(b, buf.view(np.float32), res.version, state)
            return res.version
        raise RuntimeError(f"block {b} kept moving while its master and optimizer state were copied ({attempts} tries)")
