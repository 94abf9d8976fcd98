"""zoctl's commands for a running coordinator: status, train, pause, resume, stop, snapshot, eval, export.

Each finds its cluster (``coordinator.zoctl.targets``: --coordinator, --run-dir, --context, or the one
running here), says on stderr which one it talks to, and makes one call. Light on purpose (no
torch, no pydantic until a command needs the config): these start in well under a second.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from typing import Any

from coordinator.zoctl.common import (EXIT_BAD_INPUT, EXIT_FAILED, EXIT_OK, EXIT_UNREACHABLE, CliError, add_setting_options,
                                   apply_settings, print_json)
from coordinator.zoctl.summary import ProgressBar, print_status, status_dict


def _cluster_target(args: argparse.Namespace):  # noqa: ANN202
    """The coordinator named by --coordinator, --run-dir, --context or found here (coordinator.zoctl.targets), and its
    credentials; says on stderr which cluster it is when it was not given as --coordinator."""
    from coordinator.zoctl.targets import TargetError, resolve
    from distzo.infra.rpc import Credentials

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
    args.resolved_replicas = (target.primary, target.replicas or {}, creds)  # zoctl up --hosts
    return target.address, creds


def _call(args: argparse.Namespace, method: str, request, timeout: float = 30.0):  # noqa: ANN001, ANN202
    import grpc

    from distzo.infra.coordclient import CoordinatorClient

    address, creds = _cluster_target(args)
    with CoordinatorClient(address, creds) as client:
        try:
            return client.call(method, request, timeout)
        except grpc.RpcError as exc:
            if exc.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
                raise CliError(f"cannot reach the coordinator at {address}: {exc.details()}", EXIT_UNREACHABLE) from None
            code = EXIT_BAD_INPUT if exc.code() in (grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.UNAUTHENTICATED,
                                                    grpc.StatusCode.FAILED_PRECONDITION,
                                                    grpc.StatusCode.PERMISSION_DENIED) else EXIT_FAILED
            raise CliError(f"{exc.code().name.lower()}: {exc.details()}", code) from None


def cmd_status(args: argparse.Namespace) -> int:
    from protos import coordinator_pb2 as cpb

    if not args.watch:
        st = _call(args, "GetStatus", cpb.StatusQuery())
        primary, replicas, creds = getattr(args, "resolved_replicas", (None, {}, None))
        if not replicas:
            print_status(st, args.json)
            return EXIT_OK
        from coordinator.cluster.hostcluster import replica_states  # zoctl up --hosts: the replicas too

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
    progress = ProgressBar(1, enabled=not args.json)
    while True:
        st = _call(args, "GetStatus", cpb.StatusQuery())
        progress.update(st)
        if st.state in ("done", "failed", "stopped", "idle"):
            progress.close()
            print_status(st, args.json)
            if st.state != "failed":
                return EXIT_OK
            return EXIT_BAD_INPUT if st.error_kind == "bad_input" else EXIT_FAILED
        time.sleep(1.0)


def cmd_train(args: argparse.Namespace) -> int:
    from distzo.common.config import JobConfig
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
        if method == "Pause" and reply.state not in ("paused", "stopped", "done", "failed"):
            print("zoctl: pause requested: the job pauses after its current step or evaluation", file=sys.stderr)
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
    # a URL (s3://, gs://, file://) is pushed there by the server (distzo.model.transfer)
    path = args.dir if "://" in args.dir else os.path.abspath(args.dir)
    reply = _call(args, "Export", cpb.ExportJobRequest(path=path, merge=args.merge), timeout=600)
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


def register(sub: Any) -> None:
    """Add the control commands to zoctl's subcommands (``sub``: the parser's subparsers)."""
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
    p.add_argument("--merge", action="store_true", help="train.target lora: write the merged plain model "
                   "(AutoModelForCausalLM) instead of the peft adapter directory (PeftModel.from_pretrained)")
    add_target_options(p)
    p.set_defaults(func=cmd_export)
