"""The step-time model as code: what one MeZO step costs and where the time goes.

A step streams the model block by block through every GPU while the parameter server applies
the previous update block by block, so the resources work at the same time and the step is
paced by the slowest one, not by their sum. Per step, for a model of P parameters, T tokens,
``workers = pertp x ddp x q`` and b bytes per served element:

* compute: ``q x 2 forwards x 2·P·T`` FLOPs split over all GPUs, at ``gpu_tflops x mfu``, plus
  making the perturbed copies of every block (one per forward a GPU runs);
* host->GPU: each GPU fetches ``P·b / f`` (f GPUs share one fetch, default the whole node);
* NVLink: each GPU receives the other ``(f-1)/f`` of every block in the node's all-gather;
* network: weight bytes between hosts; none with a server replica on every node (only journal
  records travel), ``P·b`` into each node from the primary without replicas;
* server update: ``P·q / shards`` values of z generated and applied (one axpy) per host;
* control: the batch (9 bytes a token: int32 ids, int8 mask, int32 labels) and a few hundred
  bytes per worker, plus the fixed per-step latency (RPC round trips, journal fsync).

Update windows (``server.update_window`` K, DESIGN.md section 12): the server materializes K updates
in one pass, so its term is the memory pass over K, bounded below by the pass's integer/ALU work
(``P·q / (server_cores x window_updates_per_s_per_core)`` per step); the workers replay on average
1.5·(K - 1) pending records per block (``mean_pending``), on their 1/f slice before the gather, at
``replay_params_per_s``; K > 1 keeps a second served slot in host memory. ``host_dram`` (when the
cluster gives ``host_dram_gbps``): everything that reads or writes one host's DRAM per step, the DMA
reads of its node's fetches and its replica's update pass over K, shared by both; it is a bound on the
step, not a pipeline stage (its bytes are the h2d and server-update terms' own).

``floor_s`` is the floor, the largest term. The prediction ``step_s`` adds what does not
overlap: the pipeline fill (one block's worth of each stage other than the slowest: block 0 is
fetched before its forward starts) and the control round (the next step needs g of this one).
``sum_s`` is the no-overlap upper bound, so ``floor_s <= step_s <= sum_s``.

``train.target lora`` (``distzo/perf/targets.py``): of the model's P parameters, the frozen base
(P) and the adapters (A) are all held by the server as fp32 master and served copy, but only
the A trainable ones get optimizer state and are updated; a worker fetches the frozen blocks once
and keeps them in its memory at the served dtype (not in fetch groups of f > 1, whose members'
all-gathers must stay paired: they fetch every block every step), so per step only A·b travels,
A is perturbed and A is updated; a forward computes 2·(P + A) FLOPs per token.

Memory per GPU and per server host is in ``memory.py``, choosing a layout and update window by these
predictions in ``recommend.py``; the model and layout descriptions it is applied to are in ``specs.py``,
the clusters in ``clusters.py``. On a CPU cluster the "GPUs" are worker processes, host->GPU is
host->worker and NVLink the link inside a node; ``ClusterSpec.wording`` says each in the cluster's
words (the terms keep their keys).
Units: seconds, bytes, bandwidths in GB/s = 1e9 bytes/s (a 400 Gb/s NIC is 50 GB/s).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from distzo.common.dtypes import ITEMSIZE, STATE_VALUES
from distzo.common.errors import counted
from distzo.perf.clusters import WORDING, ClusterSpec, GiB, Wording
from distzo.perf.memory import MASTER_BYTES, gpu_memory, host_memory, server_bytes_per_param
from distzo.perf.specs import LayoutSpec, ModelSpec
from distzo.perf.targets import FULL, TargetSpec

BATCH_BYTES_PER_TOKEN = 9  # protos BatchData: int32 input_ids + int8 attention_mask + int32 labels
CONTROL_BYTES_PER_WORKER = 512  # assignment header + loss report (assumption: a few hundred bytes)
UPDATE_RECORD_BYTES = 128  # one journal record (step, seed, g, lr) per server host


# ----------------------------------------------------------------------------- prediction
TERMS = ("compute", "h2d", "nvlink", "network", "server_update", "host_dram", "control")
STREAMING_TERMS = ("compute", "h2d", "nvlink", "network", "server_update")  # overlap each other


@dataclass(frozen=True)
class Prediction:
    """One step of one layout on one cluster: terms (s), bytes per link, memory (bytes), fit."""

    model: str
    cluster: str
    layout: LayoutSpec
    tokens_per_step: int
    seq_len: int
    served_dtype: str
    compute_dtype: str
    shards: int
    gpus_per_worker: int
    fetch_group: int
    terms_s: dict[str, float]
    compute_detail_s: dict[str, float]
    floor_s: float
    fill_s: float
    step_s: float
    sum_s: float
    bottleneck: str
    tokens_per_s: float
    bytes: dict[str, float]
    memory_per_gpu_bytes: dict[str, float]
    memory_per_server_host_bytes: dict[str, float]
    snapshot_headroom_bytes: float
    gpu_memory_bytes: int
    host_memory_bytes: int
    whole_model_bytes: float
    assumptions: tuple[str, ...] = field(default=())
    optimizer: str = "sgd"
    server_bytes_per_param: dict[str, int] = field(default_factory=dict)  # each optimizer, per trainable parameter
    device: str = "cuda"  # the cluster's: what its worker devices, links and memory are called (wording)
    target: str = "full"  # train.target
    trainable_params: int = 0  # perturbed, updated, with optimizer state
    frozen_params: int = 0  # never change: fetched once per worker (train.target lora's base)
    server_bytes_per_frozen_param: int = 0  # fp32 master + served copy, no optimizer state
    server_memory_by_optimizer: dict[str, float] = field(default_factory=dict)  # master + served + state per server host
    window: int = 1  # server.update_window K
    host_bytes_per_param_step: float = 0.0  # one host's DRAM traffic per step per model parameter: DMA reads + update / K

    @property
    def wording(self) -> Wording:
        return WORDING[self.device]

    @property
    def fits_gpu(self) -> bool:
        return self.memory_per_gpu_bytes["total"] <= self.gpu_memory_bytes

    @property
    def fits_host(self) -> bool:
        return self.memory_per_server_host_bytes["total"] <= self.host_memory_bytes

    @property
    def fits_host_with_snapshot(self) -> bool:
        return self.memory_per_server_host_bytes["total"] + self.snapshot_headroom_bytes <= self.host_memory_bytes

    @property
    def fits(self) -> bool:
        return self.fits_gpu and self.fits_host

    @property
    def whole_model_fits_gpu(self) -> bool:
        """Whether the model at the served dtype would fit one GPU at all (it never needs to)."""
        return self.whole_model_bytes <= self.gpu_memory_bytes

    def why_not_fits(self) -> str:
        parts = []
        if not self.fits_gpu:
            parts.append(f"{self.wording.memory} {self.memory_per_gpu_bytes['total'] / GiB:.1f} GiB > "
                         f"{self.gpu_memory_bytes / GiB:.1f} GiB")
        if not self.fits_host:
            parts.append(f"server host memory {self.memory_per_server_host_bytes['total'] / GiB:.0f} GiB > "
                         f"{self.host_memory_bytes / GiB:.0f} GiB")
        return "; ".join(parts)

    def to_dict(self) -> dict[str, Any]:
        out = {k: v for k, v in self.__dict__.items() if k != "layout"}
        out["layout"] = self.layout.to_dict()
        out["assumptions"] = list(self.assumptions)
        out.update(fits_gpu=self.fits_gpu, fits_host=self.fits_host, fits=self.fits,
                   fits_host_with_snapshot=self.fits_host_with_snapshot, whole_model_fits_gpu=self.whole_model_fits_gpu)
        return out


def valid_shards(cluster: ClusterSpec) -> list[int]:
    """Shard counts the cluster can host: shards x replicas = nodes with replicas, else shards <= nodes."""
    n = cluster.nodes
    return [s for s in range(1, n + 1) if not cluster.replicas or n % s == 0]


def _network_bytes(params: int, cluster: ClusterSpec, b: int, shards: int) -> tuple[float, float]:
    """Bytes per step of ``params`` fetched parameters into the worst node and out of each server host (shard copy)."""
    n, s = cluster.nodes, shards
    groups = cluster.gpus_per_node // cluster.fetch_gpus  # each fetch group on a node pulls its own copy
    shard_bytes = params * b / s
    copies = n // s if cluster.replicas else 1  # hosts holding each shard
    every_node_hosts = cluster.replicas or n == s
    inbound = params * b * ((1 - 1 / s) if every_node_hosts else 1.0) * groups
    outbound = shard_bytes * (n - copies) / copies * groups
    return inbound, outbound


def update_traffic_ratio(optimizer: str, served_dtype: str) -> float:
    """DRAM bytes of one update per parameter with ``optimizer`` over sgd's: read+write of the master, its
    state, and the served copy written (the factor the sgd-calibrated server-update rate is scaled by)."""
    served = 0 if served_dtype == "float32" else ITEMSIZE[served_dtype]
    sgd = 2 * MASTER_BYTES + served
    return (sgd + 2 * 4 * STATE_VALUES[optimizer]) / sgd


def update_pass_bytes(optimizer: str, served_dtype: str) -> int:
    """DRAM bytes per parameter of one materializing pass: the fp32 master read and written, its optimizer
    state read and written, the served copy written (with a float32 copy and K > 1 the pass reads one slot and
    writes the other: the same 8 bytes)."""
    served = 0 if served_dtype == "float32" else ITEMSIZE[served_dtype]
    return 2 * MASTER_BYTES + served + 2 * 4 * STATE_VALUES[optimizer]


def mean_pending(window: int) -> float:
    """Records a step's workers replay on average: t - base_version(t, K) runs over K - 1 .. 2K - 2."""
    return 1.5 * (window - 1)


def _check(model: ModelSpec, cluster: ClusterSpec, layout: LayoutSpec, tokens_per_step: int, served_dtype: str,
           seq_len: int, shards: int) -> None:
    if served_dtype not in ITEMSIZE:
        raise ValueError(f"served dtype {served_dtype!r}: expected one of {', '.join(ITEMSIZE)}")
    if layout.workers != cluster.workers:
        raise ValueError(f"layout {layout.name} (pertp={layout.pertp} ddp={layout.ddp} q={layout.q}) has "
                         f"{counted(layout.workers, 'worker')}; cluster {cluster.name} has {counted(cluster.workers, 'worker')} of "
                         f"{counted(cluster.worker_gpus, cluster.wording.unit)}")
    if seq_len < 1 or tokens_per_step < seq_len or tokens_per_step % seq_len:
        raise ValueError(f"tokens per step {tokens_per_step} must be a positive multiple of the sequence length {seq_len}")
    sequences = tokens_per_step // seq_len
    if sequences % layout.ddp:
        raise ValueError(f"{sequences} sequences per step cannot be cut into {layout.ddp} equal data shards")
    if shards not in valid_shards(cluster):
        how = "divide the node count" if cluster.replicas else "be at most the node count"
        raise ValueError(f"{shards} server shards on {cluster.nodes} nodes: shards must {how} (valid: {valid_shards(cluster)})")


def predict(model: ModelSpec, cluster: ClusterSpec, layout: LayoutSpec, tokens_per_step: int,
            served_dtype: str = "bfloat16", seq_len: int = 2048, shards: int = 1,
            prefetch_blocks: int = 2, optimizer: str = "sgd", target: TargetSpec = FULL,
            window: int = 1) -> Prediction:
    """Every term of one step, the floor, the prediction, bytes per link and memory per GPU and host.

    ``optimizer``: the server's update rule (sgd, momentum, adam): its state is host memory, and its
    update moves more bytes (the server-update term is scaled by ``update_traffic_ratio``).
    ``target``: what is trained (``distzo/perf/targets.py``; the module docstring says what a frozen base changes).
    ``window``: server.update_window K (the module docstring says what it changes; ValueError below 1, or
    above 1 with a stateful optimizer, which the job config refuses too)."""
    _check(model, cluster, layout, tokens_per_step, served_dtype, seq_len, shards)
    server_bytes_per_param(optimizer, served_dtype)  # a bad name is a ValueError here
    if window < 1 or (window > 1 and STATE_VALUES[optimizer]):
        raise ValueError(f"update window {window}: expected an integer >= 1, and 1 with optimizer {optimizer} "
                         "(its per-parameter state is not replayed by the workers)")
    T, b = tokens_per_step, ITEMSIZE[served_dtype]
    P, A, frozen = target.total(model), target.trainable(model), target.frozen(model)
    cpu = cluster.device == "cpu"
    compute_dtype = "float32" if cpu or served_dtype == "float32" else served_dtype
    cb = ITEMSIZE[compute_dtype]
    gpus = cluster.nodes * cluster.gpus_per_node
    g, f = cluster.worker_gpus, cluster.fetch_gpus
    kept = bool(frozen) and f == 1  # a worker keeps the frozen blocks (not in fetch groups: feed.py)
    fetched = P - frozen if kept else P  # parameters fetched per step
    tokens_per_gpu = T / (layout.ddp * g)
    gpu_mem, frozen_in_host = gpu_memory(model, cluster, layout, b, cb, tokens_per_gpu, prefetch_blocks, target, kept)

    tflops = cluster.gpu_tflops if cb == 2 else (cluster.gpu_tflops_fp32 or cluster.gpu_tflops)
    forward_s = layout.q * 2 * 2 * P * T / gpus / (tflops * 1e12 * cluster.mfu)
    perturb_s = layout.forwards_per_worker * A / cluster.perturb_params_per_s  # every GPU perturbs the trainable blocks
    replay_s = mean_pending(window) * A / f / cluster.replay_params_per_s  # on its slice, before the gather

    model_bytes = P * b
    h2d_gpu = fetched * b / f + frozen_in_host  # frozen blocks kept in pinned host memory: copied over at each use
    nvlink_gpu = fetched * b * (f - 1) / f
    net_in, net_out = _network_bytes(fetched, cluster, b, shards)
    hosts = cluster.nodes if cluster.replicas else shards
    control_bytes = (layout.workers * (CONTROL_BYTES_PER_WORKER + BATCH_BYTES_PER_TOKEN * T / layout.ddp)
                     + hosts * UPDATE_RECORD_BYTES * layout.q)

    one_pass_s = A / shards * layout.q / cluster.server_update_params_per_s * update_traffic_ratio(optimizer, served_dtype)
    window_alu_s = A / shards * layout.q / (cluster.server_cores * cluster.window_updates_per_s_per_core)
    update_bytes = A / shards * update_pass_bytes(optimizer, served_dtype) / window  # per step
    host_bytes = h2d_gpu * cluster.gpus_per_node + update_bytes  # one host: its node's DMA reads, its replica's pass
    terms = {
        "compute": forward_s + perturb_s + replay_s,
        "h2d": h2d_gpu / (cluster.h2d_gbps * 1e9),
        "nvlink": nvlink_gpu / (cluster.nvlink_gbps * 1e9),
        "network": max(net_in, net_out) / (cluster.network_gbps * 1e9),
        "server_update": one_pass_s if window == 1 else max(one_pass_s / window, window_alu_s),
        "host_dram": host_bytes / (cluster.host_dram_gbps * 1e9) if cluster.host_dram_gbps else 0.0,
        "control": control_bytes / (cluster.network_gbps * 1e9) + cluster.fixed_step_overhead_s,
    }
    streaming = max(terms[t] for t in STREAMING_TERMS)
    fill = (sum(terms[t] for t in STREAMING_TERMS) - streaming) / model.num_blocks  # the other stages' first/last block
    step = max(streaming + fill, terms["host_dram"]) + terms["control"]
    if cpu and cluster.host_cores:
        # one CPU host: every worker's compute and fetch copy, and the server's update, share its cores
        cpu_work = layout.workers * (terms["compute"] + terms["h2d"] + terms["nvlink"]) + terms["server_update"]
        step = max(step, cpu_work / cluster.host_cores + terms["control"])
    host_mem, headroom = host_memory(model, cluster, served_dtype, shards, prefetch_blocks, optimizer, target, window)
    if frozen_in_host:  # every worker of a node keeps its own pinned copy of what its GPU has no room for
        host_mem["worker_frozen_copies"] = frozen_in_host * cluster.gpus_per_node / g
        host_mem["total"] += host_mem["worker_frozen_copies"]
    return Prediction(
        model=model.name, cluster=cluster.name, layout=layout, tokens_per_step=T, seq_len=seq_len,
        served_dtype=served_dtype, compute_dtype=compute_dtype, shards=shards, gpus_per_worker=g, fetch_group=f,
        terms_s=terms, compute_detail_s={"forward": forward_s, "perturb": perturb_s, "replay": replay_s},
        floor_s=max(terms.values()), fill_s=fill, step_s=step,
        sum_s=sum(v for k, v in terms.items() if k != "host_dram"),  # host DRAM's bytes are h2d's and the update's
        bottleneck=max(terms, key=terms.__getitem__), tokens_per_s=T / step,
        bytes={"model_at_served_dtype": model_bytes, "h2d_per_gpu": h2d_gpu,
               "h2d_per_node": h2d_gpu * cluster.gpus_per_node, "nvlink_per_gpu": nvlink_gpu,
               "network_in_per_node": net_in, "network_out_per_server_host": net_out, "control_per_step": control_bytes,
               **({"frozen_once_per_worker": float(frozen * b)} if kept else {})},
        memory_per_gpu_bytes=gpu_mem,
        memory_per_server_host_bytes=host_mem, snapshot_headroom_bytes=headroom,
        gpu_memory_bytes=cluster.gpu_memory_bytes, host_memory_bytes=cluster.host_memory_bytes,
        whole_model_bytes=model_bytes, assumptions=_assumptions(cluster, g, f, prefetch_blocks, optimizer, target),
        optimizer=optimizer, server_bytes_per_param={o: server_bytes_per_param(o, served_dtype, window=window)
                                                     for o in STATE_VALUES},
        device=cluster.device, target=target.name, trainable_params=A, frozen_params=frozen,
        server_bytes_per_frozen_param=server_bytes_per_param("sgd", served_dtype, trainable=False),
        server_memory_by_optimizer={o: (A * server_bytes_per_param(o, served_dtype, window=window)
                                        + frozen * server_bytes_per_param(o, served_dtype, trainable=False)) / shards
                                    for o in STATE_VALUES},
        window=window, host_bytes_per_param_step=host_bytes / P,
    )


def _assumptions(cluster: ClusterSpec, g: int, f: int, prefetch_blocks: int, optimizer: str = "sgd",
                 target: TargetSpec = FULL) -> tuple[str, ...]:
    words = cluster.wording
    unit = words.worker
    if g == cluster.gpus_per_node and g > 1:
        worker = f"a worker is a node group of {counted(g, unit)}, splitting its data shard evenly over them"
    else:
        worker = f"a worker is {counted(g, unit)}"
    fetch = "each fetches whole blocks" if f == 1 else f"{counted(f, unit)} split each fetch and all-gather it"
    return (
        worker,
        f"{fetch}; transfers, compute and the server update overlap (pipelined by block)",
        "server replica on every node (weights over shared memory)" if cluster.replicas
        else "no replicas: the primary (or shard hosts) on the first nodes' hosts, the others pull over the network",
        f"FLOPs 2*P per token per forward (attention scores not counted) at {cluster.mfu:.0%} of peak",
        f"{words.memory}: {prefetch_blocks}+1 clean blocks, perturbed copies of 2 blocks per forward, activations "
        f"= forwards*t*hidden + t*max((4*hidden+mlp)*bytes, 4*vocab) for t tokens per {words.unit}, plus a runtime allowance",
    ) + ((f"server update with {optimizer} state: the sgd update rate scaled by the ratio of DRAM bytes moved "
          "(an estimate, not measured on this cluster)",) if STATE_VALUES[optimizer] else ()) + (
        (f"train.target {target.name}: frozen blocks " + ("fetched once per worker and kept at the served dtype: in GPU "
         "memory up to what is free less a fifth of the device, the rest in pinned host memory, copied over at each "
         "use (gpuworker/feed.py); per step the trainable blocks are fetched" if f == 1 else "fetched every step (a fetch group "
         "does not keep them)") + "; only the trainable blocks are perturbed, updated and have optimizer state",)
        if target.frozen_base else ())
