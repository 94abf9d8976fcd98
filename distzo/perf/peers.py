"""The peers' step time on the same model, cluster and batch (``zoctl plan --peers``), by the rates of the
cluster's description; the formulas and their check against measured ZO2 steps are in bench/NOTES.md, section 9.

**ZO2** (Wang et al. 2025, "ZO2: Scalable Zeroth-Order Fine-Tuning for Extremely Large Language Models
with Limited GPU Memory"; github.com/liangyuwang/zo2, ``zo2/optimizer/mezo_sgd/zo2.py``): one GPU. The
16-bit master lives in host memory; each block is uploaded, updated on the GPU with the previous step's
(seed, g), perturbed in place (+eps, -2eps, +eps: three passes), run for both signs, and written back;
upload, compute and write-back run on their own CUDA streams, PCIe being full duplex:

    upload = write-back = P·b / h2d        compute = 2 forwards x 2·P·T / (tflops·mfu) + 4·P / perturb rate
    step = max(upload, write-back, compute) + fill, and at least host DRAM = 2·P·b per step (read + write)

**DistZO2** (its scheme, on the k GPUs of one node): each GPU uploads and writes back a 1/k slice of every
block, the node all-gathers the slices; forwards split over the k GPUs; each GPU perturbs the whole block
(three passes) and updates its slice:

    upload = write-back = P·b / k / h2d     gather = P·b·(k-1)/k / nvlink
    compute = 2 forwards x 2·P·T / k / (tflops·mfu) + (3 + 1/k)·P / perturb rate
    step = max(upload, write-back, gather, compute) + fill, and at least host DRAM = 2·P·b per node per step

``fill`` is one block of each stage that is not the slowest (the pipeline's start and end), as in
``distzo.perf.model``, and every step pays the cluster's fixed per-step latency as distzo's does. Their masters are 16-bit: an update below half a 16-bit ulp rounds away (distzo's fp32
master keeps it).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from distzo.common.dtypes import ITEMSIZE
from distzo.perf.clusters import ClusterSpec
from distzo.perf.specs import ModelSpec

PERTURB_PASSES = 3  # +eps, -2eps, +eps, in place (MeZO's and ZO2's perturb/restore)


@dataclass(frozen=True)
class PeerPrediction:
    """One peer's step on the model and cluster: its terms (s), step, tokens/s and host DRAM traffic."""

    name: str
    gpus: int
    terms_s: dict[str, float]
    step_s: float
    tokens_per_s: float
    bottleneck: str
    host_bytes_per_param_step: float  # one host's DRAM bytes per step per parameter

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _step(name: str, gpus: int, terms: dict[str, float], blocks: int, tokens: int, host_bytes: float,
          cluster: ClusterSpec, params: int) -> PeerPrediction:
    slowest = max(terms.values())
    step = slowest + (sum(terms.values()) - slowest) / blocks
    if cluster.host_dram_gbps:  # a bound, as in the step-time model (model.py): its bytes are the upload's and the write-back's
        terms = {**terms, "host_dram": host_bytes * params / (cluster.host_dram_gbps * 1e9)}
        step = max(step, terms["host_dram"])
    step += cluster.fixed_step_overhead_s  # the same fixed per-step latency as distzo's control term (an assumption)
    return PeerPrediction(name, gpus, terms, step, tokens / step, max(terms, key=terms.__getitem__), host_bytes)


def predict_peers(model: ModelSpec, cluster: ClusterSpec, tokens_per_step: int, dtype: str = "bfloat16") -> list[PeerPrediction]:
    """ZO2 on one GPU of the cluster and DistZO2 on one of its nodes, at ``dtype`` (their 16-bit master)."""
    P, T, b, k = model.params, tokens_per_step, ITEMSIZE[dtype], cluster.gpus_per_node
    flops = 2 * 2 * P * T / (cluster.gpu_tflops * 1e12 * cluster.mfu)  # two forwards
    link = P * b / (cluster.h2d_gbps * 1e9)
    zo2 = {"upload": link, "write_back": link,
           "compute": flops + (PERTURB_PASSES + 1) * P / cluster.perturb_params_per_s}
    dist = {"upload": link / k, "write_back": link / k,
            "gather": P * b * (k - 1) / k / (cluster.nvlink_gbps * 1e9),
            "compute": flops / k + (PERTURB_PASSES + 1 / k) * P / cluster.perturb_params_per_s}
    return [_step("ZO2", 1, zo2, model.num_blocks, T, 2 * b, cluster, P),
            _step("DistZO2", k, dist, model.num_blocks, T, 2 * b, cluster, P)]
