"""zoctl up == zoctl reference, bit for bit, with optimizer state on the server (and after its kill)."""

from __future__ import annotations

import json
import signal

import pytest

from test_cluster import base_config, at_step, reference_export, run_cluster, same_weights, write_config, zoctl


@pytest.mark.parametrize("optimizer,layout,workers", [("momentum", "dual", 1), ("momentum", "pertp", 2),
                                                      ("adam", "dual", 1), ("adam", "ddp", 2)])
def test_up_equals_the_reference_bitwise_for_each_optimizer(cache_dir, tmp_path, optimizer, layout, workers):
    cfg = write_config(tmp_path, cache_dir, train={"steps": 5, "batch_size": 8, "weight_decay": 0.01,
                                                   "distribution": "gaussian" if optimizer == "adam" else "rademacher"})
    flags = ["--config", str(cfg), "--layout", layout, "--workers", str(workers), "--optimizer", optimizer, "--json",
             "--lr", "1e-3" if optimizer == "adam" else "5e-4"]
    up = zoctl("up", *flags, "--run-dir", str(tmp_path / "run"), "--out", str(tmp_path / "dist"))
    assert up.returncode == 0, up.stderr[-3000:]
    ref = zoctl("reference", *flags, "--out", str(tmp_path / "ref"))
    assert ref.returncode == 0, ref.stderr[-3000:]
    a, b = json.loads(up.stdout), json.loads(ref.stdout)
    assert same_weights(tmp_path / "dist", tmp_path / "ref")
    for key in ("final_loss", "dev_loss", "dev_accuracy", "train_tokens"):
        assert a[key] == b[key], key
    # the optimizer changed the trajectory: sgd's weights differ
    sgd = zoctl("reference", *[f for f in flags if f != optimizer and f != "--optimizer"], "--out", str(tmp_path / "sgd"))
    assert sgd.returncode == 0, sgd.stderr[-3000:]
    assert not same_weights(tmp_path / "sgd", tmp_path / "ref")


def test_a_killed_server_comes_back_with_its_adam_state_and_the_weights_do_not_change(cache_dir, tmp_path):
    cfg = base_config(cache_dir, train={"optimizer": "adam", "lr": 1e-3})

    def kill(cluster) -> None:  # noqa: ANN001
        at_step(cluster, 5)  # past the snapshot at 4: recovery = snapshot (master + state) + journal
        cluster.processes["paramserver"].kill(signal.SIGKILL)

    cluster, _ = run_cluster(tmp_path, cfg, kill)
    assert cluster.restarts == {"paramserver": 1}
    assert same_weights(tmp_path / "dist", reference_export(tmp_path, cfg))


def test_a_bad_optimizer_is_one_line_and_exit_2(cache_dir, tmp_path):
    r = zoctl("reference", "--optimizer", "adamw", "--steps", "1")
    assert r.returncode == 2
    assert r.stderr.strip().count("\n") == 0 and "train.optimizer" in r.stderr and "'adam'" in r.stderr
    assert "Traceback" not in r.stderr
