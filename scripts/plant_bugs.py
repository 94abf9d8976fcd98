#!/usr/bin/env python3
"""Plant known bugs, one at a time, in a scratch copy of this checkout and show that the suite catches each.

For every bug in ``BUGS``: copy the working tree (tracked and untracked files git does not ignore) to a
scratch directory, change one place in one file (a search/replace that must match exactly once, or a patch
file applied with ``git apply``), run the tests listed for it there (``PYTHONPATH`` points at the copy, so
pytest and every process the tests start import the planted code; this checkout is never modified), and
record which tests failed. A bug is caught when at least one listed test fails; the table it prints is the
one in tests/README.md. ``--control`` first runs every listed test on an unplanted copy: they must pass,
so a failure below is the bug's doing.

    python scripts/plant_bugs.py                  # every bug, a markdown table at the end
    python scripts/plant_bugs.py --list           # the bugs and their tests
    python scripts/plant_bugs.py g-sign ddp-mean  # some of them
    python scripts/plant_bugs.py --control --out /tmp/bugs.md

To add a bug: append a ``Bug`` (name, what it is, file, find + replace or patch, the tests expected to catch
it). Exit code: 0 when every bug run was caught, 1 when one was not (or a planting failed to apply).
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
MAX_SHOWN = 6  # failing test ids shown per bug in the table (the log on stderr has them all)


@dataclass(frozen=True)
class Bug:
    name: str
    what: str
    file: str  # relative to the repository root
    tests: tuple[str, ...]  # pytest node ids or paths, with optional "-k EXPR" entries
    find: str = ""  # exact text, must occur once in `file`
    replace: str = ""
    patch: str = ""  # or: a patch file (relative to the root), applied with `git apply` in the scratch copy
    notes: str = ""


BUGS: list[Bug] = [
    Bug("g-sign", "a sign flipped in the projected gradient: g = (l- - l+) / 2eps",
        "distzo/zo/mezo.py",
        ("tests/test_mezo.py", "tests/test_step.py", "tests/test_reference.py::test_loss_goes_down_on_the_shipped_task"),
        find="return [(per[(j, 1)] - per[(j, -1)]) / (2.0 * eps) for j in range(q)]",
        replace="return [(per[(j, -1)] - per[(j, 1)]) / (2.0 * eps) for j in range(q)]",
        notes="the reference and the cluster share distzo/train/step.py, so up == reference stays equal: the math tests catch it"),
    Bug("pertp-routing", "PertP routing both signs to one worker (the other gets nothing)",
        "distzo/train/plan.py",
        ("tests/test_config_data.py::test_plan_is_deterministic_and_layouts_cover_every_role",
         "tests/test_cluster.py::test_pertp_sends_each_sign_of_a_shard_to_its_own_worker"),
        find="            out.append([Role(j, d, 1 if w % 2 == 0 else -1)])",
        replace="            out.append([Role(j, d, 1), Role(j, d, -1)] if w % 2 == 0 else [])"),
    Bug("ddp-mean", "a DDP shard weighted by its mean (a mean of per-shard mean losses, not sum S / sum N)",
        "distzo/zo/mezo.py",
        ("tests/test_data_pipeline.py::test_ddp_gives_the_projected_gradient_of_dual", "tests/test_mezo.py"),
        find="                total += s\n                count += n\n",
        replace="                total += s / n if n else 0.0\n                count += 1\n"),
    Bug("journal-skip", "a journal record skipped on replay (the first after the snapshot)",
        "paramserver/durability/recovery.py",
        ("tests/test_paramserver.py", "tests/test_durability.py", "tests/test_optim_server.py",
         "tests/test_cluster_faults.py::test_killed_processes_are_replaced_and_the_weights_stay_the_references"),
        find="        for r in replay:\n            store.apply(r, dist)\n",
        replace="        for r in replay[1:]:\n            store.apply(r, dist)\n"),
    Bug("snapshot-version", "a snapshot restored at the wrong version (one before its own: a record applied twice)",
        "paramserver/durability/recovery.py",
        ("tests/test_paramserver.py", "tests/test_durability.py", "tests/test_optim_server.py",
         "tests/test_cluster_faults.py::test_killed_processes_are_replaced_and_the_weights_stay_the_references"),
        find="            base = info.version\n",
        replace="            base = max(0, info.version - 1)\n"),
    Bug("bf16-ulp", "the served bfloat16 rounding off by one ulp (ties rounded up, not to even)",
        "distzo/zo/served.py",
        ("tests/test_served.py", "tests/test_paramserver.py::test_fetch_every_block_equals_the_master"),
        find="return np.uint16((u + np.uint32(0x7FFF) + ((u >> np.uint32(16)) & np.uint32(1))) >> np.uint32(16))",
        replace="return np.uint16((u + np.uint32(0x8000)) >> np.uint32(16))"),
    Bug("lora-transposed", "a LoRA export with A and B transposed (A := B^T, B := A^T)",
        "distzo/model/adapters.py",
        ("tests/test_lora.py::test_lora_trains_only_the_adapters_and_exports_what_peft_loads",),
        find='                src = adapters[name.removeprefix("base_model.model.")]\n',
        replace='                src = adapters[name.removeprefix("base_model.model.").replace(".lora_A.", ".lora_T.")'
                '.replace(".lora_B.", ".lora_A.").replace(".lora_T.", ".lora_B.")].T\n',
        notes="the reference and the server export through the same code, so up == reference stays equal"),
    Bug("prefix-mask", "the prefix's attention mask shifted by one position",
        "distzo/model/prefix.py",
        ("tests/test_prefix.py",),
        find='return {"attention_mask": torch.cat((ones, attention_mask), dim=1),',
        replace='return {"attention_mask": torch.cat((ones, attention_mask), dim=1).roll(1, dims=1),'),
    Bug("apply-token", "the token check skipped on ApplyUpdate",
        "paramserver/service.py",
        ("tests/test_paramserver.py::test_auth_and_tls", "tests/test_security.py"),
        find='PROTECTED = (*STATE_CHANGING, "FollowJournal")',
        replace='PROTECTED = (*(m for m in STATE_CHANGING if m != "ApplyUpdate"), "FollowJournal")'),
    Bug("replay-short", "a worker replaying one pending record too few (update windows: the newest record dropped)",
        "distzo/zo/forwardweights.py",
        ("tests/test_window.py", "tests/test_matrix.py::test_up_equals_the_reference_bitwise[q2-window4-f32]"),
        find="    live = [r for r in pending if not r.skipped] if block.trainable else []\n",
        replace="    live = [r for r in pending if not r.skipped][:-1] if block.trainable else []\n"),
]


@dataclass
class Outcome:
    bug: Bug
    applied: bool
    failed: list[str] = field(default_factory=list)
    passed: int = 0
    returncode: int | None = None
    seconds: float = 0.0
    error: str = ""

    @property
    def caught(self) -> bool:
        return self.applied and bool(self.failed)


def scratch_copy(dest: Path) -> None:
    """The working tree (tracked files and untracked ones git does not ignore) copied to ``dest``."""
    files = subprocess.run(["git", "-C", str(ROOT), "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
                           capture_output=True, check=True).stdout.split(b"\0")
    for raw in files:
        if not raw:
            continue
        rel = raw.decode()
        src = ROOT / rel
        if not src.is_file():  # deleted in the working tree
            continue
        (dest / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(src, dest / rel)


def plant(bug: Bug, tree: Path) -> None:
    if bug.patch:
        subprocess.run(["git", "apply", "--directory=.", str(ROOT / bug.patch)], cwd=tree, check=True,
                       capture_output=True)
        return
    path = tree / bug.file
    text = path.read_text()
    count = text.count(bug.find)
    if count != 1:
        raise RuntimeError(f"{bug.file}: the text to replace occurs {count} times (expected once): the code moved; "
                           f"update the bug's find/replace")
    path.write_text(text.replace(bug.find, bug.replace))


def pytest_args(tests: tuple[str, ...]) -> list[str]:
    args: list[str] = []
    for t in tests:
        args += t.split(" ", 1) if t.startswith("-k ") else [t]
    return args


def run_tests(tree: Path, tests: tuple[str, ...], timeout: float) -> tuple[int, list[str], int, float, str]:
    env = {**os.environ, "PYTHONPATH": str(tree) + (os.pathsep + os.environ["PYTHONPATH"] if os.environ.get("PYTHONPATH") else "")}
    env.pop("DISTZO_TEST_CACHE", None)
    check = subprocess.run([sys.executable, "-c", "import distzo, paramserver, coordinator, gpuworker; "
                            "print(distzo.__file__, paramserver.__file__)"], cwd=tree, env=env, capture_output=True, text=True)
    if check.returncode != 0 or any(not Path(p).resolve().is_relative_to(tree.resolve()) for p in check.stdout.split()):
        raise RuntimeError(f"the scratch copy's modules are not the ones imported: {check.stdout} {check.stderr}")
    t0 = time.monotonic()
    r = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-rfE", "--timeout=900",
                        *pytest_args(tests)], cwd=tree, env=env, capture_output=True, text=True, timeout=timeout)
    failed = sorted({m.group(2) for m in re.finditer(r"^(FAILED|ERROR) (\S+)", r.stdout, re.M)})
    passed = sum(int(n) for n in re.findall(r"(\d+) passed", r.stdout.splitlines()[-1] if r.stdout.strip() else ""))
    return r.returncode, failed, passed, time.monotonic() - t0, r.stdout[-3000:]


def run_bug(bug: Bug | None, tests: tuple[str, ...], timeout: float, keep: bool) -> Outcome:
    tmp = Path(tempfile.mkdtemp(prefix=f"plant-{bug.name if bug else 'control'}-"))
    tree = tmp / "tree"
    outcome = Outcome(bug or Bug("control", "no bug (the listed tests on an unplanted copy)", "-", tests), applied=True)
    try:
        scratch_copy(tree)
        if bug is not None:
            try:
                plant(bug, tree)
            except (RuntimeError, subprocess.CalledProcessError) as exc:
                outcome.applied, outcome.error = False, str(exc)
                return outcome
        rc, failed, passed, seconds, tail = run_tests(tree, tests, timeout)
        outcome.returncode, outcome.failed, outcome.passed, outcome.seconds = rc, failed, passed, seconds
        if rc not in (0, 1):  # 1: tests failed; anything else: pytest could not run them
            outcome.error = f"pytest exited {rc}:\n{tail}"
        return outcome
    finally:
        if keep:
            print(f"kept {tree}", file=sys.stderr)
        else:
            shutil.rmtree(tmp, ignore_errors=True)


def table(outcomes: list[Outcome]) -> str:
    lines = ["| bug | where | tests run | caught | failing tests | s |", "|---|---|---|---|---|---|"]
    for o in outcomes:
        shown = [f"`{f}`" for f in o.failed[:MAX_SHOWN]] + ([f"(and {len(o.failed) - MAX_SHOWN} more)"]
                                                             if len(o.failed) > MAX_SHOWN else [])
        failed = "<br>".join(shown) or ("-" if o.applied else f"not applied: {o.error}")
        caught = "yes" if o.caught else ("n/a" if o.bug.name == "control" else "**NO**")
        if o.bug.name == "control":
            caught = "passes" if o.returncode == 0 else "**FAILS**"
        lines.append(f"| {o.bug.name}: {o.bug.what} | `{o.bug.file}` | {', '.join(f'`{t}`' for t in o.bug.tests)} | "
                     f"{caught} | {failed} | {o.seconds:.0f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("names", nargs="*", help="bugs to plant (default: all)")
    ap.add_argument("--list", action="store_true", help="list the bugs and their tests, plant nothing")
    ap.add_argument("--control", action="store_true", help="first run every listed test on an unplanted copy")
    ap.add_argument("--timeout", type=float, default=3600.0, help="seconds for one bug's tests")
    ap.add_argument("--keep", action="store_true", help="keep the scratch copies (their paths on stderr)")
    ap.add_argument("--out", help="also write the markdown table here")
    args = ap.parse_args(argv)
    known = {b.name: b for b in BUGS}
    unknown = [n for n in args.names if n not in known]
    if unknown:
        ap.error(f"unknown bugs {unknown}; known: {', '.join(known)}")
    bugs = [known[n] for n in args.names] if args.names else BUGS
    if args.list:
        for b in bugs:
            print(f"{b.name}: {b.what}\n  {b.file}\n  tests: {' '.join(b.tests)}")
        return 0
    outcomes = []
    if args.control:
        tests = tuple(dict.fromkeys(t for b in bugs for t in b.tests))
        print(f"control: {len(tests)} test selections on an unplanted copy ...", file=sys.stderr, flush=True)
        outcomes.append(run_bug(None, tests, args.timeout, args.keep))
        print(f"control: exit {outcomes[-1].returncode}, failed {outcomes[-1].failed}", file=sys.stderr, flush=True)
    for b in bugs:
        print(f"{b.name}: planting in {b.file}, running {' '.join(b.tests)} ...", file=sys.stderr, flush=True)
        o = run_bug(b, b.tests, args.timeout, args.keep)
        outcomes.append(o)
        state = f"caught by {len(o.failed)}: " + ", ".join(o.failed) if o.caught else f"NOT CAUGHT {o.error}"
        print(f"{b.name}: {state} ({o.seconds:.0f} s)", file=sys.stderr, flush=True)
    text = table(outcomes)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")
    control_ok = not args.control or outcomes[0].returncode == 0
    return 0 if control_ok and all(o.caught for o in outcomes if o.bug.name != "control") else 1


if __name__ == "__main__":
    sys.exit(main())
