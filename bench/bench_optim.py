"""Server update cost of each optimizer as ratios to MeZO-SGD's fused update, measured in one run.

    python bench/bench_optim.py [--elements N] [--repeats R] [--threads T] [--dist D] [--json]

For sgd, momentum and adam: one step of the update the parameter server applies to an fp32
block (``distzo.zo.mezo.apply_update``'s kernels: z regenerated from the seed, master, state and
a bf16 served copy written in one pass), over the same elements. Measurements alternate
(sgd, momentum, adam, sgd, ...) and each ratio is the median of per-round ratios, so machine
noise hits every side alike. For scale, also the DRAM bytes each moves per parameter
(``distzo.perf.model.update_traffic_ratio``, what ``zoctl plan`` scales the update term by).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import numpy as np

from distzo.perf.model import update_traffic_ratio
from distzo.zo import generator
from distzo.zo.optim import Optimizer, update_stateful_cpu


def measure(elements: int, repeats: int, threads: int, dist: str) -> dict[str, float]:
    generator.set_cpu_threads(threads)
    rng = np.random.default_rng(0)
    w = {o: rng.standard_normal(elements).astype(np.float32) for o in ("sgd", "momentum", "adam")}
    served = {o: np.empty(elements, np.uint16) for o in w}
    state = {"momentum": np.zeros((elements, 1), np.float32), "adam": np.zeros((elements, 2), np.float32)}
    opts = {"momentum": Optimizer("momentum"), "adam": Optimizer("adam")}

    def step(o: str, t: int) -> float:
        t0 = time.perf_counter()
        if o == "sgd":
            generator.update_cpu(w[o], 0, [t + 1], [1e-7], 0.0, dist, served[o], "bfloat16")
        else:
            update_stateful_cpu(w[o], state[o], 0, t, [t + 1], [0.5], 1e-7, 0.0, opts[o], dist, served[o], "bfloat16")
        return time.perf_counter() - t0

    for o in w:  # compile / warm
        step(o, 0)
    rounds = [{o: step(o, t + 1) for o in w} for t in range(repeats)]
    sgd_s = statistics.median(r["sgd"] for r in rounds)
    out = {"elements": elements, "threads": threads, "distribution": dist, "sgd_seconds": sgd_s,
           "sgd_params_per_s": elements / sgd_s}
    for o in ("momentum", "adam"):
        out[f"{o}_over_sgd_time"] = statistics.median(r[o] / r["sgd"] for r in rounds)
        out[f"{o}_bytes_over_sgd"] = update_traffic_ratio(o, "bfloat16")
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--elements", type=int, default=1 << 24)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--dist", choices=["rademacher", "gaussian"], default="rademacher")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    res = measure(args.elements, args.repeats, args.threads, args.dist)
    if args.json:
        print(json.dumps(res, indent=2))
        return
    print(f"{res['elements']} elements, {res['threads']} thread(s), {res['distribution']} z, bf16 served copy")
    print(f"  sgd       {res['sgd_seconds'] * 1e3:8.1f} ms  ({res['sgd_params_per_s'] / 1e9:.2f} G params/s)")
    for o in ("momentum", "adam"):
        print(f"  {o:<9} {res[f'{o}_over_sgd_time']:8.2f}x sgd's time  ({res[f'{o}_bytes_over_sgd']:.2f}x its DRAM bytes)")


if __name__ == "__main__":
    main()
