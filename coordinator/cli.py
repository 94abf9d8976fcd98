"""zoctl: the command line of distzo.

Exit codes: 0 done; 1 the run failed; 2 bad input (usage, config, model, data); 3 a
service could not be reached; 130 interrupted.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path
from typing import Any, Callable

from distzo.config import ConfigError, JobConfig
from distzo.data import DataError
from distzo.logs import setup_logging
from distzo.modeling import ModelError

EXIT_OK, EXIT_FAILED, EXIT_BAD_INPUT, EXIT_UNREACHABLE, EXIT_INTERRUPTED = 0, 1, 2, 3, 130


class CliError(Exception):
    def __init__(self, message: str, code: int = EXIT_BAD_INPUT):
        super().__init__(message)
        self.code = code


# ----------------------------------------------------------------------------- shared options
def add_job_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", metavar="FILE", help="job config (YAML); flags below override it")
    p.add_argument("--model", metavar="PRESET_OR_DIR", help="preset name (tiny-opt, tiny-gpt2, tiny-llama, tiny-qwen3, ...) or model directory")
    p.add_argument("--data", metavar="JSONL", help="training examples; default: the shipped SST-2-style task")
    p.add_argument("--dev", metavar="JSONL", help="dev examples; default: shipped dev split, or the last tenth of --data")
    p.add_argument("--workers", type=int, metavar="N", help="workers of the layout (workers = pertp x ddp x q)")
    p.add_argument("--layout", choices=["dual", "pertp", "ddp", "2d"], help="parallel layout")
    p.add_argument("--q", type=int, metavar="Q", help="perturbation directions per step")
    p.add_argument("--steps", type=int, metavar="N", help="training steps")
    p.add_argument("--seed", type=int, metavar="S", help="master seed (seeds and data order derive from it)")
    p.add_argument("--out", metavar="DIR", help="export the trained model here (Hugging Face layout)")
    p.add_argument("--json", action="store_true", help="print the summary as JSON (for scripts)")
    p.add_argument("-v", "--verbose", action="count", default=0, help="more logging (-v info, -vv debug)")


def job_config_from_args(args: argparse.Namespace) -> JobConfig:
    cfg = JobConfig.from_yaml(args.config) if args.config else JobConfig()
    overrides: dict[str, Any] = {
        "model.source": args.model,
        "data.train": args.data,
        "data.dev": args.dev,
        "layout.workers": args.workers,
        "layout.name": args.layout,
        "layout.q": args.q,
        "train.steps": args.steps,
        "train.seed": args.seed,
    }
    return cfg.with_overrides(overrides)


def print_summary(summary: dict[str, Any], as_json: bool) -> None:
    if as_json:
        print(json.dumps(summary, indent=2, sort_keys=True, default=_json_default))
        return
    for key in ("mode", "model", "layout", "workers", "steps", "final_loss", "dev_loss", "dev_accuracy",
                "tokens_per_second", "wall_seconds", "skipped_steps", "out_dir"):
        if key in summary:
            v = summary[key]
            print(f"{key:>18}: {v:.4f}" if isinstance(v, float) else f"{key:>18}: {v}")


def _json_default(o: object) -> object:
    if isinstance(o, float) and not math.isfinite(o):
        return str(o)
    return str(o)


# ----------------------------------------------------------------------------- commands
def cmd_reference(args: argparse.Namespace) -> int:
    from distzo.reference import ReferenceTrainer, TrainingStopped

    cfg = job_config_from_args(args)
    trainer = ReferenceTrainer(cfg)
    try:
        summary = trainer.train(out_dir=args.out, progress=None if not args.json else False)
    except TrainingStopped as exc:
        raise CliError(str(exc), EXIT_FAILED) from None
    print_summary(summary, args.json)
    return EXIT_OK


def cmd_config(args: argparse.Namespace) -> int:
    if args.file:
        cfg = JobConfig.from_yaml(args.file)
        print(f"{args.file}: valid" if not args.show else cfg.to_yaml(), end="\n" if not args.show else "")
    else:
        print(JobConfig().to_yaml(), end="")
    return EXIT_OK


# ----------------------------------------------------------------------------- parser
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="zoctl", description="distzo: distributed zeroth-order fine-tuning")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    p = sub.add_parser("reference", help="train in one process (the correctness oracle) and export",
                       description="In-process MeZO-SGD with the same seeds, data order and layout arithmetic as the distributed run.")
    add_job_options(p)
    p.set_defaults(func=cmd_reference)

    p = sub.add_parser("config", help="print the default job config, or validate a config file")
    p.add_argument("file", nargs="?", help="config file to validate")
    p.add_argument("--show", action="store_true", help="print the validated config with defaults filled in")
    p.add_argument("-v", "--verbose", action="count", default=0)
    p.set_defaults(func=cmd_config)

    for register in _EXTRA_COMMANDS:
        register(sub)
    return parser


_EXTRA_COMMANDS: list[Callable[[Any], None]] = []


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    setup_logging(getattr(args, "verbose", 0))
    try:
        return int(args.func(args))
    except CliError as exc:
        print(f"zoctl {args.command}: {exc}", file=sys.stderr)
        return exc.code
    except (ConfigError, DataError, ModelError) as exc:
        print(f"zoctl {args.command}: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except KeyboardInterrupt:
        print(f"zoctl {args.command}: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED


if __name__ == "__main__":
    sys.exit(main())
