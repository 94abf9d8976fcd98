"""Update windows through the whole system (server.update_window K = 4): `zoctl up` equals `zoctl reference`
bit for bit for every layout and served dtype (bfloat16 forwards too: issue 29), processes killed mid-window change
nothing, K = 4 exports what K = 1 exports with a float32 served copy, and stateful optimizers are refused in one line."""

from __future__ import annotations

import json
import signal

import pytest

from distzo.config import JobConfig
from distzo.reference import ReferenceTrainer

from clusterhelpers import wait_until
from test_cluster import at_step, reference_export, run_cluster, same_weights, zoctl

WINDOW = 4


def window_config(cache_dir: str, **sections) -> JobConfig:
    # 13 steps at K = 4: bases 0, 4 and 8 are read (steps 7 and 11 read 4 and 8), evals after 5, 10 and 13
    # steps replay 5, 6 and 5 records, the export's version 13 is the master (12) plus one pending record, and
    # snapshots every 3 steps land inside windows (their pending records replayed)
    raw = {"runtime": {"cache_dir": cache_dir}, "data": {"dev_examples": 16},
           "train": {"batch_size": 8, "steps": 13, "weight_decay": 0.01, "eval_every": 5},
           "server": {"update_window": WINDOW, "snapshot_every": 3}, "coordinator": {"heartbeat_timeout_s": 5.0}}
    for k, v in sections.items():
        raw.setdefault(k, {}).update(v)
    return JobConfig.from_dict(raw)


@pytest.mark.parametrize("served", ["float32", "bfloat16"])
@pytest.mark.parametrize("layout,workers,node_size", [("dual", 1, 1), ("pertp", 2, 1), ("ddp", 2, 1), ("2d", 4, 2)])
def test_up_equals_reference_with_update_windows(cache_dir, tmp_path, layout, workers, node_size, served):
    # 2d in two node groups of 2: each member rebuilds its slice at the step's version before the gather. pertp and
    # 2d at bf16 compute in bfloat16 as a GPU would (train.forward_dtype; issue 29): 1-D tensors float32 under
    # autocast, eps_bf16 = 4 x eps, each sign on another worker
    forward = "bfloat16" if served == "bfloat16" and layout in ("pertp", "2d") else "auto"
    cfg = window_config(cache_dir, server={"served_dtype": served}, train={"forward_dtype": forward},
                        layout={"name": layout, "workers": workers, "node_size": node_size})
    path = tmp_path / "job.yaml"
    path.write_text(cfg.to_yaml())
    flags = ["--config", str(path), "--json"]
    up = zoctl("up", *flags, "--run-dir", str(tmp_path / "run"), "--out", str(tmp_path / "dist"))
    assert up.returncode == 0, up.stderr[-3000:]
    ref = zoctl("reference", *flags, "--out", str(tmp_path / "ref"))
    assert ref.returncode == 0, ref.stderr[-3000:]
    assert same_weights(tmp_path / "dist", tmp_path / "ref")  # the export: the master plus the open window
    a, b = json.loads(up.stdout), json.loads(ref.stdout)
    for key in ("final_loss", "dev_loss", "dev_accuracy", "train_tokens", "perturbation"):
        assert a[key] == b[key], key
    assert a["perturbation"].startswith(f"{'bfloat16' if forward == 'bfloat16' else 'float32'} forwards at eps "
                                        f"{0.004 if forward == 'bfloat16' else 0.001:g}")
    assert f"zoctl: {a['perturbation']}\n" in up.stderr  # said at the start, as the reference says it
    # every evaluation replays the records after its base: 0, 5, 10 and 13 steps
    assert [e["step"] for e in a["eval_history"]] == [0, 5, 10, 13]
    assert a["eval_history"] == b["eval_history"]


def test_kills_mid_window_change_nothing(cache_dir, tmp_path):
    """A worker, then the coordinator, then the parameter server SIGKILLed inside a window (bf16 served, so the
    forwards depend on which base they read): the run ends with the reference's weights and log."""
    from protos import coordinator_pb2 as cpb

    cfg = window_config(cache_dir, train={"steps": 41, "eval_every": 0}, server={"served_dtype": "bfloat16"},
                        layout={"name": "ddp", "workers": 2})
    killed_at = {}

    def control(cluster, rpc: str) -> None:  # noqa: ANN001
        getattr(cluster.stub(), rpc)(cpb.ControlRequest(), timeout=30, metadata=cluster.creds.call_metadata())

    def paused_mid_window(cluster) -> int:  # noqa: ANN001
        # between two steps whose journal does not end on a window boundary: pending records on every side
        while True:
            control(cluster, "Pause")
            wait_until(lambda: cluster.status().state == "paused", what=f"paused (state {cluster.status().state}, step {cluster.status().step}, killed {killed_at})")
            step = cluster.status().step
            if step % WINDOW:
                return step
            control(cluster, "Resume")
            at_step(cluster, step + 1)

    def restarted(cluster, victim: str) -> None:  # noqa: ANN001
        # the supervisor restarts it (run_cluster's wait() supervises only after this function)
        wait_until(lambda: bool(cluster.supervise() or True) and cluster.restarts.get(victim) == 1,
                   timeout=120, what=f"{victim} restarted")

    def kill(cluster) -> None:  # noqa: ANN001
        at_step(cluster, 2)
        killed_at["coordinator"] = paused_mid_window(cluster)
        cluster.processes["coordinator"].kill(signal.SIGKILL)  # its successor resumes from the journal, unpaused
        restarted(cluster, "coordinator")
        at_step(cluster, killed_at["coordinator"] + 2)
        killed_at["paramserver"] = paused_mid_window(cluster)
        cluster.processes["paramserver"].kill(signal.SIGKILL)  # recovers from snapshot + journal mid-window
        restarted(cluster, "paramserver")
        wait_until(lambda: _resumed(cluster), timeout=120, what="resumed")
        at_step(cluster, killed_at["paramserver"] + 2)
        killed_at["worker-1"] = cluster.status().step
        cluster.processes["worker-1"].kill(signal.SIGKILL)  # mid-step: its forwards go to worker-0
        restarted(cluster, "worker-1")

    def _resumed(cluster) -> bool:  # noqa: ANN001
        try:
            control(cluster, "Resume")
            return True
        except Exception:  # noqa: BLE001 - the coordinator may be reconnecting to the restarted server
            return False

    cluster, st = run_cluster(tmp_path, cfg, kill)
    assert cluster.restarts == {"worker-1": 1, "coordinator": 1, "paramserver": 1}
    assert killed_at["coordinator"] % WINDOW and killed_at["paramserver"] % WINDOW, killed_at
    assert killed_at["worker-1"] < cfg.train.steps
    assert st.resumed_from == killed_at["coordinator"]  # picked up from the journal, the open window's records too
    assert same_weights(tmp_path / "dist", reference_export(tmp_path, cfg))
    from distzo.runlog import read_history

    dist, ref = read_history(tmp_path / "run"), read_history(tmp_path / "ref-run")
    assert [(r["step"], r["loss"], r["g"]) for r in dist.steps] == [(r["step"], r["loss"], r["g"]) for r in ref.steps]
    assert [(e["step"], e["dev_loss"]) for e in dist.evals] == [(e["step"], e["dev_loss"]) for e in ref.evals]


def test_a_float32_window_exports_what_k1_exports(cache_dir, tmp_path):
    """With a float32 served copy the replay reproduces the master: K changes nothing in the trajectory. With a
    16-bit one the forwards read a rounded base, and K does change it (the check above is not vacuous)."""
    def export(k: int, served: str):  # noqa: ANN202
        cfg = window_config(cache_dir, train={"steps": 10, "eval_every": 0},
                            server={"update_window": k, "served_dtype": served})
        out = tmp_path / f"k{k}-{served}"
        ReferenceTrainer(cfg).train(out_dir=out, progress=False)
        return out

    assert same_weights(export(1, "float32"), export(WINDOW, "float32"))
    assert not same_weights(export(1, "bfloat16"), export(WINDOW, "bfloat16"))


@pytest.mark.parametrize("command", ["up", "reference"])
def test_windows_refuse_stateful_optimizers(tmp_path, command):
    r = zoctl(command, "--optimizer", "momentum", "--set", f"server.update_window={WINDOW}", "--steps", "2",
              "--run-dir", str(tmp_path / "run"), timeout=120)
    assert r.returncode == 2, r.stderr[-2000:]
    lines = [line for line in r.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "server.update_window 4 needs train.optimizer sgd" in lines[0], r.stderr
    assert "momentum keeps per-parameter state" in lines[0]
