"""``python -m paramserver`` / ``distzo-paramserver``: run one parameter-server process."""

from __future__ import annotations

import os

os.environ.setdefault("GRPC_VERBOSITY", "NONE")  # gRPC's C core would log to stderr too; our errors say it once, our way

import argparse  # noqa: E402
import sys  # noqa: E402

from distzo.common.config import ConfigError, JobConfig, parse_settings
from distzo.infra.logs import setup_logging
from distzo.infra.procs import end_with_supervisor
from distzo.infra.rpc import PORTS
from distzo.model.modeldir import ModelError
from paramserver.dataplane.fence import FenceUnavailable


def parse_blocks(text: str | None) -> tuple[int, int] | None:
    if not text:
        return None
    try:
        a, b = (int(x) for x in text.split(":"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"--blocks takes FIRST:END (e.g. 0:4), got {text!r}") from None
    return a, b


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="distzo-paramserver", description="distzo parameter server")
    ap.add_argument("--config", help="job config (YAML); default config if omitted")
    ap.add_argument("--set", dest="settings", action="append", default=[], metavar="KEY.PATH=VALUE",
                    help="override a field of the config (value read as YAML; repeatable)")
    ap.add_argument("--data-dir", required=True, help="snapshots and journal")
    ap.add_argument("--listen", default=f"0.0.0.0:{PORTS['paramserver']}", help="host:port of the data port (port 0 picks a free one)")
    ap.add_argument("--control-listen", help=f"serve the state-changing RPCs only here (e.g. 0.0.0.0:{PORTS['paramserver_control']})")
    ap.add_argument("--metrics-port", type=int, default=PORTS["paramserver_metrics"], help="Prometheus /metrics port (0: free port, -1: off)")
    ap.add_argument("--metrics-host", default="0.0.0.0")
    ap.add_argument("--ready-file", help="write the bound address here once serving (JSON)")
    ap.add_argument("--blocks", type=parse_blocks, help="shard: serve only blocks FIRST:END")
    ap.add_argument("--follow", metavar="ADDR", help="replica: follow this primary's journal")
    ap.add_argument("--name", help="shared-memory segment name (default derived from model and data dir)")
    ap.add_argument("-v", "--verbose", action="count", default=0)
    args = ap.parse_args(argv)
    setup_logging(args.verbose, service="paramserver")
    end_with_supervisor()  # started by zoctl up: never outlive it
    # the service's own modules (the heavy imports) only once the flags are read and the supervisor is watched
    from paramserver.durability.datadir import RecoveryError
    from paramserver.server import run

    try:
        cfg = JobConfig.from_yaml(args.config) if args.config else JobConfig()
        if args.settings:  # --set KEY.PATH=VALUE over the file (e.g. the Kubernetes run's shape)
            cfg = cfg.with_overrides(parse_settings(args.settings), keep_none=True)
        return run(cfg, args.data_dir, args.listen, args.ready_file, args.blocks, args.follow, args.name,
                   control_listen=args.control_listen, metrics_port=args.metrics_port, metrics_host=args.metrics_host)
    except (ConfigError, ModelError, RecoveryError, ValueError, OSError, FenceUnavailable) as exc:
        print(f"distzo-paramserver: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
