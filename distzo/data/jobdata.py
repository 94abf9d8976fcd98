"""A job's resolved inputs (model directory, tokenizer, examples) and its batches.

Shared by the reference trainer and the coordinator so both cut the same batches.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import torch

from distzo.common.config import EVAL_BATCH_EXAMPLES, JobConfig
from distzo.data.catalog import resolve_model, resolve_task
from distzo.data.tasks import IGNORE, Batch, DataError, Example, TaskEncoder, load_jsonl
from distzo.model.adapters import adapter_from_train
from distzo.model.families import load_config
from distzo.model.modeldir import ModelError, check_weight_files
from distzo.model.modeling import BlockModel
from distzo.train.objective import train_candidates
from distzo.train.plan import StepPlan, shard_bounds


@dataclass
class JobData:
    cfg: JobConfig
    model_dir: Path
    encoder: TaskEncoder
    train: list[Example]
    dev: list[Example]
    train_candidates: tuple[int, ...] = ()  # token ids a training forward scores (train.objective accuracy)

    @classmethod
    def load(cls, cfg: JobConfig) -> "JobData":
        from transformers import AutoTokenizer

        model_dir = resolve_model(cfg.model.source, cfg.runtime.cache_dir)
        config = load_config(model_dir)
        check_weight_files(model_dir)  # a truncated checkpoint fails here, before anything starts
        try:
            tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
        except Exception as exc:  # noqa: BLE001 - transformers raises many kinds
            raise ModelError(f"no usable tokenizer in {str(model_dir)!r}: {exc}") from None
        check_tokenizer_fits_model(tokenizer, config, model_dir)

        adapter = adapter_from_train(cfg.train)
        if adapter is not None:  # LoRA's target modules, a prefix's model family: checked here, not first in a service

            BlockModel(config, model_dir, adapter)
        encoder = TaskEncoder(tokenizer, cfg.data.template, cfg.data.label_words, cfg.data.max_seq_len)
        limit = getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None)
        prefix = cfg.train.prefix_tokens if cfg.train.target == "prefix" else 0  # a prefix takes positions too
        if limit is not None and cfg.data.max_seq_len + prefix > limit:
            with_prefix = f" + train.prefix_tokens {prefix}" if prefix else ""
            raise DataError(f"data.max_seq_len {cfg.data.max_seq_len}{with_prefix} exceeds the model's {limit} positions")
        train_path, task_dev = resolve_task(cfg.data.train, cfg.runtime.cache_dir)
        train = load_jsonl(train_path, cfg.data.label_words)
        if cfg.data.dev is not None:
            dev = load_jsonl(resolve_task(cfg.data.dev, cfg.runtime.cache_dir)[1] or cfg.data.dev, cfg.data.label_words)
        elif task_dev is not None:
            dev = load_jsonl(task_dev, cfg.data.label_words)
        else:
            # a user file without a dev file: hold out its last tenth (deterministic)
            if len(train) < 2:
                raise DataError(f"{cfg.data.train}: need at least 2 examples to hold out a dev split (or set data.dev)")
            cut = len(train) - max(1, len(train) // 10)
            train, dev = train[:cut], train[cut:]
        if cfg.data.dev_examples is not None:
            dev = dev[: cfg.data.dev_examples]
        encoder.check(train)  # every row is encodable now, not at step 10 000
        encoder.check(dev, every_label=True)

        return cls(cfg, model_dir, encoder, train, dev, train_candidates(cfg.train.objective, encoder, train))

    def shard_batches(self, plan: StepPlan) -> list[Batch]:
        """The step's batch cut into the layout's data shards."""
        examples = [self.train[i] for i in plan.examples]
        return [self.encoder.train_batch(examples[a:b]) for a, b in shard_bounds(len(examples), self.cfg.layout.ddp)]

    def eval_chunks(self) -> list[tuple[list[Example], Batch, tuple[int, ...]]]:
        """The dev split in batches of similar length (less padding): examples, candidate rows, candidate ids."""
        order = sorted(self.dev, key=self.encoder.prompt_length)
        out = []
        for a in range(0, len(order), EVAL_BATCH_EXAMPLES):
            chunk = order[a : a + EVAL_BATCH_EXAMPLES]
            out.append((chunk, *self.encoder.eval_batch(chunk)))
        return out


def check_tokenizer_fits_model(tokenizer, config, model_dir: Path) -> None:  # noqa: ANN001
    """Refuse (ModelError) a tokenizer that can produce ids the model's embedding does not have."""
    vocab = getattr(config.get_text_config(), "vocab_size", None)
    if not isinstance(vocab, int):
        return
    where = f"{str(model_dir)!r}: the tokenizer and the weights disagree"
    for name in ("pad", "bos", "eos", "unk"):
        tid = getattr(tokenizer, f"{name}_token_id", None)
        if isinstance(tid, int) and not 0 <= tid < vocab:
            raise ModelError(f"{where}: the {name} token {getattr(tokenizer, f'{name}_token')!r} has id {tid}, outside "
                             f"the model's vocabulary of {vocab} (ids 0..{vocab - 1})")
    for tid in tokenizer.all_special_ids:
        if not 0 <= tid < vocab:
            raise ModelError(f"{where}: special token id {tid} is outside the model's vocabulary of {vocab}")
    if len(tokenizer) > vocab:
        raise ModelError(f"{where}: the tokenizer has {len(tokenizer)} tokens, the model's embedding {vocab} rows "
                         "(token ids past the embedding would fail in the forward)")


@dataclass
class EvalTally:
    """Accumulates candidate scores into dev loss and accuracy."""

    n_labels: int
    objective: str = "loss"  # train.objective: "classification" makes the dev loss its loss (over the label words)
    examples: int = 0
    nonfinite: int = 0  # examples with a non-finite candidate score: no loss or accuracy is computed from them
    _parts: list[tuple[int, float, int, int]] = field(default_factory=list)

    def add(self, chunk_index: int, examples: list[Example], batch: Batch, scores: torch.Tensor, candidates: bool) -> None:
        """``scores``: each example's summed log-prob of each candidate, [examples * n_labels] or
        [examples, n_labels]; ``candidates``: the chunk was scored one row per example (single-token labels)."""
        s = scores.reshape(len(examples), self.n_labels)
        self.nonfinite += int((~torch.isfinite(s)).any(dim=1).sum())
        if candidates:
            t = torch.ones_like(s, dtype=torch.int64)
        else:
            t = (batch.labels[:, 1:] != IGNORE).sum(dim=1).view(len(examples), self.n_labels)
        correct = 0
        logp = 0.0
        tok = 0
        classify = self.objective == "classification"
        for i, ex in enumerate(examples):
            correct += int(int(torch.argmax(s[i])) == ex.label)
            logp += float(torch.log_softmax(s[i], dim=0)[ex.label]) if classify else float(s[i, ex.label])
            tok += 1 if classify else int(t[i, ex.label])
        self._parts.append((chunk_index, logp, tok, correct))
        self.examples += len(examples)

    def result(self) -> dict[str, float]:
        """Dev loss (nats per label token; with the classification objective, per example over the label words)
        and accuracy; both NaN when any score was not finite
        (diverged weights: an argmax over NaN is no prediction)."""
        if self.nonfinite:
            return {"dev_loss": math.nan, "dev_accuracy": math.nan, "dev_examples": self.examples}
        # sum in chunk order so the figure does not depend on which worker finished first
        parts = sorted(self._parts)
        logp = sum(p[1] for p in parts)
        tok = sum(p[2] for p in parts)
        correct = sum(p[3] for p in parts)
        return {
            "dev_loss": -logp / tok if tok else math.nan,
            "dev_accuracy": correct / self.examples if self.examples else math.nan,
            "dev_examples": self.examples,
        }
