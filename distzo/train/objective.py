"""The scalar a training forward returns (``train.objective``), written once for the reference and the coordinator.

MeZO needs only a scalar per forward, so it can optimize a non-differentiable metric of the batch
directly (Malladi et al. 2023, "Fine-Tuning Language Models with Just Forward Passes": their
non-differentiable objectives, accuracy and F1). Each forward reports a pair (S, N) that
``distzo.zo.mezo.sign_losses`` adds over the data shards and divides, l = sum S / sum N:

* ``loss``: S = summed cross-entropy of the label tokens, N = label tokens (the mean token loss);
* ``classification``: S = summed cross-entropy of the true label word among the label words only, -log
  softmax over the candidates' log-probabilities at the label position, N = rows: the mean classification
  loss (MeZO's ``train_as_classification``, LM-BFF's loss). Unlike ``loss`` it does not reward raising every
  label word's probability against the rest of the vocabulary, so the steps go to telling the words apart
  (the instruct model's label-word loss starts at several nats, which ``loss`` spends its first steps on).
  Needs the same one-token label words as accuracy.
* ``accuracy``: S = minus the rows whose true label word has the highest log-probability among
  the label words (the candidates' likelihood ranking, ties to the first word, as eval ranks),
  N = rows: l = -(batch accuracy), so minimizing l maximizes accuracy. It needs label words that
  are each one token in every example's context (the forward reads them all at one position).
* ``f1``: the same ranking's macro-F1 over the classes, S = -F1 x rows, N = rows: l = -(macro-F1).
  F1_c = 2 TP_c / (2 TP_c + FP_c + FN_c), averaged over the classes that are true or predicted in
  the batch (scikit-learn's ``f1_score(average="macro")`` with its default labels). Macro-F1 does not
  add over data shards: with DDP each shard's F1 is weighted by its rows (the mean over shards of a
  shard's F1), the same in the reference and the cluster for the same layout.

Accuracy changes only when some example's ranking flips between theta + eps z and theta - eps z,
so most steps have g = 0 unless eps is large enough to flip rankings: the objective helps when the
metric itself is what matters and the loss is a poor proxy for it (MeZO reports it close to the
loss on classification); on a tiny batch it moves rarely.
"""

from __future__ import annotations

import torch

from distzo.data.tasks import IGNORE, Batch, DataError, Example, TaskEncoder


def train_candidates(objective: str, encoder: TaskEncoder, train: list[Example]) -> tuple[int, ...]:
    """The label words' token ids a training forward scores (accuracy), () for loss.

    Raises DataError when the task has no candidates: a label word of several tokens, or one that
    some example's prompt merges into other tokens."""
    if objective == "loss":
        return ()
    cands = encoder.eval_candidates
    if not cands:
        multi = [w for w, ids in zip(encoder.label_words, encoder.label_ids) if len(ids) != 1]
        raise DataError(f"train.objective {objective}: needs label words that are one token each, but "
                        f"data.label_words {multi[:3]} take several tokens with this tokenizer; use train.objective loss "
                        "or single-token label words")
    encoder.check(train, every_label=True)  # batched encoding of every (example, word) first
    for e in train:
        if not encoder._one_row_fits(e):  # noqa: SLF001 - the encoder's own test, shared with eval
            raise DataError(f"train.objective {objective}: the label words are not one token after the prompt of "
                            f"training example {e.text[:40]!r} (the tokenizer merges them); use train.objective loss")
    return cands


def forward_sums(objective: str, candidates: tuple[int, ...], batch: Batch, loss_sum: float, label_tokens: int,
                 scores: torch.Tensor | None) -> tuple[float, int]:
    """(S, N) of one forward for ``objective`` (see the module docstring).

    ``scores``: the forward's float64 [rows, len(candidates)] log-probs of the candidates at each row's
    label position (accuracy); ``batch``: its rows, whose one label token is the true word's."""
    if objective == "loss":
        return loss_sum, label_tokens
    if scores is None:
        raise ValueError(f"the {objective} objective needs the forward's candidate scores")
    labels = batch.labels[:, 1:]
    picked = labels != IGNORE
    rows = labels.shape[0]
    if int(picked.sum()) != rows or scores.numel() != rows * len(candidates):
        raise ValueError(f"{objective} needs one label token per row and {len(candidates)} scores per row")
    truth = labels[picked]
    lookup = {c: i for i, c in enumerate(candidates)}
    target = torch.tensor([lookup.get(int(t), -1) for t in truth], dtype=torch.int64)
    if bool((target < 0).any()):
        raise ValueError("a row's label token is none of the label words' tokens")
    scores = scores.reshape(rows, len(candidates))
    if objective == "classification":
        logp = torch.log_softmax(scores.to(torch.float64), dim=1)
        return -float(logp[torch.arange(rows), target].sum()), rows
    pred = torch.argmax(scores, dim=1)
    if objective == "f1":
        return -macro_f1(pred, target, len(candidates)) * rows, rows
    return -float(int((pred == target).sum())), rows


def macro_f1(pred: torch.Tensor, target: torch.Tensor, classes: int) -> float:
    """Macro-F1 of predicted vs true class indices ([rows] int64 each, in [0, classes)), over the classes
    that occur in either (scikit-learn's default labels; with one row or more there is at least one)."""
    tp = torch.bincount(target[pred == target], minlength=classes).double()
    fp = torch.bincount(pred[pred != target], minlength=classes).double()
    fn = torch.bincount(target[pred != target], minlength=classes).double()
    denom = 2 * tp + fp + fn
    present = denom > 0
    return float((2 * tp[present] / denom[present]).mean())
