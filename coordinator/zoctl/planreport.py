"""What ``zoctl plan`` prints (``plan.py`` makes the prediction): the step's terms in ms, bytes moved per
step in decimal units, memory per GPU and per server host in GiB, the recommendation and its assumptions,
and distzo's step beside its peers'.
"""

from __future__ import annotations

from distzo.common.errors import counted
from distzo.perf.clusters import ClusterSpec, GiB
from distzo.perf.model import Prediction, mean_pending
from distzo.perf.recommend import Recommendation
from distzo.perf.specs import ModelSpec, fmt_params


def render_peers(p: Prediction, peers: list) -> str:  # noqa: ANN001 - distzo.perf.peers.PeerPrediction
    """distzo's predicted step beside ZO2's and DistZO2's on the same model and batch."""
    lines = ["", f"peers on the same model and {p.tokens_per_step} tokens/step (bench/NOTES.md section 9; their "
             "masters are 16-bit)",
             f"  {'':<10}{'GPUs':>5}{'step ms':>10}{'tokens/s':>11}{'host DRAM B/param':>19}   bound",
             f"  {'distzo':<10}{p.layout.workers * p.gpus_per_worker:>5}{p.step_s * 1e3:10.1f}{p.tokens_per_s:11,.0f}"
             f"{p.host_bytes_per_param_step:19.2f}   {p.wording.terms[p.bottleneck]} (update window {p.window})"]
    for q in peers:
        lines.append(f"  {q.name:<10}{q.gpus:>5}{q.step_s * 1e3:10.1f}{q.tokens_per_s:11,.0f}{q.host_bytes_per_param_step:19.2f}"
                     f"   {q.bottleneck.replace('_', '-')}")
    return "\n".join(lines)


def _size(x: float) -> str:
    """Bytes in decimal units (the bandwidths are GB/s): 3.21 GB, 295 kB."""
    for unit, scale in (("TB", 1e12), ("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if x >= scale:
            return f"{x / scale:8.2f} {unit}"
    return f"{x:8.0f} B"


def _gib(x: float) -> str:
    return f"{x / GiB:8.1f}"


def _target_line(p: Prediction) -> str:
    if not p.frozen_params:
        return f"full: all {fmt_params(p.trainable_params)} parameters trained"
    share = p.trainable_params / (p.trainable_params + p.frozen_params)
    return (f"{p.target}: {fmt_params(p.trainable_params)} trainable parameters ({share:.1%}), "
            f"{fmt_params(p.frozen_params)} frozen (no optimizer state; a worker fetches them once)")


def _frozen_split(p: Prediction) -> str:
    """Where a worker keeps the frozen blocks: its device's memory, and what does not fit there in pinned host
    memory, copied over at each use (in host->GPU above)."""
    on_device = p.memory_per_gpu_bytes.get("frozen_blocks_kept", 0.0)
    in_host = p.bytes["frozen_once_per_worker"] - on_device
    if in_host <= 0:
        return ""
    return (f" ({_size(on_device).strip()} in {p.wording.unit} memory, {_size(in_host).strip()} in pinned host "
            "memory, copied over at each use)")


def _fits(ok: bool) -> str:
    return "fits" if ok else "DOES NOT FIT"


def render(model: ModelSpec, cluster: ClusterSpec, p: Prediction, rec: Recommendation) -> str:
    """The human-readable plan: terms in ms, bytes moved in decimal units, memory in GiB."""
    lay, b = p.layout, p.bytes
    words = cluster.wording  # a CPU cluster's worker processes, intra-node link and worker memory
    unit, labels = words.unit, words.terms
    col = max(22, len(words.link + " per " + unit) + 2, len(words.h2d + " per " + unit) + 2)  # the label column
    lines = [
        f"model    {model.name}: {fmt_params(model.params)} parameters, {model.layers} layers, hidden {model.hidden}, "
        f"{b['model_at_served_dtype'] / 1e9:.2f} GB at {p.served_dtype}",
        f"target   {_target_line(p)}",
        f"cluster  {cluster.name}: {counted(cluster.nodes, 'node')} x {counted(cluster.gpus_per_node, unit)}, "
        f"{'a server replica on every node' if cluster.replicas else 'no server replicas'}, "
        f"{counted(p.shards, 'server shard')}",
        f"layout   {lay.name} (pertp={lay.pertp} ddp={lay.ddp} q={lay.q}): {counted(lay.workers, 'worker')} of "
        f"{counted(p.gpus_per_worker, unit)}; {p.tokens_per_step} tokens/step = "
        f"{p.tokens_per_step // p.seq_len} x {p.seq_len}",
        f"window   server.update_window {p.window}" + (": every update materialized and read as it is" if p.window == 1
                                                       else f": one server pass per {p.window} updates, workers replay "
                                                       f"{mean_pending(p.window):.1f} records a step on average"),
        "",
        "step (ms)",
    ]
    for name, label in labels.items():
        extra = ""
        if name == "compute":
            d = p.compute_detail_s
            extra = f"   forward {d['forward'] * 1e3:.1f} + perturb {d['perturb'] * 1e3:.1f}"
            if p.window > 1:
                extra += f" + replay {d['replay'] * 1e3:.1f}"
        elif name == "server_update" and p.window > 1:
            extra = f"   one pass per update window of {p.window}"
        elif name == "host_dram":
            if not p.terms_s[name]:
                continue  # the cluster does not describe its host DRAM
            extra = f"   {p.host_bytes_per_param_step:.2f} B per parameter per step (DMA reads + update pass / {p.window})"
        lines.append(f"  {label:<{col}}{p.terms_s[name] * 1e3:12.1f}{extra}")
    lines += [
        f"  {'floor (max)':<{col}}{p.floor_s * 1e3:12.1f}   bottleneck: {labels[p.bottleneck]}",
        f"  {'predicted step':<{col}}{p.step_s * 1e3:12.1f}   max of the overlapping terms + fill + control",
        f"  {'no-overlap sum':<{col}}{p.sum_s * 1e3:12.1f}",
        f"  {'tokens/s':<{col}}{p.tokens_per_s:12,.0f}",
        "",
        "bytes per step",
        f"  {words.h2d + ' per ' + unit:<{col}}{_size(b['h2d_per_gpu'])}   per node {_size(b['h2d_per_node']).strip()}",
        f"  {words.link + ' per ' + unit:<{col}}{_size(b['nvlink_per_gpu'])}",
        f"  {'network in per node':<{col}}{_size(b['network_in_per_node'])}   out per server host "
        f"{_size(b['network_out_per_server_host']).strip()}",
        f"  {'control':<{col}}{_size(b['control_per_step'])}",
        *([f"  {'frozen, once per worker':<{col}}{_size(b['frozen_once_per_worker'])}   fetched at the first step, "
           f"then kept{_frozen_split(p)}"] if "frozen_once_per_worker" in b else []),
        "",
    ]
    g, h = p.memory_per_gpu_bytes, p.memory_per_server_host_bytes
    lines.append(f"memory per {unit} (GiB) {_gib(g['total'])} of {p.gpu_memory_bytes / GiB:.1f}   {_fits(p.fits_gpu)}")
    lines += [f"  {k.replace('_', ' '):<{col}}{_gib(v)}" for k, v in g.items() if k != "total"]
    lines.append(f"memory per server host (GiB) {_gib(h['total'])} of {p.host_memory_bytes / GiB:.0f}   {_fits(p.fits_host)}")
    lines += [f"  {k.replace('_', ' '):<{col}}{_gib(v)}" for k, v in h.items() if k != "total"]
    per = p.server_bytes_per_param
    lines.append(f"  server bytes per {'trainable ' if p.frozen_params else ''}parameter (fp32 master, {p.served_dtype} "
                 "served copy, fp32 optimizer state): "
                 + ", ".join(f"{o} {n} B" + (" (this plan)" if o == p.optimizer else "") for o, n in per.items()))
    if p.frozen_params:
        lines.append(f"  server bytes per frozen parameter (fp32 master, {p.served_dtype} served copy, no optimizer "
                     f"state): {p.server_bytes_per_frozen_param} B")
    lines.append("  master + served copy + optimizer state per server host, by optimizer: " + ", ".join(
        f"{o} {_size(v).strip()}" for o, v in p.server_memory_by_optimizer.items()))
    lines += [
        f"  {'+ snapshot headroom':<{col}}{_gib(p.snapshot_headroom_bytes)}   worst-case copy-on-write: "
        f"{_fits(p.fits_host_with_snapshot)}",
        f"whole model at {p.served_dtype}: {p.whole_model_bytes / GiB:.1f} GiB "
        f"({'would fit' if p.whole_model_fits_gpu else 'would not fit'} one {unit}; streamed, only blocks are resident)",
        "",
        f"recommended: {rec.reason}",
        "assumptions:",
        *[f"  - {a}" for a in p.assumptions],
    ]
    return "\n".join(lines)
