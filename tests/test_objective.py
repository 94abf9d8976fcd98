"""train.objective accuracy and f1: minus the batch accuracy (macro-F1) of the label words' ranking. (zoctl up ==
zoctl reference with each objective, DDP included: tests/test_matrix.py.)"""

from __future__ import annotations

import math

import pytest
import torch

from distzo.data.tasks import Batch, DataError
from distzo.train.objective import forward_sums

from test_cluster import zoctl_here


def test_accuracy_sums_count_the_rows_whose_true_word_ranks_first():
    cands = (7, 9, 4)
    labels = torch.full((4, 5), -100)
    labels[0, 3], labels[1, 4], labels[2, 2], labels[3, 4] = 9, 7, 4, 9  # true words: 1, 0, 2, 1
    batch = Batch(torch.zeros(4, 5, dtype=torch.int64), torch.ones(4, 5, dtype=torch.int64), labels)
    scores = torch.tensor([[-3.0, -1.0, -2.0],   # ranks word 1 first: right
                           [-1.0, -1.0, -5.0],   # tie between 0 and 1: the first (0) wins, right
                           [-0.5, -2.0, -1.0],   # ranks 0: wrong (true 2)
                           [-2.0, -2.5, -0.1]], dtype=torch.float64)  # ranks 2: wrong (true 1)
    assert forward_sums("accuracy", cands, batch, 12.5, 4, scores) == (-2.0, 4)
    assert forward_sums("loss", (), batch, 12.5, 4, None) == (12.5, 4)
    labels[3, 4] = 5  # not a label word
    with pytest.raises(ValueError, match="none of the label words"):
        forward_sums("accuracy", cands, batch, 0.0, 4, scores)


def test_classification_sums_are_the_cross_entropy_over_the_label_words_only():
    """MeZO's train_as_classification: a softmax over the candidates' log-probs, whatever the rest of the vocabulary
    holds (raising every label word's probability alike changes nothing)."""
    cands = (7, 9)
    labels = torch.full((3, 4), -100)
    labels[0, 3], labels[1, 2], labels[2, 3] = 9, 7, 7  # true words: 1, 0, 0
    batch = Batch(torch.zeros(3, 4, dtype=torch.int64), torch.ones(3, 4, dtype=torch.int64), labels)
    scores = torch.tensor([[-4.0, -2.0], [-3.0, -3.0], [-1.0, -6.0]], dtype=torch.float64)
    s, n = forward_sums("classification", cands, batch, 99.0, 3, scores)
    expect = -(torch.log_softmax(scores, dim=1)[[0, 1, 2], [1, 0, 0]]).sum()
    assert n == 3 and s == pytest.approx(float(expect), rel=1e-12)
    assert forward_sums("classification", cands, batch, 0.0, 3, scores - 5.0) == (s, n)  # a shared shift: no change
    assert s == pytest.approx(-math.log(1 / (1 + math.exp(-2))) + math.log(2) - math.log(1 / (1 + math.exp(-5))))
    # its dev loss is the same loss, per example (the plot's training and dev loss are one quantity)
    from distzo.data.jobdata import EvalTally
    from distzo.data.tasks import Example

    tally = EvalTally(2, "classification")
    tally.add(0, [Example("a", 1), Example("b", 0), Example("c", 0)], batch, scores, True)
    assert tally.result()["dev_loss"] == pytest.approx(s / 3, rel=1e-12) and tally.result()["dev_accuracy"] == 1.0


def test_f1_sums_are_minus_the_macro_f1_of_the_ranking_times_the_rows():
    cands = (7, 9, 4)
    labels = torch.full((4, 5), -100)
    labels[0, 3], labels[1, 4], labels[2, 2], labels[3, 4] = 9, 7, 4, 9  # true words: 1, 0, 2, 1
    batch = Batch(torch.zeros(4, 5, dtype=torch.int64), torch.ones(4, 5, dtype=torch.int64), labels)
    scores = torch.tensor([[-3.0, -1.0, -2.0], [-1.0, -1.0, -5.0], [-0.5, -2.0, -1.0], [-2.0, -2.5, -0.1]],
                          dtype=torch.float64)  # predicted: 1, 0, 0, 2
    # F1_0 = 2*1/(2+1+0) = 2/3, F1_1 = 2*1/(2+0+1) = 2/3, F1_2 = 0/(0+1+1) = 0: macro 4/9
    s, n = forward_sums("f1", cands, batch, 12.5, 4, scores)
    assert n == 4 and s == pytest.approx(-4 / 9 * 4, rel=1e-12)
    # a class neither true nor predicted (word 2) is not averaged in: all right gives -1 x rows
    scores2 = torch.tensor([[0.0, 1.0, -9.0], [1.0, 0.0, -9.0], [0.0, 1.0, -9.0], [0.0, 1.0, -9.0]], dtype=torch.float64)
    labels[2, 2] = 9
    assert forward_sums("f1", cands, batch, 0.0, 4, scores2) == (-4.0, 4)
    # unbalanced: all predicted as the majority class 1 (3 of 4 rows): accuracy 3/4, macro-F1 (0 + 6/7) / 2
    scores3 = torch.tensor([[0.0, 1.0, -9.0]] * 4, dtype=torch.float64)
    assert forward_sums("accuracy", cands, batch, 0.0, 4, scores3) == (-3.0, 4)
    assert forward_sums("f1", cands, batch, 0.0, 4, scores3)[0] == pytest.approx(-(6 / 7) / 2 * 4, rel=1e-12)


def test_a_task_without_single_token_candidates_is_refused_clearly(cache_dir, tmp_path):
    from distzo.common.config import JobConfig
    from distzo.data.jobdata import JobData

    cfg = JobConfig.from_dict({"runtime": {"cache_dir": cache_dir}, "data": {"label_words": ["absolutely terrible", "great"]},
                               "train": {"objective": "accuracy"}})
    with pytest.raises(DataError, match=r"train.objective accuracy: needs label words that are one token each.*"
                                        r"'absolutely terrible'"):
        JobData.load(cfg)
    r = zoctl_here("reference", "--objective", "accuracy", "--steps", "1", "--set", f"runtime.cache_dir={cache_dir}",
                   "--set", "data.label_words=[absolutely terrible, great]")
    assert r.returncode == 2 and "train.objective accuracy" in r.stderr and "Traceback" not in r.stderr
    assert r.stderr.strip().count("\n") == 0
    JobData.load(cfg.with_overrides({"train.objective": "loss"}))  # the loss objective takes any label words
