"""One MeZO-SGD step, written once: plan -> forwards -> dispatch next -> update, with the non-finite policy.

The reference trainer (forwards = the in-process engine, update = applied to its buffers)
and the coordinator (forwards = a round over the workers, dispatch next = step t+1's round,
update = sent to the parameter server) both run their steps through ``run_step``, so the two
cannot drift apart:

    step    = seeds, examples and lr of step t, and its batches  (plan_step: made once, by the caller)
    repeat up to 1 + train.nonfinite_retries times:
        losses  = (S, N) per forward (direction j, shard d, sign)  at theta ± eps z(s_j)
        outcome = g_j and the update record                      (distzo.zo.mezo.make_update)
        stop repeating when every loss is finite
    a record whose losses stay non-finite is skipped; the skip policy may stop the run
    run log                                                      (a step journaled is a step logged)
    dispatch_next(record)                                        (optional: the caller's next step starts)
    update(record)
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Protocol

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


@dataclass(frozen=True)
class PlannedStep:
    """Step t's plan and its batches, made once per step (``plan_step``); a caller may extend it with what its
    forwards need (the coordinator: the round's forward specs)."""

    plan: StepPlan
    batches: list[Batch]  # batches[d]: DDP shard d's examples of plan.examples


def plan_step(cfg: JobConfig, t: int, data: JobData) -> PlannedStep:
    """Step ``t``'s seeds, examples and lr (``distzo.train.plan.step_plan``) and one batch per DDP shard
    (``data.shard_batches``)."""
    plan = step_plan(cfg, t, len(data.train))
    return PlannedStep(plan, data.shard_batches(plan))


@dataclass
class Forwarded:
    """What one attempt's forwards give back: (S, N) per (direction, shard, sign), the tokens they processed,
    and what ran them (``ran``: handed back in ``StepResult.forwarded``; the coordinator's round, None in the
    reference)."""

    losses: Losses
    tokens: int
    ran: Any = None


@dataclass
class StepResult:
    """One finished step: its plan, the outcome and forwards of its last attempt, the re-runs, and what the
    ``dispatch_next`` stage returned (the coordinator: step t+1's round; None when there is no such stage)."""

    plan: StepPlan
    outcome: StepOutcome
    forwarded: Forwarded  # the last attempt's: its losses made the record
    retries: int  # attempts re-run because a loss was not finite
    dispatched: Any = None

    @property
    def record(self) -> UpdateRecord:
        return self.outcome.record

    @property
    def tokens(self) -> int:
        """Tokens of the last attempt's forwards."""
        return self.forwarded.tokens


class Forwards(Protocol):
    def __call__(self, step: PlannedStep, attempt: int) -> Forwarded:
        """Run every forward of the layout for ``step.plan`` (``step.batches[d]``: shard d's examples).

        ``attempt`` counts from 0; a later attempt re-runs the same forwards after a non-finite loss."""


def run_step(cfg: JobConfig, step: PlannedStep, forwards: Forwards, update: Callable[[UpdateRecord], None],
             train_log: TrainLog, run_log: RunLog | None = None, elapsed_s: Callable[[], float] | None = None,
             observe: Callable[[StepResult], None] | None = None,
             dispatch_next: Callable[[UpdateRecord], Any] | None = None) -> StepResult:
    """Run step ``step.plan.step``: forwards (retried while a loss is not finite), skip policy, run log, dispatch
    next, update.

    ``step``: the step's plan and batches (``plan_step``). ``update``: applies or sends the record (also a skipped
    one: it still advances the version). ``dispatch_next``: called with the record after it is logged and before
    ``update``, so the caller's next step can start while this update is applied; what it returns comes back in
    ``StepResult.dispatched``. ``elapsed_s``: the run's training seconds so far, for the run log. ``observe``: the
    caller's bookkeeping (metrics), called before the skip policy may stop the run.
    Raises TrainingStopped when the policy stops the run, UpdateRefused when the update is out of the parameter
    server's bounds (the record is then neither logged nor sent, and nothing is dispatched).
    """
    tc = cfg.train
    if tc.lr is None:
        raise ValueError("run_step needs train.lr set: resolve the job's defaults first (distzo.train.defaults.resolve)")
    eps = job_precision(cfg).eps  # the forwards' (train.eps_bf16 for bfloat16 forwards): g's denominator
    t0 = time.perf_counter()
    plan = step.plan
    t = plan.step
    retries = 0
    for attempt in range(tc.nonfinite_retries + 1):
        forwarded = forwards(step, attempt)
        outcome = make_update(t, plan.seeds, forwarded.losses, cfg.layout.ddp, eps, plan.lr, tc.weight_decay,
                              tc.grad_clip)
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
    result = StepResult(plan, outcome, forwarded, retries)
    train_log.tokens += forwarded.tokens
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
                     plan.lr, forwarded.tokens, seconds, outcome.record.skipped)
    if dispatch_next is not None:
        result.dispatched = dispatch_next(outcome.record)
    update(outcome.record)
    train_log.losses.append(outcome.loss)
    return result
