"""The MeZO-SGD math: perturbation, gradient estimate, update, schedules, policies."""

from __future__ import annotations

import math

import pytest
import torch
from transformers import AutoModelForCausalLM

from distzo.model.blockfeed import MemoryFeed
from distzo.model.forward import ForwardEngine, ForwardJob
from distzo.model.modeling import BlockModel
from distzo.zo import generator
from distzo.zo.forwardweights import perturb_block
from distzo.zo.mezo import apply_update, learning_rate, make_update, projected_gradients
from distzo.zo.record import Direction, UpdateRecord

from conftest import make_model_dir
from test_models import batch_for


def test_perturbing_never_changes_the_master(preset):
    d = preset("tiny-opt")
    bm = BlockModel.from_dir(d)
    buffers = bm.load_block_buffers()
    before = [b.clone() for b in buffers]
    engine = ForwardEngine(bm, "gaussian")
    engine.run([ForwardJob(batch_for(d), seed=s, coef=c) for s in (1, 2) for c in (1e-3, -1e-3)], MemoryFeed(buffers))
    assert all(torch.equal(a, b) for a, b in zip(before, buffers))
    plus, minus = perturb_block(buffers[1], 100, 9, generator.Distribution.RADEMACHER, [1e-3, -1e-3], torch.float32)
    assert torch.equal(buffers[1], before[1])
    assert not torch.equal(plus, buffers[1]) and not torch.equal(minus, buffers[1])
    # each is one rounding of theta +- eps*z: the exact float64 value rounds to it
    zz = generator.z_torch(9, 100, buffers[1].numel(), "rademacher", "cpu").double()
    assert torch.equal(plus, (buffers[1].double() + 1e-3 * zz).float())
    assert torch.equal(minus, (buffers[1].double() - 1e-3 * zz).float())


def test_zo_estimate_points_along_the_autograd_gradient(preset, tmp_path):
    """Averaged over seeds, g*z aligns with the true gradient, more so with more seeds."""
    d = make_model_dir(tmp_path / "micro", "tiny-opt", preset("tiny-opt"), hidden=16, layers=1, heads=2, positions=64)
    bm = BlockModel.from_dir(d)
    buffers = bm.load_block_buffers()
    batch = batch_for(d, n=8)
    hf = AutoModelForCausalLM.from_pretrained(str(d), dtype=torch.float32)
    loss = hf(input_ids=batch.input_ids, attention_mask=batch.attention_mask, labels=batch.labels).loss
    loss.backward()
    named = dict(hf.named_parameters())
    grad = torch.cat([named[t.name].grad.reshape(-1) for b in bm.manifest.blocks for t in b.tensors]).double()
    dim = grad.numel()
    engine = ForwardEngine(bm, "gaussian")
    eps = 1e-3
    estimate = torch.zeros(dim, dtype=torch.float64)
    cosines = {}
    for i in range(256):
        plus, minus = engine.run([ForwardJob(batch, seed=i, coef=eps), ForwardJob(batch, seed=i, coef=-eps)], MemoryFeed(buffers))
        g = (plus.loss - minus.loss) / (2 * eps)
        estimate += g * generator.z_torch(i, 0, dim, "gaussian", "cpu").double()
        if i + 1 in (4, 256):
            cosines[i + 1] = float(torch.nn.functional.cosine_similarity(estimate, grad, dim=0))
    chance = 1 / math.sqrt(dim)
    assert cosines[256] > 10 * chance  # ~sqrt(n/d) expected
    assert cosines[256] > cosines[4]


def test_projected_gradient_and_update_record():
    # (summed loss, label tokens) per (direction, shard, sign); shard 1 has three times shard 0's tokens
    losses = {(0, 0, 1): (2.0, 1), (0, 0, -1): (1.0, 1), (0, 1, 1): (9.0, 3), (0, 1, -1): (10.5, 3),
              (1, 0, 1): (1.0, 1), (1, 0, -1): (1.0, 1), (1, 1, 1): (1.5, 3), (1, 1, -1): (0.75, 3)}
    gs = projected_gradients(losses, q=2, shards=2, eps=0.5)
    # token-weighted: l+ = (2 + 9) / 4, l- = (1 + 10.5) / 4, not the mean of the shards' means
    assert gs == [((2.0 + 9.0) / 4 - (1.0 + 10.5) / 4) / 1.0, ((1.0 + 1.5) / 4 - (1.0 + 0.75) / 4) / 1.0]
    assert gs[0] == -0.125 and gs[1] == 0.1875
    out = make_update(5, [11, 12], losses, shards=2, eps=0.5, lr=0.1, weight_decay=0.0, clip=0.1)
    assert out.record.directions == (Direction(11, -0.1), Direction(12, 0.1))  # both clipped
    assert out.loss_plus == ((2.0 + 9.0) / 4 + (1.0 + 1.5) / 4) / 2
    assert not out.record.skipped
    bad = dict(losses)
    bad[(1, 1, -1)] = (float("nan"), 3)
    skipped = make_update(5, [11, 12], bad, shards=2, eps=0.5, lr=0.1, weight_decay=0.0, clip=None)
    assert skipped.record.skipped and skipped.nonfinite and skipped.record.directions == ()
    assert math.isnan(skipped.loss) and math.isnan(skipped.loss_plus)


def test_apply_update_matches_the_formula_with_decay_only_on_matrices(preset):
    bm = BlockModel.from_dir(preset("tiny-llama"))
    spec = bm.manifest.blocks[1]
    buf = bm.load_block_buffers()[1]
    before = buf.clone().double()
    rec = UpdateRecord(step=0, directions=(Direction(5, 2.0), Direction(6, -1.0)), lr=1e-2, weight_decay=0.1)
    apply_update(spec, buf, rec, generator.Distribution.GAUSSIAN)
    z5 = generator.z_torch(5, spec.global_offset, spec.numel, "gaussian", "cpu").double()
    z6 = generator.z_torch(6, spec.global_offset, spec.numel, "gaussian", "cpu").double()
    acc = (0.0 + (1e-2 * 2.0 / 2) * z5) + (1e-2 * -1.0 / 2) * z6
    decay = torch.zeros_like(before)
    for t in spec.tensors:
        if t.decay:
            decay[t.offset : t.offset + t.numel] = 1e-2 * 0.1
    expected = (before - (acc + decay * before)).float()
    assert torch.equal(buf, expected)
    norm = next(t for t in spec.tensors if not t.decay)
    assert torch.equal(  # no decay: only the z term moved the norm weights
        buf[norm.offset : norm.offset + norm.numel],
        (before - acc)[norm.offset : norm.offset + norm.numel].float(),
    )


def test_skipped_update_changes_nothing(preset):
    bm = BlockModel.from_dir(preset("tiny-opt"))
    buf = bm.load_block_buffers()[1]
    before = buf.clone()
    apply_update(bm.manifest.blocks[1], buf, UpdateRecord(3, (), 0.1, 0.1, skipped=True), generator.Distribution.RADEMACHER)
    assert torch.equal(buf, before)


def test_update_record_validation():
    UpdateRecord(0, (Direction(1, 0.5),), 1e-3, 0.0).validate()
    for bad, msg in [
        (UpdateRecord(0, (Direction(1, float("nan")),), 1e-3, 0.0), "not finite"),
        (UpdateRecord(0, (Direction(-1, 0.5),), 1e-3, 0.0), "seed"),
        (UpdateRecord(0, (), 1e-3, 0.0), "at least one"),
        (UpdateRecord(-1, (Direction(1, 0.5),), 1e-3, 0.0), "step"),
        (UpdateRecord(0, (Direction(1, 0.5),), float("inf"), 0.0), "lr"),
    ]:
        with pytest.raises(ValueError, match=msg):
            bad.validate()


def test_learning_rate_schedules():
    assert learning_rate(0, 1.0, "constant", 100) == 1.0
    assert learning_rate(0, 1.0, "constant", 100, warmup_steps=10) == pytest.approx(0.1)
    assert learning_rate(50, 1.0, "linear", 100) == pytest.approx(0.5)
    assert learning_rate(100, 1.0, "cosine", 100, min_ratio=0.1) == pytest.approx(0.1)
    assert learning_rate(0, 1.0, "cosine", 100) == pytest.approx(1.0)
    with pytest.raises(ValueError, match="schedule"):
        learning_rate(5, 1.0, "exp", 100)
