"""The workers' readiness probe: exit 0 when worker 0 of this pod says it is ready, else 1.

A Kubernetes exec probe (``python -m gpuworker.probe --port 9402``) reads worker 0's
``/metrics`` and checks ``distzo_worker_ready`` (1 while it has a session with the coordinator
and is set up for the job). Worker 0 stands for the pod: a node group forms with all its ranks
or not at all, and the launcher restarts the whole group when one rank fails.
"""

from __future__ import annotations

import argparse
import sys
import urllib.request

from prometheus_client.parser import text_string_to_metric_families

READY_METRIC = "distzo_worker_ready"


def is_ready(metrics_text: str) -> bool:
    """True when the exposition ``metrics_text`` has ``distzo_worker_ready`` equal to 1."""
    for family in text_string_to_metric_families(metrics_text):
        if family.name == READY_METRIC:
            return any(sample.value == 1 for sample in family.samples)
    return False


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m gpuworker.probe", description=__doc__.splitlines()[0])
    p.add_argument("--port", type=int, default=9402, help="worker 0's metrics port (distzo-worker-launch --metrics-base-port)")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--timeout", type=float, default=3.0, help="seconds")
    args = p.parse_args(argv)
    try:
        with urllib.request.urlopen(f"http://{args.host}:{args.port}/metrics", timeout=args.timeout) as r:
            text = r.read().decode()
    except OSError as exc:
        print(f"not ready: worker metrics at {args.host}:{args.port} unreachable ({exc})", file=sys.stderr)
        return 1
    if not is_ready(text):
        print(f"not ready: {READY_METRIC} is not 1 (no session with the coordinator, or setting up)", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
