"""The reference MeZO-SGD trainer: the correctness oracle, in one process.

Same generator, seeds, data order, layout arithmetic, forward engine and update code as
the distributed system; only the transport is missing. The distributed run's exported
weights must equal this trainer's, bit for bit, on CPU with the same thread settings.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Sequence

import torch
from tqdm import tqdm

from distzo.common.config import JobConfig
from distzo.common.durable import write_atomic
from distzo.common.locks import DirLock
from distzo.data.catalog import base_model_name
from distzo.data.jobdata import EvalTally, JobData
from distzo.model.adapters import adapter_from_train
from distzo.model.blockfeed import MemoryFeed
from distzo.model.export import check_destination, export_model_dir
from distzo.model.families import load_model
from distzo.model.forward import ForwardEngine, ForwardJob, resolve_device
from distzo.run.modelcard import model_card
from distzo.run.report import eval_summary, write_report
from distzo.run.runlog import RUN_LOCK, RunLog, loss_window, make_run_dir
from distzo.train.defaults import resolve
from distzo.train.objective import forward_sums
from distzo.train.plan import all_roles
from distzo.train.precision import PerturbationReport, forward_dtypes, job_precision, job_report
from distzo.train.step import Forwarded, PlannedStep, TrainingStopped, TrainLog, plan_step, run_step
from distzo.zo import generator
from distzo.zo.mezo import StepOutcome, apply_update, base_version
from distzo.zo.optim import Optimizer
from distzo.zo.record import UpdateRecord

__all__ = ["ReferenceTrainer", "TrainLog", "TrainingStopped", "apply_runtime_threads", "evaluate"]

def apply_runtime_threads(cfg: JobConfig) -> None:
    torch.set_num_threads(cfg.runtime.threads)
    generator.set_cpu_threads(cfg.runtime.kernel_threads)


def evaluate(engine: ForwardEngine, job: JobData, feed: MemoryFeed, pending: Sequence[UpdateRecord] = ()) -> dict[str, float]:
    """Dev loss and accuracy of the weights ``feed`` serves, with ``pending`` update records replayed on them."""
    tally = EvalTally(len(job.cfg.data.label_words), job.cfg.train.objective)
    for i, (examples, batch, candidates) in enumerate(job.eval_chunks()):
        res = engine.run([ForwardJob(batch, want_scores=True, candidates=candidates)], feed, pending)[0]
        tally.add(i, examples, batch, res.scores, bool(candidates))
    return tally.result()


class ReferenceTrainer:
    def __init__(self, cfg: JobConfig, job: JobData | None = None, resident: bool = False):
        """``resident``: keep the master weights on runtime.device (all-on-GPU MeZO, for the benchmarks;
        the model must fit there). By default they stay in host memory, as on the parameter server."""
        if cfg.train.lr is None or cfg.train.eps is None:  # the defaults for the target and the model's size

            cfg = resolve(cfg, job.model_dir if job is not None else None)[0]
            if job is not None:
                job.cfg = cfg
        self.cfg = cfg
        self.job = job or JobData.load(cfg)
        self.model = load_model(self.job.model_dir, adapter_from_train(cfg.train))
        self.buffers = self.model.load_block_buffers()
        # the workers' arithmetic: their device, and the bytes the server serves them
        self.device = resolve_device(cfg.runtime.device)
        if resident:
            self.buffers = [b.to(self.device) for b in self.buffers]
        self.precision = job_precision(cfg)  # what the forwards compute in, and their eps
        self.engine = ForwardEngine(self.model, cfg.train.distribution, device=self.device,
                                    compute_dtype=self.precision.compute_dtype)
        self._perturbation: PerturbationReport | None = None
        # the optimizer's per-parameter state (train.optimizer momentum/adam), as the server keeps it:
        # for the trainable blocks only (a frozen block never changes)
        self.optimizer = Optimizer.from_config(cfg.train)
        self.opt_state: list[torch.Tensor | None] = [
            torch.from_numpy(self.optimizer.new_state(spec.numel)).to(b.device)
            if self.optimizer.width and spec.trainable else None
            for spec, b in zip(self.model.manifest.blocks, self.buffers)]
        self.log = TrainLog()
        self.run_log: RunLog | None = None
        self.train_seconds = 0.0
        # update windows (server.update_window K > 1): the materialized bases the workers of a step read, as
        # the server keeps them (its two slots): the master at each multiple of K, the newest two
        self.window = cfg.server.update_window
        self.bases: dict[int, list[torch.Tensor]] = {0: [b.clone() for b in self.buffers]} if self.window > 1 else {}

    def feed(self, version: int | None = None) -> MemoryFeed:
        """The weights as a worker receives them (served dtype, on the worker's device): the master, or with
        update windows the materialized base ``version``."""
        buffers = self.buffers if version is None or self.window == 1 else self.bases[version]
        return MemoryFeed(buffers, self.device, self.cfg.server.served_dtype)

    def at_step(self, step: int) -> tuple[MemoryFeed, list[UpdateRecord]]:
        """What step ``step``'s forwards (or an eval after ``step`` steps) read: the base ``base_version(step, K)``
        and the records after it, replayed on it (``forwardweights.replay_block``)."""
        base = base_version(step, self.window)
        return self.feed(base), self.log.records[base:step]

    def perturbation(self) -> PerturbationReport:
        """What the forwards keep of the perturbation, on the initial weights (``precision.job_report``; measured once)."""
        if self._perturbation is None:
            self._perturbation = job_report(self.cfg, self.model.manifest, self.job.model_dir)
        return self._perturbation

    def step(self, t: int) -> StepOutcome:
        """Run step ``t`` (forwards, g, update of the in-memory master) and return its outcome."""
        t0 = time.perf_counter()
        result = run_step(self.cfg, plan_step(self.cfg, t, self.job), self._forwards, self._apply, self.log,
                          self.run_log, elapsed_s=lambda: self.train_seconds + time.perf_counter() - t0)
        return result.outcome

    def _forwards(self, step: PlannedStep, attempt: int) -> Forwarded:
        """Every forward of the layout, in this process: (S, N) per (direction, shard, sign), tokens."""
        plan, batches = step.plan, step.batches
        roles = all_roles(self.cfg.layout)
        eps = self.precision.eps
        objective, cands = self.cfg.train.objective, self.job.train_candidates
        jobs = [ForwardJob(batches[r.shard], seed=plan.seeds[r.direction], coef=r.sign * eps, want_scores=bool(cands),
                           candidates=cands) for r in roles]
        results = self.engine.run(jobs, *self.at_step(plan.step))
        losses = {(r.direction, r.shard, r.sign): forward_sums(objective, cands, batches[r.shard], res.loss_sum,
                                                               res.label_tokens, res.scores)
                  for r, res in zip(roles, results)}
        return Forwarded(losses, sum(res.tokens for res in results))

    def _apply(self, record: UpdateRecord) -> None:
        """The parameter server's update, on the in-memory fp32 master blocks."""
        for spec, buf, state in zip(self.model.manifest.blocks, self.buffers, self.opt_state):
            apply_update(spec, buf, record, self.engine.dist, optimizer=self.optimizer, state=state)
        self.log.records.append(record)
        version = record.step + 1
        if self.window > 1 and version % self.window == 0:  # materialized: steps from version + K - 1 read it
            self.bases[version] = [b.clone() for b in self.buffers]
            for old in [v for v in self.bases if v < version - self.window]:
                del self.bases[old]

    def evaluate(self, step: int) -> dict[str, Any]:
        """Dev loss and accuracy of the current weights, recorded as the evaluation at ``step``."""
        result = {"step": step, **evaluate(self.engine, self.job, *self.at_step(step))}
        self.log.evals.append(result)
        if self.run_log is not None:
            self.run_log.eval(**result)
        return result

    def train(self, out_dir: str | Path | None = None, progress: bool | None = None,
              run_dir: str | Path | None = None, merge: bool = False) -> dict[str, Any]:
        """Train ``train.steps`` steps, evaluate, export to ``out_dir``; return the run summary.

        ``merge``: a LoRA run exports its merged plain model instead of peft's adapter directory.
        ``run_dir``: write the per-step log, the config and the report plot there.
        """
        if out_dir is not None:  # a destination the export would refuse is refused now, not after training
            check_destination(out_dir)
            if merge and self.model.adapter is None:
                raise ValueError("--merge merges a LoRA adapter into the base: this run trains the full model")
        if run_dir is None:
            return self._train(out_dir, progress, None, merge)
        make_run_dir(run_dir)
        # one writer per run directory: a zoctl up there (or its services, or another reference) is refused
        lock = DirLock(run_dir, RUN_LOCK, "the run directory").acquire()
        try:
            return self._train(out_dir, progress, run_dir, merge)
        finally:
            lock.release()

    def _train(self, out_dir: str | Path | None, progress: bool | None, run_dir: str | Path | None,
               merge: bool) -> dict[str, Any]:
        cfg = self.cfg
        apply_runtime_threads(cfg)
        generator.warm_up(self.device, cfg.train.distribution, forward_dtypes(self.engine.compute_dtype),
                          cfg.layout.q)  # like every service, before the clock starts
        if run_dir is not None:
            self.run_log = RunLog(run_dir)
            self.run_log.resume(0, cfg)  # refuses a run directory of another job
            write_atomic(Path(run_dir) / "job.yaml", cfg.to_yaml(redact=True).encode())
        start = time.perf_counter()
        if cfg.train.eval_at_start:
            self.evaluate(0)
        bar = tqdm(total=cfg.train.steps, desc="reference", unit="step", disable=not progress if progress is not None else None)
        for t in range(cfg.train.steps):
            t0 = time.perf_counter()
            outcome = self.step(t)
            self.train_seconds += time.perf_counter() - t0
            bar.update(1)
            bar.set_postfix(loss=f"{outcome.loss:.4f}")
            if cfg.train.eval_every and (t + 1) % cfg.train.eval_every == 0 and t + 1 < cfg.train.steps:
                bar.set_postfix_str("evaluating (dev split)")
                self.evaluate(t + 1)
        bar.set_postfix_str("evaluating (dev split)")
        bar.close()
        final_eval = self.evaluate(cfg.train.steps)
        summary = {
            "mode": "reference",
            "model": cfg.model.source,
            "task": cfg.data.train or "sst2-synth",
            "layout": cfg.layout.name,
            "workers": cfg.layout.workers,
            "steps": cfg.train.steps,
            **eval_summary(self.log.evals),
            "start_loss": self.log.start_loss(),
            "loss_window": loss_window(len(self.log.losses)),
            "final_loss": self.log.final_loss(),
            "dev_loss": final_eval["dev_loss"],
            "dev_accuracy": final_eval["dev_accuracy"],
            "skipped_steps": self.log.skipped_steps,
            "train_tokens": self.log.tokens,
            "tokens_per_second": self.log.tokens / self.train_seconds if self.train_seconds > 0 else 0.0,
            "wall_seconds": time.perf_counter() - start,
            "out_dir": str(out_dir) if out_dir is not None else None,
            "perturbation": self.perturbation().line(),
            "perturbation_warning": self.perturbation().warning(),
        }
        if out_dir is not None:  # on copies of the buffers, with its card, moved into place whole
            export_model_dir(self.model, self.buffers, out_dir, merge=merge, base_name=base_model_name(cfg.model.source),
                             card=model_card(cfg, summary, cfg.train.steps, mode="reference", merged=merge))
        if run_dir is not None:
            summary.update(write_report(run_dir))
        return summary
