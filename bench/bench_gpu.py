"""GPU benchmark: the streaming worker against all-on-GPU MeZO, on OPT configurations with random weights.

For each OPT size: build a model directory with random weights (no download: the config's
shapes, our own counter-based generator for the values, safetensors per block, the local
tokenizer), then in one run

- the distributed system on this machine (``LocalCluster``: parameter server in host memory,
  one worker on the GPU that streams every block every step), and
- in-process MeZO with the weights resident on the GPU (``ReferenceTrainer(resident=True)``:
  the same engine and update code, no streaming),

and print tokens/s of each, their ratio, peak GPU memory, and the worker's time split
(fetch from the server, host-to-device, compute, waiting) per step. Also times the perturbation
and update kernels on the GPU against a plain copy of the same bytes.

    python bench/bench_gpu.py --sizes 1.3b,2.7b --steps 8 --json-out results.json

Results and the commands that produced them: bench/RESULTS.md.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import shutil
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench_e2e import run_distributed  # noqa: E402

from distzo.config import JobConfig  # noqa: E402
from distzo.logs import quiet_transformers  # noqa: E402

# OPT family shapes (Zhang et al. 2022, table 1): hidden, layers, heads
OPT_SIZES = {"125m": (768, 12, 12), "350m": (1024, 24, 16), "1.3b": (2048, 24, 32), "2.7b": (2560, 32, 32),
             "6.7b": (4096, 32, 32), "13b": (5120, 40, 40), "30b": (7168, 48, 56)}


def build_random_opt(size: str, out: Path) -> Path:
    """An OPT model directory of the given size with random weights, written block by block."""
    import numpy as np
    from safetensors.numpy import save_file
    from transformers import AutoTokenizer, OPTConfig

    from distzo import generator
    from distzo.modeling import BlockModel
    from distzo.presets import preset_dir

    if (out / ".complete").is_file():
        return out
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    hidden, layers, heads = OPT_SIZES[size]
    cfg = OPTConfig(vocab_size=50272, hidden_size=hidden, word_embed_proj_dim=hidden, num_hidden_layers=layers,
                    ffn_dim=4 * hidden, num_attention_heads=heads, max_position_embeddings=2048,
                    pad_token_id=1, bos_token_id=2, eos_token_id=2, dropout=0.0, attention_dropout=0.0)
    bm = BlockModel(cfg)
    generator.set_cpu_threads(16)
    weight_map = {}
    for spec in bm.manifest.blocks:
        tensors = {}
        for t in spec.tensors:
            n = int(np.prod(t.shape))
            if t.name.endswith("layer_norm.weight"):
                arr = np.ones(n, np.float32)
            elif t.name.endswith(".bias"):
                arr = np.zeros(n, np.float32)
            else:  # N(0, 0.02^2), OPT's initializer scale
                arr = generator.fill_z(np.empty(n, np.float32), 7, spec.global_offset + t.offset, "gaussian")
                arr *= 0.02
            tensors[t.name] = arr.reshape(t.shape)
        fname = f"model-block{spec.index:04d}.safetensors"
        save_file(tensors, str(out / fname))
        weight_map.update({name: fname for name in tensors})
    (out / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    cfg.save_pretrained(str(out))
    AutoTokenizer.from_pretrained(str(preset_dir("tiny-opt"))).save_pretrained(str(out))
    (out / ".complete").write_text("ok\n")
    return out


def job_config(model_dir: Path, steps: int, batch: int, served: str) -> JobConfig:
    return JobConfig.from_dict({
        "model": {"source": str(model_dir)},
        "train": {"steps": steps, "batch_size": batch, "eval_every": 0, "lr": 1e-7},
        "data": {"dev_examples": 8},
        "server": {"snapshot_every": 0, "served_dtype": served, "update_threads": 12},
        "runtime": {"device": "cuda", "threads": 4, "kernel_threads": 4, "prefetch_blocks": 2},
    })


def run_resident_mezo(raw_cfg: dict) -> dict:
    """In a fresh process: all-on-GPU MeZO (weights resident on the GPU)."""
    import torch

    from distzo.reference import ReferenceTrainer

    quiet_transformers()
    cfg = JobConfig.from_dict(raw_cfg)
    trainer = ReferenceTrainer(cfg, resident=True)
    torch.cuda.reset_peak_memory_stats()
    summary = trainer.train(progress=False)
    return {"tokens_per_second": summary["tokens_per_second"], "final_loss": summary["final_loss"],
            "peak_gpu_bytes": torch.cuda.max_memory_allocated(),
            "step_seconds": summary["train_tokens"] / summary["tokens_per_second"] / cfg.train.steps}


def kernel_rates(elements: int) -> dict:
    """The GPU perturbation and update kernels (Triton for Rademacher, the torch path for Gaussian)
    against a device copy of the same bytes (a copy reads and writes each element once, as they do)."""
    import torch

    from distzo.generator import Distribution, perturb_device, update_torch

    w = torch.randn(elements, device="cuda")
    out = torch.empty_like(w)

    def timed(fn) -> float:  # noqa: ANN001
        fn()
        torch.cuda.synchronize()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(5):
            fn()
        end.record()
        torch.cuda.synchronize()
        return start.elapsed_time(end) / 5 / 1e3

    copy_s = timed(lambda: out.copy_(w))
    res = {"elements": elements, "copy_GBps": 2 * 4 * elements / copy_s / 1e9}
    for dist in (Distribution.RADEMACHER, Distribution.GAUSSIAN):
        p = timed(lambda: perturb_device(w, 0, 3, dist, [1e-3], torch.float32))
        u = timed(lambda: update_torch(w, 0, [3], [1e-7], 0.0, dist))
        res[dist.value] = {"perturb_over_copy": copy_s / p, "update_over_copy": copy_s / u,
                           "perturb_elements_per_s": elements / p, "update_elements_per_s": elements / u}
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sizes", default="1.3b", help=f"comma-separated OPT sizes: {', '.join(OPT_SIZES)}")
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--served", default="float32,bfloat16", help="served dtypes for the distributed runs")
    ap.add_argument("--work", default="/tmp/distzo-gpu-bench")
    ap.add_argument("--no-mezo", action="store_true", help="skip the all-on-GPU baseline")
    ap.add_argument("--json-out")
    args = ap.parse_args()
    quiet_transformers()
    import torch

    work = Path(args.work)
    result = {"device": torch.cuda.get_device_name(0), "steps": args.steps, "batch": args.batch, "rows": []}
    result["kernels"] = kernel_rates(1 << 28)
    k = result["kernels"]
    print(f"kernels on {result['device']} (2^28 elements): copy {k['copy_GBps']:.0f} GB/s; " + "; ".join(
        f"{d}: perturb {k[d]['perturb_over_copy']:.2f}x copy, update {k[d]['update_over_copy']:.2f}x copy"
        for d in ("rademacher", "gaussian")), flush=True)
    ctx = mp.get_context("spawn")
    for size in args.sizes.split(","):
        t0 = time.perf_counter()
        model_dir = build_random_opt(size, work / f"opt-{size}")
        print(f"opt-{size}: built in {time.perf_counter() - t0:.0f} s", flush=True)
        for served in args.served.split(","):
            cfg = job_config(model_dir, args.steps, args.batch, served)
            t0 = time.perf_counter()
            dist = run_distributed(cfg, work / f"run-{size}-{served}")
            row = {"size": size, "served": served, "distributed": dist, "wall_s": time.perf_counter() - t0}
            if not args.no_mezo:
                with ctx.Pool(1) as pool:
                    row["mezo"] = pool.apply(run_resident_mezo, (cfg.model_dump(),))
                row["ratio"] = dist["tokens_per_second"] / row["mezo"]["tokens_per_second"]
            result["rows"].append(row)
            w = dist["workers_summed"]
            mezo = row.get("mezo")
            print(f"opt-{size} served {served}: distributed {dist['tokens_per_second']:.0f} tok/s, step "
                  f"{dist['step_seconds'] * 1e3:.0f} ms (fetch {w['fetch_s'] * 1e3:.0f}, h2d {w['h2d_s'] * 1e3:.0f}, "
                  f"compute {w['compute_s'] * 1e3:.0f}, wait {w['wait_s'] * 1e3:.0f}; server update "
                  f"{dist['coordinator']['update_s'] * 1e3:.0f}), peak GPU {dist['peak_memory_bytes'] / 2**30:.2f} GiB"
                  + (f" | resident MeZO {mezo['tokens_per_second']:.0f} tok/s, step {mezo['step_seconds'] * 1e3:.0f} ms, "
                     f"peak GPU {mezo['peak_gpu_bytes'] / 2**30:.2f} GiB | ratio {row['ratio']:.2f}x" if mezo else ""),
                  flush=True)
        if args.json_out:
            Path(args.json_out).write_text(json.dumps(result, indent=1))
    if args.json_out:
        Path(args.json_out).write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
