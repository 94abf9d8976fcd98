"""Metrics: conventional names, and a real Prometheus scraping a real local cluster."""

from __future__ import annotations

import json
import shutil
import subprocess
import time
import urllib.parse
import urllib.request

import pytest
import yaml
from prometheus_client import REGISTRY

import coordinator.metrics  # noqa: F401 - register every service's metrics
import distzo.metrics  # noqa: F401
import gpuworker.metrics  # noqa: F401
import paramserver.metrics  # noqa: F401
from coordinator.local import LocalCluster, free_port

from clusterhelpers import wait_until
from test_cluster import base_config


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


def query(base: str, expr: str) -> list[dict]:
    url = f"{base}/api/v1/query?" + urllib.parse.urlencode({"query": expr})
    with urllib.request.urlopen(url, timeout=5) as r:
        doc = json.load(r)
    assert doc["status"] == "success", doc
    return doc["data"]["result"]


def scalar(base: str, expr: str) -> float | None:
    res = query(base, expr)
    return float(res[0]["value"][1]) if res else None


def test_a_real_prometheus_scrapes_a_local_run(cache_dir, tmp_path):
    binary = shutil.which("prometheus")
    if binary is None:
        pytest.skip("the `prometheus` binary is not installed (scripts/install-test-tools.sh installs Debian's package)")
    cfg = base_config(cache_dir, steps=2000)
    cluster = LocalCluster(cfg, tmp_path / "run")
    prom = None
    try:
        cluster.start()
        targets = cluster.metrics_endpoints()
        assert set(targets) == {"paramserver", "coordinator", "worker-0"}
        scrape = {"global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
                  "scrape_configs": [{"job_name": name, "static_configs": [{"targets": [urllib.parse.urlparse(u).netloc]}]}
                                     for name, u in targets.items()]}
        (tmp_path / "prometheus.yml").write_text(yaml.safe_dump(scrape))
        port = free_port()
        base = f"http://127.0.0.1:{port}"
        log = open(tmp_path / "prometheus.log", "wb")
        prom = subprocess.Popen([binary, f"--config.file={tmp_path / 'prometheus.yml'}",
                                 f"--storage.tsdb.path={tmp_path / 'tsdb'}", f"--web.listen-address=127.0.0.1:{port}"],
                                stdout=log, stderr=subprocess.STDOUT)

        def ready() -> bool:
            try:
                with urllib.request.urlopen(f"{base}/-/ready", timeout=1) as r:
                    return r.status == 200
            except OSError:
                return False

        wait_until(ready, timeout=60, what="prometheus ready")
        wait_until(lambda: len(query(base, "up == 1")) == 3, timeout=60, what="all three targets up")
        wait_until(lambda: (scalar(base, "distzo_train_step") or 0) >= 5, timeout=120, what="step series")
        step1 = scalar(base, "distzo_train_step")
        loss1 = scalar(base, 'distzo_train_loss{sign="mean"}')
        time.sleep(4)
        step2 = scalar(base, "distzo_train_step")
        assert step2 > step1  # the series moves
        assert scalar(base, 'max_over_time(distzo_train_loss{sign="mean"}[1m])') != scalar(
            base, 'min_over_time(distzo_train_loss{sign="mean"}[1m])')
        assert loss1 is not None and 0 < loss1 < 20
        assert (scalar(base, "rate(distzo_train_tokens_total[10s])") or 0) > 0
        assert (scalar(base, "distzo_paramserver_applied_version") or 0) >= step1
        assert (scalar(base, 'sum(rate(distzo_worker_phase_seconds_total{phase="compute"}[10s]))') or 0) > 0
        assert query(base, 'distzo_grpc_server_handled_total{method="ApplyUpdate",code="OK"}')
    finally:
        if prom is not None:
            prom.terminate()
            prom.wait(10)
        cluster.shutdown()
