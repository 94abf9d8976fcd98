"""Parameter-server throughput as ratios, measured in one run, server in its own process.

    python bench/bench_paramserver.py [--model medium-opt] [--repeats 5] [--json]

* fetch: the whole model through gRPC and through shared memory, each against an
  in-process memory copy of the same bytes (np.copyto). Targets: shared memory >= 0.5x the
  copy; gRPC >= 0.5 GB/s.
* update: ApplyUpdate RPC (journal fsync + apply every block) until the last block has the
  new version, in parameters/s, against w.add_(z, alpha=-c) with a precomputed z over the
  same elements. Targets: Rademacher >= 0.5x, Gaussian >= 0.1x.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from distzo.common.config import JobConfig
from distzo.infra.procs import ServiceProcess, python_module
from distzo.zo.generator import z_torch
from distzo.zo.record import Direction, UpdateRecord
from paramserver.dataplane.client import ParamServerClient


def start_server(work: Path, cfg: JobConfig, tag: str) -> ServiceProcess:
    (work / f"{tag}.yaml").write_text(cfg.to_yaml())
    p = ServiceProcess(tag, python_module("paramserver", "--config", str(work / f"{tag}.yaml"), "--data-dir", str(work / tag),
                                          "--listen", "127.0.0.1:0", "--metrics-port", "-1",
                                          "--ready-file", str(work / f"{tag}.ready")), work / f"{tag}.ready", work / f"{tag}.log")
    p.start(timeout_s=300)
    return p


def bench_fetch(client: ParamServerClient, repeats: int) -> dict[str, float]:
    blocks = range(len(client.manifest.blocks))
    bufs = {b: np.empty(client.slice_bytes(b)[1], np.uint8) for b in blocks}
    total = sum(x.nbytes for x in bufs.values())
    src = {b: np.random.default_rng(b).integers(0, 255, bufs[b].nbytes, dtype=np.uint8) for b in blocks}
    out: dict[str, list[float]] = {"copy": [], "shm": [], "grpc": []}
    client_grpc = ParamServerClient(client.shards[0].address, transport="grpc").connect()
    client_shm = ParamServerClient(client.shards[0].address, transport="shm").connect()
    for _ in range(repeats):  # interleaved so drift hits all three alike
        t = time.perf_counter()
        for b in blocks:
            np.copyto(bufs[b], src[b])
        out["copy"].append(time.perf_counter() - t)
        for name, c in (("shm", client_shm), ("grpc", client_grpc)):
            t = time.perf_counter()
            for b in blocks:
                res = c.fetch_into(b, 0, bufs[b])
                assert res.transport == name
            out[name].append(time.perf_counter() - t)
    client_grpc.close()
    client_shm.close()
    med = {k: statistics.median(v) for k, v in out.items()}
    return {
        "model_bytes": total,
        "copy_gb_s": total / med["copy"] / 1e9,
        "shm_gb_s": total / med["shm"] / 1e9,
        "grpc_gb_s": total / med["grpc"] / 1e9,
        "shm_ratio_to_copy": med["copy"] / med["shm"],
        "grpc_ratio_to_copy": med["copy"] / med["grpc"],
    }


def bench_update(work: Path, base: JobConfig, dist: str, repeats: int) -> dict[str, float]:
    cfg = base.with_overrides({"train.distribution": dist, "server.snapshot_every": 0})
    proc = start_server(work, cfg, f"update-{dist}")
    try:
        c = ParamServerClient(proc.info["address"]).connect()
        n = c.manifest.numel
        last = len(c.manifest.blocks) - 1
        w = torch.zeros(n)
        z = z_torch(1, 0, n, dist, "cpu")
        times, axpy = [], []
        for t in range(repeats + 1):
            t0 = time.perf_counter()
            c.apply_update(UpdateRecord(t, (Direction(7 + t, 0.5),), 1e-4, 0.0))
            c.fetch_into(last, t + 1, np.empty(c.slice_bytes(last)[1], np.uint8))  # waits until the last block has it
            if t:  # the first one warms the kernels up
                times.append(time.perf_counter() - t0)
                t0 = time.perf_counter()
                w.add_(z, alpha=-1e-4)
                axpy.append(time.perf_counter() - t0)
        c.close()
    finally:
        proc.stop()
    ratios = [a / u for a, u in zip(axpy, times)]
    return {
        "parameters": n,
        "params_per_s": n / statistics.median(times),
        "axpy_params_per_s": n / statistics.median(axpy),
        "ratio_to_axpy": statistics.median(ratios),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="medium-opt")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=1, help="server update threads and torch threads for the axpy")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory(prefix="distzo-bench-") as tmp:
        work = Path(tmp)
        cfg = JobConfig.from_dict({"model": {"source": args.model}, "server": {"update_threads": args.threads}})
        proc = start_server(work, cfg, "fetch")
        try:
            client = ParamServerClient(proc.info["address"]).connect()
            fetch = bench_fetch(client, args.repeats)
            client.close()
        finally:
            proc.stop()
        update = {d: bench_update(work, cfg, d, args.repeats) for d in ("rademacher", "gaussian")}
    result = {"model": args.model, "threads": args.threads, "fetch": fetch, "update": update}
    if args.json:
        print(json.dumps(result, indent=2))
        return
    mb = fetch["model_bytes"] / 2**20
    print(f"parameter server, {args.model} ({mb:.0f} MiB fp32), server in its own process, median of {args.repeats}")
    print(f"  fetch  shared memory: {fetch['shm_gb_s']:.2f} GB/s = {fetch['shm_ratio_to_copy']:.2f}x memcpy "
          f"({fetch['copy_gb_s']:.2f} GB/s)  [target >= 0.5x]")
    print(f"  fetch  gRPC         : {fetch['grpc_gb_s']:.2f} GB/s = {fetch['grpc_ratio_to_copy']:.2f}x memcpy  [target >= 0.5 GB/s]")
    for d, u in update.items():
        target = 0.5 if d == "rademacher" else 0.1
        print(f"  update {d:<13}: {u['params_per_s'] / 1e6:.0f} M params/s = {u['ratio_to_axpy']:.2f}x axpy "
              f"({u['axpy_params_per_s'] / 1e6:.0f} M/s)  [target >= {target}x]")


if __name__ == "__main__":
    main()
