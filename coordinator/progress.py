"""The coordinator's bookkeeping of a run, kept out of the step protocol (``coordinator/job.py``).

``Progress`` is the reference trainer's ``TrainLog`` plus what only a distributed run has:
re-assignments, late reports, training seconds and the step's phase times, summed from the
rounds and from the ``Timing`` message each worker sends with its losses. Each ``on_*``
method updates both the record (for ``zoctl status``) and the Prometheus metrics.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable

from coordinator import metrics
from distzo.train.precision import job_report
from distzo.train.step import StepResult, TrainLog
from protos import coordinator_pb2 as cpb

if TYPE_CHECKING:
    from coordinator.rounds import Round
    from distzo.common.config import JobConfig
    from distzo.model.blocks import Manifest
    from distzo.run.runlog import RunHistory
    from distzo.train.precision import PerturbationReport

log = logging.getLogger("distzo.coordinator.job")

def _nan(value: float | None) -> float:
    return math.nan if value is None else float(value)


WORKER_PHASES = ("fetch", "h2d", "gather", "compute", "wait")  # the phases of cpb.Timing, in seconds


@dataclass
class PhaseTotals:
    """Seconds per phase and bytes received, summed over the timed training steps.

    Coordinator phases: assign (sending the assignments), wait (for the losses), update (the
    server's acknowledgement). Worker phases are summed over the workers of each step (seconds of
    worker time); ``worker_peak_memory_bytes`` is the largest any worker reported.
    """

    assign_s: float = 0.0
    wait_s: float = 0.0
    update_s: float = 0.0
    worker_fetch_s: float = 0.0
    worker_h2d_s: float = 0.0
    worker_gather_s: float = 0.0
    worker_compute_s: float = 0.0
    worker_wait_s: float = 0.0
    worker_peak_memory_bytes: int = 0
    bytes_received: int = 0

    def add_worker(self, tm: cpb.Timing) -> None:
        """Add one worker's timing report of a training round."""
        for phase in WORKER_PHASES:
            seconds = getattr(tm, f"{phase}_s")
            setattr(self, f"worker_{phase}_s", getattr(self, f"worker_{phase}_s") + seconds)
            metrics.WORKER_PHASE_SECONDS.labels(phase).inc(seconds)
        self.worker_peak_memory_bytes = max(self.worker_peak_memory_bytes, tm.peak_memory_bytes)
        self.bytes_received += tm.bytes_received
        metrics.BYTES_RECEIVED.inc(tm.bytes_received)


@dataclass
class Progress(TrainLog):
    """The reference trainer's log plus what only a distributed run has."""

    reassignments: int = 0
    late_reports: int = 0
    train_seconds: float = 0.0
    phase: PhaseTotals = field(default_factory=PhaseTotals)
    timed_steps: int = 0
    perturbation: str = ""  # what the forwards keep of the perturbation (distzo/train/precision.py), one line
    perturbation_warning: str = ""  # one line when a kind loses more than the bound

    # ------------------------------------------------------------------ the run
    def on_start(self, step: int, planned_steps: int, model_bytes: int) -> None:
        metrics.STEP.set(step)
        metrics.PLANNED_STEPS.set(planned_steps)
        metrics.MODEL_BYTES.set(model_bytes)

    def measure_perturbation(self, cfg: JobConfig, manifest: Manifest, model_dir: Path) -> None:
        """What the job's forwards keep of the perturbation, on its initial weights (``distzo.train.precision.job_report``):
        logged (a warning when over the bound), in the status (zoctl up prints it) and the metrics. A failure to
        measure is logged, never fatal: training goes on without the figure."""
        try:
            report = job_report(cfg, manifest, model_dir)
        except Exception:  # noqa: BLE001 - a figure for people, not a condition of the run
            log.exception("could not measure what the forwards keep of the perturbation")
            return
        self.on_perturbation(report)
        log.info(report.line())
        if report.warning():
            log.warning(report.warning())

    def on_resume(self, history: RunHistory) -> None:
        """The run log's history, also from before a restart: losses, evals, and the totals a summary reports,
        which are the whole run's (what the coordinator before this one counted too)."""
        self.losses = [r["loss"] if r.get("loss") is not None else math.nan for r in history.steps]
        self.evals = [{**e, "dev_loss": _nan(e["dev_loss"]), "dev_accuracy": _nan(e["dev_accuracy"])}
                      for e in history.evals]
        self.tokens = sum(int(r.get("tokens") or 0) for r in history.steps)
        self.skipped_steps = sum(1 for r in history.steps if r.get("skipped"))
        self.train_seconds = history.elapsed_s

    def on_perturbation(self, report: PerturbationReport) -> None:
        """The job's figures of ``distzo.train.precision.measure``, measured at its start."""
        self.perturbation = report.line()
        self.perturbation_warning = report.warning() or ""
        metrics.PERTURBATION_EPS.set(report.eps)
        for k in report.kinds:
            metrics.PERTURBATION_RMS.labels(k.kind).set(k.rms)
            metrics.PERTURBATION_LOST.labels(k.kind).set(k.lost)

    def on_outcome(self, result: StepResult) -> None:
        """A step's losses, g and lr (``distzo.train.step.run_step``'s observe hook: before the skip policy)."""
        outcome = result.outcome
        metrics.NONFINITE_RETRIES.inc(result.retries)
        metrics.TOKENS.inc(result.tokens)
        metrics.LEARNING_RATE.set(result.plan.lr)
        metrics.LOSS.labels("plus").set(outcome.loss_plus)
        metrics.LOSS.labels("minus").set(outcome.loss_minus)
        metrics.LOSS.labels("mean").set(outcome.loss)
        if outcome.record.directions:
            metrics.GRADIENT.set(outcome.record.directions[0].g)
            for d in outcome.record.directions:
                metrics.GRADIENT_ABS.observe(abs(d.g))
        if outcome.record.skipped:
            metrics.SKIPPED.inc()

    def on_update(self, seconds: float) -> None:
        """The server acknowledged a step's update after ``seconds``."""
        self.phase.update_s += seconds
        metrics.PHASE_SECONDS.labels("update").observe(seconds)

    def on_round(self, rnd: Round) -> None:
        """A round (training or eval) ended: its re-assignments and late reports."""
        self.reassignments += rnd.reassignments
        self.late_reports += rnd.late
        metrics.REASSIGNMENTS.inc(rnd.reassignments)
        metrics.LATE_REPORTS.inc(rnd.late)

    def on_late_report(self) -> None:
        """A report for no round at all."""
        self.late_reports += 1
        metrics.LATE_REPORTS.inc()

    def on_step_round(self, rnd: Round) -> None:
        """The phase times of the round that made a step's record (one timed step)."""
        self.phase.assign_s += rnd.phase["assign_s"]
        self.phase.wait_s += rnd.phase["wait_s"]
        metrics.PHASE_SECONDS.labels("assign").observe(rnd.phase["assign_s"])
        metrics.PHASE_SECONDS.labels("wait").observe(rnd.phase["wait_s"])
        for tm in rnd.timings:
            self.phase.add_worker(tm)
        self.timed_steps += 1

    def on_step_done(self, step: int, seconds: float) -> None:
        """Step ``step - 1`` finished after ``seconds`` of wall time: ``step`` steps are applied."""
        self.train_seconds += seconds
        metrics.STEP.set(step)
        metrics.STEP_SECONDS.observe(seconds)

    def on_eval(self, result: dict[str, Any]) -> None:
        self.evals.append(result)
        metrics.DEV_LOSS.set(result["dev_loss"])
        metrics.DEV_ACCURACY.set(result["dev_accuracy"])

    # ------------------------------------------------------------------ status
    def status_fields(self) -> dict[str, Any]:
        """The JobStatus fields this record holds: totals, and phase times as means per timed step."""
        p, n = self.phase, max(1, self.timed_steps)
        return dict(
            final_loss=self.final_loss(),
            tokens_per_second=self.tokens / self.train_seconds if self.train_seconds else 0.0,
            train_tokens=self.tokens, train_seconds=self.train_seconds, skipped_steps=self.skipped_steps,
            reassignments=self.reassignments, late_reports=self.late_reports, nonfinite_retries=self.nonfinite_retries,
            assign_s=p.assign_s / n, wait_s=p.wait_s / n, update_s=p.update_s / n,
            worker_fetch_s=p.worker_fetch_s / n, worker_compute_s=p.worker_compute_s / n,
            worker_wait_s=p.worker_wait_s / n, worker_gather_s=p.worker_gather_s / n,
            bytes_per_step=p.bytes_received / n, worker_h2d_s=p.worker_h2d_s / n,
            worker_peak_memory_bytes=int(p.worker_peak_memory_bytes),
            perturbation=self.perturbation, perturbation_warning=self.perturbation_warning,
        )


def set_job_state(state: str) -> None:
    """1 for the job's current state, 0 for the others."""
    for name in metrics.JOB_STATES:
        metrics.JOB_STATE.labels(name).set(1 if name == state else 0)


def set_worker_gauges(states: Iterable[str]) -> None:
    """Registered workers by state (idle, busy, lost always present)."""
    counts = {"idle": 0, "busy": 0, "lost": 0}
    for state in states:
        counts[state] = counts.get(state, 0) + 1
    for state, n in counts.items():
        metrics.WORKERS.labels(state).set(n)
