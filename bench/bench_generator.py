"""Generator speed as ratios to a plain axpy, measured in one run.

    python bench/bench_generator.py [--elements N] [--repeats R] [--threads T] [--json]

For each distribution: the fused "generate z and apply it" update (``w -= c*z`` over a
float32 slice, ``distzo.zo.generator.update_cpu``) against ``w.add_(x, alpha=-c)`` with a
precomputed z over the same elements. Measurements alternate (axpy, fused, axpy, ...) and
each ratio is the median of per-pair ratios, so machine noise hits both sides alike.
Targets (issue 2): Rademacher >= 0.5x, Gaussian >= 0.1x.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import numpy as np
import torch

from distzo.zo import generator

TARGETS = {"rademacher": 0.5, "gaussian": 0.1}


def _time(fn) -> float:  # noqa: ANN001
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def measure(elements: int, repeats: int, threads: int) -> dict[str, dict[str, float]]:
    torch.set_num_threads(threads)
    generator.set_cpu_threads(threads)
    w_np = np.random.default_rng(0).standard_normal(elements).astype(np.float32)
    w = torch.from_numpy(w_np)
    results = {}
    for dist in ("rademacher", "gaussian"):
        x = generator.z_torch(1, 0, elements, dist, "cpu")
        fused = lambda: generator.update_cpu(w_np, 0, [1], [1e-3], 0.0, dist)  # noqa: E731
        axpy = lambda: w.add_(x, alpha=-1e-3)  # noqa: E731
        fused()
        axpy()
        ratios, t_axpy, t_fused = [], [], []
        for _ in range(repeats):
            a = _time(axpy)
            f = _time(fused)
            t_axpy.append(a)
            t_fused.append(f)
            ratios.append(a / f)
        results[dist] = {
            "ratio_to_axpy": statistics.median(ratios),
            "target": TARGETS[dist],
            "fused_ns_per_element": statistics.median(t_fused) / elements * 1e9,
            "axpy_ns_per_element": statistics.median(t_axpy) / elements * 1e9,
        }
    return results


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--elements", type=int, default=1 << 25, help="float32 elements in the slice (default 2^25 = 128 MiB)")
    ap.add_argument("--repeats", type=int, default=9)
    ap.add_argument("--threads", type=int, default=1, help="threads for both torch and the kernels")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    res = measure(args.elements, args.repeats, args.threads)
    if args.json:
        print(json.dumps({"elements": args.elements, "threads": args.threads, "results": res}, indent=2))
        return
    print(f"generator vs axpy, {args.elements} float32 elements, {args.threads} thread(s), median of {args.repeats}")
    for dist, r in res.items():
        ok = "meets" if r["ratio_to_axpy"] >= r["target"] else "BELOW"
        print(f"  {dist:>10}: {r['ratio_to_axpy']:.3f}x axpy ({ok} target {r['target']}x)  "
              f"fused {r['fused_ns_per_element']:.3f} ns/el, axpy {r['axpy_ns_per_element']:.3f} ns/el")


if __name__ == "__main__":
    main()
