"""zoctl up == zoctl reference, bit for bit: a covering set of the configuration matrix.

Each run below is one ``zoctl up`` (its own processes, as a user starts them) against the in-process
reference of the same flags (tests/references.py: trained once per config and session). Together the
runs cover every layout (dual, pertp, ddp, 2d, q = 2), optimizer (sgd, momentum, adam), target (full,
lora with and without --merge, prefix), objective (loss, accuracy, f1), distribution (rademacher,
gaussian) and served dtype (float32, bfloat16, float16) at least once, several block-layout kinds of
model family (tiny-opt, bloom, gemma2; tests/test_families.py runs the distributed path of every kind
in process), update windows (K = 2 with a prefix under PertP, K = 4 with 2d in node groups and with q = 2, bf16
and fp32 served), and the interactions that broke before: PertP with an adapter, DDP with the accuracy and f1
objectives, q = 2 with LoRA. Every run checks the same things: the exported bits,
the summary (every key of the reference's, the same figures), the run log (every step's losses, g and
lr, every evaluation), and that nothing is left running. tests/README.md has the table of which run
took over which of the earlier one-config tests.

The run with a new user's defaults (own HOME) is test_zoctl_up_with_a_new_users_defaults in this file; the real
model's run is in tests/test_real_model.py; the runs with faults are in tests/test_cluster_faults.py.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest

from distzo.common.config import JobConfig
from distzo.run.runlog import read_history

from test_cluster import our_processes, same_weights, write_config, zoctl
from test_lora import same_adapter

pytestmark = pytest.mark.cluster

ADAPTER = {"lr": 1e-2, "eps": 1e-2}
STEP_KEYS = ("step", "loss", "loss_plus", "loss_minus", "g", "lr", "tokens", "skipped")  # all but the time
SUMMARY_KEYS = ("final_loss", "start_loss", "dev_loss", "dev_accuracy", "zero_shot_dev_loss", "zero_shot_dev_accuracy",
                "steps", "train_tokens", "skipped_steps", "model", "layout", "workers", "perturbation")


def same_run_log(run_dir: Path, ref_run_dir: Path) -> None:
    dist, ref = read_history(run_dir), read_history(ref_run_dir)
    assert [{k: r[k] for k in STEP_KEYS} for r in dist.steps] == [{k: r[k] for k in STEP_KEYS} for r in ref.steps]
    assert dist.evals == ref.evals  # step, dev loss, dev accuracy, examples of every evaluation


def check_up_equals_reference(tmp_path: Path, references, flags: list[str], same=same_weights, env=None):  # noqa: ANN001
    """``zoctl up FLAGS`` against the session's reference of the same flags; returns (up's summary, reference)."""
    import concurrent.futures as cf

    run, dist = tmp_path / "run", tmp_path / "dist"
    with cf.ThreadPoolExecutor(1) as pool:  # the reference trains here while zoctl up's processes start and stop
        reference = pool.submit(references.for_flags, flags)
        up = zoctl("up", *flags, "--json", "--run-dir", str(run), "--out", str(dist), env=env)
        ref, merge = reference.result()
    assert up.returncode == 0, up.stderr[-3000:]
    assert same(dist, ref.export(merge)), "the exported weights differ from the reference's"
    a, b = json.loads(up.stdout), ref.summary
    assert set(b) - {"mode"} <= set(a), set(b) - set(a)  # the reference's summary keys, and the run's own
    for key in SUMMARY_KEYS:
        assert a[key] == b[key], (key, a[key], b[key])
    assert a["mode"] == "distributed" and a["state"] == "done" and a["restarts"] == {}
    same_run_log(run, ref.run_dir)
    assert Path(a["report"]).is_file() and Path(a["step_log"]).is_file() and Path(a["eval_log"]).is_file()
    assert not our_processes(run)  # nothing left running
    return a, ref


@dataclass
class Case:
    layout: str
    workers: int
    q: int = 1
    train: dict = field(default_factory=dict)
    served: str = "float32"
    family: str | None = None  # a tiny random model of this transformers family; None: the tiny-opt preset
    merge: bool = False
    steps: int = 4
    window: int = 1  # server.update_window K
    node_size: int = 1
    server: dict = field(default_factory=dict)  # more server settings (snapshot_every)

    def flags(self, tmp_path: Path, cache_dir: str, family_dir) -> list[str]:  # noqa: ANN001
        cfg = write_config(tmp_path, cache_dir, train={"steps": self.steps, "batch_size": 8, **self.train},
                           server={"served_dtype": self.served, "update_window": self.window, **self.server},
                           layout={"name": self.layout, "workers": self.workers, "q": self.q, "node_size": self.node_size},
                           data={"dev_examples": 16})
        flags = ["--config", str(cfg), "--layout", self.layout, "--workers", str(self.workers), "--q", str(self.q)]
        if self.family:
            flags += ["--model", str(family_dir(self.family))]
        return flags + (["--merge"] if self.merge else [])


# update windows of 4 over 13 steps: bases 0, 4 and 8 are read (steps 7 and 11 read 4 and 8), the evaluations
# after 5, 10 and 13 steps replay 5, 6 and 5 records, the export's version 13 is the master (12) plus one pending
# record, and snapshots every 3 steps land inside windows (their pending records replayed)
WINDOWED = {"steps": 13, "window": 4, "server": {"snapshot_every": 3}}
WINDOWED_TRAIN = {"weight_decay": 0.01, "eval_every": 5}

CASES = {
    # PertP with an adapter (one sign per worker, the frozen base kept by each worker), the bfloat16 served copy,
    # update windows of 2 (step 3 and the final eval read base 2 from the second slot, which a frozen block shares
    # with the first)
    # with forwards computed in bfloat16 as on a GPU (issue 29: 1-D tensors float32 under autocast, eps_bf16)
    "pertp-prefix-window2-bf16": Case("pertp", 2, train={**ADAPTER, "target": "prefix", "forward_dtype": "bfloat16"},
                                      served="bfloat16", window=2),
    # 2d = PertP x DDP with the f1 objective over data shards, momentum state, float16 serving, on a family whose
    # embedding block holds a layer norm (bloom)
    "2d-momentum-f1-fp16-bloom": Case("2d", 4, train={"optimizer": "momentum", "objective": "f1", "eps": 1e-2,
                                                      "weight_decay": 0.01}, served="float16", family="bloom"),
    # DDP with the accuracy objective, adam and gaussian z, on a family whose head soft-caps the logits (gemma2)
    "ddp-adam-gaussian-accuracy-gemma2": Case("ddp", 2, train={"optimizer": "adam", "lr": 1e-3, "eps": 1e-2,
                                                               "distribution": "gaussian", "objective": "accuracy"},
                                              family="gemma2", steps=5),
    # q = 2 directions with LoRA, adam (gaussian z), weight decay
    "q2-lora-adam-gaussian": Case("dual", 2, q=2, train={**ADAPTER, "target": "lora", "optimizer": "adam",
                                                         "distribution": "gaussian", "weight_decay": 0.01}),
    # LoRA over data shards with momentum, exported merged into the base (a plain model)
    "ddp-lora-momentum-merge": Case("ddp", 2, train={**ADAPTER, "target": "lora", "optimizer": "momentum"}, merge=True),
    # update windows of 4 (above) with 2d in two node groups of 2 (each member rebuilds its slice at the step's
    # version before the gather), bfloat16 served (the forwards read the rounded base)
    "2d-nodegroups-window4-bf16": Case("2d", 4, node_size=2, served="bfloat16",
                                       train={**WINDOWED_TRAIN, "forward_dtype": "bfloat16"}, **WINDOWED),
    # update windows of 4 with q = 2 directions (records of two directions replayed), float32 served
    "q2-window4-f32": Case("dual", 2, q=2, train=WINDOWED_TRAIN, **WINDOWED),
}


@pytest.mark.parametrize("name", list(CASES))
def test_up_equals_the_reference_bitwise(cache_dir, tmp_path, references, family_dir, name):
    case = CASES[name]
    flags = case.flags(tmp_path, cache_dir, family_dir)
    target = case.train.get("target", "full")
    same = same_adapter if target != "full" and not case.merge else same_weights
    summary, ref = check_up_equals_reference(tmp_path, references, flags, same)
    cfg = ref.cfg
    assert (cfg.layout.name, cfg.layout.q, cfg.train.target, cfg.server.served_dtype, cfg.server.update_window,
            cfg.layout.node_size) == (case.layout, case.q, target, case.served, case.window, case.node_size)
    steps = read_history(ref.run_dir).steps
    if cfg.train.optimizer != "sgd":  # the optimizer changed the trajectory: sgd's weights differ
        sgd = references.get(cfg.with_overrides({"train.optimizer": "sgd"}))
        assert not same(sgd.export(case.merge), ref.export(case.merge))
    if cfg.train.objective != "loss":  # minus the batch accuracy (or macro-F1): in [-1, 0]; some step moved
        assert all(-1.0 <= r["loss"] <= 0.0 for r in steps)
        assert any(g != 0.0 for r in steps for g in r["g"])
    if cfg.train.objective == "accuracy":  # minus a count of right rows over 8 (or 4, a shard's)
        assert all(r["loss"] * 16 == int(r["loss"] * 16) for r in steps)
    if case.merge:  # the server's merged export: a plain model transformers loads
        from transformers import AutoModelForCausalLM

        assert not (tmp_path / "dist" / "adapter_config.json").exists()
        AutoModelForCausalLM.from_pretrained(str(tmp_path / "dist"))
    if target != "full" and not case.merge:
        assert json.loads((tmp_path / "dist" / "adapter_config.json").read_text())["peft_type"] == \
            {"lora": "LORA", "prefix": "PREFIX_TUNING"}[target]
    forward = case.train.get("forward_dtype", "auto")  # the perturbation the forwards see, said at the start
    assert summary["perturbation"].startswith(f"{'bfloat16' if forward == 'bfloat16' else 'float32'} forwards at eps ")
    if case.window == WINDOWED["window"]:  # every evaluation replays the records after its base
        assert [e["step"] for e in summary["eval_history"]] == [0, 5, 10, 13]


def test_the_cases_cover_the_matrix():
    """Every value of every axis appears in some run, and so do the interactions that broke before."""
    runs = [(c.layout if c.q == 1 else f"q{c.q}", c.train.get("optimizer", "sgd"), c.train.get("target", "full"),
             c.train.get("objective", "loss"), c.train.get("distribution", "rademacher"), c.served, c.merge, c.window,
             c.node_size) for c in CASES.values()]
    runs.append(("dual", "sgd", "full", "loss", "rademacher", "float32", False, 1, 1))  # test_zoctl_up_with_a_new_users_defaults
    axes = list(zip(*runs))
    assert {"dual", "pertp", "ddp", "2d", "q2"} <= set(axes[0])
    assert set(axes[1]) == {"sgd", "momentum", "adam"}
    assert set(axes[2]) == {"full", "lora", "prefix"} and True in axes[6]
    assert set(axes[3]) == {"loss", "accuracy", "f1"}
    assert set(axes[4]) == {"rademacher", "gaussian"}
    assert set(axes[5]) == {"float32", "bfloat16", "float16"}
    pertp_like = {"pertp", "2d"}
    ddp_like = {"ddp", "2d"}
    assert any(r[0] in pertp_like and r[2] != "full" for r in runs)  # PertP x an adapter
    assert {r[3] for r in runs if r[0] in ddp_like} >= {"accuracy", "f1"}  # DDP x accuracy, f1
    assert any(r[0] == "q2" and r[2] == "lora" for r in runs)  # q = 2 x LoRA
    # update windows: with both served copies, node groups, q = 2 and an adapter (frozen blocks in the slots)
    windowed = [r for r in runs if r[7] > 1]
    assert {r[5] for r in windowed} >= {"float32", "bfloat16"} and any(r[8] > 1 for r in windowed)
    assert any(r[0] == "q2" for r in windowed) and any(r[2] != "full" for r in windowed)
    assert {r[0] for r in windowed} & pertp_like and {r[0] for r in windowed} & ddp_like


def test_zoctl_up_with_a_new_users_defaults(tmp_path, references):
    """`zoctl up` as a new user runs it (own HOME, shipped preset and data, defaults), equal to the reference.
    (A run directory holding one job, and --resume: tests/test_cluster_faults.py.)"""
    home = tmp_path / "home"
    env = {"HOME": str(home)}
    run = tmp_path / "run"
    r = zoctl("up", "--steps", "5", "--json", "--run-dir", str(run), env=env)
    assert r.returncode == 0, r.stderr[-3000:]
    s = json.loads(r.stdout)
    assert s["steps"] == 5 and s["mode"] == "distributed" and s["tokens_per_second"] > 0
    assert (Path(s["out_dir"]) / "model.safetensors").is_file()
    assert "training" in r.stderr or "step" in r.stderr  # progress was shown
    assert not our_processes(run)
    # the end of a run: the starting and final loss, every evaluation, where the logs and the plot are
    assert s["state"] == "done" and np.isfinite(s["start_loss"]) and np.isfinite(s["final_loss"])
    assert [e["step"] for e in s["eval_history"]] == [0, 5]
    assert s["eval_history"][-1]["dev_accuracy"] == s["dev_accuracy"]
    assert all(Path(s[k]).is_file() for k in ("step_log", "eval_log", "report"))
    assert "1 worker)" in r.stderr, r.stderr  # counted, not "1 workers"
    assert (run / "logs" / "coordinator.log").is_file()
    logs = "".join(f.read_text() for f in (run / "logs").glob("*.log"))
    assert "worker lost" not in logs, logs  # a normal shutdown is not a lost worker (a warning, logged by default)
    # bit for bit the reference of the same defaults (the preset that run built in the new HOME)
    defaults = JobConfig().with_overrides({"train.steps": 5, "runtime.cache_dir": str(home / ".cache" / "distzo")})
    ref = references.get(defaults)
    assert same_weights(Path(s["out_dir"]), ref.out)
    for key in SUMMARY_KEYS:
        assert s[key] == ref.summary[key], key
    same_run_log(run, ref.run_dir)
