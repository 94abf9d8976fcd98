"""``python -m coordinator`` / ``distzo-coordinator``: the coordinator process."""

from __future__ import annotations

import os

os.environ.setdefault("GRPC_VERBOSITY", "NONE")  # gRPC's C core would log to stderr too; our errors say it once, our way

import argparse  # noqa: E402
import sys  # noqa: E402

from distzo.common.config import ConfigError, JobConfig, parse_settings
from distzo.infra.logs import setup_logging
from distzo.infra.rpc import PORTS, Credentials, add_security_args, security_from_args


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="distzo-coordinator", description="distzo coordinator")
    ap.add_argument("--config", help="job config (YAML); with it the job starts at once, without it `zoctl train` starts one")
    servers = ap.add_mutually_exclusive_group(required=True)
    servers.add_argument("--param-server", action="append", help="parameter-server shard address (repeat per shard)")
    servers.add_argument("--param-server-from", metavar="READY_FILE",
                         help="the parameter server's ready file: wait for it and use the address it names "
                              "(zoctl up starts both processes at once)")
    ap.add_argument("--worker-param-server", action="append",
                    help="addresses workers should fetch from (default: --param-server), e.g. a local replica")
    ap.add_argument("--listen", default=f"0.0.0.0:{PORTS['coordinator']}", help="host:port (port 0 picks a free one)")
    ap.add_argument("--ready-file", help="write the bound address here once serving (JSON)")
    ap.add_argument("--run-dir", help="write the run log (steps.jsonl, evals.jsonl) here; a restarted coordinator continues it")
    ap.add_argument("--metrics-port", type=int, default=PORTS["coordinator_metrics"], help="Prometheus /metrics port (0: free, -1: off)")
    ap.add_argument("--metrics-host", default="0.0.0.0")
    ap.add_argument("--set", dest="settings", action="append", default=[], metavar="KEY.PATH=VALUE",
                    help="override a field of --config (value read as YAML; repeatable)")
    ap.add_argument("--exit-when-done", action="store_true",
                    help="batch mode (a Kubernetes Job): exit when the job ends, 0 done/stopped and exported, 1 failed, "
                         "2 bad input")
    ap.add_argument("--export-to", metavar="DIR_OR_URL",
                    help="with --exit-when-done: export here at the end (a directory on the parameter server's host, "
                         "or a URL it pushes to: s3://, gs://, file://)")
    add_security_args(ap)
    ap.add_argument("-v", "--verbose", action="count", default=0)
    args = ap.parse_args(argv)
    setup_logging(args.verbose, service="coordinator")
    from distzo.infra.procs import end_with_supervisor

    end_with_supervisor()  # started by zoctl up: never outlive it
    # the service's own modules (the heavy imports) only once the flags are read and the supervisor is watched
    from coordinator.server import run

    if args.param_server_from:
        from distzo.infra.procs import address_from_ready_file

        try:
            args.param_server = [address_from_ready_file(args.param_server_from)]
        except TimeoutError as exc:  # not bad input: the supervisor may start us again
            print(f"distzo-coordinator: {exc}", file=sys.stderr)
            return 1
    try:
        cfg = JobConfig.from_yaml(args.config) if args.config else None
        if args.settings:  # --set KEY.PATH=VALUE over the file (e.g. the Kubernetes run's shape)
            if cfg is None:
                raise ConfigError("--set needs --config (the job it changes)")
            cfg = cfg.with_overrides(parse_settings(args.settings), keep_none=True)
        creds = Credentials.from_config(security_from_args(args, (cfg or JobConfig()).security))
        return run(cfg, args.param_server, args.listen, args.ready_file, args.worker_param_server, creds,
                   metrics_port=args.metrics_port, metrics_host=args.metrics_host, run_dir=args.run_dir,
                   exit_when_done=args.exit_when_done, export_to=args.export_to)
    except (ConfigError, ValueError, OSError) as exc:
        print(f"distzo-coordinator: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
