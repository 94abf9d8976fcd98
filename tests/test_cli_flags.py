"""zoctl's common settings as flags, --set for any field, --version, --help, and output into a closed pipe."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from coordinator.zoctl.cli import build_parser
from coordinator.zoctl.jobs import job_config_from_args
from test_cli_input import one_clean_line
from test_cluster import write_config, zoctl, zoctl_here


def test_flags_and_set_reach_the_typed_config():
    args = build_parser().parse_args(
        ["reference", "--lr", "1e-4", "--eps", "0.01", "--batch-size", "8", "--seed", "3", "--device", "cpu",
         "--set", "train.lr_schedule=cosine", "--set", "data.max_seq_len=128", "--set", "data.dev_examples=null",
         "--set", "data.label_words=[bad, good]", "--set", "train.lr=0.5"])
    cfg = job_config_from_args(args)
    assert cfg.train.lr == 1e-4  # the named flag wins over --set of the same field
    assert (cfg.train.eps, cfg.train.batch_size, cfg.train.seed, cfg.runtime.device) == (0.01, 8, 3, "cpu")
    assert cfg.train.lr_schedule == "cosine" and cfg.data.max_seq_len == 128 and cfg.data.dev_examples is None
    assert cfg.data.label_words == ["bad", "good"]


@pytest.mark.parametrize("flags,needle", [
    (["--set", "train.lrr=1"], "train.lrr: unknown field"),
    (["--set", "trian.lr=1"], "'trian' is not a config section (sections: model, data, train"),
    (["--set", "train.lr.x=1"], "'train.lr' is not a config section"),
    (["--set", "train.lr=fast"], "train.lr: Input should be a valid number"),
    (["--set", "train.lr"], "--set 'train.lr': expected KEY.PATH=VALUE"),
    (["--set", "=3"], "expected KEY.PATH=VALUE"),
    (["--lr", "-1"], "train.lr: Input should be greater than 0"),
    (["--eps", "nan"], "train.eps"),
    (["--batch-size", "0"], "train.batch_size"),
    (["--device", "tpu"], "runtime.device: Input should be 'cpu' or 'cuda'"),
])
def test_bad_settings_are_one_line_and_exit_2_everywhere(cache_dir, tmp_path, flags, needle):
    cfg = write_config(tmp_path, cache_dir)
    run = tmp_path / "run"
    # the first setting through the zoctl process, the others through its main() in this process (the same
    # parser and validation, without an interpreter start each)
    call = zoctl if flags == ["--set", "train.lrr=1"] else zoctl_here
    for cmd in (["up", "--config", str(cfg), "--run-dir", str(run)], ["reference", "--config", str(cfg)],
                ["train", "--config", str(cfg), "--coordinator", "127.0.0.1:1"]):  # refused before any call
        r = call(*cmd, *flags, timeout=300) if call is zoctl else call(*cmd, *flags)
        one_clean_line(r)
        assert needle in r.stderr, (cmd, flags, r.stderr)
    assert not run.exists()


def test_version_and_help_with_examples():
    r = zoctl("--version")
    assert r.returncode == 0 and r.stdout.startswith("zoctl (distzo) ") and "unknown" not in r.stdout, r.stdout
    h = zoctl("--help")
    assert h.returncode == 0 and "examples:" in h.stdout and "zoctl up --steps 50 --lr 1e-4" in h.stdout
    assert "--run-dir DIR, --context NAME" in h.stdout
    for cmd in ("up", "reference", "train"):
        sub = zoctl(cmd, "--help")
        assert sub.returncode == 0 and all(f in sub.stdout for f in ("--lr", "--eps", "--batch-size", "--device",
                                                                   "--seed", "--set KEY.PATH=VALUE")), (cmd, sub.stdout)


def test_output_into_a_closed_pipe_is_not_a_traceback():
    """`zoctl config | head -0`, made deterministic: the reading end is closed before zoctl writes."""
    for args in (["config"], ["plan", "--model", "OPT-13B"], ["--help"]):
        read_end, write_end = os.pipe()
        os.close(read_end)
        try:
            r = subprocess.run([sys.executable, "-m", "coordinator.zoctl.cli", *args], stdout=write_end, stderr=subprocess.PIPE,
                               text=True, timeout=120)
        finally:
            os.close(write_end)
        assert "Traceback" not in r.stderr and "BrokenPipeError" not in r.stderr and "Exception ignored" not in r.stderr, \
            (args, r.stderr)
        if args != ["--help"]:  # argparse's help ignores a closed output itself (exit 0)
            assert r.returncode == 141, (args, r.returncode)


def test_reference_with_flags_exports_a_model_card(cache_dir, tmp_path):
    cfg = write_config(tmp_path, cache_dir)
    out = tmp_path / "ref"
    r = zoctl_here("reference", "--config", str(cfg), "--steps", "2", "--lr", "2e-4", "--eps", "0.002", "--seed", "7",
                   "--set", "train.lr_schedule=linear", "--out", str(out), "--json")
    assert r.returncode == 0, r.stderr[-3000:]
    card = (out / "README.md").read_text()
    assert card.startswith("---\nlibrary_name: transformers\n") and "tiny-opt" in card and "sst2-synth" in card
    for text in ("| learning rate | 0.0002 (linear", "| perturbation scale eps | 0.002 |", "| master seed | 7 |",
                 "| steps (configured / applied) | 2 / 2 |", "| dev accuracy at the end | 0."):
        assert text in card, (text, card)
    assert "n/a" not in card.split("## Results")[1].split("| training loss")[0]  # dev figures measured


def test_layout_nodes_derive_the_workers_and_a_mismatch_is_named():
    from distzo.common.config import ConfigError, JobConfig

    cfg = JobConfig.from_dict({"layout": {"name": "2d", "nodes": 2, "node_size": 8}})
    assert cfg.layout.workers == 16
    assert cfg.with_overrides({"layout.nodes": 4, "layout.node_size": 2}).layout.workers == 8  # derived again
    with pytest.raises(ConfigError, match=r"layout: .*workers 4 must be nodes x node_size = 2 x 8"):
        JobConfig.from_dict({"layout": {"name": "2d", "nodes": 2, "node_size": 8, "workers": 4}})


def test_services_take_set_and_refuse_bad_values_in_one_line(tmp_path, capsys):
    cases = [(["paramserver", "--data-dir", str(tmp_path / "d"), "--set", "layout.nodes=zero"], "layout.nodes"),
             (["paramserver", "--data-dir", str(tmp_path / "d"), "--set", "nope"], "expected KEY.PATH=VALUE"),
             (["coordinator", "--param-server", "127.0.0.1:1", "--set", "train.lr=1"], "--set needs --config")]
    for args, needle in cases:
        r = subprocess.run([sys.executable, "-m", *args], capture_output=True, text=True, timeout=120)
        assert r.returncode == 2 and needle in r.stderr and r.stderr.count("\n") == 1, (args, r.stderr)
    from paramserver.__main__ import main as paramserver_main  # a number past its protobuf field: in process (fast)

    assert paramserver_main(["--data-dir", str(tmp_path / "d"), "--set", "train.steps=9223372036854775808"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "train.steps: Input should be less than or equal to 4611686018427387904" in err, err
    assert not (tmp_path / "d").exists()


def test_named_flags_and_set_are_validated_together():
    # --layout ddp alone (1 worker) or --set layout.workers=2 alone (dual) is invalid; together they are a job
    args = build_parser().parse_args(["up", "--layout", "ddp", "--set", "layout.workers=2", "--set", "layout.node_size=2"])
    cfg = job_config_from_args(args)
    assert (cfg.layout.name, cfg.layout.workers, cfg.layout.node_size) == ("ddp", 2, 2)


def test_counts_read_right_in_plans_and_messages():
    from distzo.common.errors import counted

    assert [counted(1, "worker"), counted(2, "worker"), counted(2, "process")] == ["1 worker", "2 workers", "2 processes"]
    r = subprocess.run([sys.executable, "-m", "coordinator.zoctl.cli", "plan", "--model", "OPT-13B", "--cluster", "cpu-netns"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert "processs" not in r.stdout and "(s)" not in r.stdout and not r.stdout.rstrip().endswith("may"), r.stdout


def test_logging_set_up_under_a_swapped_stderr_survives_its_restoration(capsys):
    """An entry point called in process (tests, notebooks) sets up logging while stderr is swapped: records after
    the swap ends go to the stderr of their time, with no 'Logging error' from a handler holding a closed stream."""
    import io
    import logging
    import sys

    from distzo.infra.logs import setup_logging

    swapped, kept = io.StringIO(), sys.stderr
    sys.stderr = swapped
    try:
        setup_logging(0)
        logging.getLogger("distzo.test").warning("first")
    finally:
        sys.stderr = kept
    swapped.close()
    logging.getLogger("distzo.test").warning("second")
    err = capsys.readouterr().err
    assert "Logging error" not in err and err.count("second") == 1, err
    setup_logging(0)  # idempotent: one handler of ours, not two
    setup_logging(0)
    logging.getLogger("distzo.test").warning("third")
    assert capsys.readouterr().err.count("third") == 1
