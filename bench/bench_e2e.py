"""End-to-end throughput: the reference trainer vs the distributed system, in one run.

    python bench/bench_e2e.py [--model small-opt] [--steps 60] [--layouts dual:1,ddp:2,pertp:2] [--json]

For each layout (name:workers), the in-process reference trainer and a `zoctl up` local
cluster (parameter server, coordinator, CPU workers as processes) train the same config;
both count tokens over their training steps only (no start-up, no eval). Each layout runs
``--repeats`` pairs, alternating which side goes first; the ratio is the median of the
per-pair ratios (this machine's speed drifts between runs). Printed: tokens/s of each and
their ratio, where the distributed step's time goes (the services' own timers), and the
bytes each step moved as a multiple of the model at the served dtype.
Target (issue 7): one worker in dual mode >= 0.9x the reference.

The step-time model (distzo/perf/model.py) is calibrated from micro-measurements on this
machine that are not the runs it predicts: the update kernel over the whole model, a memory
copy of it and gRPC round trips (once), and, right before each distributed run, a clean forward
at its shard size and the perturbation kernel, in as many processes at once as the layout
has workers (they share the cores' memory bandwidth in the real run too). Its predicted step
time is printed beside the measured one, with the median error over the runs (target: within 25%).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from coordinator.cluster.local import LocalCluster  # noqa: E402
from distzo.common.config import JobConfig  # noqa: E402
from distzo.infra.logs import quiet_transformers  # noqa: E402
from distzo.train.reference import ReferenceTrainer  # noqa: E402


def job_config(model: str, steps: int, layout: str, workers: int, cache_dir: str | None, batch: int) -> JobConfig:
    return JobConfig.from_dict({
        "model": {"source": model},
        "train": {"steps": steps, "batch_size": batch, "eval_every": 0},
        "data": {"dev_examples": 8},
        "layout": {"name": layout, "workers": workers},
        "server": {"snapshot_every": 0},
        "runtime": {"cache_dir": cache_dir},
    })


def run_reference(cfg: JobConfig) -> dict:
    trainer = ReferenceTrainer(cfg)
    summary = trainer.train(progress=False)
    return {"tokens_per_second": summary["tokens_per_second"], "train_tokens": summary["train_tokens"],
            "step_seconds": summary["train_tokens"] / summary["tokens_per_second"] / cfg.train.steps}


def run_distributed(cfg: JobConfig, work: Path) -> dict:
    cluster = LocalCluster(cfg, work)
    try:
        cluster.start()
        st = cluster.wait()
        if st.state != "done":
            raise RuntimeError(f"distributed run {st.state}: {st.error}")
        return {
            "tokens_per_second": st.tokens_per_second,
            "train_tokens": st.train_tokens,
            "step_seconds": st.train_seconds / max(1, st.step - st.resumed_from),
            "coordinator": {"assign_s": st.assign_s, "wait_s": st.wait_s, "update_s": st.update_s},
            "workers_summed": {"fetch_s": st.worker_fetch_s, "compute_s": st.worker_compute_s,
                               "wait_s": st.worker_wait_s, "gather_s": st.worker_gather_s, "h2d_s": st.worker_h2d_s},
            "bytes_per_step": st.bytes_per_step,
            "peak_memory_bytes": st.worker_peak_memory_bytes,
        }
    finally:
        cluster.shutdown()


def _compute_rates(raw_cfg: dict, shard: int, barrier) -> tuple[float, float]:  # noqa: ANN001
    """In a worker-like process: what a worker of the layout computes (its perturbed forwards, in
    lockstep, on one shard batch), split into forward FLOP/s and perturbed copies per second."""
    import torch

    from distzo.data.jobdata import JobData
    from distzo.infra.logs import quiet_transformers
    from distzo.model.blockfeed import MemoryFeed
    from distzo.model.forward import ForwardEngine, ForwardJob
    from distzo.model.modeling import BlockModel
    from distzo.train.plan import step_plan
    from distzo.zo import generator
    from distzo.zo.forwardweights import perturb_block
    from distzo.zo.generator import Distribution

    quiet_transformers()
    cfg = JobConfig.from_dict(raw_cfg)
    torch.set_num_threads(cfg.runtime.threads)
    generator.set_cpu_threads(cfg.runtime.kernel_threads)
    generator.warm_up()
    job = JobData.load(cfg)
    model = BlockModel.from_dir(job.model_dir)
    buffers = model.load_block_buffers()
    engine = ForwardEngine(model, cfg.train.distribution)
    P = model.manifest.numel
    examples = [job.train[i] for t in range(4) for i in step_plan(cfg, t, len(job.train)).examples]
    coefs = [1e-3, -1e-3] if cfg.layout.pertp == 1 else [1e-3]  # dual: both signs; PertP: one

    def jobs(batch):  # noqa: ANN001, ANN202
        return [ForwardJob(batch, seed=3, coef=c) for c in coefs]

    engine.run(jobs(job.encoder.train_batch(examples[:shard])), MemoryFeed(buffers))
    barrier.wait()  # every process measures at the same time, as the workers compute at the same time
    dist = Distribution(cfg.train.distribution)
    t = time.perf_counter()
    for _ in range(3):
        for spec, b in zip(model.manifest.blocks, buffers):
            perturb_block(b, spec.global_offset, 3, dist, coefs, torch.float32)
    perturb_s = (time.perf_counter() - t) / 3
    flops, secs, runs = 0.0, 0.0, 0
    for k in range(0, len(examples) - shard + 1, shard):
        batch = job.encoder.train_batch(examples[k:k + shard])
        t = time.perf_counter()
        engine.run(jobs(batch), MemoryFeed(buffers))
        secs += time.perf_counter() - t
        flops += 2 * P * batch.tokens * len(coefs)
        runs += 1
    return flops / (secs - runs * perturb_s), len(coefs) * P / perturb_s


def calibrate_compute(cfg: JobConfig) -> tuple[float, float]:
    """Forward and perturbation rates with as many worker-like processes at once as the layout has."""
    import multiprocessing as mp

    workers = cfg.layout.workers
    ctx = mp.get_context("spawn")
    with ctx.Manager() as manager, ctx.Pool(workers) as pool:
        barrier = manager.Barrier(workers)
        rates = pool.starmap(_compute_rates, [(cfg.model_dump(), cfg.train.batch_size // cfg.layout.ddp, barrier)] * workers)
    return statistics.mean(r[0] for r in rates), statistics.mean(r[1] for r in rates)


def calibrate(cfg: JobConfig) -> dict:
    """Rates for the step-time model (distzo.perf.model) that do not depend on the layout (see distzo.perf.clusters.cluster_from_calibration)."""
    import os
    from concurrent import futures

    import grpc
    import numpy as np
    import torch
    from grpc_health.v1 import health, health_pb2, health_pb2_grpc

    from distzo.data.jobdata import JobData
    from distzo.model.modeling import BlockModel
    from distzo.train.plan import step_plan
    from distzo.zo import generator
    from distzo.zo.generator import Distribution
    from distzo.zo.mezo import apply_update
    from distzo.zo.record import Direction, UpdateRecord

    torch.set_num_threads(cfg.runtime.threads)
    generator.set_cpu_threads(cfg.runtime.kernel_threads)
    generator.warm_up()
    job = JobData.load(cfg)
    model = BlockModel.from_dir(job.model_dir)
    buffers = model.load_block_buffers()
    P = model.manifest.numel

    def timed(fn, repeats: int = 5) -> float:
        fn()
        ts = []
        for _ in range(repeats):
            t = time.perf_counter()
            fn()
            ts.append(time.perf_counter() - t)
        return statistics.median(ts)

    dist = Distribution(cfg.train.distribution)
    rec = UpdateRecord(0, (Direction(7, 0.1),), 1e-6, 0.0)
    update_s = timed(lambda: [apply_update(s, b, rec, dist) for s, b in zip(model.manifest.blocks, buffers)])
    src = np.concatenate([b.numpy().view(np.uint8) for b in buffers])
    dst = np.empty_like(src)
    copy_s = timed(lambda: np.copyto(dst, src))
    server = grpc.server(futures.ThreadPoolExecutor(4))
    health_pb2_grpc.add_HealthServicer_to_server(health.HealthServicer(), server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    with grpc.insecure_channel(f"127.0.0.1:{port}") as ch:
        stub = health_pb2_grpc.HealthStub(ch)
        rpc_s = timed(lambda: stub.Check(health_pb2.HealthCheckRequest(), timeout=5), 50)
    server.stop(0)
    plan_s = timed(lambda: job.shard_batches(step_plan(cfg, 5, len(job.train))))
    return {
        "update_params_per_s": P / update_s,
        "memcpy_bytes_per_s": src.nbytes / copy_s,
        # per step: assignment down, results up, the update RPC, and planning the next step
        "fixed_step_overhead_s": 3 * rpc_s + plan_s,
        "host_cores": os.cpu_count() or 1,
        "params": P,
    }


def predict_step(cal: dict, cfg: JobConfig, tokens_per_step: float, compute: tuple[float, float]) -> float:
    from distzo.data.catalog import resolve_model
    from distzo.model.modeling import BlockModel
    from distzo.perf.clusters import cluster_from_calibration
    from distzo.perf.model import predict
    from distzo.perf.specs import LayoutSpec, ModelSpec

    model = ModelSpec.from_hf_config(BlockModel.from_dir(resolve_model(cfg.model.source, cfg.runtime.cache_dir)).config)
    rates = dict(cal)
    rates["forward_flops_per_s"], rates["perturb_params_per_s"] = compute
    cluster = cluster_from_calibration(rates, workers=cfg.layout.workers)
    layout = LayoutSpec.from_name(cfg.layout.name, cfg.layout.workers, cfg.layout.q)
    seq = max(1, round(tokens_per_step / cfg.train.batch_size))  # the batch's mean attended length
    return predict(model, cluster, layout, seq * cfg.train.batch_size, served_dtype="float32", seq_len=seq).step_s


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="small-opt")
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--layouts", default="dual:1,ddp:2,pertp:2")
    ap.add_argument("--repeats", type=int, default=3, help="reference/distributed pairs per layout")
    ap.add_argument("--cache-dir", default=None)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    quiet_transformers()
    rows = []
    from distzo.data.catalog import resolve_model
    from distzo.model.modeling import BlockModel

    model_bytes = BlockModel.from_dir(resolve_model(args.model, args.cache_dir)).manifest.numel * 4
    specs = [(n, int(w)) for n, w in (x.split(":") for x in args.layouts.split(","))]
    configs = [job_config(args.model, args.steps, n, w, args.cache_dir, args.batch) for n, w in specs]
    cal = calibrate(configs[0])
    with tempfile.TemporaryDirectory(prefix="distzo-e2e-") as tmp:
        for i, ((name, workers), cfg) in enumerate(zip(specs, configs)):
            refs, dists, errors = [], [], []
            for r in range(args.repeats):
                order = ("ref", "dist") if r % 2 == 0 else ("dist", "ref")
                for side in order:
                    if side == "ref":
                        refs.append(run_reference(cfg))
                    else:
                        compute = calibrate_compute(cfg)  # right before each run: the machine drifts
                        run = run_distributed(cfg, Path(tmp) / f"run-{i}-{r}")
                        tokens = run["train_tokens"] / args.steps / 2 / cfg.layout.q  # each example: a + and a - forward
                        run["predicted_step_seconds"] = predict_step(cal, cfg, tokens, compute)
                        run["calibrated_forward_flops_per_s"], run["calibrated_perturb_params_per_s"] = compute
                        errors.append(run["predicted_step_seconds"] / run["step_seconds"] - 1)
                        dists.append(run)
            ratios = [d["tokens_per_second"] / r_["tokens_per_second"] for d, r_ in zip(dists, refs)]
            mid = sorted(range(len(dists)), key=lambda k: dists[k]["tokens_per_second"])[len(dists) // 2]
            ref_mid = sorted(refs, key=lambda x: x["tokens_per_second"])[len(refs) // 2]
            rows.append({"layout": name, "workers": int(workers), "reference": ref_mid, "distributed": dists[mid],
                         "ratio": statistics.median(ratios), "ratios": ratios,
                         "predicted_step_seconds": dists[mid]["predicted_step_seconds"],
                         "prediction_error": statistics.median(errors), "prediction_errors": errors,
                         "bytes_per_step_over_model": dists[mid]["bytes_per_step"] / model_bytes / max(1, int(workers)),
                         "model_bytes": model_bytes})
    result = {"model": args.model, "steps": args.steps, "batch": args.batch, "rows": rows, "time": time.time(),
              "calibration": {k: v for k, v in cal.items()}}
    if args.json:
        print(json.dumps(result, indent=2))
        return
    print(f"end to end, {args.model}, {args.steps} steps of batch {args.batch}, tokens/s over training steps")
    print("calibration: " + ", ".join(f"{r['layout']} forward {r['distributed']['calibrated_forward_flops_per_s'] / 1e9:.1f} GFLOP/s "
                                      f"perturb {r['distributed']['calibrated_perturb_params_per_s'] / 1e6:.0f} M/s" for r in rows)
          + f"; update {cal['update_params_per_s'] / 1e6:.0f} M/s; "
          f"memcpy {cal['memcpy_bytes_per_s'] / 1e9:.1f} GB/s; fixed {cal['fixed_step_overhead_s'] * 1e3:.2f} ms/step; {cal['host_cores']} cores")
    print(f"{'layout':<8}{'workers':>8}{'reference':>11}{'distributed':>13}{'ratio':>8}   step time split (ms per step)")
    for r in rows:
        d, c, w = r["distributed"], r["distributed"]["coordinator"], r["distributed"]["workers_summed"]
        print(f"{r['layout']:<8}{r['workers']:>8}{r['reference']['tokens_per_second']:>11.0f}{d['tokens_per_second']:>13.0f}"
              f"{r['ratio']:>7.2f}x   (pairs {', '.join(f'{x:.2f}' for x in r['ratios'])}) step {d['step_seconds'] * 1e3:.1f} "
              f"[model {r['predicted_step_seconds'] * 1e3:.1f}; error median {r['prediction_error']:+.0%} of "
              f"{', '.join(f'{e:+.0%}' for e in r['prediction_errors'])}] (ref {r['reference']['step_seconds'] * 1e3:.1f}): "
              f"coordinator assign {c['assign_s'] * 1e3:.1f} wait {c['wait_s'] * 1e3:.1f} update {c['update_s'] * 1e3:.1f} | "
              f"workers (summed) fetch {w['fetch_s'] * 1e3:.1f} compute {w['compute_s'] * 1e3:.1f} "
              f"wait {w['wait_s'] * 1e3:.1f} gather {w['gather_s'] * 1e3:.1f} | "
              f"bytes/step/worker {r['bytes_per_step_over_model']:.2f}x model")


if __name__ == "__main__":
    main()
