"""Bad input, by kind: configs that validate must run (or are refused naming the field), deterministic
worker errors fail the job with their cause instead of being retried, machine-readable output is strict JSON."""

from __future__ import annotations

import json
import math
import threading

import pytest
import torch

from distzo.common.config import ConfigError, JobConfig
from distzo.data.tasks import Batch

from test_cluster import zoctl


def strict_loads(text: str):  # noqa: ANN201
    def refuse(const: str):  # noqa: ANN202
        raise ValueError(f"not strict JSON: {const}")

    return json.loads(text, parse_constant=refuse)


@pytest.mark.parametrize("raw,needle", [
    # the case: 131072 x 64 tokens = 75.5 MB in one assignment
    ({"train": {"batch_size": 131072}},
     "train.batch_size / data shards x data.max_seq_len = 131072 x 64 = 8388608 tokens per assignment (75.5 MB), "
     "over the 64 MiB gRPC message limit"),
    ({"data": {"label_words": [f"w{i}" for i in range(300)], "max_seq_len": 1024}}, "an eval chunk of 32 examples x 300"),
    ({"data": {"template": "{text} It was {mood}"}}, "data.template: template '{text} It was {mood}' cannot be filled"),
    ({"data": {"template": "{text} It was {"}}, "cannot be filled with only {text}"),
    ({"data": {"label_words": ["great", "  "]}}, "label_words must be non-blank"),
    ({"runtime": {"threads": 100000}}, "runtime.threads: Input should be less than or equal to 1024"),
    ({"runtime": {"kernel_threads": 100000}}, "runtime.kernel_threads"),
    # an infinite lr validated, then every update was refused by the parameter server
    ({"train": {"lr": float("inf")}}, "train.lr: Input should be a finite number"),
    ({"train": {"eps": float("inf")}}, "train.eps: Input should be a finite number"),
])
def test_configs_that_could_not_run_are_refused_naming_the_field(raw, needle):
    with pytest.raises(ConfigError) as err:
        JobConfig.from_dict(raw)
    assert needle in str(err.value), str(err.value)


def test_the_same_batch_spread_over_data_shards_fits():
    cfg = JobConfig.from_dict({"train": {"batch_size": 131072}, "layout": {"name": "ddp", "workers": 2}})
    assert cfg.train.batch_size // cfg.layout.ddp * cfg.data.max_seq_len * 9 < 64 << 20


def test_zoctl_config_and_up_refuse_an_unsendable_config_with_exit_2(tmp_path, cache_dir):
    p = tmp_path / "big.yaml"
    p.write_text(f"train: {{batch_size: 131072}}\nruntime: {{cache_dir: {cache_dir}}}\n")
    r = zoctl("config", str(p), timeout=120)
    assert r.returncode == 2 and "train.batch_size" in r.stderr and "64 MiB" in r.stderr, r.stderr
    assert r.stderr.count("\n") == 1
    r = zoctl("up", "--config", str(p), "--run-dir", str(tmp_path / "run"), timeout=120)
    assert r.returncode == 2 and "train.batch_size" in r.stderr and not (tmp_path / "run").exists(), r.stderr


def _round(reg, policy=None, rows=1, cols=3):  # noqa: ANN001, ANN202
    from coordinator.rounds import Round
    from distzo.common.configsections import CoordinatorSection
    from protos import coordinator_pb2 as cpb

    batch = Batch(torch.ones(rows, cols, dtype=torch.long), torch.ones(rows, cols, dtype=torch.long),
                  torch.ones(rows, cols, dtype=torch.long))
    fw = {(0, 0, s): cpb.ForwardSpec(shard=0, sign=s, seed=1, coef=s * 1e-3) for s in (1, -1)}
    return Round(reg, policy or CoordinatorSection(heartbeat_timeout_s=60), step=3, version=3, kind="train",
                 forwards=fw, batches={0: batch}, stopping=threading.Event())


def _registry(*names):  # noqa: ANN202
    from coordinator.registry import Registry
    from protos import coordinator_pb2 as cpb

    reg = Registry()
    conns = [reg.register(cpb.WorkerHello(worker_id=n, node_size=1)) for n in names]
    for c in conns:
        reg.heartbeat(c, ready=True)
    return reg, conns


def test_a_deterministic_worker_error_is_not_retried_and_keeps_its_cause():
    from protos import coordinator_pb2 as cpb

    reg, (a,) = _registry("a")
    rnd = _round(reg)
    rnd.start([[(0, 0, 1), (0, 0, -1)]])
    sent = a.outbox.get_nowait().assignment
    assert rnd.on_result(a, cpb.WorkResult(assignment_id=sent.assignment_id, step=3, error_kind="bad_input",
                                           error="index out of range in self"))
    rnd.wait()  # returns at once: nothing to re-assign
    assert rnd.done() and rnd.reassignments == 0 and all(n == 1 for n in rnd.attempts.values())
    assert rnd.errors[(0, 0, 1)] == "bad_input on a: index out of range in self"
    assert a.outbox.empty()


def test_a_transient_error_repeated_to_the_limit_names_its_last_cause():
    from coordinator.rounds import RoundFailed
    from distzo.common.configsections import CoordinatorSection
    from protos import coordinator_pb2 as cpb

    reg, (a,) = _registry("a")
    rnd = _round(reg, CoordinatorSection(heartbeat_timeout_s=60, max_attempts=2))
    rnd.start([[(0, 0, 1), (0, 0, -1)]])
    failure: list[BaseException] = []

    def wait() -> None:
        try:
            rnd.wait()
        except RoundFailed as exc:
            failure.append(exc)

    t = threading.Thread(target=wait)
    t.start()
    for _ in range(2):
        sent = a.outbox.get(timeout=10).assignment
        rnd.on_result(a, cpb.WorkResult(assignment_id=sent.assignment_id, step=3, error_kind="internal",
                                        error="CUDA error: out of memory"))
    t.join(timeout=20)
    assert failure and "failed 2 times; the last time: internal on a: CUDA error: out of memory" in str(failure[0])


def test_an_assignment_over_the_message_limit_is_refused_before_it_is_sent():
    from coordinator.rounds import BadInput

    reg, (a,) = _registry("a")
    rnd = _round(reg, rows=131072, cols=64)
    with pytest.raises(BadInput, match="131072 x 64 tokens is 75.5 MB, over the 64 MiB gRPC message limit"):
        rnd.start([[(0, 0, 1), (0, 0, -1)]])
    assert a.outbox.empty()


def test_the_job_fails_with_the_cause_and_says_it_was_bad_input(cache_dir):
    from coordinator.job import Job
    from coordinator.rounds import BadInput
    from distzo.data.jobdata import JobData
    from distzo.infra.rpc import Credentials

    from conftest import small_config

    reg, _ = _registry("a")
    cfg = small_config(cache_dir)
    job = Job(cfg, reg, [], Credentials())
    job.data = JobData.load(cfg)

    class FailingRound:
        errors = {(0, 0, 1): "bad_input on a: index out of range in self"}

    job._run_round = lambda *a, **k: FailingRound()  # type: ignore[method-assign]
    with pytest.raises(BadInput, match=r"step 0: forward .* = \(0, 0, 1\) cannot run: bad_input on a: index out of range"):
        job._train_step(0)

    def setup() -> None:
        raise BadInput("step 0: forward (0, 0, 1) cannot run: bad_input on a: index out of range in self")

    job._setup = setup  # type: ignore[method-assign]
    job._main()
    st = job.status()
    assert st.state == "failed" and st.error_kind == "bad_input" and "index out of range" in st.error


def test_machine_readable_output_is_strict_json(capsys):
    from coordinator.zoctl.common import print_json
    from coordinator.zoctl.summary import print_summary, status_dict
    from protos import coordinator_pb2 as cpb

    st = cpb.JobStatus(state="running", loss=math.nan, final_loss=math.inf, tokens_per_second=3.5)
    st.evals.add(step=0, dev_loss=math.nan, dev_accuracy=-math.inf, dev_examples=4)
    print_json(status_dict(st))
    doc = strict_loads(capsys.readouterr().out)
    assert doc["loss"] is None and doc["final_loss"] is None and doc["tokens_per_second"] == 3.5
    assert doc["evals"][0]["dev_loss"] is None and doc["evals"][0]["dev_accuracy"] is None
    print_summary({"final_loss": math.nan, "dev_accuracy": 0.5, "steps": 3}, as_json=True)
    assert strict_loads(capsys.readouterr().out) == {"final_loss": None, "dev_accuracy": 0.5, "steps": 3}


def test_zoctl_plan_json_is_strict(tmp_path):
    r = zoctl("plan", "--model", "OPT-1.3B", "--json", timeout=120)
    assert r.returncode == 0, r.stderr
    strict_loads(r.stdout)


def test_eval_metrics_are_not_computed_from_non_finite_scores():
    from distzo.data.jobdata import EvalTally
    from distzo.data.tasks import Example

    ex = [Example("a", 0), Example("b", 1)]
    batch = Batch(torch.ones(2, 3, dtype=torch.long), torch.ones(2, 3, dtype=torch.long), torch.full((2, 3), -100))
    good = EvalTally(2)
    good.add(0, ex, batch, torch.tensor([[-0.1, -2.0], [-3.0, -0.2]], dtype=torch.float64), True)
    assert good.result()["dev_accuracy"] == 1.0
    bad = EvalTally(2)
    bad.add(0, ex, batch, torch.tensor([[math.nan, math.nan], [-3.0, -0.2]], dtype=torch.float64), True)
    res = bad.result()
    assert math.isnan(res["dev_accuracy"]) and math.isnan(res["dev_loss"]) and res["dev_examples"] == 2
