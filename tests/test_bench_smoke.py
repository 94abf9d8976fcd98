"""The GPU benchmark script runs end to end on CPU (--cpu-smoke), ZO2's side included (a stand-in script)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

# stands in for ZO2's test/mezo_sgd/hf_opt/test_speed.py: the same flags, the same step lines
FAKE_ZO2 = '''
import argparse, json, sys
ap = argparse.ArgumentParser()
for flag in ("--zo_method", "--task", "--model_name", "--model_dtype"):
    ap.add_argument(flag)
for flag in ("--max_steps", "--batch_size", "--sequence_length"):
    ap.add_argument(flag, type=int)
a = ap.parse_args()
open("calls.jsonl", "a").write(json.dumps(vars(a)) + "\\n")
for i in range(a.max_steps):
    ms = 1000.0 if i == 0 else 100.0 + i   # the first (warm-up) step is slow
    print(f"Time cost after iteration {i + 1}: {ms:.2f} ms, {a.batch_size * a.sequence_length / ms * 1e3:.2f} tok/s")
'''


@pytest.mark.cluster
def test_bench_gpu_cpu_smoke_runs_every_side_and_prints_the_table_last(tmp_path):
    zo2 = tmp_path / "zo2"
    script = zo2 / "test" / "mezo_sgd" / "hf_opt" / "test_speed.py"
    script.parent.mkdir(parents=True)
    script.write_text(FAKE_ZO2)
    out = tmp_path / "res.json"
    r = subprocess.run([sys.executable, str(ROOT / "bench" / "bench_gpu.py"), "--cpu-smoke", "--work", str(tmp_path / "w"),
                        "--mezo-served", "float32", "--steps", "3", "--warmup", "1", "--zo2", "zo2",  # relative, as scripts/gpu_check.sh gives it
                        "--windows", "auto",  # the plan's window: one distzo row per setting
                        "--json-out", str(out)], capture_output=True, text=True, timeout=900, cwd=str(tmp_path))
    assert r.returncode == 0, r.stderr[-3000:]
    lines = r.stdout.strip().splitlines()
    header = next(i for i, line in enumerate(lines) if "distzo tok/s" in line)
    assert len(lines) - header == 3, r.stdout[-2000:]  # the table is last: header + one line per setting
    res = json.loads(out.read_text())
    rows = res["rows"]
    assert {(x["setting"], x["side"]) for x in rows} == {(s, side) for s in ("mezo", "zo2") for side in ("distzo", "resident", "zo2")}
    for x in rows:
        assert "error" not in x, x
        assert x["tokens_per_second"] > 0 and x["floor_over_measured"] > 0
    for x in (x for x in rows if x["side"] != "zo2"):
        assert x["tokens_per_step"] == x["batch"] * x["seq_len"]  # every row filled to the sequence length
        assert len(x["step_durations"]) == 4  # warm-up + timed
        assert isinstance(x["window"], int) and x["window"] >= 1, x  # "auto" resolved by the plan
    calls = [json.loads(line) for line in (tmp_path / "zo2" / "calls.jsonl").read_text().splitlines()]
    assert sorted((c["batch_size"], c["sequence_length"], c["model_dtype"], c["zo_method"], c["max_steps"]) for c in calls) == \
        [(1, 96, "fp16", "zo2", 4), (4, 32, "fp32", "zo2", 4)]
    zo = next(x for x in rows if x["side"] == "zo2" and x["setting"] == "mezo")
    assert zo["step_seconds"] == 0.102  # median of the timed steps (101, 102, 103 ms): the warm-up step is excluded


def test_prefix_families_names_an_unknown_model_type_in_one_line():
    r = subprocess.run([sys.executable, str(ROOT / "bench" / "prefix_families.py"), "opt", "nonsense"],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 1 and r.stdout == "", (r.returncode, r.stdout, r.stderr)
    assert r.stderr == "prefix_families.py: nonsense: not a transformers model_type (e.g. opt, llama, gpt2)\n"
