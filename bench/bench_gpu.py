"""GPU benchmark: distzo streaming vs resident MeZO vs ZO2, side by side on one GPU, against the floor.

For each OPT size (random weights: the real shapes, our generator's N(0, 0.02^2) values stored in
fp16 safetensors, the local tokenizer) and each setting,

- ``mezo``: MeZO's setting, batch 16 x 256 tokens, served (and computed in) fp32 and bf16;
- ``zo2``:  ZO2's own setting, batch 1 x 2048 tokens, fp16 (``--zo2-dtype``),

it runs, one after the other in the same call: **distzo** (``LocalCluster``: parameter server in host
memory, one dual worker on the GPU streaming every block every step), **resident MeZO** (the
reference trainer with the weights resident on the GPU: same engine, same kernels, no streaming)
and **ZO2** (its own ``test/mezo_sgd/hf_opt/test_speed.py``, zo2 method, same size, batch, length and
dtype; see bench/zo2_peer.py). Warm-up steps are excluded; tokens/s is batch tokens over the median
of the timed steps. Also: peak GPU memory (nvidia-smi per process, every side alike; torch's
allocator peak for ours), the worker's time split, host-to-GPU bandwidth during the fetch, and
every step time against the floor (bench/gpu_floor.py).

    python bench/bench_gpu.py --sizes 1.3b,6.7b --zo2 bench/peers/zo2 --zo2-site bench/peers/zo2-site \\
        --json-out bench/results/gpu.json          # the whole GPU check: scripts/gpu_check.sh
    python bench/bench_gpu.py --cpu-smoke          # on CPU, a tiny model: proves the script runs

Rows run in priority order and stop starting when ``--budget-s`` is spent; the table comes last.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import shutil
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import gpu_floor  # noqa: E402
from zo2_peer import GpuMemorySampler, run_zo2  # noqa: E402

from distzo.common.config import JobConfig  # noqa: E402
from distzo.infra.logs import quiet_transformers  # noqa: E402

# OPT family shapes (Zhang et al. 2022, table 1): hidden, layers, heads; "smoke" is ours (CPU smoke run)
OPT_SIZES = {"smoke": (64, 2, 2), "125m": (768, 12, 12), "350m": (1024, 24, 16), "1.3b": (2048, 24, 32),
             "2.7b": (2560, 32, 32), "6.7b": (4096, 32, 32), "13b": (5120, 40, 40), "30b": (7168, 48, 56)}
SETTINGS = {"mezo": (16, 256), "zo2": (1, 2048)}
SMOKE_SETTINGS = {"mezo": (4, 32), "zo2": (1, 96)}
ITEMSIZE = {"float32": 4, "bfloat16": 2, "float16": 2}


def build_random_opt(size: str, out: Path) -> Path:
    """An OPT model directory of the given size with random weights, written block by block (fp16 files)."""
    import numpy as np
    from safetensors.numpy import save_file
    from transformers import AutoTokenizer, OPTConfig

    from distzo.data.presets import preset_dir
    from distzo.model.modeling import BlockModel
    from distzo.zo import generator

    if (out / ".complete").is_file():
        return out
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    hidden, layers, heads = OPT_SIZES[size]
    cfg = OPTConfig(vocab_size=50272, hidden_size=hidden, word_embed_proj_dim=hidden, num_hidden_layers=layers,
                    ffn_dim=4 * hidden, num_attention_heads=heads, max_position_embeddings=2048,
                    pad_token_id=1, bos_token_id=2, eos_token_id=2, dropout=0.0, attention_dropout=0.0)
    bm = BlockModel(cfg)
    generator.set_cpu_threads(os.cpu_count() or 1)
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
            tensors[t.name] = arr.astype(np.float16).reshape(t.shape)
        fname = f"model-block{spec.index:04d}.safetensors"
        save_file(tensors, str(out / fname))
        weight_map.update({name: fname for name in tensors})
    (out / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    cfg.save_pretrained(str(out))
    AutoTokenizer.from_pretrained(str(preset_dir("tiny-opt"))).save_pretrained(str(out))
    (out / ".complete").write_text("ok\n")
    return out


def long_text_task(out: Path, words: int, examples: int) -> Path:
    """JSONL examples long enough to fill every row to the sequence length (rows are cut to it)."""
    import random

    if out.is_file():
        return out
    rng = random.Random(0)
    vocab = ("the a movie film story plot actor scene music ending slow funny dark bright long short good bad "
             "quiet loud old new city night day friend family war love time world life man woman").split()
    lines = [json.dumps({"text": " ".join(rng.choice(vocab) for _ in range(words)), "label": i % 2}) for i in range(examples)]
    out.write_text("\n".join(lines) + "\n")
    return out


def job_config(model_dir: Path, task: Path, batch: int, seq_len: int, steps: int, served: str, device: str,
               cache_dir: Path, window: int = 1) -> JobConfig:
    cpus = os.cpu_count() or 2
    return JobConfig.from_dict({
        "model": {"source": str(model_dir)},
        "data": {"train": str(task), "max_seq_len": seq_len, "dev_examples": 2},
        "train": {"steps": steps, "batch_size": batch, "eval_every": 0, "eval_at_start": False, "lr": 1e-7},
        "server": {"snapshot_every": 0, "snapshot_at_start": False, "served_dtype": served,
                   "update_threads": max(1, cpus - 4), "update_window": window},
        "runtime": {"device": device, "threads": min(4, cpus), "kernel_threads": min(4, cpus), "prefetch_blocks": 2,
                    "cache_dir": str(cache_dir)},
    })


def step_times(run_dir: Path, warmup: int) -> tuple[float, int, list[float]]:
    """(median timed step seconds, batch tokens per step, all step seconds) from a run log's steps.jsonl.

    The log counts the tokens of every forward (dual: the batch twice, at +eps and -eps); tokens/s here
    is MeZO's and ZO2's measure, the batch's tokens per step over the step time."""
    from distzo.run.runlog import read_history

    steps = read_history(run_dir).steps
    times = [float(r["time_s"]) for r in steps]
    durations = [b - a for a, b in zip([0.0] + times, times)]
    timed = durations[warmup:]
    if not timed:
        raise RuntimeError(f"{run_dir}: no timed steps (warm-up {warmup} of {len(durations)})")
    return statistics.median(timed), int(steps[-1]["tokens"]) // 2, durations


def run_distzo(cfg: JobConfig, work: Path, warmup: int) -> dict:
    from coordinator.cluster.local import LocalCluster

    cluster = LocalCluster(cfg, work)
    try:
        cluster.start()
        st = cluster.wait()
        if st.state != "done":
            raise RuntimeError(f"distzo run {st.state}: {st.error}")
    finally:
        cluster.shutdown()
    step_s, tokens, durations = step_times(work, warmup)
    h2d = st.worker_h2d_s
    return {"tokens_per_second": tokens / step_s, "step_seconds": step_s, "tokens_per_step": tokens,
            "step_durations": durations, "transport": "see worker log",
            "split_per_step": {"fetch_s": st.worker_fetch_s, "h2d_s": h2d, "compute_s": st.worker_compute_s,
                               "wait_s": st.worker_wait_s, "update_rpc_s": st.update_s},
            "bytes_per_step": st.bytes_per_step, "h2d_GBps": st.bytes_per_step / h2d / 1e9 if h2d else 0.0,
            "torch_peak_gpu_bytes": st.worker_peak_memory_bytes}


def run_resident(raw_cfg: dict, run_dir: str, warmup: int) -> dict:
    """In a fresh process: all-on-device MeZO (the reference trainer with resident weights)."""
    import torch

    from distzo.train.reference import ReferenceTrainer

    quiet_transformers()
    cfg = JobConfig.from_dict(raw_cfg)
    trainer = ReferenceTrainer(cfg, resident=True)
    cuda = trainer.device.type == "cuda"
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    trainer.train(progress=False, run_dir=run_dir)
    step_s, tokens, durations = step_times(Path(run_dir), warmup)
    return {"tokens_per_second": tokens / step_s, "step_seconds": step_s, "tokens_per_step": tokens,
            "step_durations": durations, "torch_peak_gpu_bytes": torch.cuda.max_memory_allocated() if cuda else 0}


def kernel_rates(elements: int, pending: int = 8) -> dict:
    """Triton perturbation/update kernels against a device copy of the same elements (GPU-only); the update
    windows' replay: ``pending`` records replayed in the perturbation kernel (bf16 base, two bf16 outputs)."""
    import torch

    from distzo.zo.generator import Distribution, perturb_device, update_torch
    from distzo.zo.record import Direction, UpdateRecord
    from distzo.zo.replay import pack, replay_perturb_device

    w = torch.randn(elements, device="cuda")
    out = torch.empty_like(w)
    served = torch.empty(elements, dtype=torch.int16, device="cuda")
    t = lambda fn: gpu_floor._median_time(fn, 5, torch.cuda.synchronize)  # noqa: E731
    copy_s = t(lambda: out.copy_(w))
    res = {"elements": elements, "copy_GBps": 2 * 4 * elements / copy_s / 1e9}
    for dist in (Distribution.RADEMACHER, Distribution.GAUSSIAN):
        res[dist.value] = {
            "perturb_over_copy": copy_s / t(lambda: perturb_device(w, 0, 3, dist, [1e-3], torch.float32)),
            "perturb2_bf16_over_copy": copy_s / t(lambda: perturb_device(w, 0, 3, dist, [1e-3, -1e-3], torch.bfloat16)),
            "update_over_copy": copy_s / t(lambda: update_torch(w, 0, [3], [1e-7], 0.0, dist)),
            "update_cast_over_copy": copy_s / t(lambda: update_torch(w, 0, [3], [1e-7], 0.0, dist, served, "bfloat16"))}
    base = w.to(torch.bfloat16)
    two = torch.empty((2, elements), dtype=torch.bfloat16, device="cuda")
    packed = pack([UpdateRecord(i, (Direction(11 + i, 0.5),), 1e-7, 0.0) for i in range(pending)], False)
    for dist in (Distribution.RADEMACHER, Distribution.GAUSSIAN):
        alone = t(lambda: perturb_device(base, 0, 3, dist, [1e-3, -1e-3], torch.bfloat16))
        fused = t(lambda: replay_perturb_device(base, 0, packed, 3, dist, [1e-3, -1e-3], two, "bfloat16"))
        res[dist.value].update({f"replay{pending}_perturb2_bf16_over_copy": copy_s / fused,
                                f"replay{pending}_over_perturb2": fused / alone,
                                "replay_records_per_s": pending * elements / max(1e-12, fused - alone)})
    return res


def plan_rows(sizes: list[str], settings: list[str], mezo_served: list[str], zo2_dtype: str, sides: list[str],
              windows: list[str] = ("1",)) -> list[dict]:
    """Rows in priority order, so that a short GPU lease measures the targets first: MeZO's setting
    served bf16, then ZO2's own setting, then MeZO's setting at the other dtypes; smaller sizes first;
    within a group distzo (each update window, the larger first: 'auto' is the plan's), then ZO2, then
    resident MeZO (sort is stable)."""
    rows = []
    for size in sizes:
        for setting in settings:
            for served in (mezo_served if setting == "mezo" else [zo2_dtype]):
                for side in sides:
                    for window in (windows if side == "distzo" else ["1"]):
                        rows.append({"size": size, "setting": setting, "dtype": served, "side": side, "window": window})
    side_prio = {"distzo": 0, "zo2": 1, "resident": 2}

    def prio(r: dict) -> tuple:
        group = 0 if (r["setting"], r["dtype"]) == ("mezo", "bfloat16") else 1 if r["setting"] == "zo2" else 2
        return group, r["dtype"], sizes.index(r["size"]), side_prio.get(r["side"], 3), r["window"] == "1"
    return sorted(rows, key=prio)


def recommended_window(model_dir: Path, tokens: int, seq_len: int, dtype: str) -> int:
    """The plan's update window for this model and batch on one H100-class GPU (zoctl plan, one node of one)."""
    from distzo.model.modeldir import read_config
    from distzo.perf.clusters import CLUSTERS, with_overrides
    from distzo.perf.recommend import recommend
    from distzo.perf.specs import ModelSpec

    cluster = with_overrides(CLUSTERS["h100x8"], gpus_per_node=1)
    model = ModelSpec.from_hf_config(read_config(model_dir))
    return recommend(model, cluster, tokens, dtype, seq_len).window


def worker_transport(run_dir: Path, device: str) -> str:
    """How the worker fetched: DMA from registered shared memory, unless its log says registration was refused."""
    logs = "".join(p.read_text(errors="replace") for p in (run_dir / "logs").glob("worker-*.log"))
    if device != "cuda":
        return "shm"
    return "shm-pinned" if "cannot register shared memory" in logs else "shm-direct"


def run_row(row: dict, args: argparse.Namespace, env: dict, sampler: GpuMemorySampler | None) -> dict:
    size, setting, dtype, side = row["size"], row["setting"], row["dtype"], row["side"]
    batch, seq_len = env["settings"][setting]
    model_dir = env["models"][size]
    task = env["tasks"][setting]
    window = recommended_window(model_dir, batch * seq_len, seq_len, dtype) if row["window"] == "auto" else int(row["window"])
    cfg = job_config(model_dir, task, batch, seq_len, args.warmup + args.steps, dtype, env["device"], env["work"] / "cache",
                     window)
    run_dir = env["work"] / f"run-{size}-{setting}-{dtype}-{side}-k{window}"
    shutil.rmtree(run_dir, ignore_errors=True)
    before = sampler.mark() if sampler else None
    t0 = time.perf_counter()
    if side == "distzo":
        out = run_distzo(cfg, run_dir, args.warmup)
        out["transport"] = worker_transport(run_dir, env["device"])
    elif side == "resident":
        with mp.get_context("spawn").Pool(1) as pool:
            out = pool.apply(run_resident, (cfg.model_dump(), str(run_dir), args.warmup))
    else:
        if args.zo2 is None:
            raise RuntimeError("no ZO2 checkout given (--zo2 PATH)")
        run_dir.mkdir(parents=True, exist_ok=True)
        out = run_zo2(Path(args.zo2), Path(args.zo2_site) if args.zo2_site else None, size, batch, seq_len, dtype,
                      args.warmup, args.steps, args.row_timeout_s, run_dir / "zo2.log", extra_env=env.get("zo2_env"))
    out["wall_s"] = time.perf_counter() - t0
    out["nvsmi_peak_gpu_bytes"] = sampler.peak_since(before) if sampler and before is not None else 0
    rates = dict(env["rates"], matmul_flops=env["rates"]["matmul"][f"{size}/{setting}/{dtype}"])
    floor = gpu_floor.step_floor(env["params"][size], env["matmul_params"][size], batch * seq_len, ITEMSIZE[dtype], rates,
                                 window)
    out["floor"] = floor
    out["floor_over_measured"] = floor["floor_s" if side == "distzo" else "resident_floor_s"] / out["step_seconds"]
    shutil.rmtree(run_dir / "server", ignore_errors=True)  # the journal; keep logs and run log
    return {**row, "window": window, "batch": batch, "seq_len": seq_len, **out}


def table(rows: list[dict]) -> str:
    """The short table printed last: one line per (size, setting, dtype), the three sides side by side."""
    groups: dict[tuple, dict] = {}
    for r in rows:  # one line per update window of distzo, the peers' rows beside each
        windows = {x.get("window", "1") for x in rows if x["side"] == "distzo" and
                   (x["size"], x["setting"], x["dtype"]) == (r["size"], r["setting"], r["dtype"])} or {"1"}
        for w in windows if r["side"] != "distzo" else [r.get("window", "1")]:
            groups.setdefault((r["size"], r["setting"], r["dtype"], w), {})[r["side"]] = r
    gib = 2**30
    lines = [f"{'size':>5} {'setting':>12} {'dtype':>8} {'K':>3} | {'distzo tok/s':>12} {'resident':>9} {'ZO2':>9} | "
             f"{'vs res':>6} {'vs ZO2':>6} | {'GPU GiB d/r/z':>15} | {'floor/meas':>10} | {'h2d GB/s':>8} | transport"]
    for (size, setting, dtype, window), g in groups.items():
        d, r, z = g.get("distzo"), g.get("resident"), g.get("zo2")
        tps = lambda x: f"{x['tokens_per_second']:.0f}" if x and "tokens_per_second" in x else "-"  # noqa: E731
        ratio = lambda a, b: f"{a['tokens_per_second'] / b['tokens_per_second']:.2f}" if (  # noqa: E731
            a and b and "tokens_per_second" in a and "tokens_per_second" in b) else "-"
        mem = "/".join(f"{x['nvsmi_peak_gpu_bytes'] / gib:.1f}" if x and x.get("nvsmi_peak_gpu_bytes") else "-" for x in (d, r, z))
        b, s = SETTINGS_SHOWN.get(setting, ("", ""))
        lines.append(f"{size:>5} {setting + f' {b}x{s}':>12} {dtype:>8} {window!s:>3} | {tps(d):>12} {tps(r):>9} {tps(z):>9} | "
                     f"{ratio(d, r):>6} {ratio(d, z):>6} | {mem:>15} | "
                     f"{(d or {}).get('floor_over_measured', float('nan')):>10.2f} | "
                     f"{(d or {}).get('h2d_GBps', float('nan')):>8.1f} | {(d or {}).get('transport', '-')}")
    errors = [f"  {r['size']} {r['setting']} {r['dtype']} {r['side']}: {r['error']}" for r in rows if "error" in r]
    return "\n".join(lines + (["failed rows:"] + errors if errors else []))


SETTINGS_SHOWN: dict[str, tuple[int, int]] = {}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sizes", default="1.3b,6.7b", help=f"comma-separated OPT sizes: {', '.join(OPT_SIZES)}")
    ap.add_argument("--settings", default="mezo,zo2", help="mezo (16 x 256) and/or zo2 (1 x 2048)")
    ap.add_argument("--mezo-served", default="float32,bfloat16", help="served (= compute) dtypes at MeZO's setting")
    ap.add_argument("--zo2-dtype", default="float16", help="dtype at ZO2's setting (ZO2's default fp16)")
    ap.add_argument("--sides", default="distzo,resident,zo2")
    ap.add_argument("--windows", default="1,auto",
                    help="server.update_window of the distzo rows ('auto': the plan's recommendation for the row)")
    ap.add_argument("--steps", type=int, default=10, help="timed steps (after the warm-up)")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--zo2", help="a ZO2 checkout (bench/peers/zo2, git-ignored)")
    ap.add_argument("--zo2-site", help="target directory with the wheels ZO2 pins (bench/peers/zo2-site)")
    ap.add_argument("--work", default="/tmp/distzo-gpu-bench")
    ap.add_argument("--budget-s", type=float, default=420.0, help="start no new row after this many seconds")
    ap.add_argument("--row-timeout-s", type=float, default=300.0)
    ap.add_argument("--no-kernels", action="store_true", help="skip the kernel micro-benchmark")
    ap.add_argument("--cpu-smoke", action="store_true", help="a tiny model on the CPU: proves the script runs")
    ap.add_argument("--json-out")
    args = ap.parse_args()
    quiet_transformers()
    import torch

    start = time.perf_counter()
    smoke = args.cpu_smoke
    device = "cpu" if smoke else "cuda"
    if not smoke and not torch.cuda.is_available():
        raise SystemExit("no CUDA device visible: run on the GPU machine, or pass --cpu-smoke")
    sizes = ["smoke"] if smoke else args.sizes.split(",")
    settings = args.settings.split(",")
    SETTINGS_SHOWN.update(SMOKE_SETTINGS if smoke else SETTINGS)
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("TRITON_CACHE_DIR", str(work / "cache" / "triton"))  # shared with every process we start
    result: dict = {"device": torch.cuda.get_device_name(0) if not smoke else "cpu (smoke)", "steps": args.steps,
                    "warmup": args.warmup, "rows": []}

    def save() -> None:
        if args.json_out:
            Path(args.json_out).write_text(json.dumps(result, indent=1, default=str))

    env = {"device": device, "work": work, "settings": SETTINGS_SHOWN, "models": {}, "tasks": {}, "params": {},
           "matmul_params": {}, "rates": {}}
    for setting in settings:
        _, seq = SETTINGS_SHOWN[setting]
        env["tasks"][setting] = long_text_task(work / f"task-{seq}.jsonl", words=int(seq * 1.3) + 16, examples=600 if seq < 1024 else 64)
    from distzo.model.modeling import BlockModel

    for size in sizes:
        t0 = time.perf_counter()
        env["models"][size] = build_random_opt(size, work / f"opt-{size}")
        manifest = BlockModel.from_dir(env["models"][size]).manifest
        env["params"][size] = manifest.numel
        # the matmul parameters (decoder layers; not the embeddings, whose forward is a lookup)
        env["matmul_params"][size] = sum(b.numel for b in manifest.blocks if b.name.startswith("layer"))
        print(f"opt-{size}: {env['params'][size] / 1e9:.2f}B parameters, ready in {time.perf_counter() - t0:.0f} s", flush=True)
    # the floor's rates, measured here, now
    rates = env["rates"]
    rates["pcie_GBps"] = gpu_floor.pinned_h2d_GBps(torch.device("cuda")) if not smoke else 0.0
    rates["update_params_per_s"] = gpu_floor.update_params_per_s("bfloat16", max(1, (os.cpu_count() or 2) - 4),
                                                                  elements=1 << (20 if smoke else 27))
    rates["matmul"] = {}
    dev = torch.device(device)
    for size in sizes:
        for setting in settings:
            b, s = SETTINGS_SHOWN[setting]
            for dt in (args.mezo_served.split(",") if setting == "mezo" else [args.zo2_dtype]):
                compute = getattr(torch, dt) if not smoke else torch.float32
                rates["matmul"][f"{size}/{setting}/{dt}"] = gpu_floor.matmul_flops(dev, compute, b * s, OPT_SIZES[size][0])
    result["rates"] = rates
    print(f"rates: pinned host-to-GPU {rates['pcie_GBps']:.1f} GB/s, server update+cast "
          f"{rates['update_params_per_s'] / 1e9:.2f} G params/s", flush=True)
    if not smoke and not args.no_kernels:
        result["kernels"] = k = kernel_rates(1 << 28)
        print(f"kernels (2^28 elements, device copy {k['copy_GBps']:.0f} GB/s): " + "; ".join(
            f"{d}: perturb {k[d]['perturb_over_copy']:.2f}x, update {k[d]['update_over_copy']:.2f}x, "
            f"update+cast {k[d]['update_cast_over_copy']:.2f}x copy, replay of 8 + perturb "
            f"{k[d]['replay8_perturb2_bf16_over_copy']:.2f}x copy ({k[d]['replay_records_per_s'] / 1e12:.2f} T records/s)"
            for d in ("rademacher", "gaussian")), flush=True)
    save()
    sampler = GpuMemorySampler().start() if not smoke else None
    sides = args.sides.split(",")
    for row in plan_rows(sizes, settings, args.mezo_served.split(","), args.zo2_dtype, sides, args.windows.split(",")):
        if time.perf_counter() - start > args.budget_s:
            result["rows"].append({**row, "error": "skipped: --budget-s spent"})
            continue
        try:
            out = run_row(row, args, env, sampler)
        except Exception as exc:  # noqa: BLE001 - one failed row must not lose the others
            out = {**row, "error": f"{type(exc).__name__}: {str(exc)[-400:]}"}
        result["rows"].append(out)
        shown = f"{out['tokens_per_second']:.0f} tok/s, step {out['step_seconds'] * 1e3:.0f} ms" if "error" not in out else out["error"]
        print(f"[{time.perf_counter() - start:5.0f} s] opt-{row['size']} {row['setting']} {row['dtype']} {row['side']} "
              f"K={out.get('window', row['window'])}: {shown}",
              flush=True)
        save()
    if sampler:
        sampler.stop()
    result["wall_s"] = time.perf_counter() - start
    save()
    print(table(result["rows"]), flush=True)


if __name__ == "__main__":
    main()
