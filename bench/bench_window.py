"""Update windows on this machine, as ratios measured in one run (issue 30; bench/NOTES.md section 9).

    python bench/bench_window.py [--model medium-opt] [--windows 1,2,4,8,16] [--repeats 5] [--threads N] [--json]

* server: the parameter server's store (paramserver/store.py, bf16 served, Rademacher, its update threads =
  cores by default) materializing K records in one pass per block, for each K, interleaved over the repeats:
  wall and CPU seconds per step (the pass over K), and the pass's rate in element-updates per second per core.
  Host bytes per parameter per step by construction: what each pass reads and writes (the fp32 master read
  and written, the served slot written) over K, plus one worker's read of the served copy (the DMA).
  ``update_time_ratio_k8``: wall seconds per step at K = 8 over K = 1. Targets: <= 0.5; bytes <= 3.5.
* worker: one block's perturbed copies (dual: +eps and -eps, bf16 base as served, CPU fp32 forward weights)
  with the mean number of pending records of window K replayed, fused (``forwardweights.replay_block``), against the
  perturbation alone; and a node group of two's alternative, each member replaying its half before the
  gather (a separate pass on the slice) then perturbing the gathered block as usual.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time

import numpy as np
import torch

from distzo.data.presets import preset_dir
from distzo.model.blocks import ITEMSIZE
from distzo.model.modeling import BlockModel
from distzo.perf.model import mean_pending
from distzo.zo import generator
from distzo.zo.forwardweights import perturb_block, replay_block
from distzo.zo.generator import Distribution
from distzo.zo.record import Direction, UpdateRecord
from distzo.zo.served import to_served
from paramserver.store import BlockStore

DIST = Distribution.RADEMACHER
SERVED = "bfloat16"


def records(first: int, count: int) -> list[UpdateRecord]:
    rng = np.random.default_rng(first)
    return [UpdateRecord(t, (Direction(int(rng.integers(0, 1 << 62)), float(rng.normal())),), 1e-6, 0.0)
            for t in range(first, first + count)]


def timed(fn) -> tuple[float, float]:  # noqa: ANN001
    """(wall, process CPU) seconds of fn()."""
    w, c = time.perf_counter(), time.process_time()
    fn()
    return time.perf_counter() - w, time.process_time() - c


def bench_server(model: BlockModel, windows: list[int], repeats: int, threads: int) -> dict[int, dict[str, float]]:
    buffers = model.load_block_buffers()
    params = sum(b.numel() for b in buffers)
    stores = {}
    for k in windows:  # one store per window: each keeps its own slots and versions
        store = BlockStore(model.manifest, 0, len(buffers), SERVED, None, f"bench-k{k}", window=k)
        for b, buf in enumerate(buffers):
            store.set_block(b, buf.numpy(), 0)
        stores[k] = store
    step = {k: 0 for k in windows}
    wall: dict[int, list[float]] = {k: [] for k in windows}
    cpu: dict[int, list[float]] = {k: [] for k in windows}
    for k in windows:  # compile and touch every slot once, off the clock
        stores[k].materialize(records(step[k], k), DIST)
        step[k] += k
    for _ in range(repeats):
        for k in windows:  # interleaved: drift on this shared machine hits every K alike
            w, c = timed(lambda: stores[k].materialize(records(step[k], k), DIST))
            step[k] += k
            wall[k].append(w / k)
            cpu[k].append(c / k)
    item = ITEMSIZE[SERVED]
    out = {}
    for k in windows:
        # by construction: a pass reads and writes every fp32 master element and writes one served slot
        pass_bytes = 4 + 4 + item
        out[k] = {"wall_s_per_step": statistics.median(wall[k]), "cpu_s_per_step": statistics.median(cpu[k]),
                  "pass_bytes_per_param_step": pass_bytes / k,
                  "host_bytes_per_param_step": pass_bytes / k + item,  # + one worker's read of the served copy
                  "updates_per_s_per_core": params * k / (statistics.median(wall[k]) * k * threads)}
    return out


def bench_worker(model: BlockModel, windows: list[int], repeats: int) -> dict[int, dict[str, float]]:
    spec = max(model.manifest.blocks[1:-1], key=lambda s: s.numel)  # a decoder layer
    base = to_served(model.load_block_buffers()[spec.index], SERVED)
    seed, coefs = 12345, [1e-3, -1e-3]
    half = spec.numel // 2
    out = {}
    for k in windows:
        pending = records(0, round(mean_pending(k)))
        alone, fused, sliced = [], [], []
        for rep in range(repeats + 1):
            a = timed(lambda: perturb_block(base, spec.global_offset, seed, DIST, coefs, torch.float32))[0]
            f = timed(lambda: replay_block(spec, base, pending, DIST, seed, coefs, torch.float32))[0]
            s = timed(lambda: replay_block(spec, base[:half], pending, DIST)) [0] if pending else 0.0
            if rep:  # the first round compiles
                alone.append(a)
                fused.append(f)
                sliced.append(s + a)
        out[k] = {"pending": len(pending), "perturb_s": statistics.median(alone), "perturb_replay_s": statistics.median(fused),
                  "replay_ratio": statistics.median(fused) / statistics.median(alone),
                  "slice_then_perturb_s": statistics.median(sliced),
                  "slice_ratio": statistics.median(sliced) / statistics.median(alone)}
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="medium-opt")
    ap.add_argument("--windows", default="1,2,4,8,16")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="server update threads (default: cores)")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    windows = sorted({int(k) for k in args.windows.split(",")})
    if 1 not in windows or 8 not in windows:
        ap.error("--windows must include 1 and 8 (the ratio's two ends)")
    torch.set_num_threads(1)
    model = BlockModel.from_dir(preset_dir(args.model))
    generator.set_cpu_threads(args.threads)
    server = bench_server(model, windows, args.repeats, args.threads)
    generator.set_cpu_threads(1)  # a CPU worker perturbs on one thread (runtime.kernel_threads)
    worker = bench_worker(model, windows, args.repeats)
    result = {"model": args.model, "params": model.manifest.numel, "served_dtype": SERVED, "threads": args.threads,
              "server": server, "worker": worker,
              "update_time_ratio_k8": server[8]["wall_s_per_step"] / server[1]["wall_s_per_step"],
              "update_cpu_ratio_k8": server[8]["cpu_s_per_step"] / server[1]["cpu_s_per_step"],
              "host_bytes_per_param_step_k8": server[8]["host_bytes_per_param_step"]}
    if args.json:
        print(json.dumps(result, indent=2))
        return 0
    print(f"{args.model}: {model.manifest.numel:,} parameters, {SERVED} served, {args.threads} server threads")
    print(f"{'K':>3} {'wall ms/step':>13} {'cpu ms/step':>12} {'host B/param/step':>18} {'G upd/s/core':>13}"
          f" {'worker replay x':>16} {'slice+perturb x':>16}")
    for k in windows:
        s, w = server[k], worker[k]
        print(f"{k:>3} {s['wall_s_per_step'] * 1e3:13.2f} {s['cpu_s_per_step'] * 1e3:12.2f} {s['host_bytes_per_param_step']:18.2f}"
              f" {s['updates_per_s_per_core'] / 1e9:13.2f} {w['replay_ratio']:16.2f} {w['slice_ratio']:16.2f}")
    print(f"update_time_ratio_k8 {result['update_time_ratio_k8']:.2f} (cpu {result['update_cpu_ratio_k8']:.2f}), "
          f"host_bytes_per_param_step_k8 {result['host_bytes_per_param_step_k8']:.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
