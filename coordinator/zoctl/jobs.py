"""The commands that train a job on this machine: ``zoctl up`` (a local cluster of processes: parameter server,
coordinator, N workers) and ``zoctl reference`` (the in-process oracle), with the job flags both take.

Both refuse bad input (a misspelled model, missing data, an export destination the export would refuse) before
torch is imported or a process starts; what they need beyond that is imported inside the command, so that
``zoctl status`` and the other light commands start fast.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

from coordinator.zoctl.common import (EXIT_BAD_INPUT, EXIT_FAILED, EXIT_OK, CliError, add_setting_options,
                                      apply_settings)
from coordinator.zoctl.summary import ProgressBar, print_summary, summary_from_status
from distzo.common.errors import counted


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


def register(sub: Any) -> None:
    """Add ``reference`` and ``up`` to zoctl's subcommands (``sub``: the parser's subparsers)."""
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
