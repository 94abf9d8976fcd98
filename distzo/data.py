"""Prompt-and-label tasks (MeZO's SST-2 style): JSONL examples, encoding, batches.

Each JSONL line is ``{"text": "...", "label": 0}`` (or the label word itself). A training
row is ``template.format(text=...)`` followed by the label word; only the label word's
tokens carry a loss. Eval scores every candidate label word and predicts the likeliest.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch

from distzo.errors import BadInput

IGNORE = -100


class DataError(BadInput):
    """A data file that cannot be used, with the file and line named."""


@dataclass(frozen=True)
class Example:
    text: str
    label: int


@dataclass(frozen=True)
class Batch:
    input_ids: torch.Tensor  # [B, T] int64
    attention_mask: torch.Tensor  # [B, T] int64
    labels: torch.Tensor  # [B, T] int64, IGNORE except on label tokens

    @property
    def tokens(self) -> int:
        return int(self.attention_mask.sum())

    def to_arrays(self) -> dict[str, bytes | tuple[int, int]]:
        """Compact wire form (int32 token ids) for the coordinator -> worker assignment."""
        return {
            "shape": tuple(self.input_ids.shape),
            "input_ids": self.input_ids.to(torch.int32).numpy().tobytes(),
            "attention_mask": self.attention_mask.to(torch.int8).numpy().tobytes(),
            "labels": self.labels.to(torch.int32).numpy().tobytes(),
        }

    @staticmethod
    def from_arrays(shape: Sequence[int], input_ids: bytes, attention_mask: bytes, labels: bytes) -> "Batch":
        b, t = int(shape[0]), int(shape[1])
        if b <= 0 or t <= 0:
            raise DataError(f"batch shape must be positive, got {b}x{t}")
        expect = {"input_ids": (input_ids, 4), "attention_mask": (attention_mask, 1), "labels": (labels, 4)}
        for name, (raw, size) in expect.items():
            if len(raw) != b * t * size:
                raise DataError(f"{name} has {len(raw)} bytes, expected {b * t * size} for a {b}x{t} batch")
        ids = torch.frombuffer(bytearray(input_ids), dtype=torch.int32).view(b, t).to(torch.int64)
        mask = torch.frombuffer(bytearray(attention_mask), dtype=torch.int8).view(b, t).to(torch.int64)
        lab = torch.frombuffer(bytearray(labels), dtype=torch.int32).view(b, t).to(torch.int64)
        return Batch(ids, mask, lab)


def load_jsonl(path: str | Path, label_words: Sequence[str]) -> list[Example]:
    """Read and validate a JSONL task file; errors name the file and line."""
    p = Path(path)
    if not p.is_file():
        raise DataError(f"data file {str(p)!r} does not exist")
    examples: list[Example] = []
    with p.open("rb") as f:
        for lineno, raw in enumerate(f, start=1):
            where = f"{p}:{lineno}"
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as exc:
                raise DataError(f"{where}: not UTF-8 text (byte 0x{raw[exc.start]:02x} at column {exc.start + 1}); "
                                "a data file is UTF-8 JSON lines") from None
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise DataError(f"{where}: not valid JSON ({exc.msg}); expected an object like "
                                '{"text": "...", "label": 0}') from None
            if not isinstance(row, dict):
                raise DataError(f'{where}: expected a JSON object with "text" and "label", got {type(row).__name__}')
            text = row.get("text")
            if not isinstance(text, str) or not text.strip():
                raise DataError(f'{where}: "text" must be a non-empty string')
            label = row.get("label")
            if isinstance(label, str) and label in label_words:
                label = list(label_words).index(label)
            if isinstance(label, bool) or not isinstance(label, int) or not 0 <= label < len(label_words):
                raise DataError(
                    f'{where}: "label" must be an integer in [0, {len(label_words) - 1}] or one of {list(label_words)}, '
                    f"got {row.get('label')!r}"
                )
            examples.append(Example(text=text.strip(), label=label))
    if not examples:
        raise DataError(f"data file {str(p)!r} has no examples")
    return examples


class TaskEncoder:
    """Turns examples into token batches for one tokenizer, template and label words."""

    def __init__(self, tokenizer, template: str, label_words: Sequence[str], max_seq_len: int):  # noqa: ANN001
        self.tokenizer = tokenizer
        self.template = template
        self.label_words = list(label_words)
        self.max_seq_len = max_seq_len
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        if pad is None:
            raise DataError("the tokenizer has neither a pad nor an eos token to pad with")
        self.pad_id = int(pad)
        self.label_ids = [tokenizer.encode(" " + w, add_special_tokens=False) for w in self.label_words]
        for w, ids in zip(self.label_words, self.label_ids):
            if not ids:
                raise DataError(f"label word {w!r} encodes to no tokens")
            if len(ids) >= max_seq_len:
                raise DataError(f"label word {w!r} needs {len(ids)} tokens, more than max_seq_len={max_seq_len}")
        self._cache: dict[str, list[int]] = {}

    def _prompt(self, text: str) -> list[int]:
        ids = self._cache.get(text)
        if ids is None:
            ids = self.tokenizer.encode(self.template.format(text=text), add_special_tokens=True)
            self._cache[text] = ids
        return ids

    def _rows(self, pairs: Sequence[tuple[str, int]]) -> Batch:
        seqs, label_spans = [], []
        for text, label in pairs:
            target = self.label_ids[label]
            prompt = self._prompt(text)[-(self.max_seq_len - len(target)) :]  # keep the template's end
            seqs.append(prompt + target)
            label_spans.append((len(prompt), len(prompt) + len(target)))
        width = max(len(s) for s in seqs)
        ids = torch.full((len(seqs), width), self.pad_id, dtype=torch.int64)
        mask = torch.zeros((len(seqs), width), dtype=torch.int64)
        labels = torch.full((len(seqs), width), IGNORE, dtype=torch.int64)
        for i, (s, (a, b)) in enumerate(zip(seqs, label_spans)):
            ids[i, : len(s)] = torch.tensor(s, dtype=torch.int64)
            mask[i, : len(s)] = 1
            labels[i, a:b] = ids[i, a:b]
        return Batch(ids, mask, labels)

    def train_batch(self, examples: Sequence[Example]) -> Batch:
        return self._rows([(e.text, e.label) for e in examples])

    @property
    def eval_candidates(self) -> tuple[int, ...]:
        """The label words' token ids when each is one token (eval then scores them all from one row), else ()."""
        if all(len(ids) == 1 for ids in self.label_ids):
            return tuple(ids[0] for ids in self.label_ids)
        return ()

    def prompt_length(self, example: Example) -> int:
        return len(self._prompt(example.text))

    def eval_batch(self, examples: Sequence[Example]) -> Batch:
        """Rows to score every candidate label word of each example.

        Single-token label words (``eval_candidates``): one row per example, its label position
        marked with the first word (the forward reads every candidate's log-prob there).
        Otherwise one row per example and candidate, example-major.
        """
        if self.eval_candidates:
            return self._rows([(e.text, 0) for e in examples])
        return self._rows([(e.text, c) for e in examples for c in range(len(self.label_words))])
