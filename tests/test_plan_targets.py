"""`zoctl plan` for train.target lora (and prefix): trainable parameters, server memory per optimizer (state for the
trainable blocks only), per-step traffic (frozen blocks fetched once), the workers' cache of them."""

from __future__ import annotations

import dataclasses
import json

import pytest

from distzo.data.presets import preset_config, preset_dir
from distzo.model.adapters import LoraTarget
from distzo.model.modeling import BlockModel
from distzo.model.prefix import PrefixTarget
from distzo.perf.clusters import CLUSTERS
from distzo.perf.model import predict
from distzo.perf.recommend import recommend
from distzo.perf.specs import MODELS, LayoutSpec, ModelSpec
from distzo.perf.targets import FULL, lora_target, prefix_target

from test_perfmodel import zoctl

H100 = CLUSTERS["h100x8"]


@pytest.mark.parametrize("preset,modules", [("tiny-opt", ["q_proj", "v_proj"]),
                                            ("tiny-opt", ["q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"]),
                                            ("tiny-llama", ["q_proj", "v_proj"]),
                                            ("tiny-llama", ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj",
                                                            "up_proj", "down_proj"]),
                                            ("tiny-qwen3", ["q_proj", "v_proj"])])
def test_lora_params_equal_the_manifests_trainable_blocks(cache_dir, preset, modules):
    model_dir = preset_dir(preset, cache_dir)
    bm = BlockModel.from_dir(model_dir, LoraTarget(8, 16.0, tuple(modules), 0))
    trainable = sum(b.numel for b in bm.manifest.blocks if b.trainable)
    frozen = sum(b.numel for b in bm.manifest.blocks if not b.trainable)
    spec = ModelSpec.from_hf_config(preset_config(preset, cache_dir), name=preset)
    target = lora_target(spec, 8, modules)
    assert (target.trainable(spec), target.frozen(spec), target.total(spec)) == (trainable, frozen, bm.manifest.numel)


@pytest.mark.parametrize("preset", ["tiny-opt", "tiny-llama"])  # tiny-llama: grouped-query keys and values
def test_prefix_params_equal_the_manifests_trainable_blocks(cache_dir, preset):
    bm = BlockModel.from_dir(preset_dir(preset, cache_dir), PrefixTarget(7))
    trainable = sum(b.numel for b in bm.manifest.blocks if b.trainable)
    spec = ModelSpec.from_hf_config(preset_config(preset, cache_dir), name=preset)
    target = prefix_target(spec, 7)
    assert (target.trainable(spec), target.total(spec)) == (trainable, bm.manifest.numel)


def test_zoctl_plan_prefix_and_its_bad_length():
    r = zoctl("plan", "--model", "OPT-13B", "--target", "prefix", "--prefix-tokens", "10")
    assert r.returncode == 0, r.stderr
    assert "prefix: 4.10M trainable parameters" in r.stdout, r.stdout  # 40 layers x 10 tokens x 2 x 5120
    bad = zoctl("plan", "--model", "OPT-13B", "--target", "prefix", "--prefix-tokens", "0")
    assert bad.returncode == 2 and bad.stderr.strip().count("\n") == 0 and "--prefix-tokens must be an integer from 1" in bad.stderr


def test_a_preset_is_planned_with_the_vocabulary_it_is_built_with(cache_dir):
    """tiny-opt used to be planned at the BPE trainer's bound (1024 tokens): 282,112 parameters, not its 254,144."""
    spec = ModelSpec.from_hf_config(preset_config("tiny-opt", cache_dir), name="tiny-opt")
    assert spec.params == BlockModel.from_dir(preset_dir("tiny-opt", cache_dir)).manifest.numel == 254144


@pytest.mark.parametrize("optimizer,width", [("sgd", 0), ("momentum", 1), ("adam", 2)])
def test_lora_server_memory_has_state_only_for_the_adapters(optimizer, width):
    m = MODELS["OPT-13B"]
    t = lora_target(m, 8, ["q_proj", "v_proj"])
    A, P = t.adapter_params, m.params
    assert A == m.layers * 2 * 8 * (m.hidden + m.hidden)
    p = predict(m, H100, LayoutSpec(), 32768, "bfloat16", optimizer=optimizer, target=t)
    full = predict(m, H100, LayoutSpec(), 32768, "bfloat16", optimizer=optimizer)
    h = p.memory_per_server_host_bytes
    assert h["master_fp32"] == 4 * (P + A) and h["served_copy"] == 2 * (P + A)
    assert h.get("optimizer_state", 0) == 4 * width * A
    assert full.memory_per_server_host_bytes.get("optimizer_state", 0) == 4 * width * P
    assert (p.trainable_params, p.frozen_params, p.target) == (A, P, "lora")
    assert p.server_bytes_per_param == {"sgd": 6, "momentum": 10, "adam": 14}  # per trainable parameter
    assert p.server_bytes_per_frozen_param == 6  # master + bfloat16 served copy, no state
    assert p.server_memory_by_optimizer == {o: (6 + 4 * w) * A + 6 * P for o, w in
                                            (("sgd", 0), ("momentum", 1), ("adam", 2))}
    assert p.snapshot_headroom_bytes == (4 + 4 * width) * A  # copy-on-write of the blocks an update changes
    assert p.terms_s["server_update"] < full.terms_s["server_update"] * A / P * 1.0001


def test_lora_traffic_is_the_adapters_per_step_and_the_base_once():
    m = MODELS["OPT-13B"]
    t = lora_target(m, 8, ["q_proj", "v_proj"])
    A, P = t.adapter_params, m.params
    one = dataclasses.replace(H100, gpus_per_worker=1, fetch_group=1)  # a worker per GPU, each keeps its copy
    p = predict(m, one, LayoutSpec(1, 8, 1), 32768, "bfloat16", target=t)
    full = predict(m, one, LayoutSpec(1, 8, 1), 32768, "bfloat16")
    assert p.bytes["h2d_per_gpu"] == 2 * A and full.bytes["h2d_per_gpu"] == 2 * P
    assert p.bytes["frozen_once_per_worker"] == 2 * P
    assert p.memory_per_gpu_bytes["frozen_blocks_kept"] == 2 * P and "frozen_blocks_kept" not in full.memory_per_gpu_bytes
    assert p.memory_per_gpu_bytes["tied_embedding"] == 0  # kept with the frozen blocks, never perturbed
    assert p.compute_detail_s["perturb"] < full.compute_detail_s["perturb"] * A / P * 1.0001
    assert p.compute_detail_s["forward"] == pytest.approx(full.compute_detail_s["forward"] * (P + A) / P)
    assert p.terms_s["h2d"] < full.terms_s["h2d"] / 100
    assert any("fetched once per worker" in a for a in p.assumptions)
    # a fetch group of 8 (a node group) does not keep the frozen blocks: they are fetched every step
    group = predict(m, H100, LayoutSpec(), 32768, "bfloat16", target=t)
    assert group.bytes["h2d_per_gpu"] == 2 * (P + A) / 8 and "frozen_once_per_worker" not in group.bytes
    assert "frozen_blocks_kept" not in group.memory_per_gpu_bytes
    assert any("fetched every step" in a for a in group.assumptions)
    # full fine-tuning is what it was
    assert predict(m, H100, LayoutSpec(), 32768, "bfloat16", target=FULL) == predict(m, H100, LayoutSpec(), 32768, "bfloat16")


def test_frozen_blocks_a_gpu_cannot_hold_are_kept_in_pinned_host_memory_as_the_worker_does():
    """Issue 25: LoRA on OPT-175B with one GPU was planned at 344 GiB per GPU (every frozen block on the GPU),
    while full fine-tuning fitted in 36 GiB. The worker keeps frozen blocks on the GPU only up to the memory free
    less a fifth of the device (gpuworker/feed.py), the rest in pinned host memory copied over at each use."""
    m = MODELS["OPT-175B"]
    t = lora_target(m, 8, ["q_proj", "v_proj"])
    one = dataclasses.replace(H100, nodes=1, gpus_per_node=1, gpus_per_worker=1, fetch_group=1)
    p = predict(m, one, LayoutSpec(1, 1, 1), 32768, "bfloat16", target=t)
    g = p.memory_per_gpu_bytes
    assert p.fits_gpu and g["total"] <= 0.8 * one.gpu_memory_bytes + 1 and g["frozen_blocks_kept"] > 0
    in_host = p.bytes["frozen_once_per_worker"] - g["frozen_blocks_kept"]
    assert p.memory_per_server_host_bytes["worker_frozen_copies"] == in_host > 0
    assert p.bytes["h2d_per_gpu"] == 2 * t.adapter_params + in_host  # the host part crosses PCIe every step
    r = zoctl("plan", "--model", "OPT-175B", "--nodes", "1", "--gpus-per-node", "1", "--target", "lora")
    assert r.returncode == 0 and "DOES NOT FIT" not in r.stdout.split("memory per server host")[0], r.stdout
    assert "in pinned host memory, copied over at each use" in r.stdout


def test_lora_fits_where_full_adam_needs_more_shards():
    m = MODELS["Llama-3-405B"]
    t = lora_target(m, 8, ["q_proj", "v_proj"])
    cluster = dataclasses.replace(CLUSTERS["h100x8-8n"], replicas=False)
    full = recommend(m, cluster, 32768, optimizer="adam")
    lora = recommend(m, cluster, 32768, optimizer="adam", target=t)
    assert lora.prediction.memory_per_server_host_bytes["total"] < full.prediction.memory_per_server_host_bytes["total"]
    # 405B x 14 B (adam) needs 3 hosts of 2 TiB; x 6 B (no state for the frozen base) needs 2
    assert (full.prediction.shards, lora.prediction.shards) == (3, 2)


def test_zoctl_plan_lora_json_and_table():
    r = zoctl("plan", "--model", "tiny-opt", "--cluster", "cpu-local", "--target", "lora", "--optimizer", "adam", "--json")
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    p = out["prediction"]
    assert out["model"]["params"] == 254144
    assert (p["target"], p["trainable_params"], p["frozen_params"]) == ("lora", 8192, 254144)
    assert p["memory_per_server_host_bytes"]["optimizer_state"] == 8 * 8192
    from test_cluster import zoctl_here  # the second through zoctl's main() in this process

    r = zoctl_here("plan", "--model", "tiny-opt", "--cluster", "cpu-local", "--target", "lora", "--lora-rank", "4",
              "--lora-modules", "q_proj,k_proj,v_proj")
    assert r.returncode == 0, r.stderr
    assert "lora: 6.14K trainable parameters" in r.stdout  # 4 layers x 3 x 4 x (64 + 64)
    assert "server bytes per frozen parameter" in r.stdout and "frozen, once per worker" in r.stdout


@pytest.mark.parametrize("args,needle", [(["--lora-modules", "q_proj,nope"], "['nope']"),
                                         (["--lora-rank", "0"], "--lora-rank must be an integer from 1 to 4096, got 0"),
                                         (["--lora-modules", ","], "LoRA modules")])
def test_zoctl_plan_bad_lora_settings_are_one_line_and_exit_2(args, needle):
    r = zoctl("plan", "--model", "OPT-13B", "--target", "lora", *args)
    assert r.returncode == 2, r.stderr
    assert r.stderr.strip().count("\n") == 0 and needle in r.stderr and "Traceback" not in r.stderr


def test_every_number_a_plan_takes_is_checked_in_one_line(capsys):
    """Kind 4 of issue 28: each numeric flag of zoctl plan, past its range, is one line and exit 2 (--q 0 was a
    ZeroDivisionError traceback, --seq-len 0 was silently the default)."""
    from coordinator.zoctl.cli import main
    from coordinator.zoctl.plan import RANGES

    for dest, low, high in RANGES:
        for value in (low - 1, high + 1):
            flag = "--" + dest.replace("_", "-")
            target = ["--target", "lora"] if dest == "lora_rank" else ["--target", "prefix"] if dest == "prefix_tokens" else []
            assert main(["plan", "--model", "OPT-13B", *target, flag, str(value)]) == 2
            err = capsys.readouterr().err
            assert err.count("\n") == 1 and f"{flag} must be an integer from {low} to {high}, got {value}" in err, err


def test_zoctl_plan_takes_a_job_config_and_names_the_worker_count_flags(tmp_path, capsys):
    """Issue 25: `--cluster cpu-local` planned 32768 tokens of 2048 whatever the job; `--layout pertp` refused
    without saying how the workers are counted."""
    from coordinator.zoctl.cli import main

    job = tmp_path / "job.yaml"
    job.write_text("model: {source: tiny-llama}\ndata: {max_seq_len: 48}\ntrain: {batch_size: 8, target: lora}\n"
                   "layout: {name: ddp, workers: 2}\n")
    assert main(["plan", "--cluster", "cpu-local", "--config", str(job), "--json"]) == 0
    p = json.loads(capsys.readouterr().out)["prediction"]
    assert (p["tokens_per_step"], p["seq_len"], p["target"]) == (8 * 48, 48, "lora")
    assert (p["layout"]["name"], p["layout"]["workers"]) == ("ddp", 2)
    assert main(["plan", "--cluster", "cpu-local", "--config", str(job), "--seq-len", "16", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["prediction"]["seq_len"] == 16  # a flag wins over the config
    assert main(["plan", "--model", "OPT-13B", "--layout", "pertp"]) == 2
    err = capsys.readouterr().err
    assert "8 GPUs per worker (--gpus-per-worker); --gpus-per-worker 4 gives 2 workers" in err and err.count("\n") == 1
    assert main(["plan", "--model", "OPT-13B", "--layout", "pertp", "--gpus-per-worker", "1"]) == 2
    assert "uses exactly 2 workers, the cluster has 8 workers" in capsys.readouterr().err
    assert main(["plan"]) == 2 and "--model NAME or --config FILE is required" in capsys.readouterr().err
