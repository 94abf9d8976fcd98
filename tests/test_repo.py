"""The repository keeps its promises: README commands, CI, generated stubs, the layout's import graph."""

from __future__ import annotations

import importlib.util
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def readme_commands() -> list[str]:
    return re.findall(r"```bash\n((?:bash scripts/install-test-tools.sh && )?python3 -m venv[^\n]+)\n```", (ROOT / "README.md").read_text())


def test_readme_has_exactly_two_setup_commands_and_ci_runs_the_test_one():
    cmds = readme_commands()
    assert len(cmds) == 2, cmds
    main, tests = cmds
    assert "zoctl" in main and "pip install torch==2.13.0" in main
    assert "pytest" in tests and "pip install torch==2.13.0" in tests
    assert main.index("torch==2.13.0") < main.index("pip install -e")
    ci = (ROOT / ".ci" / "run").read_text().splitlines()
    assert tests in ci, "'.ci/run' must run the README's test command verbatim"


def test_generated_stubs_are_fresh(tmp_path):
    """protos/*_pb2*.py are committed; regenerating them from the .proto files changes nothing."""
    from protos.generate import PROTOS, generate

    generate(tmp_path)
    for proto in PROTOS:
        stem = proto.removesuffix(".proto")
        for suffix in ("_pb2.py", "_pb2_grpc.py", "_pb2.pyi"):
            fresh = (tmp_path / "protos" / f"{stem}{suffix}").read_bytes()
            committed = (ROOT / "protos" / f"{stem}{suffix}").read_bytes()
            assert fresh == committed, f"protos/{stem}{suffix} is stale: run python -m protos.generate"


def test_the_declared_lower_bounds_are_the_tested_versions():
    """CI installs the newest versions the ranges allow; each range's floor must be that version, so the
    lower bound pyproject.toml promises is the one the suite ran on (raise the floor when CI moves on)."""
    import tomllib
    from importlib.metadata import version

    from packaging.requirements import Requirement
    from packaging.version import Version

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    reqs = [Requirement(r) for r in project["dependencies"] + project["optional-dependencies"]["test"]]
    checked = 0
    for req in reqs:
        if req.marker is not None and not req.marker.evaluate():
            continue
        floors = [Version(s.version) for s in req.specifier if s.operator in (">=", "==")]
        if not floors:
            continue
        installed = Version(Version(version(req.name)).base_version)
        floor = max(floors)
        assert installed.release[: len(floor.release)] == floor.release, f"{req.name}: declared {req.specifier}, tested {installed}"
        checked += 1
    assert checked == len(reqs) - sum(r.marker is not None and not r.marker.evaluate() for r in reqs)


MAX_MODULE_LINES = 400  # the brief's "modules stay small"; protos' generated stubs are not project modules


def test_the_layout_has_no_import_cycle_and_no_service_imports_another():
    """scripts/import_graph.py on the source (no import runs): no import cycle, function-local imports counted;
    gpuworker and coordinator import nothing of each other and paramserver neither (what two services share is
    in distzo/); no package folder holds more than 12 modules and no module more than 400 lines."""
    spec = importlib.util.spec_from_file_location("import_graph", ROOT / "scripts" / "import_graph.py")
    graph = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(graph)
    result = graph.analyse()
    assert result["cycles"] == [], "import cycles: " + "; ".join(" -> ".join(c["cycle"]) for c in result["cycles"])
    assert result["service_imports"] == [], result["service_imports"]
    folders: dict[Path, int] = {}
    for path in graph.project_modules().values():
        if path.name not in ("__init__.py", "__main__.py"):
            folders[path.parent] = folders.get(path.parent, 0) + 1
    assert max(folders.values()) <= 12, {str(f.relative_to(ROOT)): n for f, n in folders.items() if n > 12}
    long = {str(p.relative_to(ROOT)): n for p in graph.project_modules().values()
            if (n := len(p.read_text().splitlines())) > MAX_MODULE_LINES}
    assert not long, f"modules over {MAX_MODULE_LINES} lines (split them by concern): {long}"


def _load_script(name: str):  # noqa: ANN202
    spec = importlib.util.spec_from_file_location(name, ROOT / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # its dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def test_every_planted_bug_still_plants_where_it_says():
    """scripts/plant_bugs.py's bugs stay current as code moves: each one's text occurs exactly once in its file
    (or its patch applies), so the planted-bug table in tests/README.md can be re-run at any time."""
    import subprocess

    bugs = _load_script("plant_bugs")
    for bug in bugs.BUGS:
        if bug.patch:
            r = subprocess.run(["git", "apply", "--check", str(ROOT / bug.patch)], cwd=ROOT, capture_output=True, text=True)
            assert r.returncode == 0, f"{bug.name}: {bug.patch} does not apply: {r.stderr}"
            continue
        count = (ROOT / bug.file).read_text().count(bug.find)
        assert count == 1, f"{bug.name}: its text occurs {count} times in {bug.file} (expected once): update scripts/plant_bugs.py"
