"""Block-streaming forward: several forward jobs over one pass of the blocks.

A *job* is one forward of one batch at ``theta + coef * z(seed)`` (``coef = 0``: clean
weights, used by eval). All jobs of a run share each block while it is resident: the
first job to reach block ``b`` gets its clean buffer from the feed and makes every job's
perturbed copy (out of place, z generated once per seed), each job runs its part of the
model on its copy, and the block is dropped when the last job has moved past it. This
is the dual forward of ZO2 (both signs per fetch), generalized to any number of jobs.

The jobs are the skeleton's own Hugging Face ``forward`` running in threads that take
turns in strict order (job 0 on block b, job 1 on block b, ..., job 0 on block b+1):
only one thread computes at any time, so every job's result is bitwise that of running
the forwards one after another, whatever the thread scheduling. Where the blocks come from and how long
each stays resident: ``blockfeed.py``.
"""

from __future__ import annotations

import contextlib
import threading
from dataclasses import dataclass
from typing import Sequence

import torch

from distzo.common.config import ConfigError
from distzo.data.tasks import IGNORE, Batch
from distzo.model.blockfeed import BlockFeed, BlockRun
from distzo.model.modeling import BlockModel, causal_lm_logits
from distzo.zo.forwardweights import ForwardWeights, forward_weights, replay_block
from distzo.zo.generator import Distribution
from distzo.zo.record import UpdateRecord


@dataclass(frozen=True)
class ForwardJob:
    """One forward of ``batch`` (input_ids, attention_mask, labels: [B, T] int64, labels IGNORE (-100) where
    no loss is taken) at the weights ``theta + coef * z(seed)``."""

    batch: Batch
    seed: int = 0
    coef: float = 0.0  # sign * eps; 0.0 runs the clean weights
    want_scores: bool = False  # per-row summed log-prob of the label tokens (eval)
    want_logits: bool = False  # logits at every position, [B, T, V] (tests)
    # with want_scores: score these token ids at each row's one label position instead (scores [rows, C])
    candidates: tuple[int, ...] = ()


@dataclass
class JobResult:
    """What one ForwardJob gives: losses in nats (cross-entropy of each label token), token counts."""

    loss: float  # mean cross-entropy over the label tokens (loss_sum / label_tokens)
    label_tokens: int
    tokens: int  # attended tokens in the batch
    loss_sum: float = 0.0  # summed cross-entropy over the label tokens (summed in fp64): what shards add up
    scores: torch.Tensor | None = None  # float64: [rows], or [rows, len(candidates)]
    logits: torch.Tensor | None = None


class ForwardEngine:
    """Runs forward jobs over a block feed with the model's skeleton.

    ``dist``: the distribution of z (``distzo.zo.generator``); ``device``: where the forwards run;
    ``compute_dtype``: the dtype of the perturbed copies and of the forward (the job's, ``precision.job_precision``:
    float32 on CPU; on a GPU the served 16-bit dtype). A 16-bit forward keeps the tensors of rank < 2 in float32
    (``forwardweights.forward_weights``) and runs under ``torch.autocast(compute_dtype)``; a module whose weights
    are all such tensors (a norm) returns its floating outputs in the compute dtype when its inputs are (the
    activations keep the forward's dtype). One ``run`` at a time per engine.
    """

    def __init__(
        self,
        model: BlockModel,
        dist: Distribution | str = Distribution.RADEMACHER,
        device: str | torch.device = "cpu",
        compute_dtype: torch.dtype = torch.float32,
    ):
        self.model = model
        self.dist = Distribution(dist)
        self.device = torch.device(device)
        self.compute_dtype = compute_dtype
        self._tls = threading.local()
        self._lock = threading.Lock()  # one run at a time per engine (the skeleton is shared)
        self.last_peak_copy_bytes = 0
        for mod, refs in model.module_refs.items():
            mod.register_forward_pre_hook(self._pre_hook)
            if compute_dtype != torch.float32 and all(len(model.manifest.tensor(r.name)[1].shape) < 2 for r in refs):
                mod.register_forward_hook(self._keep_activation_dtype, with_kwargs=True)
        # the output embedding sees only the hidden states of the label positions (logits [1, n, V],
        # not [B, P, V]); what the family's forward does after it (scaling, soft-capping) is elementwise
        self._head = model.skeleton.get_output_embeddings()
        if self._head is not None:
            self._head.register_forward_pre_hook(self._gather_label_positions)

    # ------------------------------------------------------------------ perturbation
    def make_copies(self, b: int, clean: torch.Tensor, jobs: list[ForwardJob],
                    pending: Sequence[UpdateRecord] = ()) -> list[ForwardWeights]:
        """Each job's weights for block b, made out of place from the clean buffer
        (``forwardweights.forward_weights``).

        ``clean``: block b's flat [numel] buffer, the fetched base; ``pending``: the update records after it
        (update windows), replayed first (``forwardweights.replay_block``, fused into the perturbation when one
        seed serves every job). Returns one ``ForwardWeights`` per job in ``compute_dtype``: x + coef * z(seed)
        (z over the block's global element indices, generated once per seed for all that seed's
        coefficients), or x itself for ``coef == 0`` and for a frozen block (train.target lora's base
        weights), x being the base with the pending records applied."""
        spec = self.model.manifest.blocks[b]
        dt = self.compute_dtype
        by_seed: dict[int, list[int]] = {}
        for j, job in enumerate(jobs):
            if job.coef != 0.0 and spec.trainable:
                by_seed.setdefault(job.seed, []).append(j)
        replays = pending and spec.trainable and any(not r.skipped for r in pending)
        if replays and len(by_seed) == 1 and sum(map(len, by_seed.values())) == len(jobs):
            (seed, idx), = by_seed.items()  # the usual worker: one seed, both signs, one fused pass
            outs = forward_weights(spec, clean, self.dist, seed, [jobs[j].coef for j in idx], dt, pending)
            return [outs[idx.index(j)] for j in range(len(jobs))]
        base = replay_block(spec, clean, pending, self.dist)[0] if replays else clean
        copies: list[ForwardWeights | None] = [None] * len(jobs)
        perturbed = {i for idx in by_seed.values() for i in idx}
        if len(perturbed) < len(jobs):
            plain = forward_weights(spec, base, self.dist, compute_dtype=dt)[0]
            for j in range(len(jobs)):
                if j not in perturbed:
                    copies[j] = plain
        for seed, idx in by_seed.items():
            for j, out in zip(idx, forward_weights(spec, base, self.dist, seed, [jobs[j].coef for j in idx], dt)):
                copies[j] = out
        return copies  # type: ignore[return-value]

    # ------------------------------------------------------------------ hooks
    def _pre_hook(self, module: torch.nn.Module, _args: object) -> None:
        ctx = getattr(self._tls, "ctx", None)
        if ctx is None:
            raise RuntimeError("the model skeleton has no weights outside ForwardEngine.run")
        run, j = ctx
        b = self.model.module_block[module]
        if b == run.current[j]:
            return
        if b < run.current[j]:
            raise RuntimeError(f"module of block {b} ran after block {run.current[j]}: not a block-ordered model")
        run.lockstep.move(j, b, run.release_passed)
        run.current[j] = b
        # the whole block at once: a layer may read a parameter of one of its modules without calling it
        for mod in self.model.block_modules[b]:
            self.model.bind(mod, {r.block: run.views(j, r.block) for r in self.model.module_refs[mod]})

    def _keep_activation_dtype(self, _module: torch.nn.Module, args: tuple, kwargs: dict, out: object) -> object:
        """A 16-bit forward's module whose weights are all float32 vectors (a norm): when its floating inputs are
        all in the compute dtype, its float32 outputs are rounded to it, as in a forward without float32 vectors
        (the module's arithmetic used the float32 weights; the activations keep the forward's dtype)."""
        dt = self.compute_dtype
        floats = [a.dtype for a in (*args, *kwargs.values()) if isinstance(a, torch.Tensor) and a.is_floating_point()]
        if not floats or any(d != dt for d in floats):
            return None

        def cast(x: object) -> object:
            if isinstance(x, torch.Tensor) and x.dtype == torch.float32:
                return x.to(dt)
            if type(x) in (tuple, list):
                return type(x)(cast(v) for v in x)
            return x

        return cast(out)

    def _autocast(self) -> contextlib.AbstractContextManager:
        """A 16-bit forward runs under torch.autocast (its float32 vectors meet 16-bit activations)."""
        if self.compute_dtype == torch.float32:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.compute_dtype)

    def _gather_label_positions(self, _module: torch.nn.Module, args: tuple) -> tuple | None:
        picks = getattr(self._tls, "picks", None)
        if picks is None or not args:
            return None
        rows, cols, kept_cols, kept = picks
        hidden = args[0]
        if not (isinstance(hidden, torch.Tensor) and hidden.is_floating_point() and hidden.dim() == 3):
            return None  # not hidden states (a module shared with the input embedding): leave it alone
        at = kept_cols if hidden.shape[1] == kept else cols  # the family kept only `positions`, or all
        return (hidden[rows, at].unsqueeze(0), *args[1:])

    # ------------------------------------------------------------------ running
    def run(self, jobs: list[ForwardJob], feed: BlockFeed, pending: Sequence[UpdateRecord] = ()) -> list[JobResult]:
        """Run ``jobs`` over one pass of ``feed``'s blocks; their results, in order.

        Each block is fetched once for all jobs (``feed.get``) and released when the last job has
        passed it; ``pending``: update records replayed on every fetched block first (update windows:
        the feed serves the base, the jobs run at the base plus these). Raises the first job's error
        (ValueError for a batch without label tokens; the feed's own errors, e.g. a failed fetch) after
        every job has stopped.
        """
        if not jobs:
            return []
        with self._lock:
            pending = tuple(pending)
            run = BlockRun(self.model, feed, len(jobs), lambda b, clean: self.make_copies(b, clean, jobs, pending))
            results: list[JobResult | None] = [None] * len(jobs)
            errors: list[BaseException | None] = [None] * len(jobs)
            threads = [
                threading.Thread(target=self._job, args=(run, j, jobs[j], results, errors), name=f"fwd-job-{j}",
                                 daemon=True)
                for j in range(1, len(jobs))
            ]
            for t in threads:
                t.start()
            self._job(run, 0, jobs[0], results, errors)
            for t in threads:
                t.join()
            for b in list(run.blocks):
                run.drop(b)
            self.model.unbind_all()
            self.last_peak_copy_bytes = run.peak_copy_bytes
            for err in errors:
                if err is not None:
                    raise err
            return results  # type: ignore[return-value]

    def _job(self, run: BlockRun, j: int, job: ForwardJob, results: list, errors: list) -> None:
        self._tls.ctx = (run, j)
        try:
            run.lockstep.wait_turn(j)
            with torch.inference_mode(), self._autocast():
                results[j] = self._forward(job)
        except BaseException as exc:  # reported to the caller after every job has finished
            errors[j] = exc
        finally:
            self._tls.ctx = None
            run.lockstep.finish(j)

    def _forward(self, job: ForwardJob) -> JobResult:
        model = self.model
        batch = job.batch
        ids = batch.input_ids.to(self.device)
        mask = batch.attention_mask.to(self.device)
        labels = batch.labels.to(self.device)[:, 1:]
        picked = labels != IGNORE
        n = int(picked.sum())
        if n == 0:
            raise ValueError("the batch has no label tokens to compute a loss on")
        rows, cols = picked.nonzero(as_tuple=True)  # row-major: position cols predicts token cols + 1
        # the family's own forward (final norm, head, logit scaling or soft-capping), with logits
        # only at the positions some row predicts a label from
        if job.want_logits:
            logits_full = causal_lm_logits(model.skeleton, ids, mask, None, model.forward_extra, model.keeps_logits,
                                           prefix_layers=model.prefix_layers).float()
            logits = logits_full[rows, cols]
        else:
            logits_full = None
            positions = torch.unique(cols)
            kept_cols = torch.searchsorted(positions, cols)
            self._tls.picks = (rows, cols, kept_cols, positions.numel()) if self._head is not None else None
            try:
                out = causal_lm_logits(model.skeleton, ids, mask, positions, model.forward_extra, model.keeps_logits,
                                       select=self._head is None, prefix_layers=model.prefix_layers)
            finally:
                self._tls.picks = None
            if self._head is not None:
                if out.shape[:2] != (1, n):
                    raise RuntimeError(f"{model.config.model_type}: the logits after the output embedding have shape "
                                       f"{tuple(out.shape)}, expected (1, {n}, vocab): the family reshapes them")
                logits = out[0].float()
            else:
                logits = out[rows, kept_cols].float()
        logp = torch.log_softmax(logits, dim=-1)
        token_logp = logp.gather(1, labels[picked].unsqueeze(1)).squeeze(1)
        loss_sum = float(-token_logp.double().sum())  # fp64: shards add up to the whole batch's sum
        scores = None
        if job.want_scores and job.candidates:
            if rows.numel() != ids.shape[0] or not torch.equal(rows, torch.arange(ids.shape[0], device=rows.device)):
                raise ValueError("scoring candidates needs exactly one label position in every row")
            cand = torch.tensor(job.candidates, dtype=torch.long, device=logits.device)
            scores = logp[:, cand].to(torch.float64).cpu()
        elif job.want_scores:
            scores = torch.zeros(ids.shape[0], dtype=torch.float64, device=self.device)
            scores.index_add_(0, rows, token_logp.to(torch.float64))
            scores = scores.cpu()
        return JobResult(
            loss=loss_sum / n,
            label_tokens=n,
            tokens=int(mask.sum()),
            loss_sum=loss_sum,
            scores=scores,
            logits=logits_full.cpu() if logits_full is not None else None,
        )


def resolve_device(name: str | torch.device) -> torch.device:
    """A torch device, with a clear error when a CUDA device is asked for and none is visible."""
    try:
        device = torch.device(name)
    except RuntimeError:
        device = torch.device("meta")  # not a device name: refused below
    if device.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise ConfigError(f"device {str(name)!r}: no CUDA device is visible (expected 'cpu' on this machine)")
        if device.index is not None and device.index >= count:
            raise ConfigError(f"device {str(name)!r}: only {count} CUDA device(s) visible (cuda:0..cuda:{count - 1})")
    elif device.type != "cpu":
        raise ConfigError(f"device {str(name)!r}: expected 'cpu', 'cuda' or 'cuda:N'")
    return device
