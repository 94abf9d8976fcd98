"""Which coordinator a control command (status, pause, eval, export, train, ...) talks to.

Nothing global: a local cluster of ``zoctl up`` is announced only in its own run directory
(``<run dir>/cluster.json``, removed at shutdown), and a command reaches, in this order,

1. ``--coordinator ADDR`` (with ``--token-file`` and the TLS flags): that address;
2. ``--run-dir DIR``: the cluster running in DIR;
3. ``--context NAME``: a named context (``zoctl context set``; ``~/.config/distzo/contexts.json``);
4. the run directory it is started in (``./cluster.json``), or the one cluster running under
   ``./runs/``; several there is an error that lists them;
5. the current context (``zoctl context use NAME``); else an error naming the flags.

A record counts only when it belongs to this user (file owner) and its processes are alive
(the supervising ``zoctl up`` and the coordinator): a stale record of a killed run, or another
user's cluster on the same machine, is never picked. Every command says on stderr which
cluster it talks to. Only the standard library is imported here (control commands start fast).
"""

from __future__ import annotations

import json
import os
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

from distzo.common.durable import write_atomic
from distzo.run.runlog import CLUSTER_FILE

DAMAGED = "is damaged"  # a record that is not what zoctl up writes: bad input (exit 2), not an unreachable cluster
RUNS_DIR = "runs"


class TargetError(Exception):
    """No cluster to talk to, or more than one candidate: ``code`` is zoctl's exit code (2 or 3)."""

    def __init__(self, message: str, code: int):
        super().__init__(message)
        self.code = code


@dataclass(frozen=True)
class Target:
    """A coordinator address and how to reach it; ``source`` says where it came from (shown to the user)."""

    address: str
    token_file: str | None
    tls_ca: str | None
    tls_cert: str | None
    tls_key: str | None
    source: str
    primary: str | None = None  # zoctl up --hosts: the primary parameter server and the replicas (host -> address)
    replicas: dict[str, str] | None = None


def contexts_file() -> Path:
    """``$XDG_CONFIG_HOME/distzo/contexts.json`` (default ``~/.config/distzo/contexts.json``)."""
    base = os.environ.get("XDG_CONFIG_HOME") or os.path.join(os.path.expanduser("~"), ".config")
    return Path(base) / "distzo" / "contexts.json"


CONTEXT_KEYS = ("coordinator", "token_file", "tls_ca", "tls_cert", "tls_key")


def load_contexts() -> dict[str, Any]:
    """``{"current": NAME | None, "contexts": {NAME: {coordinator, token_file, tls_ca, tls_cert, tls_key}}}``.

    Read defensively: the user may have edited it. Anything but that shape (not a file, not JSON, a
    context that is not a mapping of strings, ...) is a TargetError (exit 2) naming the file and what is wrong."""
    path = contexts_file()
    if not path.exists():
        return {"current": None, "contexts": {}}
    try:
        if not path.is_file():
            raise ValueError("it is not a regular file")
        doc = json.loads(path.read_bytes())
        if not isinstance(doc, dict) or not isinstance(doc.get("contexts"), dict):
            raise ValueError('expected a JSON object with a "contexts" object')
        if doc.get("current") is not None and not isinstance(doc["current"], str):
            raise ValueError('"current" must be a context name or null')
        for name, ctx in doc["contexts"].items():
            if not isinstance(ctx, dict) or not isinstance(ctx.get("coordinator"), str):
                raise ValueError(f"context {name[:60]!r} must be an object with a \"coordinator\" address")
            bad = [k for k in CONTEXT_KEYS if ctx.get(k) is not None and not isinstance(ctx[k], str)]
            if bad:
                raise ValueError(f"context {name[:60]!r}: {bad[0]} must be a path (a string)")
        return doc
    except (OSError, ValueError) as exc:
        why = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)[:200]
        raise TargetError(f"{path} (zoctl's named contexts) is damaged: {why}; fix or remove it", 2) from None


@contextmanager
def contexts_locked() -> Iterator[None]:
    """Hold the contexts file's lock (``contexts.json.lock``, flock): a read-modify-write of it by several
    ``zoctl context`` commands at once loses no change."""
    import fcntl

    path = contexts_file()
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path.with_name(path.name + ".lock"), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def save_contexts(doc: dict[str, Any]) -> Path:
    """Write the contexts file whole (unique temporary name, renamed into place; mode 0600); call it
    under ``contexts_locked``."""
    path = contexts_file()
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(path, json.dumps(doc, indent=2, sort_keys=True).encode(), 0o600)
    return path


def _alive(pid: Any) -> bool:
    if not isinstance(pid, int) or pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, but another user's: not ours
        return False
    return True


def read_record(run_dir: Path) -> tuple[dict[str, Any] | None, str]:
    """The live cluster record of ``run_dir``, or None and why not (for messages)."""
    path = run_dir / CLUSTER_FILE
    try:
        st = path.stat()
    except OSError:
        return None, f"no local cluster is running in {run_dir} (no {CLUSTER_FILE})"
    if hasattr(os, "getuid") and st.st_uid != os.getuid():
        return None, f"the cluster in {run_dir} belongs to another user (uid {st.st_uid})"
    try:
        info = json.loads(path.read_bytes())
        _check_record(info)
        address = info["coordinator"]
    except (OSError, ValueError) as exc:
        why = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)[:200]
        return None, f"{path} {DAMAGED} ({why})"
    pids = info.get("pids") or {}
    if not _alive(info.get("supervisor_pid")) or not _alive(pids.get("coordinator")):
        return None, f"the cluster of {run_dir} (coordinator {address}) is no longer running"
    return info, ""


def _check_record(info: Any) -> None:
    """ValueError unless ``info`` has the shape ``zoctl up`` writes (a cluster.json edited or damaged by hand)."""
    if not isinstance(info, dict) or not isinstance(info.get("coordinator"), str):
        raise ValueError('expected a JSON object with a "coordinator" address')
    for key in ("token_file", "tls_ca", "tls_cert", "tls_key"):
        if info.get(key) is not None and not isinstance(info[key], str):
            raise ValueError(f"{key} must be a path")
    if not isinstance(info.get("pids") or {}, dict) or not isinstance(info.get("replicas") or {}, dict):
        raise ValueError("pids and replicas must be objects")
    servers = info.get("param_servers") or []
    if not isinstance(servers, list) or not all(isinstance(a, str) for a in servers):
        raise ValueError("param_servers must be a list of addresses")


def _from_record(info: dict[str, Any], run_dir: Path) -> Target:
    where = "this run directory" if str(run_dir) == "." else str(run_dir)
    return Target(str(info["coordinator"]), info.get("token_file"), info.get("tls_ca"), info.get("tls_cert"),
                  info.get("tls_key"), f"the local cluster of {where}", (info.get("param_servers") or [None])[0],
                  info.get("replicas"))


def running_clusters(base: Path) -> list[Path]:
    """Run directories directly under ``base`` whose cluster is running (this user's), sorted."""
    if not base.is_dir():
        return []
    return sorted(d for d in base.iterdir() if (d / CLUSTER_FILE).is_file() and read_record(d)[0] is not None)


def resolve(coordinator: str | None = None, run_dir: str | None = None, context: str | None = None,
            cwd: Path | None = None) -> Target:
    """The coordinator to talk to (see the module docstring for the order). Raises TargetError."""
    if coordinator:
        return Target(coordinator, None, None, None, None, "--coordinator")
    if run_dir:
        d = Path(run_dir)
        info, why = read_record(d)
        if info is None:
            if (d / "steps.jsonl").is_file() or (d / "evals.jsonl").is_file():  # a run that ended (or was killed)
                hint = (f"`zoctl report {run_dir}` shows it; `zoctl up --config {d / 'job.yaml'} --run-dir {run_dir} --resume "
                        f"--steps N` continues it to step N")
            else:
                hint = f"start it with `zoctl up --run-dir {run_dir}`"
            raise TargetError(f"--run-dir {run_dir}: {why} ({hint})", 2 if DAMAGED in why else 3)
        return _from_record(info, d)
    if context:
        return _from_context(context)
    here = cwd or Path.cwd()
    if (here / CLUSTER_FILE).is_file():
        info, why = read_record(here)
        if info is None:
            raise TargetError(f"{why}; pass --run-dir DIR, --coordinator ADDR or --context NAME", 2 if DAMAGED in why else 3)
        return _from_record(info, Path("."))
    found = running_clusters(here / RUNS_DIR)
    if len(found) == 1:
        return _from_record(read_record(found[0])[0] or {}, found[0].relative_to(here))
    if len(found) > 1:
        listed = ", ".join(str(d.relative_to(here)) for d in found)
        raise TargetError(f"{len(found)} local clusters are running here ({listed}): say which one with --run-dir DIR", 2)
    current = load_contexts().get("current") if contexts_file().exists() else None
    if current:
        return _from_context(current)
    raise TargetError("no cluster named and none running here (./runs/): pass --run-dir DIR (a `zoctl up` run "
                      "directory), --coordinator ADDR or --context NAME, or start one with `zoctl up`", 3)


def _from_context(name: str) -> Target:
    doc = load_contexts()
    ctx = doc["contexts"].get(name)
    if not isinstance(ctx, dict) or not ctx.get("coordinator"):
        known = ", ".join(sorted(doc["contexts"])) or "none"
        raise TargetError(f"unknown context {name!r} (known: {known}; add one with `zoctl context set NAME "
                          "--coordinator ADDR`)", 2)
    return Target(str(ctx["coordinator"]), ctx.get("token_file"), ctx.get("tls_ca"), ctx.get("tls_cert"),
                  ctx.get("tls_key"), f"context {name}")


# ----------------------------------------------------------------------------- zoctl context
def register(sub: Any) -> None:
    """Add ``context`` to zoctl's subcommands: named clusters, as kubectl's contexts."""
    p = sub.add_parser("context", help="named clusters: set, use, list, delete (as kubectl's contexts)",
                       description="A context names a coordinator and its credentials; `--context NAME` (or the current "
                                   "context, `zoctl context use NAME`) makes the control commands talk to it.")
    p.add_argument("action", choices=["set", "use", "list", "delete"])
    p.add_argument("name", nargs="?", metavar="NAME")
    p.add_argument("--coordinator", metavar="ADDR", help="set: the coordinator host:port")
    p.add_argument("--token-file", help="set: bearer token file")
    p.add_argument("--tls-ca", help="set: CA certificate (PEM)")
    p.add_argument("--tls-cert", help="set: client certificate (PEM)")
    p.add_argument("--tls-key", help="set: client key (PEM)")
    p.add_argument("-v", "--verbose", action="count", default=0)
    p.set_defaults(func=cmd_context)


def cmd_context(args: Any) -> int:
    if args.action == "list":
        doc = load_contexts()
        for name in sorted(doc["contexts"]):
            mark = "*" if name == doc.get("current") else " "
            print(f"{mark} {name:<20} {doc['contexts'][name].get('coordinator')}")
        return 0
    if not args.name:
        raise TargetError(f"zoctl context {args.action} needs a NAME", 2)
    if args.action == "set" and not args.coordinator:
        raise TargetError("zoctl context set NAME needs --coordinator ADDR", 2)
    with contexts_locked():  # read, change and write as one: concurrent commands each keep their change
        doc = load_contexts()
        ctxs: dict[str, Any] = doc.setdefault("contexts", {})
        if args.action == "set":
            files = {k: getattr(args, k) for k in ("token_file", "tls_ca", "tls_cert", "tls_key")}
            ctxs[args.name] = {"coordinator": args.coordinator,
                               **{k: os.path.abspath(v) for k, v in files.items() if v}}  # usable from any directory
            print(f"context {args.name}: coordinator {args.coordinator} ({save_contexts(doc)})")
            return 0
        if args.name not in ctxs:
            raise TargetError(f"unknown context {args.name!r} (known: {', '.join(sorted(ctxs)) or 'none'})", 2)
        if args.action == "use":
            doc["current"] = args.name
            print(f"current context: {args.name} (coordinator {ctxs[args.name]['coordinator']})")
        else:
            del ctxs[args.name]
            if doc.get("current") == args.name:
                doc["current"] = None
            print(f"context {args.name} deleted")
        save_contexts(doc)
    return 0
