"""One pod per GPU node: a worker per GPU, as one node group, restarted together.

    python -m gpuworker.launch --coordinator ADDR --param-server 127.0.0.1:7070 [--gpus N|all] [--token-file F]

Each worker gets ``--device cuda:i`` (or ``cpu``), node rank ``i`` of ``N`` with a loopback
rendezvous, and metrics port ``base + i``. The members of a node group gather block slices
together, so when one dies the others cannot go on: the launcher stops the rest and starts
the whole group again (the coordinator re-assigns their work meanwhile), with backoff when
it keeps dying soon after starting. A worker that exits with code 2 refused its input (a bad
flag or config): that fails the same way every time, so the launcher stops and exits 2.
(The restart policy: ``distzo.infra.supervise``, shared with ``zoctl up``'s local cluster.)
"""

from __future__ import annotations

import argparse
import logging
import signal
import subprocess
import sys
import time

from distzo.infra.logs import kv, setup_logging
from distzo.infra.procs import ServiceFailed, worker_command
from distzo.infra.rpc import PORTS
from distzo.infra.supervise import RestartPolicy, Restarts

log = logging.getLogger("distzo.launch")
STABLE_S = 60.0
# a group dying within a minute of its start, again and again, waits 2 s, 4 s, 6 s, ... up to 30 s; no limit
POLICY = RestartPolicy(first_delay_s=2.0, max_delay_s=30.0, stable_s=STABLE_S, growth="linear", min_delay_s=2.0)


def gpu_count(spec: str) -> int:
    if spec != "all":
        n = int(spec)
        if n < 1:
            raise ValueError(f"--gpus must be >= 1 or 'all', got {spec}")
        return n
    import torch

    n = torch.cuda.device_count()
    if n == 0:
        raise ValueError("--gpus all: no CUDA device is visible")
    return n


def worker_argv(args: argparse.Namespace, rank: int, size: int) -> list[str]:
    """Rank ``rank`` of this pod's ``size`` workers, from distzo-worker-launch's flags."""
    node = (rank, size, f"127.0.0.1:{args.rendezvous_port}", args.name) if size > 1 else None
    return worker_command(args.coordinator, args.param_server or [], f"cuda:{rank}" if args.device == "cuda" else "cpu",
                          f"{args.name}-{rank}", vars(args), node,
                          ["--metrics-port", str(args.metrics_base_port + rank)])


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="distzo-worker-launch", description=__doc__.split("\n")[0])
    ap.add_argument("--coordinator", required=True)
    ap.add_argument("--param-server", action="append", help="where the workers fetch blocks (the pod's replica)")
    ap.add_argument("--gpus", default="all", help="workers to start: a number or 'all' visible GPUs")
    ap.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    ap.add_argument("--name", default=None, help="node name (default: hostname)")
    ap.add_argument("--rendezvous-port", type=int, default=29500)
    ap.add_argument("--metrics-base-port", type=int, default=PORTS["worker_metrics"])
    ap.add_argument("--token-file")
    ap.add_argument("--tls-ca")
    ap.add_argument("--tls-cert")
    ap.add_argument("--tls-key")
    ap.add_argument("-v", "--verbose", action="count", default=0)
    args = ap.parse_args(argv)
    setup_logging(args.verbose, service="launch")
    import socket

    args.name = args.name or socket.gethostname()
    try:
        size = gpu_count(args.gpus) if args.device == "cuda" else int(args.gpus if args.gpus != "all" else 1)
    except ValueError as exc:
        print(f"distzo-worker-launch: {exc}", file=sys.stderr)
        return 2
    stopping = False

    def stop(*_: object) -> None:
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    restarts = Restarts("the node group", POLICY)
    while not stopping:
        started = time.monotonic()
        procs = [subprocess.Popen(worker_argv(args, r, size)) for r in range(size)]
        log.info("node group started", extra=kv(workers=size, restarts=restarts.count))
        while not stopping and all(p.poll() is None for p in procs):
            time.sleep(0.5)
        for p in procs:
            if p.poll() is None:
                p.terminate()
        for p in procs:
            try:
                p.wait(30)
            except subprocess.TimeoutExpired:
                p.kill()
        if stopping or all(p.returncode == 0 for p in procs):
            return 0
        codes = ",".join(str(p.returncode) for p in procs)
        try:
            delay = restarts.died([p.returncode for p in procs], time.monotonic() - started)
        except ServiceFailed as exc:  # the workers' output went to this process's stderr: no tail to add
            log.error("a worker refused its input (exit code 2); not restarting", extra=kv(codes=codes))
            return exc.code
        log.warning("a worker of the node group exited; restarting the group",
                    extra=kv(codes=codes, restarts=restarts.count, backoff_s=delay))
        time.sleep(delay)
    return 0


if __name__ == "__main__":
    sys.exit(main())
