"""The run log and report: resume semantics, strict JSON, the plot, `zoctl report`, the reference's run dir."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

from distzo.run.report import text_report, write_report
from distzo.run.runlog import RunLog, read_history

from conftest import small_config


def _log_steps(log: RunLog, steps: range, loss: float = 2.0) -> None:
    for t in steps:
        log.step(t, loss - 0.01 * t, loss, loss - 0.02 * t, [0.5 * t], 1e-3, 100, float(t + 1), False)


def test_resume_keeps_the_history_before_the_step_and_drops_what_it_will_redo(tmp_path):
    log = RunLog(tmp_path)
    log.eval(0, 3.0, 0.5, 16)
    _log_steps(log, range(0, 7))
    log.eval(5, 2.5, 0.6, 16)
    log.eval(7, 2.4, 0.7, 16)  # after the crash point: redone
    with (tmp_path / "steps.jsonl").open("a") as f:
        f.write('{"step": 7, "loss": 1.')  # a torn last line: the process died while writing it
    history = RunLog(tmp_path).resume(5)
    assert [r["step"] for r in history.steps] == [0, 1, 2, 3, 4]
    assert [e["step"] for e in history.evals] == [0, 5]
    assert history.elapsed_s == 5.0
    on_disk = read_history(tmp_path)
    assert on_disk.steps == history.steps and on_disk.evals == history.evals
    assert RunLog(tmp_path).resume(0).steps == []


def test_records_are_strict_json_even_for_non_finite_numbers(tmp_path):
    log = RunLog(tmp_path)
    log.step(0, math.nan, math.inf, -math.inf, [], 1e-3, 10, 1.0, True)
    log.eval(0, math.nan, math.nan, 0)
    for name in ("steps.jsonl", "evals.jsonl"):
        line = (tmp_path / name).read_text().strip()
        assert "NaN" not in line and "Infinity" not in line
        json.loads(line, parse_constant=lambda c: (_ for _ in ()).throw(ValueError(c)))
    assert read_history(tmp_path).steps[0]["loss"] is None


def test_report_draws_a_png_and_prints_the_history(tmp_path):
    log = RunLog(tmp_path)
    log.eval(0, 3.0, 0.55, 200)
    _log_steps(log, range(40))
    log.eval(40, 2.0, 0.65, 200)
    paths = write_report(tmp_path)
    png = (tmp_path / "report.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000 and paths["report"].endswith("report.png")
    text = text_report(read_history(tmp_path))
    assert "steps: 0..39 (40 logged)" in text and "0.5500" in text and "0.6500" in text
    r = subprocess.run([sys.executable, "-m", "coordinator.zoctl.cli", "report", str(tmp_path)], capture_output=True, text=True,
                       timeout=120, env=dict(os.environ))
    assert r.returncode == 0 and "training loss:" in r.stdout and "report.png" in r.stdout, r.stderr
    empty = tmp_path / "empty"
    empty.mkdir()
    r = subprocess.run([sys.executable, "-m", "coordinator.zoctl.cli", "report", str(empty)], capture_output=True, text=True,
                       timeout=120, env=dict(os.environ))
    assert r.returncode == 2 and "holds no run log" in r.stderr


def test_the_reference_writes_the_run_log_with_the_zero_shot_eval(cache_dir, tmp_path):
    from distzo.train.reference import ReferenceTrainer

    cfg = small_config(cache_dir, train={"steps": 3, "eval_every": 2})
    trainer = ReferenceTrainer(cfg)
    summary = trainer.train(progress=False, run_dir=tmp_path)
    history = read_history(tmp_path)
    assert [r["step"] for r in history.steps] == [0, 1, 2]
    assert [e["step"] for e in history.evals] == [0, 2, 3]
    assert summary["zero_shot_dev_accuracy"] == history.evals[0]["dev_accuracy"]
    assert summary["dev_accuracy"] == history.evals[-1]["dev_accuracy"]
    assert summary["report"] == str(tmp_path / "report.png") and (tmp_path / "report.png").is_file()
    assert [r["g"] for r in history.steps] == [[d.g for d in rec.directions] for rec in trainer.log.records]
    assert [r["loss"] for r in history.steps] == trainer.log.losses


def test_a_run_log_of_another_job_is_never_continued_or_overwritten(cache_dir, tmp_path):
    import pytest

    from distzo.common.durable import CorruptFile, JobMismatch

    ours = small_config(cache_dir)
    log = RunLog(tmp_path)
    log.resume(0, ours)
    _log_steps(log, range(0, 4))
    before = (tmp_path / "steps.jsonl").read_bytes()
    for other, needle in ((small_config(cache_dir, train={"seed": 3}), "train.seed is 0 there and 3 here"),
                          (small_config(cache_dir, model={"source": "tiny-llama"}), "model.source is 'tiny-opt' there"),
                          (small_config(cache_dir, layout={"name": "ddp", "workers": 2}), "layout.name is 'dual' there")):
        with pytest.raises(JobMismatch, match=needle):
            RunLog(tmp_path).resume(2, other)
        assert (tmp_path / "steps.jsonl").read_bytes() == before
    longer = small_config(cache_dir, train={"steps": 40, "eval_every": 7})  # steps and eval cadence: the same job
    assert [r["step"] for r in RunLog(tmp_path).resume(2, longer).steps] == [0, 1]
    claim = tmp_path / "run.json"
    raw = bytearray(claim.read_bytes())
    raw[len(raw) // 2] ^= 0x02
    claim.write_bytes(bytes(raw))
    with pytest.raises(CorruptFile, match="run.json is damaged"):
        RunLog(tmp_path).resume(0, ours)


def test_the_worker_launcher_does_not_restart_a_worker_that_refuses_its_input(tmp_path):
    # a certificate without its key: the worker exits 2 at once, every time
    r = subprocess.run([sys.executable, "-m", "gpuworker.launch", "--coordinator", "127.0.0.1:1", "--device", "cpu",
                        "--gpus", "1", "--tls-cert", str(tmp_path / "c.pem"), "--metrics-base-port", "-1"],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 2, r.stderr[-2000:]
    assert r.stderr.count("node group started") <= 1 and "not restarting" in r.stderr


def test_run_directory_files_of_the_wrong_type_or_kind_are_one_line_and_exit_2(cache_dir, tmp_path, capsys):
    """The user's run-directory files are read defensively: each command that reads one names it (kind 7)."""
    from coordinator.zoctl.cli import main

    cfg = tmp_path / "job.yaml"
    cfg.write_text(small_config(cache_dir).to_yaml())

    def zoctl(*args: str) -> subprocess.CompletedProcess:  # in process: these fail before anything starts
        code = main(list(args))
        out = capsys.readouterr()
        return subprocess.CompletedProcess(args, code, out.out, out.err)

    run = tmp_path / "run"
    log = RunLog(run)
    log.resume(0, small_config(cache_dir))
    _log_steps(log, range(3))
    steps = run / "steps.jsonl"
    good = steps.read_text()
    for line, needle in (('{"step": 3, "loss": "low"}', "steps.jsonl:4: loss is str"),
                         ('{"step": 3, "g": {"x": 1}}', "steps.jsonl:4: g is not a list of numbers"),
                         ('{"step": -1}', "steps.jsonl:4: step -1 is negative")):
        steps.write_text(good + line + "\n")
        for cmd in (["report", str(run)], ["up", "--config", str(cfg), "--run-dir", str(run), "--resume"]):
            r = zoctl(*cmd)
            assert r.returncode == 2 and r.stderr.count("\n") == 1 and needle in r.stderr, (cmd, r.stderr)
    steps.unlink()
    steps.mkdir()  # the wrong kind of file
    r = zoctl("report", str(run))
    assert r.returncode == 2 and f"{steps} is not a regular file" in r.stderr, r.stderr
    steps.rmdir()
    (run / "run.json").unlink()
    (run / "run.json").mkdir()
    r = zoctl("up", "--config", str(cfg), "--run-dir", str(run), "--resume")
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "run.json is not a regular file" in r.stderr, r.stderr
    (tmp_path / "file").write_text("x")
    for cmd in (["up", "--config", str(cfg), "--run-dir", str(tmp_path / "file")],
                ["reference", "--config", str(cfg), "--run-dir", str(tmp_path / "file")]):
        r = zoctl(*cmd)
        assert r.returncode == 2 and r.stderr.count("\n") == 1 and "is a file: expected a directory" in r.stderr, r.stderr
    assert (tmp_path / "file").read_text() == "x"


def test_a_run_directory_in_use_is_refused_by_every_writer(cache_dir, tmp_path, capsys):
    """One writer per run directory (kind 2): while a process holds it (here a stand-in for a running `zoctl up`
    or one of its services), `zoctl up`, `zoctl up --resume` and `zoctl reference --run-dir` are refused in one
    line naming its pid; once it ends, the directory is free again."""
    from coordinator.zoctl.cli import main

    run = tmp_path / "run"
    RunLog(run).resume(0, small_config(cache_dir))
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time\nfrom distzo.common.locks import DirLock\n"
                               "DirLock(sys.argv[1], '.lock', 'the run directory').acquire()\nprint('held', flush=True)\n"
                               "time.sleep(600)\n", str(run)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        cfg = tmp_path / "job.yaml"
        cfg.write_text(small_config(cache_dir).to_yaml())
        for argv in (["up", "--config", str(cfg), "--run-dir", str(run)],
                     ["up", "--config", str(cfg), "--run-dir", str(run), "--resume"],
                     ["reference", "--config", str(cfg), "--run-dir", str(run)]):
            assert main(argv) == 2, argv
            err = capsys.readouterr().err
            assert err.count("\n") == 1 and f"the run directory {run} is in use by pid {holder.pid}" in err, (argv, err)
    finally:
        holder.kill()
        holder.wait()
    from distzo.common.locks import DirLock

    DirLock(run, ".lock", "the run directory").acquire().release()  # the kernel dropped it with its holder
