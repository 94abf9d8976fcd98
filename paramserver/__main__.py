"""``python -m paramserver`` / ``distzo-paramserver``: run one parameter-server process."""

from __future__ import annotations

import argparse
import sys

from distzo.config import ConfigError, JobConfig
from distzo.logs import setup_logging
from distzo.modeling import ModelError


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
    ap.add_argument("--data-dir", required=True, help="snapshots and journal")
    ap.add_argument("--listen", default="127.0.0.1:0", help="host:port (port 0 picks a free one)")
    ap.add_argument("--ready-file", help="write the bound address here once serving (JSON)")
    ap.add_argument("--blocks", type=parse_blocks, help="shard: serve only blocks FIRST:END")
    ap.add_argument("--follow", metavar="ADDR", help="replica: follow this primary's journal")
    ap.add_argument("--name", help="shared-memory segment name (default derived from model and data dir)")
    ap.add_argument("-v", "--verbose", action="count", default=0)
    args = ap.parse_args(argv)
    setup_logging(args.verbose, service="paramserver")
    from paramserver.server import run
    from paramserver.state import RecoveryError

    try:
        cfg = JobConfig.from_yaml(args.config) if args.config else JobConfig()
        return run(cfg, args.data_dir, args.listen, args.ready_file, args.blocks, args.follow, args.name)
    except (ConfigError, ModelError, RecoveryError, ValueError, OSError) as exc:
        print(f"distzo-paramserver: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
