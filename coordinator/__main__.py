"""``python -m coordinator`` / ``distzo-coordinator``: the coordinator process."""

from __future__ import annotations

import argparse
import sys

from distzo.config import ConfigError, JobConfig
from distzo.logs import setup_logging


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="distzo-coordinator", description="distzo coordinator")
    ap.add_argument("--config", help="job config (YAML); with it the job starts at once, without it `zoctl train` starts one")
    ap.add_argument("--param-server", action="append", required=True, help="parameter-server shard address (repeat per shard)")
    ap.add_argument("--worker-param-server", action="append",
                    help="addresses workers should fetch from (default: --param-server), e.g. a local replica")
    ap.add_argument("--listen", default="127.0.0.1:0")
    ap.add_argument("--ready-file")
    ap.add_argument("-v", "--verbose", action="count", default=0)
    args = ap.parse_args(argv)
    setup_logging(args.verbose, service="coordinator")
    from distzo.rpc import Credentials
    from coordinator.server import run

    try:
        cfg = JobConfig.from_yaml(args.config) if args.config else None
        creds = Credentials.from_config((cfg or JobConfig()).security)
        return run(cfg, args.param_server, args.listen, args.ready_file, args.worker_param_server, creds)
    except (ConfigError, ValueError, OSError) as exc:
        print(f"distzo-coordinator: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
