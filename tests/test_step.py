"""The one step function (distzo/train/step.py): retry, skip policy, order of run log and update."""

from __future__ import annotations

import math

import pytest

from distzo.common.config import JobConfig
from distzo.train.step import Forwarded, TrainingStopped, TrainLog, plan_step, run_step


class _Data:
    """Stands in for JobData: 8 training examples, one batch per DDP shard."""

    train = list(range(8))

    def shard_batches(self, plan):  # noqa: ANN001, ANN201
        return [list(plan.examples)]


def _cfg(**train) -> JobConfig:
    # lr and eps set: the step takes a resolved config (distzo.train.defaults.resolve chooses them by the model)
    return JobConfig.from_dict({"train": {"steps": 10, "batch_size": 2, "lr": 5e-4, "eps": 1e-3, **train}})


def _forwards(nonfinite_attempts: set[int]):
    """Forwards whose losses are non-finite on the given attempts; l+ = 2.0, l- = 1.0 otherwise."""
    calls = []

    def run(step, attempt):  # noqa: ANN001, ANN202
        calls.append((step.plan.step, attempt, step.batches))
        bad = attempt in nonfinite_attempts
        return Forwarded({(0, 0, 1): (math.nan if bad else 4.0, 2), (0, 0, -1): (2.0, 2)}, 6)

    return run, calls


def test_a_non_finite_attempt_is_re_run_and_the_finite_one_is_applied():
    cfg, log, sent = _cfg(nonfinite_retries=2), TrainLog(), []
    forwards, calls = _forwards({0})
    result = run_step(cfg, plan_step(cfg, 3, _Data()), forwards, sent.append, log)
    assert [c[1] for c in calls] == [0, 1] and calls[0][2] == calls[1][2]  # the same batches again
    assert result.retries == 1 and log.nonfinite_retries == 1 and log.skipped_steps == 0
    assert sent == [result.record] and not result.record.skipped and result.record.step == 3
    assert result.record.directions[0].g == pytest.approx((2.0 - 1.0) / (2 * cfg.train.eps))
    assert log.losses == [1.5] and log.tokens == 6  # the tokens of the attempt that counted


def test_a_step_that_stays_non_finite_is_sent_skipped_until_the_policy_stops_the_run():
    cfg, log, sent, seen = _cfg(nonfinite_retries=1, max_consecutive_skips=2), TrainLog(), [], []
    forwards, calls = _forwards({0, 1})
    first = run_step(cfg, plan_step(cfg, 0, _Data()), forwards, sent.append, log, observe=seen.append)
    assert first.record.skipped and sent == [first.record] and log.consecutive_skips == 1
    assert len(calls) == 2 and log.nonfinite_retries == 1 and math.isnan(log.losses[0])
    with pytest.raises(TrainingStopped, match="2 steps in a row had non-finite losses"):
        run_step(cfg, plan_step(cfg, 1, _Data()), forwards, sent.append, log, observe=seen.append)
    assert len(sent) == 1  # the stopping step is never sent
    assert [r.plan.step for r in seen] == [0, 1]  # bookkeeping saw it before the policy stopped the run


def test_the_stop_policy_stops_at_the_first_non_finite_step():
    cfg = _cfg(nonfinite_retries=0, nonfinite_policy="stop")
    forwards, _ = _forwards({0})
    with pytest.raises(TrainingStopped, match="nonfinite_policy is 'stop'"):
        run_step(cfg, plan_step(cfg, 5, _Data()), forwards, lambda r: None, TrainLog())


def test_a_finite_step_resets_the_run_of_skips_and_is_logged_before_it_is_sent(tmp_path):
    from distzo.run.runlog import RunLog

    cfg, log, order = _cfg(), TrainLog(consecutive_skips=4), []
    run_log = RunLog(tmp_path)
    run_log.resume(0, cfg)
    real_step = run_log.step
    run_log.step = lambda *a, **k: (order.append("logged"), real_step(*a, **k))  # type: ignore[method-assign]
    forwards, _ = _forwards(set())
    run_step(cfg, plan_step(cfg, 0, _Data()), forwards, lambda r: order.append("sent"), log, run_log,
             elapsed_s=lambda: 1.25)
    assert log.consecutive_skips == 0 and order == ["logged", "sent"]
    (row,) = RunLog(tmp_path).resume(1).steps
    assert row["step"] == 0 and row["time_s"] == 1.25 and row["loss"] == 1.5 and not row["skipped"]


def test_the_next_step_is_dispatched_after_the_run_log_and_before_the_update_and_handed_back():
    """The coordinator's overlap: step t+1's round goes out before step t's update, never for a stopped step."""
    cfg, order = _cfg(nonfinite_retries=0, max_consecutive_skips=1), []
    forwards, _ = _forwards(set())
    log = TrainLog()
    log_step = lambda *a: order.append("logged")  # noqa: E731
    run_log = type("RunLogStub", (), {"step": staticmethod(log_step)})()
    result = run_step(cfg, plan_step(cfg, 0, _Data()), forwards, lambda r: order.append("sent"), log, run_log,
                      dispatch_next=lambda r: (order.append("dispatched"), f"round {r.step + 1}")[1])
    assert order == ["logged", "dispatched", "sent"] and result.dispatched == "round 1"
    bad, _ = _forwards({0})
    with pytest.raises(TrainingStopped):
        run_step(cfg, plan_step(cfg, 1, _Data()), bad, lambda r: order.append("sent"), log, run_log,
                 dispatch_next=lambda r: order.append("dispatched"))
    assert order == ["logged", "dispatched", "sent"]  # a step the policy stops dispatches nothing
