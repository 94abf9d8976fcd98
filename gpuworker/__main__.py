"""``python -m gpuworker`` / ``distzo-worker``: one worker process per GPU (or per CPU worker)."""

from __future__ import annotations

import os

os.environ.setdefault("GRPC_VERBOSITY", "NONE")  # gRPC's C core would log to stderr too; our errors say it once, our way

import argparse  # noqa: E402
import signal  # noqa: E402
import sys  # noqa: E402

from distzo.common.config import ConfigError
from distzo.infra.logs import setup_logging
from distzo.infra.rpc import PORTS, add_security_args, security_from_args

EXIT_GROUP_BROKEN = 75  # a node-group collective failed: restart the whole group


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="distzo-worker", description="distzo worker")
    coordinator = ap.add_mutually_exclusive_group(required=True)
    coordinator.add_argument("--coordinator", help="coordinator address host:port")
    coordinator.add_argument("--coordinator-from", metavar="READY_FILE",
                             help="the coordinator's ready file: wait for it and use the address it names "
                                  "(zoctl up starts both processes at once)")
    ap.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    ap.add_argument("--param-server", action="append", help="override the parameter-server addresses the coordinator gives")
    ap.add_argument("--node-rank", type=int, default=0, help="rank inside the node group")
    ap.add_argument("--node-size", type=int, default=1, help="workers in the node group (sliced fetch + all-gather)")
    ap.add_argument("--node-master", help="the node group's rendezvous: HOST:PORT (rank 0 listens) or file:///PATH (a fresh file all ranks see)")
    ap.add_argument("--node-id", help="name shared by the node group's workers")
    ap.add_argument("--worker-id", help="stable id (default: host-pid-random)")
    add_security_args(ap)
    ap.add_argument("--metrics-port", type=int, default=PORTS["worker_metrics"], help="Prometheus /metrics port (0: free, -1: off)")
    ap.add_argument("--metrics-host", default="0.0.0.0")
    ap.add_argument("--ready-file", help="write pid and metrics port here once started (JSON)")
    ap.add_argument("-v", "--verbose", action="count", default=0)
    args = ap.parse_args(argv)
    setup_logging(args.verbose, service="worker")
    from distzo.infra.procs import end_with_supervisor

    end_with_supervisor()  # started by zoctl up: never outlive it
    # the service's own modules (the heavy imports) only once the flags are read and the supervisor is watched
    from distzo.infra.metrics import start_metrics_server
    from distzo.infra.rpc import Credentials, write_ready_file
    from gpuworker.node import GatherError
    from gpuworker.worker import Worker

    if args.coordinator_from:
        from distzo.infra.procs import address_from_ready_file

        try:
            args.coordinator = address_from_ready_file(args.coordinator_from)
        except TimeoutError as exc:  # not bad input: the supervisor may start us again
            print(f"distzo-worker: {exc}", file=sys.stderr)
            return 1
    try:
        creds = Credentials.from_config(security_from_args(args, client=True))
        worker = Worker(args.coordinator, creds, device=args.device, node_rank=args.node_rank, node_size=args.node_size,
                        node_master=args.node_master, node_id=args.node_id, worker_id=args.worker_id,
                        param_servers=args.param_server)
        bound = start_metrics_server(args.metrics_port, args.metrics_host)
    except (ConfigError, ValueError, OSError) as exc:
        print(f"distzo-worker: {exc}", file=sys.stderr)
        return 2
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: worker.stop())
    write_ready_file(args.ready_file, {"pid": os.getpid(), "metrics_port": bound, "worker_id": worker.worker_id})
    try:
        return worker.run()
    except GatherError:
        return EXIT_GROUP_BROKEN
    finally:
        worker.close()


if __name__ == "__main__":
    sys.exit(main())
