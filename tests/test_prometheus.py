"""Metrics: conventional names (a real Prometheus scraping a running cluster: tests/test_control.py)."""

from __future__ import annotations

from prometheus_client import REGISTRY

import coordinator.metrics  # noqa: F401 - register every service's metrics
import distzo.infra.metrics  # noqa: F401
import gpuworker.metrics  # noqa: F401
import paramserver.metrics  # noqa: F401


def distzo_families():
    return [f for f in REGISTRY.collect() if f.name.startswith("distzo")]


def test_metric_names_follow_prometheus_conventions():
    families = distzo_families()
    assert len(families) >= 40
    for f in families:
        assert f.name.startswith("distzo_"), f.name
        assert f.documentation, f.name
        if f.type == "counter":
            assert all(s.name.endswith(("_total", "_created")) for s in f.samples), f.name
        if f.type == "histogram":
            assert f.name.endswith("_seconds") or f.name.endswith("_abs"), f.name
        for s in f.samples:
            assert not {"step", "seed"} & set(s.labels), (f.name, s.labels)
        for unit in ("_ms", "_milliseconds", "_kb", "_mb", "_minutes"):
            assert unit not in f.name, f.name
