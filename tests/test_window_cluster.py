"""Update windows (server.update_window K = 4) around the cluster runs: K = 4 exports what K = 1 exports with a
float32 served copy (and not with a bfloat16 one), and stateful optimizers are refused in one line.

`zoctl up` equals the reference with windows in tests/test_matrix.py (K = 2 under PertP with a prefix, K = 4 in
2d node groups and with q = 2, bfloat16 and float32 served); processes killed inside a window: the fault run in
tests/test_cluster_faults.py (DDP, K = 4, bfloat16)."""

from __future__ import annotations

import pytest

from distzo.common.config import JobConfig
from distzo.train.reference import ReferenceTrainer

from test_cluster import same_weights, zoctl

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
