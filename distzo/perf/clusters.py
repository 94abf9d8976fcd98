"""The hardware the step-time model (``distzo/perf/model.py``) is applied to, as rates: named
clusters (DGX H100/A100 nodes, this project's CPU machine), one calibrated on this machine from measured
rates, and the words a plan uses for a cluster's parts.

Units: seconds, bytes, bandwidths in GB/s = 1e9 bytes/s (a 400 Gb/s NIC is 50 GB/s).
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass, replace
from typing import Any, Mapping

GiB, TiB = 1 << 30, 1 << 40


@dataclass(frozen=True)
class Wording:
    """What a plan calls a cluster's parts, in its own hardware's words (the model's terms keep their
    keys, h2d and nvlink, whatever the hardware).

    ``unit``: one worker device ("GPU"; a CPU cluster's "process"); ``worker``: the same, said in full
    ("GPU", "CPU worker process"); ``h2d``: the copy from host memory to it; ``link``: the link of the
    all-gather inside a node, ``gather``: that all-gather; ``memory``: its memory."""

    unit: str
    worker: str
    h2d: str
    link: str
    gather: str
    memory: str

    @property
    def terms(self) -> dict[str, str]:
        """A label for each term of the step (model.TERMS), in order."""
        return {"compute": "compute", "h2d": self.h2d, "nvlink": self.gather, "network": "network",
                "server_update": "server update", "host_dram": "host DRAM", "control": "control"}


WORDING = {"cuda": Wording("GPU", "GPU", "host->GPU", "NVLink", "NVLink gather", "GPU memory"),
           "cpu": Wording("process", "CPU worker process", "host->worker", "intra-node link", "intra-node gather",
                          "worker memory")}


@dataclass(frozen=True)
class ClusterSpec:
    """The hardware, as rates. Bandwidths in GB/s (1e9 bytes/s), each direction.

    ``h2d_gbps``: per GPU, host memory to device (effective: shared memory -> pinned -> GPU).
    ``nvlink_gbps``: per GPU, bytes received per second in an all-gather inside a node.
    ``network_gbps``: per host NIC. ``server_update_params_per_s``: one host applying one seed
    update (generate z, axpy on the fp32 master, write the served copy). ``gpu_tflops``: dense
    16-bit peak per GPU (``gpu_tflops_fp32`` for float32 compute). ``perturb_params_per_s``: one
    GPU writing one perturbed copy. A worker is ``gpus_per_worker`` GPUs of one node (None: the
    whole node, a node group); ``fetch_group`` GPUs split one fetch and all-gather (None: the node).
    ``host_cores`` (CPU clusters): cores the workers, the server and the coordinator share; the
    step then cannot be shorter than all their CPU work divided by the cores. ``device``: cuda or
    cpu (a CPU cluster's "GPUs" are worker processes; ``wording`` names them so).
    Update windows (server.update_window): ``host_dram_gbps``, the DRAM bandwidth of one host that the
    DMA reads and the server's update share (None: not modelled); ``server_cores`` and
    ``window_updates_per_s_per_core``, the integer/ALU rate of the K-step pass (element-updates per
    second per core, Philox words and selects on values in L1); ``replay_params_per_s``, one GPU
    replaying one pending record in the perturbation kernel (element-records per second).
    """

    name: str
    nodes: int
    gpus_per_node: int
    h2d_gbps: float
    nvlink_gbps: float
    network_gbps: float
    server_update_params_per_s: float
    gpu_tflops: float
    mfu: float = 0.4
    gpu_memory_bytes: int = 80 * GiB
    host_memory_bytes: int = 2 * TiB
    replicas: bool = True
    fixed_step_overhead_s: float = 0.005
    gpu_tflops_fp32: float | None = None
    perturb_params_per_s: float = 6e11
    gpus_per_worker: int | None = None
    fetch_group: int | None = None
    device: str = "cuda"
    host_cores: int | None = None
    host_dram_gbps: float | None = None
    server_cores: int = 1
    window_updates_per_s_per_core: float = 3.0e9
    replay_params_per_s: float = 6e12

    def __post_init__(self) -> None:
        if self.nodes < 1 or self.gpus_per_node < 1:
            raise ValueError(f"cluster {self.name}: nodes and gpus_per_node must be >= 1")
        if self.device not in WORDING:
            raise ValueError(f"cluster {self.name}: device {self.device!r}: expected one of {', '.join(WORDING)}")
        for attr in ("h2d_gbps", "nvlink_gbps", "network_gbps", "server_update_params_per_s", "gpu_tflops", "mfu",
                     "perturb_params_per_s", "server_cores", "window_updates_per_s_per_core", "replay_params_per_s"):
            if not getattr(self, attr) > 0:
                raise ValueError(f"cluster {self.name}: {attr} must be > 0")
        for attr in ("gpus_per_worker", "fetch_group"):
            v = getattr(self, attr)
            if v is not None and (v < 1 or self.gpus_per_node % v):
                raise ValueError(f"cluster {self.name}: {attr}={v} must divide gpus_per_node={self.gpus_per_node}")

    @property
    def wording(self) -> Wording:
        """How a plan names this cluster's worker devices, links and memory."""
        return WORDING[self.device]

    @property
    def worker_gpus(self) -> int:
        return self.gpus_per_worker or self.gpus_per_node

    @property
    def fetch_gpus(self) -> int:
        return self.fetch_group or self.gpus_per_node

    @property
    def workers(self) -> int:
        """Workers the cluster offers the layout (workers = pertp x ddp x q)."""
        return self.nodes * self.gpus_per_node // self.worker_gpus

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _dgx(name: str, nodes: int, gpu: str) -> ClusterSpec:
    # H100 SXM: 989 TFLOP/s dense bf16, 67 fp32; PCIe Gen5 x16 (64 GB/s raw, ~50 effective); NVLink 4
    # 450 GB/s per direction (~370 achieved in all-gathers); one 400 Gb/s NIC for host traffic (50 GB/s);
    # HBM3 3.35 TB/s at ~70% and 4 bytes moved per 16-bit perturbed element: 5.9e11 elements/s.
    # A100 SXM 80GB: 312 / 19.5 TFLOP/s, PCIe Gen4 (~25 GB/s), NVLink 3 300 GB/s (~230), 200 Gb/s
    # NIC (25 GB/s), HBM2e 2.0 TB/s -> 3.5e11. Host update: a dual-socket host streams ~10 bytes per
    # parameter (fp32 read+write, 16-bit served copy) at ~250 GB/s: 2.5e10 params/s (an assumption:
    # replace it with a measurement, bench/).
    # Update windows (DESIGN.md section 12): a DGX H100 host has two 56-core sockets and ~560 GB/s of DRAM
    # (8 DDR5-4800 channels each); DGX A100 two 64-core EPYC 7742, 8 DDR4-3200 channels each (~410 GB/s).
    # The K-step pass: 3.0e9 element-updates/s per core, measured on this project's Zen 4 core
    # (bench/bench_window.py); a GPU replays a record in the perturbation kernel at ~1/5.5 of its FP64 rate
    # (H100 SXM 34 TFLOP/s, A100 9.7: about 5.5 float64 operations per element and record): assumptions
    # until scripts/gpu_check.sh measures them.
    if gpu == "h100":
        return ClusterSpec(name, nodes, 8, h2d_gbps=50, nvlink_gbps=370, network_gbps=50,
                           server_update_params_per_s=2.5e10, gpu_tflops=989, gpu_tflops_fp32=67,
                           gpu_memory_bytes=80 * GiB, host_memory_bytes=2 * TiB, perturb_params_per_s=5.9e11,
                           host_dram_gbps=560, server_cores=112, replay_params_per_s=6e12)
    return ClusterSpec(name, nodes, 8, h2d_gbps=25, nvlink_gbps=230, network_gbps=25,
                       server_update_params_per_s=2.0e10, gpu_tflops=312, gpu_tflops_fp32=19.5,
                       gpu_memory_bytes=80 * GiB, host_memory_bytes=2 * TiB, perturb_params_per_s=3.5e11,
                       host_dram_gbps=410, server_cores=128, replay_params_per_s=1.8e12)


CLUSTERS: dict[str, ClusterSpec] = {
    "h100x8": _dgx("h100x8", 1, "h100"),
    "h100x8-2n": _dgx("h100x8-2n", 2, "h100"),
    "h100x8-8n": _dgx("h100x8-8n", 8, "h100"),
    "a100x8": _dgx("a100x8", 1, "a100"),
    # A placeholder for this project's 2-core CPU machine, two single-thread worker processes, each
    # fetching the whole model over shared memory. memcpy 19 GB/s = README's 17.7 GB/s shm fetch / 0.93;
    # update 3.2e9 params/s (README); 0.1 TFLOP/s is one core's fp32 matmul peak measured with torch
    # (99 GFLOP/s, 512x512 @ 512x2048). Benchmarks should use cluster_from_calibration instead.
    "cpu-local": ClusterSpec("cpu-local", 1, 2, h2d_gbps=19, nvlink_gbps=19, network_gbps=1.09,
                             server_update_params_per_s=3.2e9, gpu_tflops=0.1, gpu_tflops_fp32=0.1,
                             gpu_memory_bytes=8 * GiB, host_memory_bytes=16 * GiB, fixed_step_overhead_s=0.02,
                             perturb_params_per_s=3.2e9, gpus_per_worker=1, fetch_group=1, device="cpu",
                             server_cores=1, replay_params_per_s=3.0e9),
    # `zoctl up --hosts 2` on that machine (coordinator.cluster.hosts): simulated hosts (network namespaces), one CPU
    # worker each, a replica per host, links limited to 1 Gbit/s (cluster.link_rate: 1gbit = 0.125 GB/s); the
    # same rates as cpu-local, and every process shares its 2 cores (host_cores). --nodes N for N hosts.
    "cpu-netns": ClusterSpec("cpu-netns", 2, 1, h2d_gbps=19, nvlink_gbps=19, network_gbps=0.125,
                             server_update_params_per_s=3.2e9, gpu_tflops=0.1, gpu_tflops_fp32=0.1,
                             gpu_memory_bytes=8 * GiB, host_memory_bytes=16 * GiB, fixed_step_overhead_s=0.02,
                             perturb_params_per_s=3.2e9, gpus_per_worker=1, fetch_group=1, device="cpu", host_cores=2,
                             server_cores=1, replay_params_per_s=3.0e9),
}

CALIBRATION_KEYS = ("forward_flops_per_s", "memcpy_bytes_per_s", "update_params_per_s", "fixed_step_overhead_s")


def cluster_from_calibration(cal: Mapping[str, float], workers: int = 1, name: str = "cpu-calibrated",
                             fetch_group: int = 1) -> ClusterSpec:
    """A one-host CPU "cluster" from rates measured on it, so a benchmark can set its achieved
    step time against the model's prediction for the same machine.

    Required keys: ``forward_flops_per_s`` (achieved by one worker process's forward, so the MFU
    is 1), ``memcpy_bytes_per_s`` (the shared-memory fetch and the gloo gather are copies),
    ``update_params_per_s`` (the server's seed update), ``fixed_step_overhead_s``. Optional:
    ``perturb_params_per_s`` (default: the update rate), ``network_bytes_per_s`` (loopback gRPC,
    only the control messages use it; default 1e9), ``memory_bytes`` (default: physical memory),
    ``host_cores`` (the cores every process shares; default: no sharing bound),
    ``window_updates_per_s_per_core`` and ``replay_params_per_s`` (update windows; default 3.0e9).
    Each of ``workers`` processes is a worker; ``fetch_group`` of them split each fetch and gather
    it (the job's ``layout.node_size``; 1: each fetches the whole model).
    """
    missing = [k for k in CALIBRATION_KEYS if k not in cal]
    if missing:
        raise KeyError(f"calibration lacks {', '.join(missing)} (needs {', '.join(CALIBRATION_KEYS)})")
    memory = int(cal.get("memory_bytes") or os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))
    memcpy_gbps = float(cal["memcpy_bytes_per_s"]) / 1e9
    tflops = float(cal["forward_flops_per_s"]) / 1e12
    update = float(cal["update_params_per_s"])
    return ClusterSpec(
        name, nodes=1, gpus_per_node=workers, h2d_gbps=memcpy_gbps, nvlink_gbps=memcpy_gbps,
        network_gbps=float(cal.get("network_bytes_per_s", 1e9)) / 1e9, server_update_params_per_s=update,
        gpu_tflops=tflops, gpu_tflops_fp32=tflops, mfu=1.0, gpu_memory_bytes=memory // workers,
        host_memory_bytes=memory, fixed_step_overhead_s=float(cal["fixed_step_overhead_s"]),
        perturb_params_per_s=float(cal.get("perturb_params_per_s", update)), gpus_per_worker=1,
        fetch_group=fetch_group, device="cpu",
        host_cores=int(cal["host_cores"]) if cal.get("host_cores") else None,
        window_updates_per_s_per_core=float(cal.get("window_updates_per_s_per_core", 3.0e9)),
        replay_params_per_s=float(cal.get("replay_params_per_s", cal.get("window_updates_per_s_per_core", 3.0e9))),
    )


def with_overrides(cluster: ClusterSpec, **changes: Any) -> ClusterSpec:
    """The cluster with some fields changed (None values are ignored); validated again."""
    real = {k: v for k, v in changes.items() if v is not None}
    if not real:
        return cluster
    if "nodes" in real or "gpus_per_node" in real:
        nodes, k = real.get("nodes", cluster.nodes), real.get("gpus_per_node", cluster.gpus_per_node)
        real.setdefault("name", f"{cluster.name} as {nodes}x{k}")
        if "gpus_per_node" in real:  # keep worker and fetch groups meaningful for the new node size
            for attr in ("gpus_per_worker", "fetch_group"):
                v = getattr(cluster, attr)
                if v is not None and real["gpus_per_node"] % v:
                    real[attr] = None
    return replace(cluster, **real)
