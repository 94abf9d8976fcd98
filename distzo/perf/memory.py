"""Memory of one step's layout: per GPU (worker device) and per parameter-server host, in bytes.

Memory per GPU is a few blocks, never the model: ``prefetch + 1`` clean blocks, the perturbed
copies of two adjacent blocks for each forward on the GPU (jobs run in lockstep), a tied
embedding kept for the head, activations and a runtime allowance. Memory per server host is
the fp32 master, the 16-bit served copy, the workers' pinned buffers; snapshot copy-on-write
can add up to another fp32 copy (reported separately).

With ``train.target lora`` or ``prefix`` (``targets.py``) only the trainable parameters have
optimizer state and a second served slot; a worker may keep the frozen blocks (``gpu_memory``'s ``kept``).
Used by ``model.predict`` (the prediction's memory) and ``recommend.min_shards`` (the fewest shards that fit).
"""

from __future__ import annotations

from distzo.common.dtypes import ITEMSIZE, STATE_VALUES
from distzo.perf.clusters import ClusterSpec
from distzo.perf.specs import LayoutSpec, ModelSpec
from distzo.perf.targets import FULL, TargetSpec

RUNTIME_BYTES = {"cuda": 1 << 30, "cpu": 256 << 20}  # CUDA context / interpreter and allocator slack (assumption)
FROZEN_GPU_RESERVE = 0.2  # of the device: what gpuworker/feed.py leaves free when it keeps frozen blocks on the GPU
MASTER_BYTES = 4  # the server's fp32 master


def server_bytes_per_param(optimizer: str, served_dtype: str, trainable: bool = True, window: int = 1) -> int:
    """Parameter-server memory per parameter (bytes): the fp32 master, the served copy (none at float32:
    the master is served), with update window > 1 a second served slot (trainable parameters only), and for
    a trainable parameter the optimizer's fp32 state (momentum 1 value, adam 2; distzo/zo/optim.py). A frozen
    parameter (train.target lora's base) has no state."""
    if optimizer not in STATE_VALUES:
        raise ValueError(f"optimizer {optimizer!r}: expected one of {', '.join(STATE_VALUES)}")
    state = 4 * STATE_VALUES[optimizer] if trainable else 0
    second = ITEMSIZE[served_dtype] if trainable and window > 1 else 0
    return MASTER_BYTES + (0 if served_dtype == "float32" else ITEMSIZE[served_dtype]) + second + state


def host_memory(model: ModelSpec, cluster: ClusterSpec, served_dtype: str, shards: int,
                prefetch_blocks: int, optimizer: str = "sgd", target: TargetSpec = FULL,
                window: int = 1) -> tuple[dict[str, float], float]:
    """Bytes per server host of one of ``shards`` shards: (each part and ``total``, the snapshot headroom: what a
    snapshot's copy-on-write may add). KeyError for an unknown dtype or optimizer."""
    b = ITEMSIZE[served_dtype]
    total, trainable = target.total(model), target.trainable(model)
    master = MASTER_BYTES * total / shards
    served = 0.0 if served_dtype == "float32" else b * total / shards
    # K > 1: the second served slot (the published base while the next is written; a float32 copy's slots
    # are the masters of two bases); a frozen block's slots share one buffer
    second = b * trainable / shards if window > 1 else 0.0
    state = 4 * STATE_VALUES[optimizer] * trainable / shards  # trainable blocks only
    pinned_blocks = 1 if model.tied else 0
    pool = (prefetch_blocks + pinned_blocks + 1) * model.largest_block() * b  # gpuworker.runner's BufferPool
    buffers = float(cluster.gpus_per_node * pool)
    mem = {"master_fp32": master, "served_copy": served}
    if second:
        mem["second_served_slot"] = second
    if state:
        mem["optimizer_state"] = state
    mem.update(worker_buffers=buffers, total=master + served + second + state + buffers)
    # a snapshot's copy-on-write copies a block's master and state, of the blocks an update changes
    return mem, MASTER_BYTES * trainable / shards + state


def gpu_memory(model: ModelSpec, cluster: ClusterSpec, layout: LayoutSpec, b: int, cb: int, tokens_per_gpu: float,
               prefetch_blocks: int, target: TargetSpec = FULL, kept: bool = False) -> tuple[dict[str, float], float]:
    """Bytes per GPU (each part and ``total``) and the bytes of frozen blocks kept in pinned host memory instead.

    ``b``, ``cb``: bytes per served and per computed element; ``tokens_per_gpu``: one forward's tokens on a GPU;
    ``kept``: the worker keeps the frozen blocks (train.target lora, no fetch group)."""
    jobs = layout.forwards_per_worker
    streamed = model.largest_block(include_embed=not model.tied)  # a tied embedding stays resident instead
    resident = (prefetch_blocks + 1) * streamed * b
    perturbed = streamed if not target.frozen_base else max(1, target.adapter_params // model.layers)
    copies = 2 * jobs * perturbed * cb  # lockstep: job 0 may be on block b+1 while job 1 is still on b
    tied = model.embed_params * (b + jobs * cb) if model.tied else 0.0
    if target.frozen_base and model.tied:
        tied = 0.0 if kept else model.embed_params * b  # frozen: never perturbed (and kept with the other frozen blocks)
    mlp = model.ffn * (2 if model.gated else 1)
    residual = jobs * tokens_per_gpu * model.hidden * cb
    transient = tokens_per_gpu * max((4 * model.hidden + mlp) * cb, 4 * model.vocab)  # one job computes at a time
    runtime = float(RUNTIME_BYTES.get(cluster.device, RUNTIME_BYTES["cuda"]))
    mem = {"resident_blocks": resident, "perturbed_copies": copies, "tied_embedding": tied,
           "activations": residual + transient, "runtime": runtime}
    host = 0.0
    if kept:  # fetched once, at the served dtype, and kept as gpuworker/feed.py's FrozenBlocks keeps them
        frozen = float(target.frozen(model) * b)
        if cluster.device == "cpu":
            on_device = frozen  # a CPU worker's memory holds them all
        else:  # GPU memory up to what is free less a fifth of the device, the rest in pinned host memory
            on_device = min(frozen, max(0.0, cluster.gpu_memory_bytes * (1 - FROZEN_GPU_RESERVE) - sum(mem.values())))
        mem["frozen_blocks_kept"] = on_device
        host = frozen - on_device
    mem["total"] = sum(mem.values())
    return mem, host
