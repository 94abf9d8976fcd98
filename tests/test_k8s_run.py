"""k8s/overlays/gpu-run: a training run as a JobSet that completes, its inputs pulled and verified,
its export pushed, its shape (worker nodes, GPUs per node) set in one place; and every shipped
overlay's job accepted by `zoctl plan` for the cluster it declares (plan.yaml).

Rendered with `kubectl kustomize`; the Jobs inside the JobSet validate strictly as batch/v1 Jobs
(kubernetes-validate, offline), the JobSet's own fields are checked here by hand.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from distzo.common.config import JobConfig
from test_k8s import K8S, MIN_KUBERNETES, ROOT, _console_scripts, cli_flags, flag_values

RUN = "gpu-run"


def render_dir(overlay_dir: Path) -> list[dict]:
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        pytest.skip("kubectl is not on PATH: run scripts/install-test-tools.sh")
    proc = subprocess.run([kubectl, "kustomize", str(overlay_dir)], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    return [d for d in yaml.safe_load_all(proc.stdout) if d]


@pytest.fixture(scope="module")
def docs() -> list[dict]:
    return render_dir(K8S / "overlays" / RUN)


def jobset(docs: list[dict]) -> dict:
    (js,) = [d for d in docs if d["kind"] == "JobSet"]
    return js


def rjob(docs: list[dict], name: str) -> dict:
    (r,) = [r for r in jobset(docs)["spec"]["replicatedJobs"] if r["name"] == name]
    return r


def pod(docs: list[dict], name: str) -> dict:
    return rjob(docs, name)["template"]["spec"]["template"]["spec"]


def ctr(docs: list[dict], job: str, name: str) -> dict:
    spec = pod(docs, job)
    (c,) = [c for c in [*spec.get("initContainers", []), *spec["containers"]] if c["name"] == name]
    return c


def config_map(docs: list[dict], prefix: str) -> dict:
    (cm,) = [d for d in docs if d["kind"] == "ConfigMap" and re.fullmatch(rf"{prefix}(-[a-z0-9]{{10}})?", d["metadata"]["name"])]
    return cm


def shape(overlay_dir: Path) -> dict:
    return yaml.safe_load((overlay_dir / "shape.yaml").read_text())["spec"]


def test_the_run_is_one_jobset_with_no_long_lived_workloads(docs):
    kinds = [d["kind"] for d in docs]
    assert kinds.count("JobSet") == 1
    assert not {"StatefulSet", "Deployment", "DaemonSet", "Secret", "RunShape"} & set(kinds)
    js = jobset(docs)
    assert js["metadata"]["namespace"] == "distzo"
    spec = js["spec"]
    # the coordinator's exit decides; bad input (exit 2) fails the set at once, anything else restarts it
    assert spec["successPolicy"] == {"operator": "All", "targetReplicatedJobs": ["coordinator"]}
    assert spec["failurePolicy"]["maxRestarts"] >= 1
    assert {"action": "FailJobSet", "onJobFailureReasons": ["PodFailurePolicy"], "targetReplicatedJobs": ["coordinator"]} \
        in spec["failurePolicy"]["rules"]
    assert spec["startupPolicy"]["startupPolicyOrder"] == "InOrder"
    assert [r["name"] for r in spec["replicatedJobs"]] == ["paramserver", "coordinator", "workers"]
    co = rjob(docs, "coordinator")["template"]["spec"]
    assert co["template"]["spec"]["restartPolicy"] == "Never"  # podFailurePolicy needs it
    assert co["podFailurePolicy"]["rules"] == [{"action": "FailJob", "onExitCodes": {"containerName": "coordinator",
                                                                                    "operator": "In", "values": [2]}}]
    flags = flag_values(ctr(docs, "coordinator", "coordinator"))
    assert "--exit-when-done" in flags and flags["--export-to"] == ["$(EXPORT_URL)"]
    workers = rjob(docs, "workers")
    assert workers["template"]["spec"]["completionMode"] == "Indexed"
    assert workers["template"]["metadata"]["annotations"]["alpha.jobset.sigs.k8s.io/exclusive-topology"] == "kubernetes.io/hostname"
    # the server's state outlives the run: a claim of its own, not an emptyDir or a template
    (claim,) = [v for v in pod(docs, "paramserver")["volumes"] if v["name"] == "state"]
    assert claim["persistentVolumeClaim"]["claimName"] in {d["metadata"]["name"] for d in docs if d["kind"] == "PersistentVolumeClaim"}


def test_the_jobs_validate_strictly_as_batch_v1_jobs(docs):
    kv = pytest.importorskip("kubernetes_validate")
    errors = []
    for r in jobset(docs)["spec"]["replicatedJobs"]:
        job = {"apiVersion": "batch/v1", "kind": "Job", "metadata": {"name": f"distzo-run-{r['name']}", **r["template"].get("metadata", {})},
               "spec": r["template"]["spec"]}
        for version in sorted({MIN_KUBERNETES, kv.latest_version()}):
            try:
                kv.validate(job, version, strict=True)
            except kv.ValidationError as exc:
                errors.append(f"{r['name']} (k8s {version}) at {'.'.join(map(str, exc.path))}: {exc.message}")
    for d in docs:
        if d["kind"] in ("ConfigMap", "PersistentVolumeClaim", "NetworkPolicy", "Service", "Namespace"):
            try:
                kv.validate(d, kv.latest_version(), strict=True)
            except kv.ValidationError as exc:
                errors.append(f"{d['kind']} {d['metadata']['name']}: {exc.message}")
    assert not errors, "\n".join(errors)


def test_containers_use_real_flags_and_defined_variables(docs):
    scripts = _console_scripts()
    env = {**config_map(docs, "distzo-run")["data"], **config_map(docs, "distzo-shape")["data"]}
    for job in ("paramserver", "coordinator", "workers"):
        spec = pod(docs, job)
        for c in [*spec.get("initContainers", []), *spec["containers"]]:
            cmd = c["command"]
            assert cmd[0] in scripts, (job, c["name"], cmd)
            known, required, one_of = (cli_flags(scripts[cmd[0]]) if cmd[0] != "distzo-transfer"
                                       else (frozenset(), frozenset(), ()))
            used = set(flag_values(c))
            assert used <= known and required <= used, (job, c["name"], used - known, required - used)
            assert all(group & used for group in one_of), (job, c["name"], one_of)
            names = {e["name"] for e in c.get("env", [])}
            for ref in c.get("envFrom", []):
                if "configMapRef" in ref:
                    assert any(ref["configMapRef"]["name"] == config_map(docs, p)["metadata"]["name"]
                               for p in ("distzo-run", "distzo-shape")), ref
            for var in re.findall(r"\$\((\w+)\)", " ".join(c.get("args", []))):
                assert var in names or var in env, (job, c["name"], var)


def test_inputs_are_pulled_where_the_job_config_reads_them(docs):
    run_env = config_map(docs, "distzo-run")["data"]
    assert {"MODEL_URL", "DATA_URL", "EXPORT_URL"} <= set(run_env)
    cfg = JobConfig.from_dict(yaml.safe_load(config_map(docs, "distzo-job")["data"]["job.yaml"]))
    wanted = {"paramserver": ("paramserver", [cfg.model.source]), "coordinator": ("coordinator",
              [cfg.model.source, cfg.data.train, cfg.data.dev]), "workers": ("replica", [cfg.model.source])}
    for job, (reader, paths) in wanted.items():
        spec = pod(docs, job)
        pulls = {c["args"][2]: c for c in spec["initContainers"] if c["command"] == ["distzo-transfer"]}
        assert all(c["args"][0] == "pull" and c["args"][1] in ("$(MODEL_URL)", "$(DATA_URL)") for c in pulls.values())
        main = ctr(docs, job, reader)
        for path in paths:
            dest = next((d for d in pulls if path == d or path.startswith(d + "/")), None)
            assert dest, f"{job}: nothing pulls {path}"
            init_mount = next(m for m in pulls[dest]["volumeMounts"] if dest.startswith(m["mountPath"]))
            main_mount = next((m for m in main["volumeMounts"] if path.startswith(m["mountPath"] + "/")), None)
            assert main_mount and (main_mount["name"], main_mount.get("subPath")) == (init_mount["name"], init_mount.get("subPath")), \
                f"{job}: {reader} does not see what the init step pulled to {dest}"


def effective_config(docs: list[dict], nodes: int, gpus: int) -> JobConfig:
    cfg = JobConfig.from_dict(yaml.safe_load(config_map(docs, "distzo-job")["data"]["job.yaml"]))
    return cfg.with_overrides({"layout.nodes": nodes, "layout.node_size": gpus})


def test_the_shape_is_one_place_and_everything_follows(docs, tmp_path):
    for overlay_docs, sh in ((docs, shape(K8S / "overlays" / RUN)), (None, {"nodes": 4, "gpusPerNode": 4})):
        if overlay_docs is None:  # a copy of k8s/ with another shape: the same checks hold
            shutil.copytree(K8S, tmp_path / "k8s")
            f = tmp_path / "k8s" / "overlays" / RUN / "shape.yaml"
            f.write_text(f.read_text().replace("nodes: 2", "nodes: 4").replace("gpusPerNode: 8", "gpusPerNode: 4"))
            overlay_docs = render_dir(tmp_path / "k8s" / "overlays" / RUN)
        w = rjob(overlay_docs, "workers")["template"]["spec"]
        assert w["parallelism"] == w["completions"] == sh["nodes"]
        res = ctr(overlay_docs, "workers", "workers")["resources"]
        assert res["requests"]["nvidia.com/gpu"] == res["limits"]["nvidia.com/gpu"] == sh["gpusPerNode"]
        data = config_map(overlay_docs, "distzo-shape")["data"]
        assert data == {"DISTZO_NODES": str(sh["nodes"]), "DISTZO_GPUS_PER_NODE": str(sh["gpusPerNode"])}
        assert flag_values(ctr(overlay_docs, "workers", "workers"))["--gpus"] == ["$(DISTZO_GPUS_PER_NODE)"]
        for job, name in (("paramserver", "paramserver"), ("coordinator", "coordinator"), ("workers", "replica")):
            assert flag_values(ctr(overlay_docs, job, name))["--set"] == ["layout.nodes=$(DISTZO_NODES)",
                                                                          "layout.node_size=$(DISTZO_GPUS_PER_NODE)"]
        cfg = effective_config(overlay_docs, sh["nodes"], sh["gpusPerNode"])
        assert cfg.layout.workers == sh["nodes"] * sh["gpusPerNode"]


def plan_args(overlay: str, cfg: JobConfig, extra: dict) -> list[str]:
    spec = {**yaml.safe_load((K8S / "overlays" / overlay / "plan.yaml").read_text()), **extra}
    args = ["plan", "--model", spec["model"], "--cluster", spec["cluster"], "--layout", cfg.layout.name,
            "--q", str(cfg.layout.q), "--json",  # a step's batch as the job config has it
            "--tokens-per-step", str(cfg.train.batch_size * cfg.data.max_seq_len), "--seq-len", str(cfg.data.max_seq_len)]
    for key in ("nodes", "gpus_per_node", "gpus_per_worker", "fetch_group"):
        if spec.get(key) is not None:
            args += [f"--{key.replace('_', '-')}", str(spec[key])]
    return args


@pytest.mark.parametrize("overlay", ["dev", "gpu", RUN])
def test_every_overlays_job_passes_zoctl_plan_for_its_declared_cluster(overlay):
    docs = render_dir(K8S / "overlays" / overlay)
    if overlay == RUN:
        sh = shape(K8S / "overlays" / RUN)
        cfg = effective_config(docs, sh["nodes"], sh["gpusPerNode"])
        extra = {"nodes": sh["nodes"], "gpus_per_node": sh["gpusPerNode"], "fetch_group": sh["gpusPerNode"]}
    else:
        cfg = JobConfig.from_dict(yaml.safe_load(config_map(docs, "distzo-job")["data"]["job.yaml"]))
        extra = {}
    r = subprocess.run([sys.executable, "-m", "coordinator.zoctl.cli", *plan_args(overlay, cfg, extra)], capture_output=True,
                       text=True, timeout=120, cwd=ROOT)
    assert r.returncode == 0, f"zoctl plan refuses {overlay}'s job: {r.stderr}"
    pred = json.loads(r.stdout)["prediction"]
    assert pred["layout"]["workers"] == cfg.layout.workers and pred["layout"]["name"] == cfg.layout.name, pred["layout"]
    assert pred["fits"] is True, pred
