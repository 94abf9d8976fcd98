"""The project's import graph, from the source: cycles, and imports between the services.

    python scripts/import_graph.py [--json]

Reads every module of the project's packages (``distzo``, ``paramserver``, ``gpuworker``, ``coordinator``,
``protos``) with ``ast`` and builds the graph of project imports, module to module. An import inside a
function counts as much as one at the top (a cycle dodged by a function-local import is still a cycle);
imports under ``if TYPE_CHECKING:`` count too (a type hint couples the modules as well). Reports:

* cycles: the strongly connected components of more than one module (Tarjan), each with one cycle in it;
* service imports: ``gpuworker`` and ``coordinator`` importing each other, ``paramserver`` importing either;
* function-local imports of project modules (for the reader: each should have a reason written beside it).

Exit status 1 when there is a cycle or a service-to-service import, 0 otherwise.
"""

from __future__ import annotations

import argparse
import ast
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("distzo", "paramserver", "gpuworker", "coordinator", "protos")
# a service may import the shared layers (distzo, protos) and, for workers and the coordinator, the parameter
# server's client; never another service's internals
FORBIDDEN = {("gpuworker", "coordinator"), ("coordinator", "gpuworker"), ("paramserver", "gpuworker"),
             ("paramserver", "coordinator")}


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def project_modules() -> dict[str, Path]:
    out = {}
    for pkg in PACKAGES:
        for path in sorted((ROOT / pkg).rglob("*.py")):
            if "__pycache__" not in path.parts and not path.name.endswith(("_pb2.py", "_pb2_grpc.py")):
                out[module_name(path)] = path
    return out


def resolve(name: str, modules: dict[str, Path]) -> str | None:
    """The project module an imported name lives in (the longest prefix that is a module)."""
    parts = name.split(".")
    for n in range(len(parts), 0, -1):
        cand = ".".join(parts[:n])
        if cand in modules:
            return cand
    return None


def imports_of(mod: str, path: Path, modules: dict[str, Path]) -> list[tuple[str, bool, int]]:
    """(imported project module, inside a function, line) for every import in the module."""
    tree = ast.parse(path.read_text(), str(path))
    package = mod if path.name == "__init__.py" else mod.rpartition(".")[0]
    found = []

    def visit(node: ast.AST, in_function: bool) -> None:
        for child in ast.iter_child_nodes(node):
            local = in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
            names: list[str] = []
            if isinstance(child, ast.Import):
                names = [a.name for a in child.names]
            elif isinstance(child, ast.ImportFrom):
                base = child.module or ""
                if child.level:
                    up = package.split(".")
                    base = ".".join(up[: len(up) - child.level + 1] + ([base] if base else []))
                names = [f"{base}.{a.name}" if base else a.name for a in child.names]
            for name in names:
                target = resolve(name, modules)
                if target is not None and target != mod:
                    found.append((target, local, child.lineno))
            visit(child, local)

    visit(tree, False)
    return found


def strongly_connected(graph: dict[str, set[str]]) -> list[list[str]]:
    """Tarjan's algorithm (iterative): the components of more than one node."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    comps: list[list[str]] = []
    counter = 0
    for root in graph:
        if root in index:
            continue
        work = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = counter
        counter += 1
        stack.append(root)
        on_stack.add(root)
        while work:
            node, it = work[-1]
            nxt = next(it, None)
            if nxt is None:
                work.pop()
                if work:
                    low[work[-1][0]] = min(low[work[-1][0]], low[node])
                if low[node] == index[node]:
                    comp = []
                    while True:
                        w = stack.pop()
                        on_stack.discard(w)
                        comp.append(w)
                        if w == node:
                            break
                    if len(comp) > 1:
                        comps.append(sorted(comp))
            elif nxt not in index:
                index[nxt] = low[nxt] = counter
                counter += 1
                stack.append(nxt)
                on_stack.add(nxt)
                work.append((nxt, iter(sorted(graph[nxt]))))
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
    return comps


def one_cycle(comp: list[str], graph: dict[str, set[str]]) -> list[str]:
    """A cycle through the component's first module (breadth-first back to it)."""
    start, members = comp[0], set(comp)
    prev = {start: None}
    queue = [start]
    while queue:
        node = queue.pop(0)
        for nxt in sorted(graph[node] & members):
            if nxt == start:
                path = [node]
                while prev[path[-1]] is not None:
                    path.append(prev[path[-1]])
                return list(reversed(path)) + [start]
            if nxt not in prev:
                prev[nxt] = node
                queue.append(nxt)
    return comp


def analyse() -> dict:
    modules = project_modules()
    graph: dict[str, set[str]] = {m: set() for m in modules}
    local_imports, service_imports = [], []
    for mod, path in modules.items():
        for target, local, line in imports_of(mod, path, modules):
            graph[mod].add(target)
            where = f"{path.relative_to(ROOT)}:{line}"
            if local:
                local_imports.append({"from": mod, "to": target, "at": where})
            if (mod.split(".")[0], target.split(".")[0]) in FORBIDDEN:
                service_imports.append({"from": mod, "to": target, "at": where})
    comps = strongly_connected(graph)
    return {"modules": len(modules), "edges": sum(len(v) for v in graph.values()),
            "cycles": [{"modules": c, "cycle": one_cycle(c, graph)} for c in comps],
            "service_imports": service_imports, "function_local_imports": local_imports}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    result = analyse()
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        print(f"{result['modules']} modules, {result['edges']} import edges")
        print(f"{len(result['cycles'])} import cycles")
        for c in result["cycles"]:
            print(f"  {len(c['modules'])} modules ({', '.join(c['modules'])}); one cycle: " + " -> ".join(c["cycle"]))
        print(f"{len(result['service_imports'])} service-to-service imports")
        for s in result["service_imports"]:
            print(f"  {s['from']} -> {s['to']} ({s['at']})")
        print(f"{len(result['function_local_imports'])} function-local imports of project modules")
    return 1 if result["cycles"] or result["service_imports"] else 0


if __name__ == "__main__":
    sys.exit(main())
