"""The k8s manifests: each overlay renders with `kubectl kustomize`, validates offline, and agrees
with the code it deploys (ports, CLI flags, the job config, the Secret, the NetworkPolicies).

Needs `kubectl` (scripts/install-test-tools.sh installs it) and kubernetes-validate (the `test`
extra). Nothing is downloaded: kubernetes-validate ships its schemas.
"""

from __future__ import annotations

import functools
import json
import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path, PurePosixPath
from typing import Any, Iterator

import pytest
import yaml

from distzo.common.config import JobConfig
from distzo.data.presets import PRESETS
from distzo.infra.rpc import PORTS

ROOT = Path(__file__).resolve().parents[1]
K8S = ROOT / "k8s"
OVERLAYS = ("dev", "gpu")
NAMESPACE = "distzo"
WORKLOAD_KINDS = ("Deployment", "StatefulSet", "DaemonSet", "ReplicaSet", "Job")
CUSTOM_KINDS = {("monitoring.coreos.com/v1", "ServiceMonitor")}
# schemas to validate against: the oldest Kubernetes these manifests target (native gRPC probes,
# NetworkPolicy endPort, emptyDir sizeLimit are GA there) and the newest kubernetes-validate knows
MIN_KUBERNETES = "1.29"
PLACEHOLDER_MARK = "CHANGE-ME"


# ----------------------------------------------------------------------------- rendering
@functools.cache
def _render(overlay: str) -> tuple[str, str, int]:
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        return "", "", -1
    proc = subprocess.run([kubectl, "kustomize", str(K8S / "overlays" / overlay)], capture_output=True, text=True,
                          timeout=120, check=False)
    return proc.stdout, proc.stderr, proc.returncode


def render(overlay: str) -> list[dict[str, Any]]:
    out, err, rc = _render(overlay)
    if rc == -1:
        pytest.skip("kubectl is not on PATH: run scripts/install-test-tools.sh (it installs kubectl for `kubectl kustomize`)")
    assert rc == 0, f"kubectl kustomize k8s/overlays/{overlay} failed:\n{err}"
    docs = [d for d in yaml.safe_load_all(out) if d]
    assert docs, f"k8s/overlays/{overlay} renders nothing"
    return docs


@pytest.fixture(params=OVERLAYS)
def overlay(request: pytest.FixtureRequest) -> str:
    return request.param


@pytest.fixture
def docs(overlay: str) -> list[dict[str, Any]]:
    return render(overlay)


# ----------------------------------------------------------------------------- helpers
def of_kind(docs: list[dict], kind: str) -> list[dict]:
    return [d for d in docs if d["kind"] == kind]


def one(docs: list[dict], kind: str, name: str) -> dict:
    found = [d for d in docs if d["kind"] == kind and d["metadata"]["name"] == name]
    assert len(found) == 1, f"expected one {kind} {name}, found {len(found)}"
    return found[0]


def workloads(docs: list[dict]) -> list[dict]:
    return [d for d in docs if d["kind"] in WORKLOAD_KINDS]


def pod_spec(workload: dict) -> dict:
    return workload["spec"]["template"]["spec"]


def pod_labels(workload: dict) -> dict[str, str]:
    return workload["spec"]["template"]["metadata"].get("labels", {})


def all_containers(workload: dict) -> list[dict]:
    spec = pod_spec(workload)
    return [*spec.get("initContainers", []), *spec["containers"]]


def containers(docs: list[dict]) -> Iterator[tuple[dict, dict]]:
    for w in workloads(docs):
        for c in all_containers(w):
            yield w, c


def workload_of(docs: list[dict], component: str) -> dict:
    found = [w for w in workloads(docs) if pod_labels(w).get("app.kubernetes.io/component") == component]
    assert len(found) == 1, f"expected one workload of component {component}, found {len(found)}"
    return found[0]


def container(docs: list[dict], component: str, name: str) -> dict:
    for c in all_containers(workload_of(docs, component)):
        if c["name"] == name:
            return c
    raise AssertionError(f"no container {name} in the {component} pods")


def selector_matches(selector: dict | None, labels: dict[str, str]) -> bool:
    """A LabelSelector (matchLabels + matchExpressions) against a label set; {} matches everything."""
    selector = selector or {}
    if any(labels.get(k) != v for k, v in (selector.get("matchLabels") or {}).items()):
        return False
    for expr in selector.get("matchExpressions") or []:
        key, op, values = expr["key"], expr["operator"], expr.get("values") or []
        if op == "In" and labels.get(key) not in values:
            return False
        if op == "NotIn" and labels.get(key) in values:
            return False
        if op == "Exists" and key not in labels:
            return False
        if op == "DoesNotExist" and key in labels:
            return False
    return True


def argv(c: dict) -> list[str]:
    return [*c.get("command", []), *c.get("args", [])]


def flag_values(c: dict) -> dict[str, list[str]]:
    """--flag=value and --flag value pairs of a container's command line (flags without a value map to '')."""
    out: dict[str, list[str]] = {}
    words = argv(c)[1:]
    i = 0
    while i < len(words):
        w = words[i]
        if w.startswith("--"):
            if "=" in w:
                name, value = w.split("=", 1)
            elif i + 1 < len(words) and not words[i + 1].startswith("-"):
                name, value = w, words[i + 1]
                i += 1
            else:
                name, value = w, ""
            out.setdefault(name, []).append(value)
        i += 1
    return out


def flag(c: dict, name: str) -> str | None:
    values = flag_values(c).get(name)
    return values[-1] if values else None


def port_of(address: str) -> int:
    return int(address.rsplit(":", 1)[1])


def container_ports(c: dict) -> dict[str, int]:
    return {p["name"]: p["containerPort"] for p in c.get("ports", []) if "name" in p}


def mounts(c: dict) -> list[dict]:
    return c.get("volumeMounts", [])


def volume(workload: dict, name: str) -> dict:
    for v in pod_spec(workload).get("volumes", []):
        if v["name"] == name:
            return v
    raise AssertionError(f"{workload['metadata']['name']}: no volume {name}")


def mount_for(c: dict, path: str) -> dict | None:
    """The volume mount whose mountPath holds ``path`` (the deepest one)."""
    best = None
    for m in mounts(c):
        mp = PurePosixPath(m["mountPath"])
        p = PurePosixPath(path)
        if p == mp or mp in p.parents:
            if best is None or len(mp.parts) > len(PurePosixPath(best["mountPath"]).parts):
                best = m
    return best


_QUANTITY = re.compile(r"^([0-9.]+)([a-zA-Z]*)$")
_SUFFIX = {"": 1, "m": 1e-3, "k": 1e3, "M": 1e6, "G": 1e9, "T": 1e12, "Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40}


def quantity(q: str | int | float) -> float:
    m = _QUANTITY.match(str(q))
    assert m and m.group(2) in _SUFFIX, f"cannot parse the quantity {q!r}"
    return float(m.group(1)) * _SUFFIX[m.group(2)]


def component_kind(c: dict) -> str:
    """Which service a container runs, from its console script."""
    return {"distzo-paramserver": "paramserver", "distzo-coordinator": "coordinator",
            "distzo-worker-launch": "worker-launch", "distzo-worker": "worker"}.get(c.get("command", [""])[0], "other")


def job_config_text(docs: list[dict]) -> str:
    cms = [d for d in of_kind(docs, "ConfigMap") if "job.yaml" in (d.get("data") or {})]
    assert len(cms) == 1, f"expected one ConfigMap with job.yaml, found {len(cms)}"
    return cms[0]["data"]["job.yaml"]


@functools.cache
def _job_config(overlay: str) -> JobConfig:
    return JobConfig.from_dict(yaml.safe_load(job_config_text(render(overlay))))


# ----------------------------------------------------------------------------- structure
def test_renders_the_services(docs: list[dict]) -> None:
    ns = one(docs, "Namespace", NAMESPACE)
    assert ns["metadata"]["labels"].get("pod-security.kubernetes.io/enforce") == "restricted"
    for d in docs:
        labels = d["metadata"].get("labels", {})
        assert labels.get("app.kubernetes.io/name") == "distzo", f"{d['kind']} {d['metadata']['name']}: no common label"
        if d["kind"] != "Namespace":
            assert d["metadata"].get("namespace") == NAMESPACE, f"{d['kind']} {d['metadata']['name']} is not in {NAMESPACE}"
    sts = one(docs, "StatefulSet", "distzo-paramserver")
    assert sts["spec"]["replicas"] == 1
    assert [t["metadata"]["name"] for t in sts["spec"]["volumeClaimTemplates"]] == ["data"]
    headless = one(docs, "Service", sts["spec"]["serviceName"])
    assert headless["spec"].get("clusterIP") == "None", "the parameter server's Service must be headless (stable pod DNS)"
    assert {p["name"] for p in headless["spec"]["ports"]} == {"grpc", "control", "metrics"}
    assert {p["name"] for p in one(docs, "Service", "distzo-coordinator")["spec"]["ports"]} == {"grpc", "metrics"}
    assert one(docs, "Service", "distzo-worker")["spec"].get("clusterIP") == "None"
    one(docs, "Deployment", "distzo-coordinator")
    one(docs, "DaemonSet", "distzo-worker")
    for component in ("paramserver", "coordinator", "worker"):
        w = workload_of(docs, component)
        assert pod_labels(w).get("app.kubernetes.io/name") == "distzo"
        assert selector_matches(w["spec"]["selector"], pod_labels(w)), f"{w['metadata']['name']}: selector misses its pods"
    assert {c["name"] for c in all_containers(workload_of(docs, "worker"))} == {"replica", "workers"}


def test_builtin_kinds_validate_strictly(docs: list[dict]) -> None:
    kv = pytest.importorskip("kubernetes_validate", reason="pip install kubernetes-validate (the `test` extra)")
    versions = sorted({MIN_KUBERNETES, kv.latest_version()})
    errors = []
    for d in docs:
        if (d["apiVersion"], d["kind"]) in CUSTOM_KINDS:
            continue
        for version in versions:
            try:
                kv.validate(d, version, strict=True)
            except kv.ValidationError as exc:
                path = ".".join(str(p) for p in exc.path)
                errors.append(f"{d['kind']} {d['metadata']['name']} (k8s {version}) at {path}: {exc.message}")
            except kv.SchemaNotFoundError as exc:
                errors.append(f"{d['kind']} {d['metadata']['name']}: {exc.message}")
    assert not errors, "\n".join(errors)
    unknown = {(d["apiVersion"], d["kind"]) for d in docs} & CUSTOM_KINDS
    assert unknown == {("monitoring.coreos.com/v1", "ServiceMonitor")}


def test_service_selectors_and_ports_match_pods(docs: list[dict]) -> None:
    for svc in of_kind(docs, "Service"):
        sel = svc["spec"].get("selector")
        assert sel, f"Service {svc['metadata']['name']} has no selector"
        pods = [w for w in workloads(docs) if selector_matches({"matchLabels": sel}, pod_labels(w))]
        assert pods, f"Service {svc['metadata']['name']} selects no pod template ({sel})"
        for p in svc["spec"]["ports"]:
            target = p.get("targetPort", p["port"])
            for w in pods:
                found = [cp for c in all_containers(w) for cp in c.get("ports", [])
                         if cp.get("name") == target or cp["containerPort"] == target]
                assert found, f"Service {svc['metadata']['name']} port {p['name']}: no container port {target!r} in {w['metadata']['name']}"
                assert found[0]["containerPort"] == p["port"], \
                    f"Service {svc['metadata']['name']} port {p['name']} is {p['port']} but the container listens on {found[0]['containerPort']}"


def test_container_ports_are_the_codes_ports(docs: list[dict]) -> None:
    expected = {
        "paramserver": {"grpc": PORTS["paramserver"], "control": PORTS["paramserver_control"],
                        "metrics": PORTS["paramserver_metrics"], "replica-metrics": PORTS["paramserver_metrics"]},
        "coordinator": {"grpc": PORTS["coordinator"], "metrics": PORTS["coordinator_metrics"]},
    }
    for w, c in containers(docs):
        kind = component_kind(c)
        where = f"{w['metadata']['name']}/{c['name']}"
        ports = container_ports(c)
        assert len(ports) == len(c.get("ports", [])), f"{where}: every container port must be named"
        for name, number in ports.items():
            if kind == "worker-launch":
                m = re.fullmatch(r"metrics(?:-(\d+))?", name)
                assert m, f"{where}: unexpected port name {name}"
                want = PORTS["worker_metrics"] + int(m.group(1) or 0)
            else:
                assert name in expected.get(kind, {}), f"{where}: unexpected port name {name}"
                want = expected[kind][name]
            assert number == want, f"{where}: port {name} is {number}, distzo.infra.rpc.PORTS says {want}"
        # ... and the command line listens where the ports say
        if kind in ("paramserver", "coordinator"):
            assert port_of(flag(c, "--listen") or "") == ports["grpc"], f"{where}: --listen is not the grpc port"
            assert int(flag(c, "--metrics-port") or -1) == next(v for k, v in ports.items() if k.endswith("metrics")), \
                f"{where}: --metrics-port is not the metrics port"
        if kind == "paramserver" and "control" in ports:
            assert port_of(flag(c, "--control-listen") or "") == ports["control"]
        if kind == "worker-launch":
            assert int(flag(c, "--metrics-base-port") or PORTS["worker_metrics"]) == ports["metrics"]


def test_addresses_resolve_to_services(docs: list[dict]) -> None:
    sts = one(docs, "StatefulSet", "distzo-paramserver")
    ps_svc = one(docs, "Service", sts["spec"]["serviceName"])
    primary = f"{sts['metadata']['name']}-0.{ps_svc['metadata']['name']}:{PORTS['paramserver']}"
    assert flag(container(docs, "coordinator", "coordinator"), "--param-server") == primary
    assert flag(container(docs, "worker", "replica"), "--follow") == primary
    assert any(p["port"] == PORTS["paramserver"] for p in ps_svc["spec"]["ports"])
    host, port = (flag(container(docs, "worker", "workers"), "--coordinator") or ":").rsplit(":", 1)
    coord_svc = one(docs, "Service", host)
    assert int(port) in {p["port"] for p in coord_svc["spec"]["ports"]}
    assert selector_matches({"matchLabels": coord_svc["spec"]["selector"]}, pod_labels(workload_of(docs, "coordinator")))
    # the workers fetch from their own pod's replica
    replica = container(docs, "worker", "replica")
    assert flag(container(docs, "worker", "workers"), "--param-server") == f"127.0.0.1:{port_of(flag(replica, '--listen') or '')}"
    # $(VAR) in args must be defined in the container's env
    for w, c in containers(docs):
        env = {e["name"] for e in c.get("env", [])}
        for ref in re.findall(r"\$\((\w+)\)", " ".join(argv(c))):
            assert ref in env, f"{w['metadata']['name']}/{c['name']}: $({ref}) is not in env"


def test_servicemonitors(docs: list[dict]) -> None:
    monitors = of_kind(docs, "ServiceMonitor")
    assert {m["metadata"]["name"] for m in monitors} == {"distzo-paramserver", "distzo-coordinator", "distzo-worker"}
    for m in monitors:
        name = m["metadata"]["name"]
        assert m["apiVersion"] == "monitoring.coreos.com/v1"
        assert m["metadata"].get("namespace") == NAMESPACE
        spec = m.get("spec") or {}
        assert spec.get("selector", {}).get("matchLabels"), f"ServiceMonitor {name}: spec.selector.matchLabels is required"
        assert spec.get("endpoints"), f"ServiceMonitor {name}: spec.endpoints is required"
        services = [s for s in of_kind(docs, "Service") if selector_matches(spec["selector"], s["metadata"].get("labels", {}))]
        assert services, f"ServiceMonitor {name} selects no Service"
        for ep in spec["endpoints"]:
            assert ep.get("path", "/metrics") == "/metrics"
            assert isinstance(ep.get("port"), str), f"ServiceMonitor {name}: endpoints must name a Service port"
            for s in services:
                ports = {p["name"]: p for p in s["spec"]["ports"]}
                assert ep["port"] in ports, f"ServiceMonitor {name}: port {ep['port']} is not a port of Service {s['metadata']['name']}"
                target = ports[ep["port"]].get("targetPort")
                pods = [w for w in workloads(docs) if selector_matches({"matchLabels": s["spec"]["selector"]}, pod_labels(w))]
                assert any(target in container_ports(c) for w in pods for c in all_containers(w)), \
                    f"ServiceMonitor {name}: port {ep['port']} targets {target!r}, not a named container port"
        # every metrics port of the selected pods is scraped
        scraped = {ep["port"] for ep in spec["endpoints"]}
        for s in services:
            metric_ports = {p["name"] for p in s["spec"]["ports"] if "metrics" in p["name"]}
            assert metric_ports <= scraped, f"ServiceMonitor {name} misses {sorted(metric_ports - scraped)}"


def test_coordinator_is_never_two(docs: list[dict]) -> None:
    dep = one(docs, "Deployment", "distzo-coordinator")
    assert dep["spec"]["strategy"]["type"] == "Recreate"
    assert dep["spec"].get("replicas", 1) == 1


def test_gpus_only_in_the_gpu_overlay(overlay: str, docs: list[dict]) -> None:
    def gpus(c: dict, part: str) -> int:
        return int(c.get("resources", {}).get(part, {}).get("nvidia.com/gpu", 0))

    workers = container(docs, "worker", "workers")
    ds = workload_of(docs, "worker")
    assert ds["kind"] == "DaemonSet", "one worker pod per node"
    if overlay == "dev":
        for w, c in containers(docs):
            assert not gpus(c, "limits") and not gpus(c, "requests"), f"{w['metadata']['name']}/{c['name']} asks for GPUs in dev"
        assert flag(workers, "--device") == "cpu" and flag(workers, "--gpus") == "1"
    else:
        n = gpus(workers, "limits")
        assert n == 8 and gpus(workers, "requests") in (0, n)
        assert flag(workers, "--device") in (None, "cuda") and flag(workers, "--gpus") == "all"
        for w, c in containers(docs):
            if c is not workers:
                assert not gpus(c, "limits"), f"{w['metadata']['name']}/{c['name']} should not hold GPUs"
        spec = pod_spec(ds)
        assert spec.get("nodeSelector"), "worker pods must be restricted to GPU nodes"
        assert any(t.get("key") == "nvidia.com/gpu" for t in spec.get("tolerations", [])), "worker pods must tolerate the GPU taint"
        # one metrics port per GPU, and the node group is as big as the node
        assert len([p for p in container_ports(workers) if p.startswith("metrics")]) == n
        assert _job_config(overlay).layout.node_size == n


def test_resources_on_every_container(docs: list[dict]) -> None:
    for w, c in containers(docs):
        where = f"{w['metadata']['name']}/{c['name']}"
        res = c.get("resources") or {}
        for part in ("requests", "limits"):
            for key in ("cpu", "memory"):
                assert key in (res.get(part) or {}), f"{where}: no {part}.{key}"
        for key in ("cpu", "memory"):
            assert quantity(res["requests"][key]) <= quantity(res["limits"][key]), f"{where}: {key} request above its limit"


def test_memory_fits_the_master(overlay: str, docs: list[dict]) -> None:
    """The parameter server and each replica hold the fp32 master (4 B/param) plus a served copy."""
    cfg = _job_config(overlay)
    if cfg.model.source in PRESETS:
        return  # a preset is tiny; nothing to size
    m = re.search(r"(\d+(?:\.\d+)?)b\b", cfg.model.source.lower())
    if not m:
        return
    params = float(m.group(1)) * 1e9
    per_param = 4 + (0 if cfg.server.served_dtype == "float32" else 2)
    for c in (container(docs, "paramserver", "paramserver"), container(docs, "worker", "replica")):
        limit = quantity(c["resources"]["limits"]["memory"])
        assert limit >= params * per_param * 1.1, f"{c['name']}: {limit / 2**30:.0f} GiB cannot hold {params:.3g} params x {per_param} B"


def test_pods_run_restricted(docs: list[dict]) -> None:
    """The 'restricted' Pod Security Standard the Namespace enforces."""
    for w in workloads(docs):
        pod_sc = pod_spec(w).get("securityContext", {})
        assert pod_sc.get("seccompProfile", {}).get("type") == "RuntimeDefault", f"{w['metadata']['name']}: seccomp"
        assert pod_spec(w).get("automountServiceAccountToken") is False
        for c in all_containers(w):
            sc = c.get("securityContext", {})
            where = f"{w['metadata']['name']}/{c['name']}"
            assert sc.get("runAsNonRoot", pod_sc.get("runAsNonRoot")) is True, f"{where}: runAsNonRoot"
            assert sc.get("runAsUser", pod_sc.get("runAsUser", 1)) != 0, f"{where}: runs as root"
            assert sc.get("allowPrivilegeEscalation") is False, f"{where}: allowPrivilegeEscalation"
            assert sc.get("capabilities", {}).get("drop") == ["ALL"], f"{where}: capabilities"
            assert not sc.get("privileged"), f"{where}: privileged"
            if sc.get("readOnlyRootFilesystem"):
                assert mount_for(c, "/tmp"), f"{where}: a read-only root filesystem needs a writable /tmp"


def test_probes(docs: list[dict]) -> None:
    for w, c in containers(docs):
        kind = component_kind(c)
        where = f"{w['metadata']['name']}/{c['name']}"
        if kind in ("paramserver", "coordinator"):
            grpc_port = container_ports(c)["grpc"]
            for probe in ("livenessProbe", "readinessProbe", "startupProbe"):
                assert c.get(probe, {}).get("grpc", {}).get("port") == grpc_port, f"{where}: {probe} is not a gRPC probe on {grpc_port}"
            # the empty service name is SERVING as soon as the server runs; the named one only when it can serve
            want = "distzo.v1.ParameterServer" if kind == "paramserver" else "distzo.v1.Coordinator"
            assert c["readinessProbe"]["grpc"].get("service") == want, f"{where}: readiness must ask for {want}"
        elif kind == "worker-launch":
            get = c.get("livenessProbe", {}).get("httpGet", {})
            assert get.get("path") == "/metrics" and get.get("port") == container_ports(c)["metrics"], f"{where}: liveness"
            # readiness: worker 0's distzo_worker_ready (gpuworker/probe.py), on the port it serves metrics on
            command = c.get("readinessProbe", {}).get("exec", {}).get("command", [])
            assert command[:3] == ["python", "-m", "gpuworker.probe"], f"{where}: readiness is not gpuworker.probe"
            assert command[command.index("--port") + 1] == str(container_ports(c)["metrics"]), f"{where}: probe port"
    # the replica's readiness is its catch-up
    assert flag(container(docs, "worker", "replica"), "--follow")


def test_shared_memory_is_memory_backed(docs: list[dict]) -> None:
    cfg_shm = _job_config_for(docs).server.shm_dir
    for component, name in (("paramserver", "paramserver"), ("worker", "replica"), ("worker", "workers")):
        w = workload_of(docs, component)
        c = container(docs, component, name)
        m = mount_for(c, cfg_shm)
        assert m and m["mountPath"] == cfg_shm, f"{name}: {cfg_shm} is not a mounted volume"
        assert volume(w, m["name"]).get("emptyDir", {}).get("medium") == "Memory", f"{name}: {cfg_shm} is not memory-backed"
    # the replica and the workers share one /dev/shm (the shared-memory fetch path)
    a = mount_for(container(docs, "worker", "replica"), cfg_shm)
    b = mount_for(container(docs, "worker", "workers"), cfg_shm)
    assert a and b and a["name"] == b["name"]


def _job_config_for(docs: list[dict]) -> JobConfig:
    return JobConfig.from_dict(yaml.safe_load(job_config_text(docs)))


def test_job_config_validates_and_fits_the_deployment(overlay: str, docs: list[dict], tmp_path: Path) -> None:
    path = tmp_path / "job.yaml"
    path.write_text(job_config_text(docs))
    cfg = JobConfig.from_yaml(path)  # unknown fields and bad values raise ConfigError
    assert cfg.runtime.device == {"dev": "cpu", "gpu": "cuda"}[overlay]
    if overlay == "dev":
        assert cfg.model.source == "tiny-opt"
        assert (cfg.layout.workers, cfg.layout.name) == (1, "dual")
    else:
        assert cfg.server.served_dtype == "bfloat16"
        assert cfg.layout.workers % cfg.layout.node_size == 0
    assert cfg.server.export_root and cfg.server.data_dir
    # every service reads this file at the path --config names
    cm_names = {d["metadata"]["name"] for d in of_kind(docs, "ConfigMap") if "job.yaml" in (d.get("data") or {})}
    ps = container(docs, "paramserver", "paramserver")
    for component, name in (("paramserver", "paramserver"), ("coordinator", "coordinator"), ("worker", "replica")):
        w, c = workload_of(docs, component), container(docs, component, name)
        cfg_path = flag(c, "--config")
        assert cfg_path, f"{name}: no --config"
        m = mount_for(c, cfg_path)
        assert m, f"{name}: --config {cfg_path} is not mounted"
        assert volume(w, m["name"]).get("configMap", {}).get("name") in cm_names
        # the model, the data and the cache are where the container can see them
        for p in (cfg.model.source if cfg.model.source not in PRESETS else None, cfg.data.train, cfg.data.dev):
            if p:
                assert mount_for(c, p), f"{name}: {p} (job config) is not on a mounted volume"
        assert cfg.runtime.cache_dir and mount_for(c, cfg.runtime.cache_dir), f"{name}: runtime.cache_dir is not writable"
    # the primary keeps its state (and exports) on its PVC
    data_dir = flag(ps, "--data-dir")
    assert data_dir == cfg.server.data_dir
    m = mount_for(ps, data_dir)
    assert m and m["name"] in {t["metadata"]["name"] for t in one(docs, "StatefulSet", "distzo-paramserver")["spec"]["volumeClaimTemplates"]}
    assert mount_for(ps, cfg.server.export_root) == m, "server.export_root must be on the parameter server's PVC"


def test_token_secret(overlay: str, docs: list[dict]) -> None:
    cfg = _job_config_for(docs)
    token_file = cfg.security.token_file
    assert token_file, "security.token_file must name the mounted Secret"
    secret_names = set()
    for w, c in containers(docs):
        m = mount_for(c, token_file)
        if m is None:
            continue
        v = volume(w, m["name"])
        assert m.get("readOnly") is True, f"{c['name']}: the token must be mounted read-only"
        secret_names.add(v.get("secret", {}).get("secretName"))
        assert PurePosixPath(token_file).name == "token"
        if "--token-file" in flag_values(c):
            assert flag(c, "--token-file") == token_file
    assert secret_names == {"distzo-token"}
    for component, name in (("coordinator", "coordinator"), ("worker", "workers")):
        assert flag(container(docs, component, name), "--token-file") == token_file
    secrets = of_kind(docs, "Secret")
    if overlay == "dev":
        (s,) = secrets
        assert s["metadata"]["name"] == "distzo-token" and set(s.get("stringData", {})) == {"token"}
        assert PLACEHOLDER_MARK in s["stringData"]["token"], "only an obvious placeholder may be committed"
    else:
        assert not secrets, "the gpu overlay must not ship a token: the operator creates distzo-token (k8s/README.md)"


def test_no_real_token_is_committed() -> None:
    for p in K8S.rglob("*.yaml"):
        for d in yaml.safe_load_all(p.read_text()):
            if isinstance(d, dict) and d.get("kind") == "Secret":
                for value in [*(d.get("stringData") or {}).values(), *(d.get("data") or {}).values()]:
                    assert PLACEHOLDER_MARK in str(value), f"{p}: a Secret with a non-placeholder value"


def test_dashboard_configmap(docs: list[dict]) -> None:
    cms = [d for d in of_kind(docs, "ConfigMap") if d["metadata"].get("labels", {}).get("grafana_dashboard") == "1"]
    assert len(cms) == 1
    (text,) = cms[0]["data"].values()
    assert json.loads(text) == json.loads((K8S / "grafana" / "distzo-dashboard.json").read_text())


def test_images(overlay: str, docs: list[dict]) -> None:
    tag = {"dev": "-cpu", "gpu": "-cuda"}[overlay]
    for w, c in containers(docs):
        assert c["image"].endswith(tag), f"{w['metadata']['name']}/{c['name']}: image {c['image']} is not the {tag[1:]} flavor"


# ----------------------------------------------------------------------------- NetworkPolicy
def _port_matches(rule_ports: list[dict] | None, port: int, target: dict) -> bool:
    if not rule_ports:
        return True
    named = {p["name"]: p["containerPort"] for c in all_containers(target) for p in c.get("ports", []) if "name" in p}
    for p in rule_ports:
        if p.get("protocol", "TCP") != "TCP":
            continue
        if "port" not in p:
            return True
        lo = named.get(p["port"], -1) if isinstance(p["port"], str) else p["port"]
        if lo <= port <= p.get("endPort", lo):
            return True
    return False


def _peer_matches(peers: list[dict] | None, peer_ns: dict[str, str], peer_labels: dict[str, str]) -> bool:
    """Whether a pod (namespace labels, pod labels) is one of a rule's peers (policy namespace = distzo)."""
    if not peers:
        return True
    for p in peers:
        if "ipBlock" in p:
            continue  # pods are not addressed by IP here
        in_ns = selector_matches(p["namespaceSelector"], peer_ns) if "namespaceSelector" in p \
            else peer_ns.get("kubernetes.io/metadata.name") == NAMESPACE
        if in_ns and selector_matches(p.get("podSelector"), peer_labels):
            return True
    return False


def _allowed(policies: list[dict], direction: str, subject: dict[str, str], port: int, target: dict | None,
             peer_ns: dict[str, str], peer_labels: dict[str, str]) -> bool:
    """NetworkPolicy semantics for one direction of one connection, seen from ``subject`` (a distzo pod)."""
    kind, field, peers_key = ("Ingress", "ingress", "from") if direction == "in" else ("Egress", "egress", "to")
    selecting = [p for p in policies if selector_matches(p["spec"]["podSelector"], subject)
                 and kind in p["spec"].get("policyTypes", ["Ingress"])]
    if not selecting:
        return True
    for p in selecting:
        for rule in p["spec"].get(field) or []:
            if _port_matches(rule.get("ports"), port, target or {"spec": {"template": {"spec": {"containers": []}}}}) \
                    and _peer_matches(rule.get(peers_key), peer_ns, peer_labels):
                return True
    return False


def test_network_policies(docs: list[dict]) -> None:
    pols = of_kind(docs, "NetworkPolicy")
    assert any(p["spec"]["podSelector"] == {} and set(p["spec"].get("policyTypes", [])) >= {"Ingress", "Egress"}
               and not p["spec"].get("ingress") and not p["spec"].get("egress") for p in pols), "no default-deny policy"
    ours = {"kubernetes.io/metadata.name": NAMESPACE}
    monitoring = {"kubernetes.io/metadata.name": "monitoring"}
    elsewhere = {"kubernetes.io/metadata.name": "default"}
    ps, co, wk = (workload_of(docs, c) for c in ("paramserver", "coordinator", "worker"))
    ps_l, co_l, wk_l = pod_labels(ps), pod_labels(co), pod_labels(wk)
    zoctl = {"run": "zoctl"}

    def connect(src_ns: dict, src: dict, dst: dict, port: int, src_is_ours: bool = True) -> bool:
        dst_l = pod_labels(dst)
        ok_in = _allowed(pols, "in", dst_l, port, dst, src_ns, src)
        ok_out = not src_is_ours or _allowed(pols, "out", src, port, dst, ours, dst_l)
        return ok_in and ok_out

    control, data = PORTS["paramserver_control"], PORTS["paramserver"]
    # the control port: the coordinator, nobody else
    assert connect(ours, co_l, ps, control)
    for who, labels, ns, is_ours in (("worker pods", wk_l, ours, True), ("the parameter server", ps_l, ours, True),
                                     ("any pod of the namespace", zoctl, ours, True),
                                     ("Prometheus", {}, monitoring, False),
                                     ("a coordinator-labelled pod elsewhere", co_l, elsewhere, False)):
        assert not _allowed(pols, "in", ps_l, control, ps, ns, labels), f"{who} may reach the control port"
        assert not connect(ns, labels, ps, control, is_ours)
    # ... checked on the rules themselves too: every ingress rule that covers 7071 names coordinator pods only
    for p in pols:
        if not selector_matches(p["spec"]["podSelector"], ps_l) or "Ingress" not in p["spec"].get("policyTypes", ["Ingress"]):
            continue
        for rule in p["spec"].get("ingress") or []:
            if not _port_matches(rule.get("ports"), control, ps):
                continue
            peers = rule.get("from") or []
            assert peers, f"NetworkPolicy {p['metadata']['name']}: a rule admits everyone to {control}"
            for peer in peers:
                assert set(peer) == {"podSelector"}, f"NetworkPolicy {p['metadata']['name']}: {control} admits {peer}"
                assert selector_matches(peer["podSelector"], co_l), f"NetworkPolicy {p['metadata']['name']}: {peer}"
                assert not selector_matches(peer["podSelector"], wk_l) and not selector_matches(peer["podSelector"], ps_l)
    # the data port: coordinator and worker pods (the replicas follow the journal there)
    assert connect(ours, co_l, ps, data) and connect(ours, wk_l, ps, data)
    assert not connect(ours, zoctl, ps, data) and not connect(monitoring, {}, ps, data, False)
    # the coordinator: worker pods and any pod of the namespace (zoctl); not from elsewhere
    coord = PORTS["coordinator"]
    assert connect(ours, wk_l, co, coord) and connect(ours, zoctl, co, coord)
    assert not connect(elsewhere, zoctl, co, coord, False) and not connect(monitoring, {}, co, coord, False)
    # metrics: from the monitoring namespace only
    for w in (ps, co, wk):
        for c in all_containers(w):
            for name, number in container_ports(c).items():
                if "metrics" in name:
                    assert connect(monitoring, {}, w, number, False), f"Prometheus cannot scrape {c['name']}:{number}"
                    assert not connect(elsewhere, {}, w, number, False)
                    assert not connect(ours, zoctl, w, number)
    # nothing else gets into a worker pod; every pod may resolve names
    assert not connect(ours, co_l, wk, data) and not connect(ours, ps_l, wk, data)
    for labels in (ps_l, co_l, wk_l, zoctl):
        assert _allowed(pols, "out", labels, 53, None, {"kubernetes.io/metadata.name": "kube-system"}, {"k8s-app": "kube-dns"})
    # nothing leaves for the internet
    for labels in (ps_l, co_l, wk_l, zoctl):
        assert not _allowed(pols, "out", labels, 443, None, elsewhere, {})


# ----------------------------------------------------------------------------- CLI flags
@functools.cache
def _console_scripts() -> dict[str, str]:
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    return {name: target.split(":")[0].removesuffix(".__main__") for name, target in scripts.items()}


@functools.cache
def cli_flags(module: str) -> tuple[frozenset[str], frozenset[str], tuple[frozenset[str], ...]]:
    """(every flag, the required flags, the required one-of groups) of ``python -m module --help``.

    argparse prints a required mutually exclusive group as ``(--a A | --b B)``: one of them is needed."""
    proc = subprocess.run([sys.executable, "-m", module, "--help"], capture_output=True, text=True, cwd=ROOT,
                          timeout=120, check=False)
    assert proc.returncode == 0, f"python -m {module} --help failed:\n{proc.stderr}"
    text = proc.stdout
    known = frozenset(re.findall(r"(?<![\w-])(--[A-Za-z][\w-]*)", text))
    usage = text.split("\n\n", 1)[0]
    one_of = tuple(frozenset(re.findall(r"(?<![\w-])(--[A-Za-z][\w-]*)", g)) for g in re.findall(r"\(([^()]*\|[^()]*)\)", usage))
    usage = re.sub(r"\([^()]*\|[^()]*\)", "", usage)
    while True:  # drop [optional] groups, innermost first
        stripped = re.sub(r"\[[^\[\]]*\]", "", usage)
        if stripped == usage:
            break
        usage = stripped
    required = frozenset(re.findall(r"(?<![\w-])(--[A-Za-z][\w-]*)", usage))
    return known, required, one_of


def test_cli_flag_parser_reads_help() -> None:
    known, required, one_of = cli_flags("paramserver")
    assert one_of == ()
    _, coordinator_required, coordinator_one_of = cli_flags("coordinator")
    assert coordinator_one_of == (frozenset({"--param-server", "--param-server-from"}),)
    assert not coordinator_required & {"--param-server", "--param-server-from"}
    assert {"--config", "--data-dir", "--listen", "--control-listen", "--metrics-port", "--follow"} <= known
    assert required == {"--data-dir"}


def test_containers_use_only_real_flags(docs: list[dict]) -> None:
    scripts = _console_scripts()
    for w, c in containers(docs):
        where = f"{w['metadata']['name']}/{c['name']}"
        cmd = c.get("command") or []
        assert cmd and cmd[0] in scripts, f"{where}: command {cmd} is not one of the console scripts {sorted(scripts)}"
        module = scripts[cmd[0]]
        known, required, one_of = cli_flags(module)
        used = flag_values(c)
        unknown = set(used) - known
        assert not unknown, f"{where}: {cmd[0]} ({module}) has no flag(s) {sorted(unknown)}"
        missing = required - set(used)
        assert not missing, f"{where}: {cmd[0]} needs {sorted(missing)}"
        for group in one_of:
            assert group & set(used), f"{where}: {cmd[0]} needs one of {sorted(group)}"
