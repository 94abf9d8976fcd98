"""The host side of the GPU data path, measured on CPU as ratios in one run (issue 12's CPU targets).

    python bench/bench_hostpath.py [--model medium-opt] [--threads 2] [--repeats 7] [--json]

* **fetch**: every block of the model through the shared-memory path (parameter server in its own
  process, seqlock-checked copy split over ``--threads`` threads) into preallocated buffers (the
  worker's BufferPool; pinned on a GPU host, plain here), against the machine's multi-threaded
  memcpy of the same bytes between two private buffers (the best of 1 and ``--threads`` threads).
  Target: >= 0.8x. Served float32 and bfloat16 (the server's segment holds the served copy).
* **update + cast**: the parameter server's update of every block with the 16-bit served copy
  written in the same pass (``BlockStore.apply``, served bfloat16 and float16, ``--threads`` update threads),
  against ``w.add_(z, alpha=-c)`` over the same elements with a precomputed z (torch, same threads):
  axpy reads 8 and writes 4 bytes a parameter, the fused update reads 4 and writes 6. Target
  (Rademacher, the default z): >= 0.5x. Also the update without the cast, and Gaussian z.

Measurements alternate between the two sides of each ratio; each ratio is the median of the
per-pair ratios (this machine is shared and drifts). Results: bench/NOTES.md, section 7.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench_paramserver import start_server  # noqa: E402

from distzo.common.config import JobConfig  # noqa: E402
from distzo.data.catalog import resolve_model  # noqa: E402
from distzo.model.modeling import BlockModel  # noqa: E402
from distzo.zo import generator  # noqa: E402
from distzo.zo.generator import Distribution  # noqa: E402
from distzo.zo.record import Direction, UpdateRecord  # noqa: E402
from paramserver.dataplane import hostcopy  # noqa: E402
from paramserver.dataplane.client import ParamServerClient  # noqa: E402
from paramserver.store import BlockStore  # noqa: E402


def _time(fn) -> float:  # noqa: ANN001
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def bench_fetch(work: Path, model: str, served: str, threads: int, repeats: int) -> dict:
    cfg = JobConfig.from_dict({"model": {"source": model}, "server": {"served_dtype": served, "snapshot_every": 0}})
    proc = start_server(work, cfg, f"fetch-{served}")
    try:
        client = ParamServerClient(proc.info["address"], transport="shm").connect()
        blocks = range(len(client.manifest.blocks))
        sizes = [client.slice_bytes(b)[1] for b in blocks]
        pool = [torch.empty(n, dtype=torch.uint8) for n in sizes]  # the worker's preallocated buffers
        dests = [p.numpy() for p in pool]
        srcs = [np.random.default_rng(b).integers(0, 255, n, dtype=np.uint8) for b, n in enumerate(sizes)]
        total = sum(sizes)

        def fetch() -> None:
            for b in blocks:
                client.fetch_into(b, 0, dests[b])

        def memcpy(t: int) -> float:
            hostcopy.set_copy_threads(t)
            return _time(lambda: [hostcopy.parallel_copy(d, s) for d, s in zip(dests, srcs)])

        for t in (1, threads):  # first touch of every page, and the kernels' pools
            memcpy(t)
        hostcopy.set_copy_threads(threads)
        fetch()
        ratios, t_fetch, t_copy, t_copy1 = [], [], [], []
        for _ in range(repeats):
            one, many = memcpy(1), memcpy(threads)
            hostcopy.set_copy_threads(threads)
            f = _time(fetch)
            best = min(one, many)
            t_copy1.append(one)
            t_copy.append(many)
            t_fetch.append(f)
            ratios.append(best / f)
        client.close()
    finally:
        proc.stop()
    med = statistics.median
    return {"served": served, "bytes": total, "threads": threads, "ratio_to_memcpy": med(ratios),
            "fetch_GBps": total / med(t_fetch) / 1e9, "memcpy_GBps": total / med(t_copy) / 1e9,
            "memcpy_1thread_GBps": total / med(t_copy1) / 1e9}


def bench_update(model: str, threads: int, repeats: int) -> dict:
    model_dir = resolve_model(model, None)
    bm = BlockModel.from_dir(model_dir)
    buffers = bm.load_block_buffers()
    n = bm.manifest.numel
    generator.set_cpu_threads(threads)
    torch.set_num_threads(threads)
    w = torch.from_numpy(np.random.default_rng(0).standard_normal(n).astype(np.float32))
    out = {}
    for dist in (Distribution.RADEMACHER, Distribution.GAUSSIAN):
        z = generator.z_torch(1, 0, n, dist, "cpu")
        stores = {}
        for served in ("bfloat16", "float16", "float32"):
            store = BlockStore(bm.manifest, 0, len(buffers), served, None, f"bench-{served}")
            for b, buf in enumerate(buffers):
                store.set_block(b, buf.numpy(), 0)
            stores[served] = store
        step = {"bfloat16": 0, "float16": 0, "float32": 0}

        def update(served: str) -> None:
            rec = UpdateRecord(step[served], (Direction(7 + step[served], 0.5),), 1e-4, 0.0)
            stores[served].apply(rec, dist)
            step[served] += 1

        update("bfloat16")
        update("float16")
        update("float32")
        w.add_(z, alpha=-1e-4)
        ratios, ratios16, plain = [], [], []
        for _ in range(repeats):
            a = _time(lambda: w.add_(z, alpha=-1e-4))
            u = _time(lambda: update("bfloat16"))
            h = _time(lambda: update("float16"))
            p = _time(lambda: update("float32"))
            ratios.append(a / u)
            ratios16.append(a / h)
            plain.append(a / p)
        out[dist.value] = {"parameters": n, "update_cast_ratio_to_axpy": statistics.median(ratios),
                           "update_cast_f16_ratio_to_axpy": statistics.median(ratios16),
                           "update_only_ratio_to_axpy": statistics.median(plain), "threads": threads}
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="medium-opt")
    ap.add_argument("--threads", type=int, default=2, help="copy/update threads and torch threads for the axpy")
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="distzo-bench-") as tmp:
        fetch = [bench_fetch(Path(tmp), args.model, s, args.threads, args.repeats) for s in ("float32", "bfloat16")]
    update = bench_update(args.model, args.threads, args.repeats)
    result = {"model": args.model, "fetch": fetch, "update": update}
    if args.json:
        print(json.dumps(result, indent=2))
        return
    print(f"host data path, {args.model}, {args.threads} thread(s), median of {args.repeats} interleaved pairs")
    for f in fetch:
        print(f"  fetch served {f['served']:<8} ({f['bytes'] / 2**20:.0f} MiB): {f['fetch_GBps']:.2f} GB/s = "
              f"{f['ratio_to_memcpy']:.2f}x multi-threaded memcpy (memcpy {f['memcpy_GBps']:.2f} GB/s with "
              f"{f['threads']} threads, {f['memcpy_1thread_GBps']:.2f} with 1)  [target >= 0.8x]")
    for d, u in update.items():
        target = "  [target >= 0.5x]" if d == "rademacher" else ""
        print(f"  update+cast {d:<10}: {u['update_cast_ratio_to_axpy']:.2f}x axpy to bfloat16, "
              f"{u['update_cast_f16_ratio_to_axpy']:.2f}x to float16 (update alone "
              f"{u['update_only_ratio_to_axpy']:.2f}x){target}")


if __name__ == "__main__":
    main()
