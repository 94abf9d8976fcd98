"""Parameter-server metrics (see distzo/infra/metrics.py for the conventions)."""

from typing import Callable

from prometheus_client import Counter, Gauge, Histogram

from distzo.infra.metrics import LATENCY_BUCKETS

SERVED_BYTES = Counter("distzo_paramserver_served_bytes_total",
                       "Block bytes sent to clients over gRPC (shared-memory reads never reach the server: workers count them)",
                       ["transport"])
FETCH_SECONDS = Histogram("distzo_paramserver_fetch_duration_seconds", "FetchSlice streams, from request to last chunk",
                          buckets=LATENCY_BUCKETS)
VERSION_WAIT_SECONDS = Histogram("distzo_paramserver_version_wait_seconds",
                                 "Time a fetch or WaitVersion waited for the block's version", buckets=LATENCY_BUCKETS)
UPDATE_SECONDS = Histogram("distzo_paramserver_update_duration_seconds",
                           "One materializing pass over every owned block: one update, or a window of "
                           "server.update_window updates", buckets=LATENCY_BUCKETS)
JOURNAL_FSYNC_SECONDS = Histogram("distzo_paramserver_journal_append_seconds", "Appending and fsyncing one journal record",
                                  buckets=LATENCY_BUCKETS)
UPDATES = Counter("distzo_paramserver_updates_total", "Update requests by outcome", ["outcome"])
APPLIED_VERSION = Gauge("distzo_paramserver_applied_version",
                        "Version the server's weights are at: every journaled update taken up, materialized or pending "
                        "in the open update window")
MATERIALIZED_VERSION = Gauge("distzo_paramserver_materialized_version",
                             "Version every owned block's fp32 master has (a multiple of server.update_window)")
JOURNALED_STEPS = Gauge("distzo_paramserver_journaled_steps", "Updates durable in the journal")
VERSION_LAG = Gauge("distzo_paramserver_version_lag", "Journaled updates not yet applied to every owned block")
JOURNAL_BYTES = Gauge("distzo_paramserver_journal_bytes", "Journal size on disk")
SNAPSHOT_BYTES = Gauge("distzo_paramserver_snapshot_bytes", "Size of the last completed snapshot")
SNAPSHOT_VERSION = Gauge("distzo_paramserver_snapshot_version", "Version of the last completed snapshot")
SNAPSHOT_SECONDS = Histogram("distzo_paramserver_snapshot_duration_seconds", "Writing one snapshot",
                             buckets=(0.01, 0.05, 0.1, 0.5, 1, 5, 10, 30, 60, 300, 900, 3600))
REPLICA_FOLLOWING = Gauge("distzo_paramserver_replica_following",
                          "Replicas: 1 while following the primary's journal and caught up once, 0 while catching up "
                          "or after the follower died (the replica then reports NOT_SERVING and exits)")
MODEL_BYTES = Gauge("distzo_paramserver_master_bytes", "fp32 master bytes this server holds")
SERVED_COPY_BYTES = Gauge("distzo_paramserver_served_copy_bytes",
                          "Served-copy bytes this server holds besides the master: the 16-bit copy, and with "
                          "server.update_window > 1 the second slot (with a float32 copy the slots are the master's)")
OPTIMIZER_STATE_BYTES = Gauge("distzo_paramserver_optimizer_state_bytes",
                              "train.optimizer momentum/adam state this server holds (trainable blocks only: none for frozen ones)")


def watch(applied: Callable[[], int], materialized: Callable[[], int], journaled: Callable[[], int],
          journal_bytes: Callable[[], int]) -> None:
    """Point the version and journal gauges at a running server's state, read at each scrape: the version its
    weights are at, the masters' version, the updates journaled, the journal's bytes on disk."""
    APPLIED_VERSION.set_function(applied)
    MATERIALIZED_VERSION.set_function(materialized)
    JOURNALED_STEPS.set_function(journaled)
    VERSION_LAG.set_function(lambda: max(0, journaled() - applied()))
    JOURNAL_BYTES.set_function(journal_bytes)


def freeze() -> None:
    """Freeze the callback gauges at their last values: the server state they read is going away."""
    for gauge in (APPLIED_VERSION, JOURNALED_STEPS, VERSION_LAG, JOURNAL_BYTES):
        try:
            last = next(iter(gauge.collect())).samples[0].value
        except Exception:  # noqa: BLE001 - a gauge that cannot be read is frozen at 0
            last = 0.0
        gauge.set_function(lambda v=last: v)
