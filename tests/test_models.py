"""Blocks and model adapters for every supported family."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from distzo.data.presets import DEFAULT_TRAIN
from distzo.data.tasks import TaskEncoder, load_jsonl
from distzo.model.blockfeed import MemoryFeed
from distzo.model.blocks import block_views, flatten_block
from distzo.model.forward import ForwardEngine, ForwardJob
from distzo.model.modeling import BlockModel, ModelError

FAMILIES = ["tiny-opt", "tiny-gpt2", "tiny-llama", "tiny-qwen3", "tiny-qwen2", "tiny-mistral"]


def batch_for(model_dir, n=6):
    tok = AutoTokenizer.from_pretrained(str(model_dir))
    enc = TaskEncoder(tok, "{text} It was", ["terrible", "great"], 48)
    return enc.train_batch(load_jsonl(DEFAULT_TRAIN, ["terrible", "great"])[:n])


@pytest.mark.parametrize("name", FAMILIES)
def test_blocks_round_trip_bitwise(preset, name):
    d = preset(name)
    bm = BlockModel.from_dir(d)
    hf = AutoModelForCausalLM.from_pretrained(str(d), dtype=torch.float32)
    state = hf.state_dict()
    buffers = bm.load_block_buffers()
    m = bm.manifest
    assert [b.name for b in m.blocks] == ["embed"] + [f"layer.{i}" for i in range(hf.config.num_hidden_layers)] + ["head"]
    # every parameter exactly once; tied weights only under their canonical name
    names = [t.name for b in m.blocks for t in b.tensors]
    assert len(names) == len(set(names))
    assert sum(p.numel() for p in hf.parameters()) == m.numel
    offsets = [b.global_offset for b in m.blocks]
    assert offsets == sorted(offsets) and offsets[0] == 0
    for spec, buf in zip(m.blocks, buffers):
        views = block_views(spec, buf)
        for t in spec.tensors:
            assert torch.equal(views[t.name], state[t.name])
            assert views[t.name].data_ptr() >= buf.data_ptr()  # a view into the block, not a copy
            assert t.decay == (len(t.shape) >= 2)
        assert torch.equal(flatten_block(spec, views), buf)
    for alias, canon in m.tied.items():
        assert torch.equal(state[alias], state[canon])
    # layers dominate nothing here, but the head of an untied model holds lm_head
    if not m.tied:
        assert any(t.name.endswith("lm_head.weight") for t in m.blocks[-1].tensors)


@pytest.mark.parametrize("name", FAMILIES)
def test_block_by_block_forward_equals_model_forward(preset, name):
    d = preset(name)
    bm = BlockModel.from_dir(d)
    batch = batch_for(d)
    res = ForwardEngine(bm).run([ForwardJob(batch, want_logits=True)], MemoryFeed(bm.load_block_buffers()))[0]
    hf = AutoModelForCausalLM.from_pretrained(str(d), dtype=torch.float32).eval()
    with torch.no_grad():
        out = hf(input_ids=batch.input_ids, attention_mask=batch.attention_mask, labels=batch.labels)
    real = batch.attention_mask.bool()
    torch.testing.assert_close(res.logits[real], out.logits[real], rtol=1e-5, atol=1e-5)
    assert res.loss == pytest.approx(out.loss.item(), rel=1e-6)
    assert res.label_tokens == int((batch.labels[:, 1:] != -100).sum())


def test_dual_lockstep_equals_sequential_forwards(preset):
    d = preset("tiny-llama")
    bm = BlockModel.from_dir(d)
    feed = MemoryFeed(bm.load_block_buffers())
    batch = batch_for(d)
    engine = ForwardEngine(bm, "gaussian")
    jobs = [ForwardJob(batch, seed=3, coef=1e-3), ForwardJob(batch, seed=3, coef=-1e-3), ForwardJob(batch, seed=4, coef=1e-3)]
    together = engine.run(jobs, feed)
    alone = [engine.run([j], feed)[0] for j in jobs]
    assert [r.loss for r in together] == [r.loss for r in alone]
    assert together[0].loss != together[1].loss


def test_engine_drops_blocks_as_it_goes(preset):
    d = preset("tiny-opt")
    bm = BlockModel.from_dir(d)
    buffers = bm.load_block_buffers()
    events = []

    class Recording(MemoryFeed):
        def get(self, b):
            events.append(("get", b))
            return super().get(b)

        def release(self, b):
            events.append(("release", b))

    ForwardEngine(bm).run([ForwardJob(batch_for(d), seed=1, coef=1e-3), ForwardJob(batch_for(d), seed=1, coef=-1e-3)], Recording(buffers))
    gets = [b for e, b in events if e == "get"]
    assert gets == list(range(bm.num_blocks))  # each block fetched once for both signs
    # a decoder layer is released before the next-but-one is fetched: at most ~2 resident
    for b in range(1, bm.num_blocks - 2):
        assert events.index(("release", b)) < events.index(("get", b + 2))
    # the tied embedding stays until the head has used it
    assert events.index(("release", 0)) > events.index(("get", bm.num_blocks - 1))


def test_not_a_causal_lm(tmp_path):
    with pytest.raises(ModelError, match="does not exist"):
        BlockModel.from_dir(tmp_path / "nope")
    (tmp_path / "x").mkdir()
    with pytest.raises(ModelError, match="config.json"):
        BlockModel.from_dir(tmp_path / "x")
    from transformers import BertConfig

    BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32).save_pretrained(tmp_path / "bert")
    with pytest.raises(ModelError, match="causal"):
        BlockModel.from_dir(tmp_path / "bert")


def test_slices_cover_a_block_exactly(preset):
    bm = BlockModel.from_dir(preset("tiny-opt"))
    spec = bm.manifest.blocks[1]
    for k in (1, 2, 3, 7):
        ranges = [spec.slice_range(r, k) for r in range(k)]
        assert ranges[0][0] == 0 and ranges[-1][1] == spec.numel
        assert all(a[1] == b[0] for a, b in zip(ranges, ranges[1:]))
    with pytest.raises(ValueError):
        spec.slice_range(2, 2)
    with pytest.raises(ValueError):
        spec.slice_range(0, 0)


def test_the_head_runs_on_the_label_positions_only(preset):
    """The family's forward runs end to end, but the output embedding sees one hidden state per label token."""
    d = preset("tiny-llama")
    bm = BlockModel.from_dir(d)
    batch = batch_for(d)
    shapes = []
    hook = bm.skeleton.get_output_embeddings().register_forward_hook(lambda m, a, o: shapes.append(tuple(o.shape)))
    try:
        res = ForwardEngine(bm).run([ForwardJob(batch)], MemoryFeed(bm.load_block_buffers()))[0]
    finally:
        hook.remove()
    n = int((batch.labels[:, 1:] != -100).sum())
    assert res.label_tokens == n and shapes == [(1, n, bm.config.vocab_size)]
    assert res.loss == res.loss_sum / n
