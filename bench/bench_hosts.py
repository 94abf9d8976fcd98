"""Two simulated hosts: workers fetching across the link from the primary vs from their host's replica.

    sudo python bench/bench_hosts.py [--model tiny-opt] [--steps 30] [--link-rate 1gbit] [--json]
    sudo python bench/bench_hosts.py --scale 1,2,3 [--link-rate 1gbit] [--steps 30]

Host 0 runs the primary parameter server and the coordinator; host 1 runs both workers of
``ddp:2`` (one dual worker per data shard), and nothing else of the job runs on host 0. Two runs
of the same job, alternately:

- ``primary``: no replica; host 1's workers fetch every block from the primary over gRPC,
  across host 1's link (the primary offers no shared memory: the simulated hosts share one
  filesystem, and a worker mapping the primary's segments would move no bytes on the link);
- ``replica``: host 1 runs a replica that follows the primary's journal, and its workers fetch
  through host 1's shared memory (what ``zoctl up --hosts`` does).

Printed: host 1's link bytes per step in steady state (coordinator.cluster.linkstats), their ratio to one
copy of the model, and tokens/s over the training steps (the coordinator's count). Target (issue
16): the replica path moves >= 100x fewer bytes per step on the link. Needs root.

``--scale 1,2,3``: instead, ``zoctl up --hosts N`` itself for each N (dual on each host, ddp across
hosts; N=1 is one namespace with a dual worker), tokens/s measured beside ``zoctl plan``'s
prediction for the ``cpu-netns`` cluster description with N nodes and the same tokens per step.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from coordinator.cluster.hostcluster import HostsCluster  # noqa: E402
from distzo.common.config import JobConfig  # noqa: E402
from distzo.infra.logs import quiet_transformers  # noqa: E402


class AllWorkersOnHost1(HostsCluster):
    """Every node group on host 1; ``via_primary``: no replica, the workers fetch from the primary over gRPC."""

    via_primary = False

    def _node_host(self, node: int) -> int:
        return 1

    def _node_servers(self, node: int) -> list[str]:
        return [self.server_address] if self.via_primary else super()._node_servers(node)

    def _server_args(self, host: int) -> list[str]:
        extra = ["--set", "server.shared_memory=false"] if self.via_primary and host == 0 else []
        return super()._server_args(host) + extra

    def _start_replicas(self) -> None:
        if not self.via_primary:
            super()._start_replicas()


class ViaPrimary(AllWorkersOnHost1):
    via_primary = True


def job_config(model: str, steps: int, link_rate: str | None, cache_dir: str | None) -> JobConfig:
    return JobConfig.from_dict({
        "model": {"source": model},
        "train": {"steps": steps, "batch_size": 8, "eval_every": 0, "eval_at_start": False},
        "data": {"dev_examples": 8},
        "layout": {"name": "ddp", "workers": 2},
        "server": {"snapshot_every": 0},
        "runtime": {"cache_dir": cache_dir},
        "cluster": {"hosts": 2, "link_rate": link_rate},
    })


def run(kind: type[HostsCluster], cfg: JobConfig, work: Path) -> dict:
    cluster = kind(cfg, work)
    try:
        cluster.start()
        st = cluster.wait()
        if st.state != "done":
            raise RuntimeError(f"the run ended {st.state}: {st.error}")
        rep = cluster.link_report()
        link = rep["links"][1]
        return {"bytes_per_step": link["bytes_per_step"], "received_bytes_per_step": link["received_bytes_per_step"],
                "fraction_of_model": link["fraction_of_model"], "steady_steps": rep["steady_steps"],
                "model_bytes": rep["model_bytes"], "tokens_per_second": st.tokens_per_second,
                "initial_sync_bytes": link["initial_sync_bytes"]}
    finally:
        cluster.shutdown()


def scale(args: argparse.Namespace) -> list[dict]:
    """Tokens/s of zoctl up --hosts N for each N, beside the planner's prediction (cpu-netns, N nodes)."""
    from coordinator.zoctl.plan import resolve_model
    from distzo.perf.clusters import CLUSTERS, with_overrides
    from distzo.perf.model import predict
    from distzo.perf.specs import LayoutSpec

    rows = []
    for n in (int(x) for x in args.scale.split(",")):
        layout = "ddp" if n > 1 else "dual"
        cfg = JobConfig.from_dict({
            "model": {"source": args.model},
            "train": {"steps": args.steps, "batch_size": 6, "eval_every": 0, "eval_at_start": False},
            "data": {"dev_examples": 8}, "layout": {"name": layout, "workers": n}, "server": {"snapshot_every": 0},
            "runtime": {"cache_dir": args.cache_dir}, "cluster": {"hosts": n, "link_rate": args.link_rate}})
        with tempfile.TemporaryDirectory(prefix="bench-hosts-") as tmp:
            cluster = HostsCluster(cfg, Path(tmp) / "run")
            try:
                cluster.start()
                st = cluster.wait()
                rep_ = cluster.link_report()
            finally:
                cluster.shutdown()
        seq = max(1, round(st.train_tokens / st.step / cfg.train.batch_size))
        pred = predict(resolve_model(args.model), with_overrides(CLUSTERS["cpu-netns"], nodes=n),
                       LayoutSpec.from_name(layout, n), seq * cfg.train.batch_size, "float32", seq)
        rows.append({"hosts": n, "layout": f"{layout}:{n}", "measured_tokens_per_s": st.tokens_per_second,
                     "predicted_tokens_per_s": pred.tokens_per_s, "bottleneck": pred.bottleneck,
                     "max_link_bytes_per_step": max(link["bytes_per_step"] for link in rep_["links"])})
    return rows


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="tiny-opt")
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--link-rate", default=None, help="tc rate of each link, e.g. 1gbit (default: unlimited)")
    ap.add_argument("--cache-dir", default=None)
    ap.add_argument("--scale", metavar="N,N,...", help="tokens/s of zoctl up --hosts N for each N, and the prediction")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    quiet_transformers()
    if args.scale:
        rows = scale(args)
        if args.json:
            print(json.dumps(rows, indent=2))
            return 0
        print(f"model {args.model}, links {args.link_rate or 'unlimited'}")
        print(f"{'hosts':>5} {'layout':<8} {'measured tok/s':>15} {'predicted tok/s':>16} {'measured/pred':>14} "
              f"{'bottleneck':<14} {'max link B/step':>15}")
        for r in rows:
            print(f"{r['hosts']:>5} {r['layout']:<8} {r['measured_tokens_per_s']:>15,.0f} {r['predicted_tokens_per_s']:>16,.0f} "
                  f"{r['measured_tokens_per_s'] / r['predicted_tokens_per_s']:>14.2f} {r['bottleneck']:<14} "
                  f"{r['max_link_bytes_per_step']:>15,.0f}")
        return 0
    cfg = job_config(args.model, args.steps, args.link_rate, args.cache_dir)
    out = {}
    with tempfile.TemporaryDirectory(prefix="bench-hosts-") as tmp:
        for name, kind in (("primary", ViaPrimary), ("replica", AllWorkersOnHost1)):
            out[name] = run(kind, cfg, Path(tmp) / name)
    out["bytes_ratio"] = out["primary"]["bytes_per_step"] / out["replica"]["bytes_per_step"]
    out["tokens_per_second_ratio"] = out["replica"]["tokens_per_second"] / out["primary"]["tokens_per_second"]
    out.update(model=args.model, steps=args.steps, link_rate=args.link_rate)
    if args.json:
        print(json.dumps(out, indent=2))
        return 0
    print(f"model {args.model}: {out['primary']['model_bytes']:,} bytes served; link {args.link_rate or 'unlimited'}")
    print(f"{'workers on host 1 fetch from':<30} {'link bytes/step':>16} {'of the model':>13} {'tokens/s':>9}")
    for name in ("primary", "replica"):
        r = out[name]
        print(f"{name + (' (gRPC across the link)' if name == 'primary' else ' (shared memory)'):<30} "
              f"{r['bytes_per_step']:>16,.0f} {100 * r['fraction_of_model']:>12.2f}% {r['tokens_per_second']:>9.0f}")
    print(f"replica path: {out['bytes_ratio']:.0f}x fewer bytes per step (target >= 100x), "
          f"{out['tokens_per_second_ratio']:.2f}x the tokens/s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
