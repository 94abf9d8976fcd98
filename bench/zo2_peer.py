"""ZO2 (github.com/liangyuwang/zo2) run beside distzo with its own speed script, and GPU memory sampling.

ZO2 is never committed or installed into our environment: ``bench/peers/`` (git-ignored) holds a
checkout and a target directory with the wheels it pins (an older transformers) that the GPU
machine lacks. Its script runs as its own process with those first on PYTHONPATH:

    python test/mezo_sgd/hf_opt/test_speed.py --model_name opt_1_3b --task causalLM --zo_method zo2 \\
        --max_steps N --model_dtype fp16 --batch_size 1 --sequence_length 2048

and prints ``Time cost after iteration i: X ms, Y tok/s`` per step (tok/s = batch x length / step time).
Preparation (on a machine with internet): bench/README-gpu.md.
"""

from __future__ import annotations

import os
import re
import statistics
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

ZO2_SCRIPT = "test/mezo_sgd/hf_opt/test_speed.py"
ZO2_MODEL = {"smoke": "opt_125m",  # only the CPU smoke run's stand-in script sees this one
             "125m": "opt_125m", "350m": "opt_350m", "1.3b": "opt_1_3b", "2.7b": "opt_2_7b", "6.7b": "opt_6_7b",
             "13b": "opt_13b", "30b": "opt_30b"}
ZO2_DTYPE = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16"}
STEP_LINE = re.compile(r"Time cost after iteration (\d+): ([0-9.]+) ms, ([0-9.]+) tok/s")


@dataclass
class GpuMemorySampler:
    """Peak GPU memory of what runs on GPU 0, sampled from nvidia-smi, the same measure for every side.

    Per process where nvidia-smi can see the processes (CUDA context included); in a container that
    hides them, the device's used memory over the row minus what was used just before it (the rows
    run one at a time, so that is the row's own)."""

    interval_s: float = 0.2
    peaks: dict[int, int] = field(default_factory=dict)  # pid -> bytes
    device_used: list[int] = field(default_factory=list)  # bytes used on GPU 0, one per sample
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    def start(self) -> "GpuMemorySampler":
        self._thread = threading.Thread(target=self._run, daemon=True, name="gpu-mem")
        self._thread.start()
        return self

    @staticmethod
    def _query(args: list[str]) -> list[list[str]]:
        out = subprocess.run(["nvidia-smi", *args, "--format=csv,noheader,nounits"], capture_output=True, text=True,
                             timeout=10).stdout
        return [[p.strip() for p in line.split(",")] for line in out.splitlines() if line.strip()]

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            try:
                apps = self._query(["--query-compute-apps=pid,used_memory"])
                used = self._query(["--query-gpu=memory.used", "-i", "0"])
            except (OSError, subprocess.TimeoutExpired):
                return  # no nvidia-smi: nothing to sample
            for parts in apps:
                if len(parts) == 2 and parts[0].isdigit() and parts[1].isdigit():
                    pid, mib = int(parts[0]), int(parts[1])
                    self.peaks[pid] = max(self.peaks.get(pid, 0), mib << 20)
            if used and used[0][0].isdigit():
                self.device_used.append(int(used[0][0]) << 20)

    def mark(self) -> tuple[set[int], int]:
        """Call before a row starts: what is already there."""
        return set(self.peaks), len(self.device_used)

    def peak_since(self, mark: tuple[set[int], int]) -> int:
        """The row's peak: the largest new process's peak, else the device's rise over its level before the row."""
        pids, index = mark
        per_process = max((v for p, v in self.peaks.items() if p not in pids), default=0)
        if per_process:
            return per_process
        during = self.device_used[index:]
        before = self.device_used[index - 1] if index > 0 else 0
        return max(0, max(during, default=0) - before)

    def stop(self) -> None:
        self._stop.set()


def parse_steps(output: str) -> list[tuple[int, float, float]]:
    """(iteration, ms, tok/s) for every step line of ZO2's speed script."""
    return [(int(m.group(1)), float(m.group(2)), float(m.group(3))) for m in STEP_LINE.finditer(output)]


def run_zo2(zo2_dir: Path, site_dir: Path | None, size: str, batch: int, seq_len: int, dtype: str, warmup: int,
            steps: int, timeout_s: float, log_path: Path, script: str = ZO2_SCRIPT, extra_env: dict | None = None) -> dict:
    """Run ZO2's speed script (zo2 method: weights offloaded to the CPU, blocks uploaded per step) and
    return the median tokens/s of the steps after ``warmup``."""
    zo2_dir = zo2_dir.resolve()  # it runs in its own checkout: every path it is given must hold from there
    site_dir = site_dir.resolve() if site_dir is not None else None
    if size not in ZO2_MODEL:
        raise ValueError(f"ZO2 has no OPT size {size!r}; it knows {', '.join(ZO2_MODEL)}")
    script_path = zo2_dir / script
    if not script_path.is_file():
        raise FileNotFoundError(f"{script_path} does not exist: prepare ZO2 as bench/README-gpu.md says")
    argv = [sys.executable, str(script_path), "--model_name", ZO2_MODEL[size], "--task", "causalLM", "--zo_method", "zo2",
            "--max_steps", str(warmup + steps), "--model_dtype", ZO2_DTYPE[dtype], "--batch_size", str(batch),
            "--sequence_length", str(seq_len)]
    path = [str(p) for p in (site_dir, zo2_dir) if p is not None]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(path + [os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep),
           **(extra_env or {})}
    t0 = time.perf_counter()
    proc = subprocess.run(argv, cwd=str(zo2_dir), env=env, capture_output=True, text=True, timeout=timeout_s)
    log_path.write_text(proc.stdout + "\n--- stderr ---\n" + proc.stderr)
    rows = parse_steps(proc.stdout + proc.stderr)  # tqdm.write goes to stdout; be lenient
    if proc.returncode != 0 or len(rows) < warmup + 1:
        raise RuntimeError(f"ZO2 run failed (exit {proc.returncode}, {len(rows)} step lines); see {log_path}:\n"
                           + (proc.stderr or proc.stdout)[-1500:])
    timed = [r for r in rows if r[0] > warmup]
    return {"tokens_per_second": statistics.median(r[2] for r in timed),
            "step_seconds": statistics.median(r[1] for r in timed) / 1e3, "timed_steps": len(timed),
            "wall_s": time.perf_counter() - t0, "argv": argv}
