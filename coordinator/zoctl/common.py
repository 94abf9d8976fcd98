"""What every zoctl command shares: exit codes, the bad-input error, strict JSON output, the common settings flags.

Exit codes: 0 done; 1 the run failed; 2 bad input (usage, config, model, data); 3 a
service could not be reached; 130 interrupted; 141 the output was closed. Light on purpose (no torch, no pydantic):
status and control commands start in well under a second.
"""

from __future__ import annotations

import argparse
import json
from typing import Any

from distzo.common.strictjson import strict_json  # noqa: F401 - re-exported for the commands

EXIT_OK, EXIT_FAILED, EXIT_BAD_INPUT, EXIT_UNREACHABLE, EXIT_INTERRUPTED = 0, 1, 2, 3, 130
EXIT_BROKEN_PIPE = 141  # 128 + SIGPIPE, what a shell reports for a writer whose reader has gone


class CliError(Exception):
    """A command's error: zoctl prints the message on one line and exits with ``code``."""

    def __init__(self, message: str, code: int = EXIT_BAD_INPUT):
        super().__init__(message)
        self.code = code


def print_json(value: Any, indent: int | None = 2) -> None:
    """Machine-readable output: strict JSON (non-finite numbers as null)."""
    print(json.dumps(strict_json(value), indent=indent, sort_keys=True, allow_nan=False))


# flag -> config field: the common settings; any other field through --set
SETTING_FLAGS = {"lr": "train.lr", "eps": "train.eps", "batch_size": "train.batch_size", "seed": "train.seed",
                 "device": "runtime.device", "optimizer": "train.optimizer", "objective": "train.objective",
                 "target": "train.target"}


def add_setting_options(p: argparse.ArgumentParser) -> None:
    """--lr, --eps, --batch-size, --seed, --device, --optimizer, --objective, --target and --set KEY.PATH=VALUE
    (validated by the typed config)."""
    p.add_argument("--lr", type=float, metavar="LR", help="learning rate (train.lr)")
    p.add_argument("--eps", type=float, metavar="EPS", help="perturbation scale (train.eps)")
    p.add_argument("--batch-size", type=int, metavar="N", help="examples per step (train.batch_size)")
    p.add_argument("--seed", type=int, metavar="S", help="master seed (train.seed; seeds and data order derive from it)")
    p.add_argument("--device", metavar="DEVICE", help="cpu or cuda (runtime.device)")
    p.add_argument("--optimizer", metavar="NAME", help="sgd, momentum or adam (train.optimizer; state on the server)")
    p.add_argument("--objective", metavar="NAME", help="loss, classification, accuracy or f1 (train.objective)")
    p.add_argument("--target", metavar="NAME", help="full, lora or prefix (train.target; lora settings: --set "
                   "train.lora_rank=N, train.lora_alpha, train.lora_modules; prefix: train.prefix_tokens)")
    p.add_argument("--set", dest="settings", action="append", default=[], metavar="KEY.PATH=VALUE",
                   help="any config field, e.g. --set train.lr_schedule=cosine --set data.max_seq_len=128 "
                        "(value read as YAML; repeatable; `zoctl config` lists the fields)")


def apply_settings(cfg, args: argparse.Namespace, extra: dict[str, Any] | None = None):  # noqa: ANN001, ANN201
    """``cfg`` with --set values and the named flags (they win over --set of the same field), validated once,
    all together: a flag and a --set that only make sense together (``--layout ddp --set layout.workers=2``)
    are never checked apart (ConfigError: one line)."""
    from distzo.common.config import parse_settings

    overrides = dict(parse_settings(getattr(args, "settings", [])))  # --set x=null: null
    named = dict(extra or {})
    named.update({field: getattr(args, flag, None) for flag, field in SETTING_FLAGS.items()})
    overrides.update({field: value for field, value in named.items() if value is not None})  # absent flags: no change
    return cfg.with_overrides(overrides, keep_none=True)
