"""One MeZO-SGD step, written once: plan -> forwards -> update, with the non-finite policy.

The reference trainer (forwards = the in-process engine, update = applied to its buffers)
and the coordinator (forwards = a round over the workers, update = sent to the parameter
server) both run their steps through ``run_step``, so the two cannot drift apart:

    plan    = seeds, examples and lr of step t                  (distzo.train.plan.step_plan)
    repeat up to 1 + train.nonfinite_retries times:
        losses  = (S, N) per forward (direction j, shard d, sign)  at theta ± eps z(s_j)
        outcome = g_j and the update record                      (distzo.zo.mezo.make_update)
        stop repeating when every loss is finite
    a record whose losses stay non-finite is skipped; the skip policy may stop the run
    run log, then update(record)                                 (a step journaled is a step logged)
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Protocol, Sequence

from distzo.common.config import JobConfig
from distzo.data.jobdata import JobData
from distzo.data.tasks import Batch
from distzo.infra.logs import kv
from distzo.run.runlog import RunLog, loss_window, mean_finite
from distzo.train.plan import StepPlan, step_plan
from distzo.train.precision import job_precision
from distzo.zo.mezo import StepOutcome, make_update
from distzo.zo.record import UpdateRecord

log = logging.getLogger("distzo.step")

ForwardKey = tuple[int, int, int]  # (direction j, shard d, sign +1/-1)
Losses = Mapping[ForwardKey, tuple[float, int]]  # key -> (summed label-token loss S, label tokens N)


class TrainingStopped(RuntimeError):
    """The non-finite policy stopped the run, or a step's update is one the parameter server refuses."""


class UpdateRefused(TrainingStopped):
    """A step's update is out of the parameter server's bounds (``UpdateRecord.check_bounds``): a diverged run.
    Checked here, before the step is logged or sent, so the reference and the cluster stop at the same step
    with the same message, and the run log never records it as a step that was applied."""


def check_skip_policy(cfg: JobConfig, step: int, consecutive: int) -> None:
    """Raise TrainingStopped when the non-finite policy says the run cannot go on."""
    if cfg.train.nonfinite_policy == "stop":
        raise TrainingStopped(f"step {step}: losses are not finite and train.nonfinite_policy is 'stop'")
    if consecutive >= cfg.train.max_consecutive_skips:
        raise TrainingStopped(
            f"step {step}: {consecutive} steps in a row had non-finite losses (train.max_consecutive_skips); "
            "the run has diverged: lower train.lr or set train.grad_clip"
        )


@dataclass
class TrainLog:
    """What a run has done so far: per-step losses, counts of skips, retries and tokens, the evals."""

    losses: list[float] = field(default_factory=list)
    skipped_steps: int = 0
    consecutive_skips: int = 0
    nonfinite_retries: int = 0
    tokens: int = 0
    evals: list[dict[str, Any]] = field(default_factory=list)
    records: list[UpdateRecord] = field(default_factory=list)  # what a parameter server would be sent (reference)

    def start_loss(self) -> float:
        """Mean of the first ``loss_window`` step losses that are finite (nan when there are none)."""
        return mean_finite(self.losses[:loss_window(len(self.losses))])

    def final_loss(self) -> float:
        """Mean of the last ``loss_window`` step losses that are finite (nan when there are none)."""
        return mean_finite(self.losses[-loss_window(len(self.losses)):])


@dataclass
class StepResult:
    """One finished step: its plan, the outcome of its last attempt, tokens and re-runs."""

    plan: StepPlan
    outcome: StepOutcome
    tokens: int  # tokens of the last attempt's forwards
    retries: int  # attempts re-run because a loss was not finite

    @property
    def record(self) -> UpdateRecord:
        return self.outcome.record


class Forwards(Protocol):
    def __call__(self, plan: StepPlan, batches: Sequence[Batch], attempt: int) -> tuple[Losses, int]:
        """Run every forward of the layout for ``plan`` (``batches[d]``: shard d's examples).

        Returns (S, N) per (direction, shard, sign) and the tokens the forwards processed.
        ``attempt`` counts from 0; a later attempt re-runs the same forwards after a non-finite loss."""


def run_step(cfg: JobConfig, t: int, data: JobData, forwards: Forwards, update: Callable[[UpdateRecord], None],
             train_log: TrainLog, run_log: RunLog | None = None, elapsed_s: Callable[[], float] | None = None,
             observe: Callable[[StepResult], None] | None = None) -> StepResult:
    """Run step ``t``: plan, forwards (retried while a loss is not finite), skip policy, run log, update.

    ``data``: the job's training set and its batching (``plan.examples`` -> one batch per DDP shard).
    ``update``: applies or sends the record (also a skipped one: it still advances the version).
    ``elapsed_s``: the run's training seconds so far, for the run log. ``observe``: the caller's
    bookkeeping (metrics), called before the skip policy may stop the run.
    Raises TrainingStopped when the policy stops the run, UpdateRefused when the update is out of the parameter
    server's bounds (the record is then neither logged nor sent).
    """
    tc = cfg.train
    if tc.lr is None:
        raise ValueError("run_step needs train.lr set: resolve the job's defaults first (distzo.train.defaults.resolve)")
    eps = job_precision(cfg).eps  # the forwards' (train.eps_bf16 for bfloat16 forwards): g's denominator
    t0 = time.perf_counter()
    plan = step_plan(cfg, t, len(data.train))
    batches = data.shard_batches(plan)
    retries = 0
    for attempt in range(tc.nonfinite_retries + 1):
        losses, tokens = forwards(plan, batches, attempt)
        outcome = make_update(t, plan.seeds, losses, cfg.layout.ddp, eps, plan.lr, tc.weight_decay, tc.grad_clip)
        if not outcome.nonfinite:
            break
        if attempt < tc.nonfinite_retries:
            retries += 1
            train_log.nonfinite_retries += 1
            log.warning("non-finite loss, re-running the step", extra=kv(step=t))
    try:  # the server's bound, applied by whoever runs the step (the reference too)
        outcome.record.check_bounds(cfg.server.max_update_step)
    except ValueError as exc:
        raise UpdateRefused(f"step {t}: {exc}") from None
    result = StepResult(plan, outcome, tokens, retries)
    train_log.tokens += tokens
    if observe is not None:
        observe(result)
    if outcome.record.skipped:
        train_log.skipped_steps += 1
        train_log.consecutive_skips += 1
        log.warning("step skipped: non-finite loss", extra=kv(step=t))
        check_skip_policy(cfg, t, train_log.consecutive_skips)
    else:
        train_log.consecutive_skips = 0
    if run_log is not None:
        seconds = elapsed_s() if elapsed_s is not None else time.perf_counter() - t0
        run_log.step(t, outcome.loss, outcome.loss_plus, outcome.loss_minus, [d.g for d in outcome.record.directions],
                     plan.lr, tokens, seconds, outcome.record.skipped)
    update(outcome.record)
    train_log.losses.append(outcome.loss)
    return result
