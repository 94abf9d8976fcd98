"""The step-time model (distzo.perf.model) and `zoctl plan`: counts, terms, bytes, memory, layouts."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import pytest

from distzo.perf.clusters import CLUSTERS, ClusterSpec, cluster_from_calibration
from distzo.perf.model import predict
from distzo.perf.recommend import layouts_for, recommend
from distzo.perf.specs import MODELS, LayoutSpec, ModelSpec

ROOT = Path(__file__).resolve().parent.parent
H100 = CLUSTERS["h100x8"]
NOMINAL = {"OPT-1.3B": 1.3e9, "OPT-2.7B": 2.7e9, "OPT-6.7B": 6.7e9, "OPT-13B": 13e9, "OPT-30B": 30e9, "OPT-66B": 66e9,
           "OPT-175B": 175e9, "Llama-3-8B": 8e9, "Llama-3-70B": 70e9, "Llama-3-405B": 405e9}


def on(cluster: ClusterSpec, **changes: object) -> ClusterSpec:
    return dataclasses.replace(cluster, **changes)


# ----------------------------------------------------------------------------- the catalog
def test_catalog_holds_the_named_models_near_their_nominal_size():
    assert set(MODELS) == set(NOMINAL)
    for name, nominal in NOMINAL.items():
        assert MODELS[name].params == pytest.approx(nominal, rel=0.03), name


@pytest.mark.parametrize("name,published", [("OPT-13B", 12.85e9), ("OPT-175B", 174.6e9), ("Llama-3-8B", 8.03e9),
                                            ("Llama-3-70B", 70.55e9), ("Llama-3-405B", 405.85e9)])
def test_catalog_counts_match_the_published_architectures(name, published):
    assert MODELS[name].params == pytest.approx(published, rel=0.002)


def test_from_hf_config_counts_exactly_what_the_catalog_computes():
    from transformers import LlamaConfig, OPTConfig

    opt = ModelSpec.from_hf_config(OPTConfig(hidden_size=2048, word_embed_proj_dim=2048, num_hidden_layers=24,
                                             ffn_dim=8192, num_attention_heads=32, vocab_size=50272))
    ref = MODELS["OPT-1.3B"]
    assert (opt.params, opt.layers, opt.hidden, opt.ffn, opt.tied, opt.positions) == \
        (ref.params, ref.layers, ref.hidden, ref.ffn, ref.tied, ref.positions)
    llama = ModelSpec.from_hf_config(LlamaConfig(hidden_size=4096, num_hidden_layers=32, intermediate_size=14336,
                                                 num_attention_heads=32, num_key_value_heads=8, vocab_size=128256,
                                                 tie_word_embeddings=False))
    ref = MODELS["Llama-3-8B"]
    assert (llama.params, llama.kv_heads, llama.tied, llama.gated) == (ref.params, 8, False, True)


@pytest.mark.parametrize("preset", ["tiny-opt", "tiny-gpt2", "tiny-llama", "tiny-qwen3"])
def test_from_hf_config_agrees_with_the_servers_block_manifest(preset):
    """Same parameter count (tied weights once) and block count as the blocks the server holds."""
    from distzo.data.presets import PRESETS, VOCAB_SIZE
    from distzo.model.modeling import BlockModel

    factory, sizes = PRESETS[preset]
    config = factory(VOCAB_SIZE, **sizes)
    spec = ModelSpec.from_hf_config(config, name=preset)
    manifest = BlockModel(config).manifest
    assert spec.params == manifest.numel
    assert spec.num_blocks == len(manifest.blocks)
    assert spec.largest_block() >= max(b.numel for b in manifest.blocks[1:-1])


# ----------------------------------------------------------------------------- terms
def test_terms_follow_the_formulas_and_the_floor_is_their_max():
    m, T = MODELS["OPT-13B"], 32768
    p = predict(m, H100, LayoutSpec(), T, "bfloat16")
    gpus = H100.nodes * H100.gpus_per_node
    assert p.compute_detail_s["forward"] == pytest.approx(2 * 2 * m.params * T / gpus / (H100.gpu_tflops * 1e12 * H100.mfu))
    assert p.terms_s["h2d"] == pytest.approx(m.params * 2 / 8 / (H100.h2d_gbps * 1e9))
    assert p.terms_s["nvlink"] == pytest.approx(m.params * 2 * 7 / 8 / (H100.nvlink_gbps * 1e9))
    assert p.terms_s["server_update"] == pytest.approx(m.params / H100.server_update_params_per_s)
    assert p.floor_s == max(p.terms_s.values())
    assert p.bottleneck == max(p.terms_s, key=p.terms_s.get)
    # one host's DRAM: its node's DMA reads and its replica's update pass (fp32 read+write, bf16 written)
    assert p.terms_s["host_dram"] == pytest.approx((m.params * 2 + m.params * 10) / (H100.host_dram_gbps * 1e9))
    assert p.host_bytes_per_param_step == pytest.approx(12.0)
    assert p.floor_s <= p.step_s <= p.sum_s
    assert p.sum_s == pytest.approx(sum(v for k, v in p.terms_s.items() if k != "host_dram"))  # the same bytes
    assert p.tokens_per_s == pytest.approx(T / p.step_s)


def test_q_directions_multiply_compute_and_server_update():
    m = MODELS["OPT-6.7B"]
    c = on(CLUSTERS["h100x8-2n"])
    one = predict(m, c, LayoutSpec(1, 2, 1), 32768)
    two = predict(m, c, LayoutSpec(1, 1, 2), 32768)
    assert two.compute_detail_s["forward"] == pytest.approx(2 * one.compute_detail_s["forward"])
    assert two.terms_s["server_update"] == pytest.approx(2 * one.terms_s["server_update"])
    assert two.bytes["h2d_per_node"] == one.bytes["h2d_per_node"]


def test_more_tokens_grow_compute_and_move_the_bottleneck_from_transfer_to_compute():
    fast_server = on(H100, server_update_params_per_s=1e14, host_dram_gbps=None)
    m = MODELS["OPT-13B"]
    small = predict(m, fast_server, LayoutSpec(), 256, seq_len=256)
    large = predict(m, fast_server, LayoutSpec(), 256 * 1024, seq_len=2048)
    assert large.terms_s["compute"] > small.terms_s["compute"] * 10
    assert small.bottleneck in ("h2d", "nvlink")
    assert large.bottleneck == "compute"
    assert large.terms_s["h2d"] == small.terms_s["h2d"]  # transfer is per step, not per token
    assert large.tokens_per_s > small.tokens_per_s


def test_16bit_serving_halves_every_weight_transfer():
    m = MODELS["OPT-6.7B"]
    c = on(CLUSTERS["h100x8-2n"], replicas=False)
    fp32 = predict(m, c, LayoutSpec(1, 2, 1), 32768, "float32")
    for dtype in ("bfloat16", "float16"):
        half = predict(m, c, LayoutSpec(1, 2, 1), 32768, dtype)
        for key in ("model_at_served_dtype", "h2d_per_gpu", "h2d_per_node", "nvlink_per_gpu", "network_in_per_node",
                    "network_out_per_server_host"):
            assert half.bytes[key] == pytest.approx(fp32.bytes[key] / 2), key
            assert half.bytes[key] > 0, key
        for term in ("h2d", "nvlink", "network"):
            assert half.terms_s[term] == pytest.approx(fp32.terms_s[term] / 2), term


@pytest.mark.parametrize("cluster,layout", [("h100x8", LayoutSpec(1, 1, 1)), ("h100x8-8n", LayoutSpec(1, 8, 1)),
                                            ("h100x8-8n", LayoutSpec(2, 4, 1)), ("a100x8", LayoutSpec(1, 1, 1))])
def test_each_node_receives_one_copy_of_the_model_per_step(cluster, layout):
    m = MODELS["Llama-3-8B"]
    p = predict(m, CLUSTERS[cluster], layout, 32768, "bfloat16")
    assert p.bytes["h2d_per_node"] == pytest.approx(1.0 * m.params * 2)  # not 2x: no offload back
    assert p.bytes["h2d_per_gpu"] == pytest.approx(m.params * 2 / 8)  # each GPU fetches its slice


def test_replicas_take_the_weights_off_the_network():
    m = MODELS["OPT-30B"]
    lay = LayoutSpec(1, 2, 1)
    with_replicas = predict(m, CLUSTERS["h100x8-2n"], lay, 32768)
    without = predict(m, on(CLUSTERS["h100x8-2n"], replicas=False), lay, 32768)
    assert with_replicas.bytes["network_in_per_node"] == 0 and with_replicas.bytes["network_out_per_server_host"] == 0
    assert without.bytes["network_in_per_node"] == pytest.approx(m.params * 2)
    assert without.terms_s["network"] > 100 * with_replicas.terms_s["network"]
    assert with_replicas.bytes["control_per_step"] < 1e6  # journal records and batches: bytes, not gigabytes


def test_shards_divide_the_server_update_and_its_memory():
    m = MODELS["OPT-66B"]
    c = CLUSTERS["h100x8-8n"]
    one = predict(m, c, LayoutSpec(1, 8, 1), 32768, shards=1)
    four = predict(m, c, LayoutSpec(1, 8, 1), 32768, shards=4)
    assert four.terms_s["server_update"] == pytest.approx(one.terms_s["server_update"] / 4)
    assert four.memory_per_server_host_bytes["master_fp32"] == pytest.approx(one.memory_per_server_host_bytes["master_fp32"] / 4)
    assert four.bytes["network_in_per_node"] == pytest.approx(m.params * 2 * 3 / 4)  # the other shards' blocks
    with pytest.raises(ValueError, match="shards"):
        predict(m, c, LayoutSpec(1, 8, 1), 32768, shards=3)  # 3 does not divide 8 nodes of replicas


# ----------------------------------------------------------------------------- memory
def test_memory_per_gpu_does_not_grow_with_depth():
    shallow = ModelSpec.opt("shallow", hidden=4096, layers=8, ffn=16384, heads=32)
    deep = ModelSpec.opt("deep", hidden=4096, layers=96, ffn=16384, heads=32)
    assert deep.params > 8 * shallow.params
    a = predict(shallow, H100, LayoutSpec(), 32768)
    b = predict(deep, H100, LayoutSpec(), 32768)
    assert b.memory_per_gpu_bytes["total"] == pytest.approx(a.memory_per_gpu_bytes["total"], rel=1e-3)
    assert b.memory_per_server_host_bytes["master_fp32"] == pytest.approx(4 * deep.params)


def test_175b_does_not_fit_one_gpu_as_a_whole_but_streams():
    p = predict(MODELS["OPT-175B"], H100, LayoutSpec(), 32768, "bfloat16")
    assert p.whole_model_bytes > H100.gpu_memory_bytes and not p.whole_model_fits_gpu
    assert p.fits_gpu and p.memory_per_gpu_bytes["total"] < H100.gpu_memory_bytes / 2
    assert p.fits_host  # 4P master + 2P served copy on a 2 TiB host
    assert p.snapshot_headroom_bytes == pytest.approx(4 * MODELS["OPT-175B"].params)


def test_dual_holds_more_perturbed_copies_than_pertp():
    m = MODELS["Llama-3-8B"]
    dual = predict(m, CLUSTERS["h100x8-2n"], LayoutSpec(1, 2, 1), 32768)
    pertp = predict(m, CLUSTERS["h100x8-2n"], LayoutSpec(2, 1, 1), 32768)
    assert dual.memory_per_gpu_bytes["perturbed_copies"] == 2 * pertp.memory_per_gpu_bytes["perturbed_copies"]
    assert dual.compute_detail_s["forward"] == pytest.approx(pertp.compute_detail_s["forward"])


def test_16bit_served_copy_is_host_memory_and_405b_needs_shards():
    m = MODELS["Llama-3-405B"]
    one_node = recommend(m, H100, 32768, "bfloat16")
    assert not one_node.prediction.fits_host and "nothing fits" in one_node.reason
    assert recommend(m, H100, 32768, "float32").prediction.fits_host  # no 16-bit copy beside the master
    eight = recommend(m, CLUSTERS["h100x8-8n"], 32768, "bfloat16")
    assert eight.prediction.shards >= 2 and eight.prediction.fits


# ----------------------------------------------------------------------------- layouts
def test_layout_names_follow_the_config_rules():
    assert LayoutSpec.from_name("dual", 1) == LayoutSpec(1, 1, 1)
    assert LayoutSpec.from_name("pertp", 2) == LayoutSpec(2, 1, 1)
    assert LayoutSpec.from_name("ddp", 8) == LayoutSpec(1, 8, 1)
    assert LayoutSpec.from_name("2d", 8) == LayoutSpec(2, 4, 1)
    assert LayoutSpec.from_name("dual", 4, q=4) == LayoutSpec(1, 1, 4)
    for name, workers in (("dual", 2), ("pertp", 3), ("ddp", 1), ("2d", 2), ("nope", 1)):
        with pytest.raises(ValueError):
            LayoutSpec.from_name(name, workers)
    with pytest.raises(ValueError, match="workers"):
        predict(MODELS["OPT-1.3B"], H100, LayoutSpec(1, 2, 1), 32768)  # 2 workers on a 1-worker cluster


FITTING = [(c, m) for c in CLUSTERS for m in ("OPT-1.3B", "OPT-66B", "Llama-3-70B")
           if not (c.startswith("cpu-") and MODELS[m].params > 2e9)]  # the CPU placeholders hold only small models


@pytest.mark.parametrize("cluster,model", FITTING)
def test_recommend_returns_a_valid_fitting_layout_for_the_whole_cluster(cluster, model):
    c, m = CLUSTERS[cluster], MODELS[model]
    rec = recommend(m, c, 32768)
    lay = rec.layout
    assert lay.workers == c.workers and lay.pertp in (1, 2) and lay.ddp >= 1 and lay.q == 1
    assert rec.prediction.fits and rec.reason.startswith(lay.name)
    fitting = [p for p in rec.candidates if p.fits]
    assert rec.prediction.tokens_per_s >= max(p.tokens_per_s for p in fitting) * 0.99
    assert {p.layout for p in rec.candidates} == set(layouts_for(c.workers, 16))


def test_recommend_says_so_when_nothing_fits():
    rec = recommend(MODELS["OPT-66B"], CLUSTERS["cpu-local"], 32768)
    assert not rec.prediction.fits and "nothing fits" in rec.reason and "GiB" in rec.reason


def test_recommend_refuses_a_batch_that_no_layout_can_shard():
    with pytest.raises(ValueError, match="sequences"):
        recommend(MODELS["OPT-1.3B"], CLUSTERS["h100x8-8n"], 2048, seq_len=2048)  # 1 sequence, 8 workers


# ----------------------------------------------------------------------------- CPU calibration
def test_cluster_from_calibration_predicts_a_small_cpu_model():
    from transformers import OPTConfig

    cal = {"forward_flops_per_s": 2e10, "memcpy_bytes_per_s": 1e10, "update_params_per_s": 2e9,
           "fixed_step_overhead_s": 0.01, "memory_bytes": 8 << 30}
    c = cluster_from_calibration(cal, workers=2)
    m = ModelSpec.from_hf_config(OPTConfig(hidden_size=256, word_embed_proj_dim=256, num_hidden_layers=8, ffn_dim=1024,
                                           num_attention_heads=8, vocab_size=1024, max_position_embeddings=256))
    p = predict(m, c, LayoutSpec(1, 2, 1), 16 * 64, "float32", seq_len=64)
    assert p.compute_dtype == "float32"
    assert p.compute_detail_s["forward"] == pytest.approx(2 * 2 * m.params * 1024 / 2 / 2e10)
    assert p.compute_detail_s["perturb"] == pytest.approx(2 * m.params / 2e9)  # dual: two copies per block
    assert p.terms_s["h2d"] == pytest.approx(m.params * 4 / 1e10)  # each worker copies the whole model
    assert p.terms_s["nvlink"] == 0 and p.terms_s["network"] == 0
    assert p.terms_s["server_update"] == pytest.approx(m.params / 2e9)
    assert p.terms_s["control"] >= 0.01
    assert p.fits
    with pytest.raises(KeyError, match="update_params_per_s"):
        cluster_from_calibration({"forward_flops_per_s": 1.0, "memcpy_bytes_per_s": 1.0, "fixed_step_overhead_s": 0.0})


# ----------------------------------------------------------------------------- zoctl plan
def zoctl(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "coordinator.zoctl.cli", *args], capture_output=True, text=True,
                          timeout=120, cwd=ROOT)


def test_zoctl_plan_json_has_the_prediction_and_the_recommendation():
    r = zoctl("plan", "--model", "OPT-13B", "--json")
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert {"model", "cluster", "prediction", "recommended"} <= set(out)
    p = out["prediction"]
    for key in ("terms_s", "floor_s", "step_s", "sum_s", "bottleneck", "bytes", "memory_per_gpu_bytes",
                "memory_per_server_host_bytes", "snapshot_headroom_bytes", "fits", "tokens_per_s", "layout"):
        assert key in p, key
    assert set(p["terms_s"]) == {"compute", "h2d", "nvlink", "network", "server_update", "host_dram", "control"}
    assert p["bottleneck"] in p["terms_s"] and p["fits"] is True
    assert out["model"]["params"] == MODELS["OPT-13B"].params
    assert out["recommended"]["layout"]["workers"] == 1 and out["recommended"]["reason"]


def test_zoctl_plan_table_and_a_chosen_layout():
    r = zoctl("plan", "--model", "llama-3-70b", "--cluster", "h100x8", "--nodes", "2", "--layout", "pertp",
              "--tokens-per-step", "8192", "--seq-len", "1024", "--no-replicas")
    assert r.returncode == 0, r.stderr
    for text in ("bottleneck", "tokens/s", "memory per GPU", "memory per server host", "recommended:", "pertp",
                 "no server replicas"):
        assert text in r.stdout, text


def test_zoctl_plan_unknown_names_exit_2_and_list_the_known_ones():
    r = zoctl("plan", "--model", "OPT-14B")
    assert r.returncode == 2
    assert "OPT-14B" in r.stderr and all(name in r.stderr for name in MODELS)
    r = zoctl("plan", "--model", "OPT-13B", "--cluster", "dgx-z9")
    assert r.returncode == 2 and all(name in r.stderr for name in CLUSTERS)
    r = zoctl("plan", "--model", "OPT-13B", "--cluster", "h100x8-2n", "--layout", "dual")
    assert r.returncode == 2 and "layout ddp" in r.stderr


def test_zoctl_help_lists_plan():
    r = zoctl("--help")
    assert r.returncode == 0 and "plan" in r.stdout
    r = zoctl("plan", "--help")
    assert r.returncode == 0 and "--tokens-per-step" in r.stdout and "--no-replicas" in r.stdout


def test_zoctl_plan_models_a_local_preset_on_the_cpu_placeholder():
    r = zoctl("plan", "--model", "tiny-opt", "--cluster", "cpu-local", "--tokens-per-step", "256", "--seq-len", "64",
              "--served-dtype", "float32", "--json")
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["model"]["name"] == "tiny-opt" and out["prediction"]["compute_dtype"] == "float32"
    assert out["prediction"]["layout"]["workers"] == CLUSTERS["cpu-local"].workers


def test_cpu_host_cores_bound_shared_work():
    """Two workers on a two-core host cannot hide the server's update behind their compute."""
    from transformers import OPTConfig

    m = ModelSpec.from_hf_config(OPTConfig(vocab_size=600, hidden_size=256, num_hidden_layers=8, ffn_dim=1024,
                                           num_attention_heads=8, max_position_embeddings=256, word_embed_proj_dim=256))
    cal = {"forward_flops_per_s": 2e10, "memcpy_bytes_per_s": 1e10, "update_params_per_s": 1e9, "fixed_step_overhead_s": 0.002}
    free = predict(m, cluster_from_calibration(cal, workers=2), LayoutSpec(1, 2, 1), 512, served_dtype="float32", seq_len=32)
    shared = predict(m, cluster_from_calibration({**cal, "host_cores": 2}, workers=2), LayoutSpec(1, 2, 1), 512, seq_len=32,
                     served_dtype="float32")
    t = shared.terms_s
    assert shared.step_s >= (2 * (t["compute"] + t["h2d"]) + t["server_update"]) / 2 + t["control"] - 1e-12
    assert shared.step_s > free.step_s
    one = predict(m, cluster_from_calibration({**cal, "host_cores": 2}, workers=1), LayoutSpec(1, 1, 1), 512, seq_len=32,
                  served_dtype="float32")
    assert one.step_s == predict(m, cluster_from_calibration(cal, workers=1), LayoutSpec(1, 1, 1), 512, seq_len=32,
                                 served_dtype="float32").step_s  # one worker leaves a core free: no bound


@pytest.mark.parametrize("cluster,model", [("cpu-netns", "OPT-1.3B"), ("cpu-local", "OPT-175B")])
def test_a_cpu_clusters_plan_speaks_of_worker_processes_not_gpus(cluster, model):
    # OPT-175B does not fit cpu-local: the "nothing fits" reason names the memory too
    cpu = zoctl("plan", "--model", model, "--cluster", cluster)
    assert cpu.returncode == 0, cpu.stderr
    for word in ("GPU", "NVLink"):
        assert word not in cpu.stdout, word
    for text in ("host->worker per process", "intra-node link per process", "intra-node gather", "memory per process",
                 "worker memory", "CPU worker process"):
        assert text in cpu.stdout, text
    gpu = zoctl("plan", "--model", model, "--cluster", "h100x8")  # the GPU cluster keeps its words
    for text in ("host->GPU per GPU", "NVLink per GPU", "NVLink gather", "memory per GPU", "GPU memory"):
        assert text in gpu.stdout, text
    with pytest.raises(ValueError, match="cluster x: device 'tpu': expected one of cuda, cpu"):
        on(CLUSTERS[cluster], name="x", device="tpu")
    lay = LayoutSpec(1, 1, 1)  # a layout of the wrong size: the error counts processes
    with pytest.raises(ValueError, match="has 2 workers of 1 process$"):
        predict(MODELS[model], CLUSTERS[cluster], lay, 32768)


# ----------------------------------------------------------------------------- update windows, peers
def test_update_windows_divide_the_server_pass_and_add_the_replay():
    from distzo.perf.model import mean_pending

    m, T = MODELS["OPT-175B"], 2048
    one = predict(m, H100, LayoutSpec(), T, "bfloat16")
    for k in (2, 8, 32):
        p = predict(m, H100, LayoutSpec(), T, "bfloat16", window=k)
        alu = m.params / (H100.server_cores * H100.window_updates_per_s_per_core)
        assert p.terms_s["server_update"] == pytest.approx(max(one.terms_s["server_update"] / k, alu))
        assert p.compute_detail_s["replay"] == pytest.approx(1.5 * (k - 1) * m.params / 8 / H100.replay_params_per_s)
        assert p.host_bytes_per_param_step == pytest.approx(2 + 10 / k)  # DMA reads of 8 sliced fetches + pass / K
        assert p.memory_per_server_host_bytes["second_served_slot"] == pytest.approx(2 * m.params)
        assert p.server_bytes_per_param["sgd"] == 8  # master 4, two 2-byte served slots
    assert mean_pending(1) == 0 and mean_pending(4) == 4.5
    assert "second_served_slot" not in one.memory_per_server_host_bytes and one.compute_detail_s["replay"] == 0
    with pytest.raises(ValueError, match="update window 4"):
        predict(m, H100, LayoutSpec(), T, "bfloat16", optimizer="adam", window=4)


def test_the_plan_recommends_a_window_that_takes_the_update_off_the_critical_path():
    m = MODELS["OPT-175B"]
    today = recommend(m, H100, 2048, "bfloat16", 2048, window=1).prediction
    rec = recommend(m, H100, 2048, "bfloat16", 2048)
    assert today.bottleneck == "server_update" and today.step_s > 6.9
    assert rec.window == 8 and rec.prediction.bottleneck == "compute" and rec.prediction.step_s <= 1.3
    assert rec.prediction.host_bytes_per_param_step <= 3.25
    assert recommend(m, H100, 2048, "bfloat16", 2048, optimizer="momentum").window == 1  # state is not replayed
    # where the update does not bound the step the replay is pure cost: a CPU cluster gets K = 1
    assert recommend(MODELS["OPT-1.3B"], CLUSTERS["cpu-local"], 512, "float32", 64).window == 1


def test_peers_follow_their_formulas():
    from distzo.perf.peers import predict_peers

    m, T = MODELS["OPT-175B"], 2048
    zo2, dist = predict_peers(m, H100, T, "bfloat16")
    link = m.params * 2 / (H100.h2d_gbps * 1e9)
    assert zo2.gpus == 1 and zo2.terms_s["upload"] == pytest.approx(link) == zo2.terms_s["write_back"]
    assert zo2.bottleneck == "upload" and zo2.host_bytes_per_param_step == 4
    assert zo2.step_s > link  # PCIe-bound, plus the pipeline's ends and the fixed per-step latency
    assert dist.gpus == 8 and dist.terms_s["upload"] == pytest.approx(link / 8)
    assert dist.terms_s["gather"] == pytest.approx(m.params * 2 * 7 / 8 / (H100.nvlink_gbps * 1e9))
    ours = recommend(m, H100, T, "bfloat16", 2048).prediction
    assert ours.tokens_per_s > dist.tokens_per_s > zo2.tokens_per_s


def test_zoctl_plan_update_window_and_peers():
    r = zoctl("plan", "--model", "OPT-175B", "--tokens-per-step", "2048", "--peers", "--json")
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["recommended"]["update_window"] == 8 and out["prediction"]["window"] == 8
    assert [p["name"] for p in out["peers"]] == ["ZO2", "DistZO2"]
    text = zoctl("plan", "--model", "OPT-175B", "--tokens-per-step", "2048", "--update-window", "1", "--peers")
    assert text.returncode == 0 and "server.update_window 1" in text.stdout and "ZO2" in text.stdout
    assert "12.00 B per parameter per step" in text.stdout
    bad = zoctl("plan", "--model", "OPT-175B", "--update-window", "0")
    assert bad.returncode == 2 and "--update-window 0" in bad.stderr
    stateful = zoctl("plan", "--model", "OPT-13B", "--optimizer", "adam", "--update-window", "4")
    assert stateful.returncode == 2 and "update window 4" in stateful.stderr
