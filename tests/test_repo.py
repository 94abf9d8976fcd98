"""The repository keeps its promises: README commands, CI, generated stubs."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def readme_commands() -> list[str]:
    return re.findall(r"```bash\n(python3 -m venv[^\n]+)\n```", (ROOT / "README.md").read_text())


def test_readme_has_exactly_two_setup_commands_and_ci_runs_the_test_one():
    cmds = readme_commands()
    assert len(cmds) == 2, cmds
    main, tests = cmds
    assert "zoctl" in main and "pip install torch==2.13.0" in main
    assert "pytest" in tests and "pip install torch==2.13.0" in tests
    assert main.index("torch==2.13.0") < main.index("pip install -e")
    ci = (ROOT / ".ci" / "run").read_text().splitlines()
    assert tests in ci, "'.ci/run' must run the README's test command verbatim"
