"""The reference trainer: it learns, exports a loadable model, and its layouts mean what they say."""

from __future__ import annotations

import json
import subprocess
import sys

import torch
from transformers import AutoModelForCausalLM

from distzo.train.reference import ReferenceTrainer, TrainingStopped

from conftest import small_config


def test_loss_goes_down_on_the_shipped_task(cache_dir):
    cfg = small_config(cache_dir, train={"steps": 200, "batch_size": 16})
    trainer = ReferenceTrainer(cfg)
    trainer.train(progress=False)
    losses = trainer.log.losses
    first, last = sum(losses[:20]) / 20, sum(losses[-20:]) / 20
    assert last < 0.7 * first, (first, last)


def test_export_loads_with_transformers_and_equals_the_blocks(cache_dir, tmp_path):
    cfg = small_config(cache_dir, model={"source": "tiny-qwen3"}, train={"steps": 3})
    trainer = ReferenceTrainer(cfg)
    summary = trainer.train(out_dir=tmp_path / "out", progress=False)
    assert summary["steps"] == 3 and summary["tokens_per_second"] > 0
    model = AutoModelForCausalLM.from_pretrained(str(tmp_path / "out"), dtype=torch.float32)
    state = model.state_dict()
    for spec, buf in zip(trainer.model.manifest.blocks, trainer.buffers):
        for t in spec.tensors:
            assert torch.equal(state[t.name], buf[t.offset : t.offset + t.numel].view(t.shape))
    assert (tmp_path / "out" / "tokenizer.json").is_file()
    # the weights moved away from the preset's
    fresh = ReferenceTrainer(cfg)
    assert not all(torch.equal(a, b) for a, b in zip(fresh.buffers, trainer.buffers))


def test_pertp_layout_is_the_same_arithmetic_as_dual(cache_dir):
    dual = ReferenceTrainer(small_config(cache_dir))
    dual.train(progress=False)
    pertp = ReferenceTrainer(small_config(cache_dir, layout={"name": "pertp", "workers": 2}))
    pertp.train(progress=False)
    ddp = ReferenceTrainer(small_config(cache_dir, layout={"name": "ddp", "workers": 2}))
    ddp.train(progress=False)
    assert all(torch.equal(a, b) for a, b in zip(dual.buffers, pertp.buffers))
    assert not all(torch.equal(a, b) for a, b in zip(dual.buffers, ddp.buffers))  # shards change the g


def test_divergence_stops_with_a_clear_message(cache_dir):
    import pytest

    cfg = small_config(cache_dir, train={"steps": 30, "lr": 1e6, "max_consecutive_skips": 3})
    with pytest.raises(TrainingStopped, match="diverged"):
        ReferenceTrainer(cfg).train(progress=False)


def test_zoctl_reference_cli(cache_dir, tmp_path):
    cfg = tmp_path / "job.yaml"
    cfg.write_text(f"runtime:\n  cache_dir: {cache_dir}\ndata:\n  dev_examples: 8\ntrain:\n  batch_size: 4\n")
    out = subprocess.run([sys.executable, "-m", "coordinator.zoctl.cli", "reference", "--config", str(cfg), "--steps", "2",
                          "--json", "--out", str(tmp_path / "m")], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    summary = json.loads(out.stdout)
    for key in ("final_loss", "steps", "tokens_per_second", "wall_seconds", "dev_accuracy"):
        assert key in summary
    assert summary["steps"] == 2
    bad = subprocess.run([sys.executable, "-m", "coordinator.zoctl.cli", "reference", "--config", str(cfg), "--workers", "3"],
                         capture_output=True, text=True, timeout=300)
    assert bad.returncode == 2 and "uses exactly 1 worker" in bad.stderr
    from test_cluster import zoctl_here  # more refusals: the same main() in this process

    for args, needle in ((["--model", str(tmp_path / "none")], "does not exist"), (["--steps", "0"], "train.steps")):
        r = zoctl_here("reference", "--config", str(cfg), *args)
        assert r.returncode == 2 and needle in r.stderr, r.stderr


def test_one_row_per_example_scores_the_candidates_as_one_row_per_candidate_does(cache_dir, monkeypatch):
    from distzo.data.tasks import TaskEncoder

    trainer = ReferenceTrainer(small_config(cache_dir, data={"dev_examples": 40}))
    assert trainer.job.encoder.eval_candidates  # the shipped words are one token each: eval takes the short path
    rows = trainer.job.eval_chunks()[0][1].input_ids.shape[0]
    short = trainer.evaluate(0)
    monkeypatch.setattr(TaskEncoder, "eval_candidates", property(lambda self: ()))
    assert trainer.job.eval_chunks()[0][1].input_ids.shape[0] == 2 * rows
    long = trainer.evaluate(0)
    assert short["dev_accuracy"] == long["dev_accuracy"] and short["dev_examples"] == long["dev_examples"] == 40
    assert abs(short["dev_loss"] - long["dev_loss"]) < 1e-5
