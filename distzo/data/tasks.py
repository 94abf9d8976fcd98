"""Prompt-and-label tasks (MeZO's SST-2 style): JSONL examples, encoding, batches.

Each JSONL line is ``{"text": "...", "label": 0}`` (or the label word itself). A training
row is ``template.format(text=...)`` followed by the label word; only the label word's
tokens carry a loss. Eval scores every candidate label word and predicts the likeliest.
"""

from __future__ import annotations

import json
import string
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch

from distzo.common.errors import BadInput

IGNORE = -100


class DataError(BadInput):
    """A data file that cannot be used, with the file and line named."""


@dataclass(frozen=True)
class Example:
    """One labelled example: ``label`` indexes ``data.label_words`` (the word the model should say)."""

    text: str
    label: int


@dataclass(frozen=True)
class Batch:
    """B rows of T tokens, right-padded; the loss is taken only where ``labels`` is not IGNORE (-100)."""

    input_ids: torch.Tensor  # [B, T] int64
    attention_mask: torch.Tensor  # [B, T] int64
    labels: torch.Tensor  # [B, T] int64, IGNORE except on label tokens

    @property
    def tokens(self) -> int:
        """Attended (non-padding) tokens in the batch."""
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
        """The inverse of ``to_arrays`` (``shape`` = (B, T)); DataError when a buffer's size does not match."""
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


def _common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


class TaskEncoder:
    """Turns examples into token batches for one tokenizer, template and label words.

    A row is the tokenization of the whole string ``template(text) + " " + word`` (no extra space
    when the template ends in whitespace), after the tokenizer's leading special tokens (BOS). The
    label tokens are what the word adds in context: the tokens past the longest common prefix with
    the prompt's own tokenization (lm-evaluation-harness's rule). Encoding the word on its own
    would be wrong for SentencePiece tokenizers, where ``" terrible"`` alone gives
    ``['▁', '▁terrible']`` but after "It was" only ``['▁terrible']``. A row longer than
    ``max_seq_len`` loses tokens from the start of the text, never the special prefix or the word.
    """

    def __init__(self, tokenizer, template: str, label_words: Sequence[str], max_seq_len: int):  # noqa: ANN001
        self.tokenizer = tokenizer
        self.template = template
        self.label_words = list(label_words)
        self.max_seq_len = max_seq_len
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        if pad is None:
            raise DataError("the tokenizer has neither a pad nor an eos token to pad with")
        self.pad_id = int(pad)
        self._prompts: dict[str, list[int]] = {}
        self._pairs: dict[tuple[str, int], tuple[list[int], int]] = {}
        # a text to fill the template with, to find the tokenizer's special prefix and the label words' tokens in
        # context: made of what the user gave (a label word), so no check can trip over text the user never wrote
        probe = self.label_words[0]
        with_special = self._encode(template.format(text=probe), special=True, what="data.template")
        plain = self._encode(template.format(text=probe), special=False, what="data.template")
        at = next((i for i in range(len(with_special) - len(plain) + 1) if with_special[i : i + len(plain)] == plain), 0)
        self.prefix = with_special[:at]  # BOS and the like; trailing specials (EOS) never go before the word
        unk = tokenizer.unk_token_id
        # the template is judged by its own text, never by the probe sentence filled in to find the prefix
        for literal in (text for text, *_ in string.Formatter().parse(template) if text):
            ids = self._encode(literal, special=False, what="data.template")
            if unk is not None and unk in ids:
                pieces = [t for t, i in zip(tokenizer.convert_ids_to_tokens(ids), ids) if i == unk]
                raise DataError(f"data.template {template!r}: the tokenizer cannot encode {literal!r} (gives the "
                                f"unknown token {pieces[0]!r}); use characters its vocabulary has")
        # the label words in the template's context: eval's candidates, and the length check
        self.label_ids = [self._pair(probe, c)[0][self._pair(probe, c)[1] :] for c in range(len(self.label_words))]
        budget = max_seq_len - len(self.prefix) - 1  # at least one token to predict the word from
        for w, ids in zip(self.label_words, self.label_ids):
            if unk is not None and unk in ids:
                raise DataError(f"data.label_words: the tokenizer cannot encode {w!r} (gives the unknown token)")
            if len(ids) > budget:
                raise DataError(f"data.label_words: {w!r} needs {len(ids)} tokens, more than data.max_seq_len="
                                f"{max_seq_len} leaves after the special tokens and one prompt token")
        seen: dict[tuple[int, ...], str] = {}
        for w, ids in zip(self.label_words, self.label_ids):
            if tuple(ids) in seen:
                raise DataError(f"data.label_words: {seen[tuple(ids)]!r} and {w!r} are the same tokens {ids} for this "
                                "tokenizer, so no model can tell them apart")
            seen[tuple(ids)] = w

    def _encode(self, text: str, special: bool, what: str = "the data") -> list[int]:
        try:
            return list(self.tokenizer.encode(text, add_special_tokens=special))
        except Exception as exc:  # noqa: BLE001 - tokenizers raise many kinds
            raise DataError(f"{what}: the tokenizer cannot encode {text[:80]!r}: {exc}") from None

    def _encode_many(self, texts: list[str]) -> list[list[int]]:
        """Batch encoding (no special tokens): the tokenizer's fast path, same ids as ``_encode``."""
        if not texts:
            return []
        try:
            return [list(ids) for ids in self.tokenizer(texts, add_special_tokens=False)["input_ids"]]
        except Exception:  # noqa: BLE001 - find the text that fails, one by one
            return [self._encode(t, special=False) for t in texts]

    def _separator(self, prompt_text: str, word: str) -> str:
        return "" if prompt_text[-1:].isspace() or word[:1].isspace() else " "

    def _prompt(self, text: str) -> list[int]:
        ids = self._prompts.get(text)
        if ids is None:
            ids = self._encode(self.template.format(text=text), special=False)
            self._prompts[text] = ids
        return ids

    def _pair(self, text: str, label: int) -> tuple[list[int], int]:
        """The tokens of prompt + word (no special tokens) and where the word's tokens start."""
        key = (text, label)
        got = self._pairs.get(key)
        if got is None:
            prompt_text = self.template.format(text=text)
            word = self.label_words[label]
            whole = self._encode(prompt_text + self._separator(prompt_text, word) + word, special=False)
            start = _common_prefix(self._prompt(text), whole)
            if start == len(whole):
                raise DataError(f"data.label_words: {word!r} adds no tokens after the prompt {prompt_text[-40:]!r}")
            got = (whole, start)
            self._pairs[key] = got
        return got

    def _row(self, text: str, label: int) -> tuple[list[int], int]:
        """One row (special prefix + prompt + word, cut to max_seq_len from the text's start) and its label start."""
        whole, start = self._pair(text, label)
        room = self.max_seq_len - len(self.prefix)
        if len(whole) - start >= room:
            raise DataError(f"data.label_words: {self.label_words[label]!r} needs {len(whole) - start} tokens after "
                            f"{text[:40]!r}, more than data.max_seq_len={self.max_seq_len} leaves")
        cut = max(0, len(whole) - room)
        return self.prefix + whole[cut:], len(self.prefix) + start - cut

    def _rows(self, pairs: Sequence[tuple[str, int]], last_label_token_only: bool = False) -> Batch:
        rows = [self._row(text, label) for text, label in pairs]
        width = max(len(r) for r, _ in rows)
        ids = torch.full((len(rows), width), self.pad_id, dtype=torch.int64)
        mask = torch.zeros((len(rows), width), dtype=torch.int64)
        labels = torch.full((len(rows), width), IGNORE, dtype=torch.int64)
        for i, (r, a) in enumerate(rows):
            ids[i, : len(r)] = torch.tensor(r, dtype=torch.int64)
            mask[i, : len(r)] = 1
            labels[i, a : len(r)] = ids[i, a : len(r)]
        return Batch(ids, mask, labels)

    def train_batch(self, examples: Sequence[Example]) -> Batch:
        """Prompt + label word per example, the loss on the label word's tokens only ([B, T] tensors)."""
        return self._rows([(e.text, e.label) for e in examples])

    @property
    def eval_candidates(self) -> tuple[int, ...]:
        """The label words' in-context token ids when each is one token (eval then scores them all from one row), else ()."""
        if all(len(ids) == 1 for ids in self.label_ids):
            return tuple(ids[0] for ids in self.label_ids)
        return ()

    def _one_row_fits(self, example: Example) -> bool:
        """Every label word adds exactly its candidate token to the same prompt tokens for this example."""
        cands = self.eval_candidates
        pairs = [self._pair(example.text, c) for c in range(len(self.label_words))]
        prompt = pairs[0][0][: pairs[0][1]]
        return all(whole[start:] == [cands[c]] and whole[:start] == prompt for c, (whole, start) in enumerate(pairs))

    def prompt_length(self, example: Example) -> int:
        """Tokens of the example's prompt (without the label word)."""
        return len(self._prompt(example.text))

    def check(self, examples: Sequence[Example], every_label: bool = False) -> None:
        """Encode every example (with its label word, or with every one) now, in batches, so a bad one
        fails before training (DataError) and the rows are cached."""
        pairs = [(e.text, c) for e in examples for c in (range(len(self.label_words)) if every_label else [e.label])]
        texts = sorted({t for t, _ in pairs if t not in self._prompts})
        for t, ids in zip(texts, self._encode_many([self.template.format(text=t) for t in texts])):
            self._prompts[t] = ids
        todo = sorted({p for p in pairs if p not in self._pairs})
        wholes = []
        for t, c in todo:
            prompt_text, word = self.template.format(text=t), self.label_words[c]
            wholes.append(prompt_text + self._separator(prompt_text, word) + word)
        for (t, c), whole in zip(todo, self._encode_many(wholes)):
            start = _common_prefix(self._prompts[t], whole)
            if start == len(whole):
                raise DataError(f"data.label_words: {self.label_words[c]!r} adds no tokens after the prompt of {t[:40]!r}")
            self._pairs[(t, c)] = (whole, start)
        for t, c in pairs:
            self._row(t, c)

    def eval_batch(self, examples: Sequence[Example]) -> tuple[Batch, tuple[int, ...]]:
        """Rows to score every candidate label word of each example, and the candidates to score.

        Single-token label words (``eval_candidates``) that each example's prompt takes as the same
        one token: one row per example, its label position marked with the first word (the forward
        reads every candidate's log-prob there). Otherwise one row per example and candidate,
        example-major, and no candidates.
        """
        if self.eval_candidates and all(self._one_row_fits(e) for e in examples):
            return self._rows([(e.text, 0) for e in examples]), self.eval_candidates
        return self._rows([(e.text, c) for e in examples for c in range(len(self.label_words))]), ()
