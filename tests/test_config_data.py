"""Job config validation and data-file validation: bad input gets a clear message."""

from __future__ import annotations

import pytest

from distzo.common.config import ConfigError, JobConfig
from distzo.data.tasks import DataError, load_jsonl
from distzo.train.plan import all_roles, batch_examples, direction_seed, shard_bounds, worker_roles


def test_defaults_run_and_round_trip(tmp_path):
    cfg = JobConfig()
    assert cfg.layout.workers == 1 and cfg.layout.name == "dual"
    p = tmp_path / "job.yaml"
    p.write_text(cfg.to_yaml())
    assert JobConfig.from_yaml(p) == cfg


@pytest.mark.parametrize(
    "raw,needle",
    [
        ({"train": {"lr": -1}}, "train.lr: Input should be greater than 0 (got -1)"),
        ({"train": {"stepz": 3}}, "train.stepz: unknown field"),
        ({"train": {"distribution": "uniform"}}, "train.distribution: Input should be 'rademacher' or 'gaussian'"),
        ({"layout": {"name": "dual", "workers": 3}}, "uses exactly 1 worker, got 3"),
        ({"layout": {"name": "pertp", "workers": 3}}, "needs a multiple of 2 workers"),
        ({"layout": {"name": "ddp", "workers": 1}}, "needs at least 2 workers"),
        ({"layout": {"name": "ddp", "workers": 3}, "train": {"batch_size": 16}}, "batch_size 16 must be divisible by the 3 data shards"),
        ({"server": {"chunk_bytes": 100}}, "server.chunk_bytes"),
        ({"data": {"template": "no placeholder"}}, "{text}"),
        ({"server": {"served_dtype": "int8"}}, "server.served_dtype"),
        ({"train": 5}, "train: Input should be a valid dictionary"),
    ],
)
def test_bad_values_name_the_field(raw, needle):
    with pytest.raises(ConfigError) as err:
        JobConfig.from_dict(raw)
    assert needle in str(err.value)


def test_bad_yaml_files(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        JobConfig.from_yaml(tmp_path / "missing.yaml")
    (tmp_path / "broken.yaml").write_text("train: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        JobConfig.from_yaml(tmp_path / "broken.yaml")
    (tmp_path / "list.yaml").write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="mapping"):
        JobConfig.from_yaml(tmp_path / "list.yaml")


def test_overrides_are_validated():
    cfg = JobConfig().with_overrides({"train.steps": 7, "layout.workers": 2, "layout.name": "pertp"})
    assert cfg.train.steps == 7 and cfg.layout.pertp == 2
    with pytest.raises(ConfigError, match="train.steps"):
        JobConfig().with_overrides({"train.steps": 0})


@pytest.mark.parametrize(
    "line,needle",
    [
        ("not json", ":2: not valid JSON"),
        ("[1, 2]", ":2: expected a JSON object"),
        ('{"label": 1}', ':2: "text" must be a non-empty string'),
        ('{"text": "ok", "label": 2}', ':2: "label" must be an integer in [0, 1]'),
        ('{"text": "ok", "label": "fine"}', ":2: \"label\" must be"),
        ('{"text": "ok", "label": true}', ":2: \"label\" must be"),
    ],
)
def test_malformed_data_lines_report_the_line(tmp_path, line, needle):
    p = tmp_path / "d.jsonl"
    p.write_text('{"text": "good", "label": 0}\n' + line + "\n")
    with pytest.raises(DataError) as err:
        load_jsonl(p, ["terrible", "great"])
    assert needle in str(err.value) and str(p) in str(err.value)


def test_data_accepts_label_words_and_blank_lines(tmp_path):
    p = tmp_path / "d.jsonl"
    p.write_text('{"text": "a", "label": "great"}\n\n{"text": "b", "label": 0}\n')
    ex = load_jsonl(p, ["terrible", "great"])
    assert [(e.text, e.label) for e in ex] == [("a", 1), ("b", 0)]
    with pytest.raises(DataError, match="no examples"):
        (tmp_path / "empty.jsonl").write_text("\n")
        load_jsonl(tmp_path / "empty.jsonl", ["x", "y"])


def test_plan_is_deterministic_and_layouts_cover_every_role():
    assert direction_seed(0, 5, 1) == direction_seed(0, 5, 1) != direction_seed(0, 5, 0)
    assert 0 <= direction_seed(2**62, 10**9, 3) < 2**63
    a = batch_examples(7, 3, 16, 100)
    assert a == batch_examples(7, 3, 16, 100) and len(set(a)) == 16
    # one epoch visits every example once
    seen = [i for t in range(100 // 4) for i in batch_examples(1, t, 4, 100)]
    assert sorted(seen) == list(range(100))
    assert shard_bounds(16, 4) == [(0, 4), (4, 8), (8, 12), (12, 16)]
    for name, workers, q in (("dual", 1, 1), ("dual", 2, 2), ("pertp", 2, 1), ("ddp", 4, 1), ("2d", 4, 1), ("2d", 8, 2)):
        layout = JobConfig.from_dict({"layout": {"name": name, "workers": workers, "q": q}, "train": {"batch_size": 8}}).layout
        roles = all_roles(layout)
        want = {(j, d, s) for j in range(q) for d in range(layout.ddp) for s in (1, -1)}
        assert {(r.direction, r.shard, r.sign) for r in roles} == want and len(roles) == len(want)
        assert len(worker_roles(layout)) == workers
        for rs in worker_roles(layout):  # dual: both signs of one (direction, shard); PertP: one sign per worker
            assert len({(r.direction, r.shard) for r in rs}) == 1
            assert sorted(r.sign for r in rs) == ([-1, 1] if layout.pertp == 1 else [rs[0].sign])


def _numeric_fields():
    import typing

    for section, info in JobConfig.model_fields.items():
        for field, f in info.annotation.model_fields.items():
            kinds = [a for a in (typing.get_args(f.annotation) or (f.annotation,)) if a is not type(None)]
            if kinds and all(a in (int, float) for a in kinds):
                yield f"{section}.{field}", kinds[0], f


def test_every_number_of_the_config_has_a_range_checked_before_anything_starts(tmp_path, capsys):
    """Kind 4 of issue 28: an integer fits the protobuf field it travels in (int64 at most), a wait fits the
    timeouts of threading and gRPC, no number is inf or nan; past the range is one line, exit 2, nothing started."""
    from coordinator.zoctl.cli import main
    from distzo.common.configsections import MAX_WAIT_S
    from distzo.common.wire_sizes import INT64_MAX

    fields = list(_numeric_fields())
    assert len(fields) > 30
    for key, kind, f in fields:
        section, field = key.split(".")
        bounds = {type(m).__name__: getattr(m, type(m).__name__.lower()) for m in f.metadata
                  if type(m).__name__ in ("Le", "Lt", "Ge", "Gt")}
        if kind is int:
            top = bounds.get("Le", bounds.get("Lt", INT64_MAX + 1) - 1)
            assert "Le" in bounds or "Lt" in bounds, f"{key} has no upper bound"
            assert top <= INT64_MAX, key
            with pytest.raises(ConfigError, match=f"{key}: Input should be less than"):
                JobConfig.from_dict({section: {field: top + 1}})
        else:
            for bad in (float("inf"), float("nan")):
                with pytest.raises(ConfigError, match=key):
                    JobConfig.from_dict({section: {field: bad}})
            if field.endswith("_s"):
                assert bounds.get("Le", float("inf")) <= MAX_WAIT_S, f"{key}: a wait without a bound"
        assert "Ge" in bounds or "Gt" in bounds, f"{key} has no lower bound"
    # the same, from the command line: one line, exit 2, no run directory made
    for setting, needle in (("train.steps=9223372036854775808", "train.steps: Input should be less than or equal"),
                            ("layout.q=5000", "layout.q: Input should be less than or equal to 4096"),
                            ("coordinator.heartbeat_timeout_s=1e300", "coordinator.heartbeat_timeout_s"),
                            ("train.weight_decay=3000", "train.lr x train.weight_decay = 0.0004 x 3000.0 = 1.2 must be below 1")):
        assert main(["up", "--set", setting, "--run-dir", str(tmp_path / "run")]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and needle in err, (setting, err)
    assert not (tmp_path / "run").exists()
