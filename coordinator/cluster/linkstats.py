"""Bytes on the wire per simulated host's link: sampled per step, reported in the summary and to Prometheus.

The counters are the link's own (``HostNetwork.link_counters``: the veth's rx/tx bytes, frames
with their Ethernet, IP and TCP headers, every protocol), so nothing a process sends can escape
them. Steady state is the bytes between two status polls that both saw training running, divided
by the steps applied between them, summed over every such interval that contains no eval (an eval
ships dev examples) and does not reach the last step (the final eval follows it at once):
``bytes_per_step = sum(bytes over kept intervals) / sum(steps over kept intervals)``. A replica's
initial sync (from its start until it reports SERVING) is counted apart, per host.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from typing import Callable

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector, CollectorRegistry

Counters = Callable[[int], tuple[int, int]]  # host -> (bytes sent, bytes received)


@dataclass
class _Sample:
    step: int
    evals: int
    counters: list[tuple[int, int]]


@dataclass(eq=False)  # hashable by identity: a Prometheus registry keys on it
class LinkMeter(Collector):
    """Per-host link bytes of one run. ``counters(h)``: (sent, received) bytes of host ``h`` so far."""

    hosts: int
    counters: Counters
    total_steps: int
    model_bytes: int = 0
    initial_sync: dict[int, tuple[int, int]] = field(default_factory=dict)  # host -> (sent, received) while syncing
    _samples: list[_Sample] = field(default_factory=list)
    _start: list[tuple[int, int]] = field(default_factory=list)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def begin(self) -> None:
        self._start = self._read()

    def _read(self) -> list[tuple[int, int]]:
        return [self.counters(h) for h in range(self.hosts)]

    def observe(self, state: str, step: int, evals: int) -> None:
        """Record the counters when a status poll sees a new step of a running job."""
        if state != "running" or step < 1 or (self._samples and self._samples[-1].step == step):
            return
        with self._lock:
            self._samples.append(_Sample(step, evals, self._read()))

    def steady(self) -> tuple[int, list[tuple[int, int]]]:
        """(steps counted, per host (bytes sent, bytes received) over those steps) in steady state."""
        steps, sums = 0, [(0, 0)] * self.hosts
        with self._lock:
            pairs = list(zip(self._samples, self._samples[1:]))
        for a, b in pairs:
            if b.evals != a.evals or b.step >= self.total_steps:
                continue
            steps += b.step - a.step
            sums = [(s + (cb[0] - ca[0]), r + (cb[1] - ca[1])) for (s, r), ca, cb in zip(sums, a.counters, b.counters)]
        return steps, sums

    def report(self) -> dict:
        """The summary's ``links``: per host, bytes per step (sent, received, their sum), its ratio to one copy of
        the model at the served dtype, the run's totals and the initial sync; plus the steps counted."""
        steps, sums = self.steady()
        now = self._read()
        links = []
        for h in range(self.hosts):
            sent, recv = sums[h]
            per_step = (sent + recv) / steps if steps else float("nan")
            links.append({
                "host": h,
                "sent_bytes_per_step": sent / steps if steps else float("nan"),
                "received_bytes_per_step": recv / steps if steps else float("nan"),
                "bytes_per_step": per_step,
                "fraction_of_model": per_step / self.model_bytes if self.model_bytes and steps else float("nan"),
                "total_sent_bytes": now[h][0] - self._start[h][0] if self._start else 0,
                "total_received_bytes": now[h][1] - self._start[h][1] if self._start else 0,
                "initial_sync_bytes": sum(self.initial_sync[h]) if h in self.initial_sync else None,
            })
        return {"model_bytes": self.model_bytes, "steady_steps": steps, "links": links}

    # ------------------------------------------------------------------ Prometheus
    def collect(self):  # noqa: ANN201 - the collector protocol
        sent = CounterMetricFamily("distzo_link_sent_bytes", "Bytes a simulated host sent on its link", labels=["host"])
        recv = CounterMetricFamily("distzo_link_received_bytes", "Bytes a simulated host received on its link",
                                   labels=["host"])
        per_step = GaugeMetricFamily("distzo_link_steady_bytes_per_step",
                                     "Steady-state bytes per training step on a host's link (both directions)",
                                     labels=["host"])
        sync = GaugeMetricFamily("distzo_link_initial_sync_bytes",
                                 "Bytes on a host's link while its replica caught up with the primary", labels=["host"])
        model = GaugeMetricFamily("distzo_link_model_bytes", "One copy of the served model, for comparison")
        rep = self.report()
        for link in rep["links"]:
            h = str(link["host"])
            sent.add_metric([h], link["total_sent_bytes"])
            recv.add_metric([h], link["total_received_bytes"])
            if rep["steady_steps"]:
                per_step.add_metric([h], link["bytes_per_step"])
            if link["initial_sync_bytes"] is not None:
                sync.add_metric([h], link["initial_sync_bytes"])
        model.add_metric([], rep["model_bytes"])
        yield from (sent, recv, per_step, sync, model)

    def serve(self, host: str = "127.0.0.1") -> int:
        """Serve these metrics on ``host``, a free port; returns the port."""
        from prometheus_client import start_http_server

        registry = CollectorRegistry()
        registry.register(self)
        server, _ = start_http_server(0, addr=host, registry=registry)
        self._server = server
        return int(server.server_port)

    def close(self) -> None:
        server = getattr(self, "_server", None)
        if server is not None:
            server.shutdown()
            server.server_close()


def measure_sync(counters: Counters, host: int, until: Callable[[], None]) -> tuple[int, int]:
    """Bytes (sent, received) on ``host``'s link while ``until()`` runs (a replica catching up)."""
    a = counters(host)
    until()
    b = counters(host)
    return b[0] - a[0], b[1] - a[1]
