"""Move project modules to new paths and rewrite every reference to them in the tree.

    python scripts/move_modules.py [--rewrite-only] [--dry-run] [MOVE_SET ...]

``MOVES`` below is the layout change of issue 27 (``distzo/`` by concern; the coordinator's zoctl and
cluster launcher; the parameter server's durability and data plane), old dotted module -> new one. The
script ``git mv``s each module (``--rewrite-only``: they are moved already, e.g. on a branch written
against the old layout that merges this one) and rewrites, in every tracked text file but the generated
stubs:

* ``from distzo import generator, served`` -> one ``from NEW_PACKAGE import ...`` per new package;
* every dotted name ``distzo.old`` (imports, ``python -m`` commands, patch targets, docs) -> ``distzo.new.path``,
  except inside ``getLogger("...")`` (logger names stay);
* every file path ``distzo/old.py`` -> ``distzo/new/path.py``.
"""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

MOVES: dict[str, dict[str, str]] = {
    "distzo": {
        # what every layer shares, no torch: the job config, errors, strict JSON, small files and locks
        "distzo.config": "distzo.common.config",
        "distzo.configtext": "distzo.common.configtext",
        "distzo.errors": "distzo.common.errors",
        "distzo.strictjson": "distzo.common.strictjson",
        "distzo.wire_sizes": "distzo.common.wire_sizes",
        "distzo.dtypes": "distzo.common.dtypes",
        "distzo.durable": "distzo.common.durable",
        "distzo.locks": "distzo.common.locks",
        "distzo.cache": "distzo.common.cache",
        # what the service processes share: gRPC, limits, metrics, logs, starting and supervising processes
        "distzo.rpc": "distzo.infra.rpc",
        "distzo.limits": "distzo.infra.limits",
        "distzo.metrics": "distzo.infra.metrics",
        "distzo.logs": "distzo.infra.logs",
        "distzo.procs": "distzo.infra.procs",
        "distzo.supervise": "distzo.infra.supervise",
        # the zeroth-order math and its kernels
        "distzo.generator": "distzo.zo.generator",
        "distzo.generator_cuda": "distzo.zo.generator_cuda",
        "distzo.zkernels": "distzo.zo.zkernels",
        "distzo.windowkernels": "distzo.zo.windowkernels",
        "distzo.kernelcache": "distzo.zo.kernelcache",
        "distzo.served": "distzo.zo.served",
        "distzo.mezo": "distzo.zo.mezo",
        "distzo.optim": "distzo.zo.optim",
        "distzo.replay": "distzo.zo.replay",
        # models: blocks, the families, the block-streaming forward, trainable targets, export
        "distzo.blocks": "distzo.model.blocks",
        "distzo.modeling": "distzo.model.modeling",
        "distzo.modeldir": "distzo.model.modeldir",
        "distzo.families": "distzo.model.families",
        "distzo.forward": "distzo.model.forward",
        "distzo.lockstep": "distzo.model.lockstep",
        "distzo.adapters": "distzo.model.adapters",
        "distzo.prefix": "distzo.model.prefix",
        "distzo.export": "distzo.model.export",
        "distzo.transfer": "distzo.model.transfer",
        # tasks, a job's inputs, the catalog and the presets (and the shipped task, datasets/)
        "distzo.data": "distzo.data.tasks",
        "distzo.jobdata": "distzo.data.jobdata",
        "distzo.catalog": "distzo.data.catalog",
        "distzo.presets": "distzo.data.presets",
        # the step written once, and the reference trainer around it
        "distzo.plan": "distzo.train.plan",
        "distzo.step": "distzo.train.step",
        "distzo.objective": "distzo.train.objective",
        "distzo.precision": "distzo.train.precision",
        "distzo.defaults": "distzo.train.defaults",
        "distzo.reference": "distzo.train.reference",
        # the step-time model behind zoctl plan
        "distzo.perfmodel": "distzo.perf.model",
        "distzo.perfspecs": "distzo.perf.specs",
        "distzo.perftargets": "distzo.perf.targets",
        "distzo.perfpeers": "distzo.perf.peers",
        # a run's record: the run log, the report, the model card
        "distzo.runlog": "distzo.run.runlog",
        "distzo.report": "distzo.run.report",
        "distzo.modelcard": "distzo.run.modelcard",
    },
    "coordinator": {
        "coordinator.cli": "coordinator.zoctl.cli",
        "coordinator.clicommon": "coordinator.zoctl.common",
        "coordinator.control_cli": "coordinator.zoctl.control",
        "coordinator.plan_cli": "coordinator.zoctl.plan",
        "coordinator.targets": "coordinator.zoctl.targets",
        "coordinator.summary": "coordinator.zoctl.summary",
        "coordinator.local": "coordinator.cluster.local",
        "coordinator.hostcluster": "coordinator.cluster.hostcluster",
        "coordinator.hosts": "coordinator.cluster.hosts",
        "coordinator.linkstats": "coordinator.cluster.linkstats",
        "coordinator.rundir": "coordinator.cluster.rundir",
        # the one client of the coordinator's RPCs: the workers and zoctl both use it
        "coordinator.client": "distzo.infra.coordclient",
    },
    "paramserver": {
        "paramserver.journal": "paramserver.durability.journal",
        "paramserver.snapshot": "paramserver.durability.snapshot",
        "paramserver.replication": "paramserver.durability.replication",
        "paramserver.client": "paramserver.dataplane.client",
        "paramserver.transport": "paramserver.dataplane.transport",
        "paramserver.shm": "paramserver.dataplane.shm",
        "paramserver.hostcopy": "paramserver.dataplane.hostcopy",
        "paramserver.fence": "paramserver.dataplane.fence",
        "paramserver.wire": "paramserver.dataplane.wire",
    },
}
# folders that move whole (package data)
DIR_MOVES = {"distzo": {"distzo/datasets": "distzo/data/datasets"}}
SKIP = re.compile(r"^protos/.*_pb2(_grpc)?\.pyi?$|\.(png|jpg|gif|pdf|safetensors|gguf|bin|whl)$")


def path_of(mod: str) -> str:
    return mod.replace(".", "/") + ".py"


def rewriter(moves: dict[str, str], dir_moves: dict[str, str]):
    """A function text -> text applying ``moves`` (dotted) and ``dir_moves`` (paths) in one pass each."""
    names = sorted(moves, key=len, reverse=True)
    dotted = re.compile(r"(?<![\w.])(" + "|".join(re.escape(n) for n in names) + r")(?![\w])")
    paths = {path_of(o): path_of(n) for o, n in moves.items()} | {f"{o}/": f"{n}/" for o, n in dir_moves.items()}
    pathre = re.compile(r"(?<![\w.])(" + "|".join(re.escape(p) for p in sorted(paths, key=len, reverse=True)) + r")")
    pkgs = sorted({n.split(".")[0] for n in moves})
    from_import = re.compile(r"^(\s*)from (" + "|".join(pkgs) + r") import ([\w ,]+?)(\s*#.*)?$", re.M)
    logger = re.compile(r"getLogger\(\"[^\"]*\"\)")
    # an old module that is a package of the new layout (distzo.data): followed by one of the package's
    # modules, or quoted whole (package data), it names the new package already
    children = {o: {n[len(o) + 1:].split(".")[0] for n in moves.values() if n.startswith(o + ".")} for o in moves}
    newer = {o: re.compile(r"(\.| import )(" + "|".join(sorted(c)) + r")\b|\"") for o, c in children.items() if c}

    def fix_from(m: re.Match) -> str:
        indent, pkg, names_s, comment = m.group(1), m.group(2), m.group(3), m.group(4) or ""
        groups: dict[str, list[str]] = {}
        for item in (s.strip() for s in names_s.split(",")):
            name, _, alias = item.partition(" as ")
            old = f"{pkg}.{name.strip()}"
            if old in moves:
                parent, _, base = moves[old].rpartition(".")
                alias = alias.strip() or (name.strip() if base != name.strip() else "")
            else:
                parent, base = pkg, name.strip()
                alias = alias.strip()
            groups.setdefault(parent, []).append(base + (f" as {alias}" if alias else ""))
        lines = [f"{indent}from {p} import {', '.join(ns)}" for p, ns in groups.items()]
        lines[0] += comment
        return "\n".join(lines)

    def fix_dotted(text: str) -> str:
        out, last = [], 0
        protected = [(m.start(), m.end()) for m in logger.finditer(text)]
        for m in dotted.finditer(text):
            old = m.group(1)
            if (any(a <= m.start() < b for a, b in protected) or text.startswith(moves[old], m.start())
                    or (old in newer and newer[old].match(text, m.end()))):
                continue  # a logger name, or the new layout already
            out.append(text[last:m.start()])
            out.append(moves[m.group(1)])
            last = m.end()
        out.append(text[last:])
        return "".join(out)

    def run(text: str) -> str:
        text = fix_dotted(text)  # first: a from-import's new package may start with an old module (distzo.data)
        text = from_import.sub(fix_from, text)
        return pathre.sub(lambda m: paths[m.group(1)], text)

    return run


def tracked_files() -> list[Path]:
    out = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True).stdout.split()
    me = Path(__file__).resolve().relative_to(ROOT).as_posix()  # its own table names the old paths: never rewritten
    return [ROOT / f for f in out if not SKIP.search(f) and f != me]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("sets", nargs="*", default=list(MOVES), help=f"which move sets ({', '.join(MOVES)}; default all)")
    ap.add_argument("--rewrite-only", action="store_true", help="the files are moved already: rewrite references only")
    ap.add_argument("--dry-run", action="store_true", help="list the files that would change")
    args = ap.parse_args()
    moves: dict[str, str] = {}
    dir_moves: dict[str, str] = {}
    for s in args.sets:
        moves |= MOVES[s]
        dir_moves |= DIR_MOVES.get(s, {})
    if not args.rewrite_only and not args.dry_run:
        for old, new in list(dir_moves.items()) + [(path_of(o), path_of(n)) for o, n in moves.items()]:
            dest = ROOT / new
            dest.parent.mkdir(parents=True, exist_ok=True)
            init = dest.parent / "__init__.py"
            if dest.suffix == ".py" and not init.exists():
                init.write_text("")
                subprocess.run(["git", "add", str(init)], cwd=ROOT, check=True)
            subprocess.run(["git", "mv", old, new], cwd=ROOT, check=True)
    fix = rewriter(moves, dir_moves)
    changed = []
    for path in tracked_files():
        if not path.is_file():
            continue
        try:
            text = path.read_text()
        except UnicodeDecodeError:
            continue
        new = fix(text)
        if new != text:
            changed.append(path.relative_to(ROOT))
            if not args.dry_run:
                path.write_text(new)
    print("\n".join(map(str, changed)))
    print(f"{len(changed)} files {'would change' if args.dry_run else 'rewritten'}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
