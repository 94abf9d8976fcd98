"""The physical floor of a training step, from rates measured on the machine the benchmark runs on.

Per step (dual forwards, one GPU, model of P parameters, T tokens per forward), bench/NOTES.md §7:

    host->GPU    P x bytes(served dtype) / pinned host-to-device bandwidth
    compute      2 forwards x 2 x P_layers x T FLOPs / matmul rate (the model's own GEMM shape, compute
                 dtype; P_layers: the decoder layers' parameters, attention's T^2 terms left out)
    server       P / update rate (fused Rademacher update + served cast over a model-sized buffer, the
                 server's update threads: reads and writes the fp32 master, writes the served copy)
    floor        max of the three (the system pipelines them block by block)

Every GPU figure is reported beside ``floor / measured`` (1.0 = at the floor).
"""

from __future__ import annotations

import statistics
import time

import numpy as np
import torch

from distzo.model.blocks import BlockSpec, TensorSpec
from distzo.zo import generator
from distzo.zo.generator import Distribution
from distzo.zo.mezo import apply_update
from distzo.zo.record import Direction, UpdateRecord


def _median_time(fn, repeats: int, sync) -> float:  # noqa: ANN001
    fn()
    sync()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def pinned_h2d_GBps(device: torch.device, nbytes: int = 1 << 30) -> float:
    """Host-to-device copy from pinned memory (GPU-only)."""
    host = torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)
    dev = torch.empty(nbytes, dtype=torch.uint8, device=device)
    s = _median_time(lambda: dev.copy_(host, non_blocking=True), 5, torch.cuda.synchronize)
    return nbytes / s / 1e9


def matmul_flops(device: torch.device, dtype: torch.dtype, tokens: int, hidden: int) -> float:
    """FLOP/s of [tokens, hidden] x [hidden, 4 hidden] (the MLP's GEMM) in ``dtype``."""
    a = torch.randn(tokens, hidden, device=device).to(dtype)
    b = torch.randn(hidden, 4 * hidden, device=device).to(dtype)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    s = _median_time(lambda: a @ b, 5, sync)
    return 2 * tokens * hidden * 4 * hidden / s


def update_params_per_s(served_dtype: str, threads: int, elements: int = 1 << 27) -> float:
    """The server's fused update (+ served cast) over one buffer, Rademacher z, ``threads`` threads."""
    generator.set_cpu_threads(threads)
    w = torch.from_numpy(np.random.default_rng(0).standard_normal(elements).astype(np.float32))
    served = np.empty(elements, np.uint16) if served_dtype != "float32" else None
    spec = BlockSpec(index=0, name="bench", global_offset=0,
                     tensors=(TensorSpec(name="w", shape=(elements,), offset=0, decay=False),))
    step = [0]

    def update() -> None:
        apply_update(spec, w, UpdateRecord(step[0], (Direction(step[0] + 1, 0.5),), 1e-6, 0.0), Distribution.RADEMACHER,
                     served, served_dtype)
        step[0] += 1

    return elements / _median_time(update, 3, lambda: None)


def step_floor(params: int, matmul_params: int, tokens_per_forward: int, itemsize: int, rates: dict,
               window: int = 1) -> dict:
    """The three bounds of a streaming step and their max (seconds); ``rates``: pcie_GBps, matmul_flops,
    update_params_per_s. ``matmul_params``: the decoder layers' parameters (an embedding's forward is a
    lookup); attention's T^2 terms are left out, so the compute bound is a lower bound. ``window``:
    server.update_window K, one server pass per K steps (its ALU floor and the replay are left out)."""
    h2d = params * itemsize / (rates["pcie_GBps"] * 1e9) if rates.get("pcie_GBps") else 0.0
    compute = 2 * 2 * matmul_params * tokens_per_forward / rates["matmul_flops"]
    server = params / rates["update_params_per_s"] / window
    return {"h2d_s": h2d, "compute_s": compute, "server_s": server, "floor_s": max(h2d, compute, server),
            "resident_floor_s": compute}
