"""The real material of `zoctl fetch`: SmolLM2-135M through our block model, the movie-review task,
and a few distributed steps on them equal to the reference, bit for bit.

Skipped with the reason when the material is not fetched (the README's test command fetches it).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from distzo.data import catalog, conversions

pytestmark = pytest.mark.skipif(
    not (catalog.is_fetched("smollm2-135m") and catalog.is_fetched("rotten-tomatoes")),
    reason="the real model and task are not fetched: run `zoctl fetch` (the README's test command does)")


def test_the_converted_model_is_the_pretrained_one():
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = catalog.locate("smollm2-135m")
    tok = AutoTokenizer.from_pretrained(str(path))
    model = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32)
    assert sum(p.numel() for p in model.parameters()) == 134_515_008
    ids = tok("The capital of France is", return_tensors="pt")
    out = model.generate(**ids, max_new_tokens=4, do_sample=False)
    assert "Paris" in tok.decode(out[0, ids["input_ids"].shape[1]:])


def test_block_model_gives_the_logits_of_the_transformers_forward():
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from distzo.data.tasks import TaskEncoder, load_jsonl
    from distzo.model.blockfeed import MemoryFeed
    from distzo.model.forward import ForwardEngine, ForwardJob
    from distzo.model.modeling import BlockModel

    path = catalog.locate("smollm2-135m")
    tok = AutoTokenizer.from_pretrained(str(path))
    train, _ = catalog.resolve_task("rotten-tomatoes")
    examples = load_jsonl(train, ["terrible", "great"])[:6]
    batch, cand = TaskEncoder(tok, "{text} It was", ["terrible", "great"], 64).eval_batch(examples)  # padded rows
    assert int((batch.attention_mask == 0).sum()) > 0
    bm = BlockModel.from_dir(path)
    engine, feed = ForwardEngine(bm), MemoryFeed(bm.load_block_buffers())
    result = engine.run([ForwardJob(batch, want_logits=True)], feed)[0]
    hf = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32).eval()
    with torch.inference_mode():
        expect = hf(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
    real = batch.attention_mask.bool()
    assert torch.allclose(result.logits[real], expect[real], rtol=0, atol=1e-4), (result.logits[real] - expect[real]).abs().max()
    # eval reads every label word's log-prob at the one label position of each row
    assert len(cand) == 2 and cand == TaskEncoder(tok, "{text} It was", ["terrible", "great"], 64).eval_candidates
    scored = engine.run([ForwardJob(batch, want_scores=True, candidates=cand)], feed)[0]
    logp = torch.log_softmax(expect[:, :-1].double(), dim=-1)
    at = (batch.labels[:, 1:] != -100).nonzero()
    assert at[:, 0].tolist() == list(range(len(examples)))
    want = logp[at[:, 0], at[:, 1]][:, list(cand)]
    assert scored.scores.shape == (len(examples), 2) and torch.allclose(scored.scores, want, atol=1e-4)


def test_the_task_split_is_whole_and_disjoint():
    train_path, dev_path = catalog.resolve_task("rotten-tomatoes")
    train = [json.loads(x) for x in Path(train_path).read_text().splitlines()]
    dev = [json.loads(x) for x in Path(dev_path).read_text().splitlines()]
    assert len(dev) == conversions.POLARITY_DEV_EXAMPLES and len(train) > 11_000
    assert not {r["text"] for r in train} & {r["text"] for r in dev}
    for split in (train, dev):
        share = sum(r["label"] for r in split) / len(split)
        assert 0.5 < share < 0.65  # 7,403 fresh of 12,808 snippets before dedup


@pytest.mark.cluster
def test_a_few_distributed_steps_on_the_real_model_equal_the_reference_bitwise(tmp_path, references):
    from test_matrix import check_up_equals_reference

    cfg = tmp_path / "job.yaml"
    cfg.write_text("model: {source: smollm2-135m}\ndata: {train: rotten-tomatoes, dev_examples: 8, max_seq_len: 32}\n"
                   "train: {steps: 3, batch_size: 4, lr: 1.0e-5}\nserver: {snapshot_every: 0}\n")
    a, _ = check_up_equals_reference(tmp_path, references, ["--config", str(cfg)])  # weights, summary, run log
    assert a["model"] == "smollm2-135m" and a["task"] == "rotten-tomatoes"
