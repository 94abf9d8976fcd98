"""The data pipeline on inputs that other fine-tuning tools get wrong: label words in context,
token-weighted shards, and tokenizers that disagree with the model."""

from __future__ import annotations

import json
import math
import string
from pathlib import Path

import pytest
import torch

from distzo.data.presets import DEFAULT_TRAIN
from distzo.data.tasks import IGNORE, DataError, Example, TaskEncoder

from conftest import small_config

TEMPLATE = "{text} It was"
WORDS = ["terrible", "great"]


def sentencepiece_tokenizer(out: Path, byte_fallback: bool = True):  # noqa: ANN201
    """A Llama-2-style SentencePiece tokenizer built here with `tokenizers`: '▁' marks a space, one is
    prepended to the input (so " terrible" alone becomes ['▁', '▁terrible']), BOS added, no pad token."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=byte_fallback))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first")  # pieces within words
    lines = [json.loads(x)["text"] + f" It was {w}" for x in DEFAULT_TRAIN.read_text().splitlines() if x for w in WORDS]
    byte_tokens = [f"<0x{i:02X}>" for i in range(256)]  # SentencePiece's byte-fallback pieces
    trainer = trainers.BpeTrainer(vocab_size=900, special_tokens=["<unk>", "<s>", "</s>", *byte_tokens],
                                  initial_alphabet=list(string.ascii_letters + string.digits + string.punctuation),
                                  show_progress=False)
    tok.train_from_iterator(lines, trainer=trainer)
    # then encode as Llama-2's (legacy) tokenizer does: prepend '▁', spaces become '▁', no pre-tokenizer
    tok.pre_tokenizer = None
    tok.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                     decoders.Strip(" ", 1, 0)])
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>")
    fast.save_pretrained(str(out))
    return fast


@pytest.fixture(scope="module")
def sp_tok(tmp_path_factory):
    return sentencepiece_tokenizer(tmp_path_factory.mktemp("sp"))


def test_label_words_are_tokenized_in_context_with_a_sentencepiece_tokenizer(sp_tok):
    # the pitfall: the word encoded on its own gets a lone '▁' in front
    alone = sp_tok.convert_ids_to_tokens(sp_tok.encode(" terrible", add_special_tokens=False))
    assert alone == ["▁", "▁terrible"]
    enc = TaskEncoder(sp_tok, TEMPLATE, WORDS, 64)
    assert [sp_tok.convert_ids_to_tokens(ids) for ids in enc.label_ids] == [["▁terrible"], ["▁great"]]
    examples = [Example("a gripping, heartfelt film", 1), Example("dull and far too long", 0)]
    batch = enc.train_batch(examples)
    for i, ex in enumerate(examples):
        n = int(batch.attention_mask[i].sum())
        row = batch.input_ids[i, :n].tolist()
        # the row is exactly the tokenizer's encoding of the whole sentence (BOS included) ...
        assert row == sp_tok.encode(f"{ex.text} It was {WORDS[ex.label]}")
        assert row[0] == sp_tok.bos_token_id
        # ... and the loss is on the one token the word adds, not on a lone '▁'
        marked = (batch.labels[i] != IGNORE).nonzero().flatten().tolist()
        assert marked == [n - 1]
        assert sp_tok.convert_ids_to_tokens(row[-1:]) == ["▁" + WORDS[ex.label]]
    # the dev candidates are the same in-context ids, scored from one row per example
    rows, cands = enc.eval_batch(examples)
    assert cands == enc.eval_candidates == tuple(sp_tok.convert_tokens_to_ids(["▁terrible", "▁great"]))
    assert rows.input_ids.shape[0] == len(examples)


def test_a_template_ending_in_a_space_gets_no_second_space(sp_tok):
    enc = TaskEncoder(sp_tok, "{text} It was ", WORDS, 64)
    batch = enc.train_batch([Example("fine", 1)])
    row = batch.input_ids[0, : int(batch.attention_mask[0].sum())].tolist()
    assert row == sp_tok.encode("fine It was great")
    assert sp_tok.convert_ids_to_tokens(row[-1:]) == ["▁great"]


def test_multi_token_label_words_are_scored_one_row_per_candidate(sp_tok):
    enc = TaskEncoder(sp_tok, TEMPLATE, ["terrible", "great fun"], 64)
    long = sp_tok.encode("ok It was great fun", add_special_tokens=False)[len(sp_tok.encode("ok It was", add_special_tokens=False)):]
    assert len(long) > 1 and enc.label_ids == [enc.label_ids[0], long] and enc.eval_candidates == ()
    rows, cands = enc.eval_batch([Example("ok", 0)])
    assert cands == () and rows.input_ids.shape[0] == 2
    assert rows.labels[1][rows.labels[1] != IGNORE].tolist() == long


def test_truncation_keeps_the_special_prefix_and_the_word(sp_tok):
    enc = TaskEncoder(sp_tok, TEMPLATE, WORDS, 8)
    batch = enc.train_batch([Example("a very long review that goes on and on about the film", 0)])
    row = batch.input_ids[0].tolist()
    assert len(row) == 8 and row[0] == sp_tok.bos_token_id
    assert sp_tok.convert_ids_to_tokens(row[-3:]) == ["▁It", "▁was", "▁terrible"]


def test_label_words_the_tokenizer_cannot_tell_apart_or_encode_are_refused(sp_tok, tmp_path):
    with pytest.raises(DataError, match="data.template"):
        TaskEncoder(sentencepiece_tokenizer(tmp_path, byte_fallback=False), "{text} → It was", WORDS, 64)
    with pytest.raises(DataError, match=r"data.label_words: 'terrible terrible .*' needs 20 tokens, more than "
                                        r"data.max_seq_len=16 leaves"):
        TaskEncoder(sp_tok, TEMPLATE, [" ".join(["terrible"] * 20), "great"], 16)
    with pytest.raises(DataError, match=r"data.label_words: 'great' and ' great' are the same tokens"):
        TaskEncoder(sp_tok, TEMPLATE, ["great", " great"], 64)


def test_ddp_gives_the_projected_gradient_of_dual(cache_dir):
    """Same step, same 8 examples, label words of 1 and 3 tokens: token-weighted shards give dual's g."""
    from distzo.model.forward import ForwardJob
    from distzo.train.plan import step_plan
    from distzo.train.reference import ReferenceTrainer
    from distzo.zo.mezo import make_update

    words = {"label_words": ["terrible", "really quite great"]}
    dual = ReferenceTrainer(small_config(cache_dir, data=words, train={"batch_size": 8}))
    ddp = ReferenceTrainer(small_config(cache_dir, data=words, train={"batch_size": 8}, layout={"name": "ddp", "workers": 2}))
    assert [len(x) for x in dual.job.encoder.label_ids] == [1, 3]
    plan = step_plan(ddp.cfg, 0, len(ddp.job.train))
    shards = ddp.job.shard_batches(plan)
    counts = [int((b.labels[:, 1:] != IGNORE).sum()) for b in shards]
    assert counts[0] != counts[1]  # the case where a mean of shard means is wrong
    eps = ddp.cfg.train.eps
    res = ddp.engine.run([ForwardJob(b, seed=plan.seeds[0], coef=s * eps) for b in shards for s in (1, -1)], ddp.feed())
    mean_of_means = sum((res[2 * d].loss - res[2 * d + 1].loss) / (2 * eps) for d in range(2)) / 2
    g_dual = dual.step(0).record.directions[0].g
    g_ddp = ddp.step(0).record.directions[0].g
    losses = {(0, d, s): (res[2 * d + (s == -1)].loss_sum, res[2 * d + (s == -1)].label_tokens) for d in range(2) for s in (1, -1)}
    assert make_update(0, plan.seeds, losses, 2, eps, 1.0, 0.0, None).record.directions[0].g == g_ddp
    assert abs(g_ddp - g_dual) <= 1e-4 * abs(g_dual), (g_ddp, g_dual)
    assert abs(mean_of_means - g_dual) > 20 * abs(g_ddp - g_dual), (mean_of_means, g_dual)  # the old arithmetic
    # the logged loss is layout-independent too
    assert math.isclose(dual.log.losses[0], ddp.log.losses[0], rel_tol=1e-6)


def _model_dir_with(tmp_path: Path, preset_dir: Path, tokenizer_dir: Path, vocab: int) -> Path:
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    cfg = AutoConfig.from_pretrained(str(preset_dir))
    cfg.vocab_size = vocab
    torch.manual_seed(0)
    out = tmp_path / "model"
    AutoModelForCausalLM.from_config(cfg).save_pretrained(str(out))
    AutoTokenizer.from_pretrained(str(tokenizer_dir)).save_pretrained(str(out))
    return out


def test_a_tokenizer_that_disagrees_with_the_weights_is_refused_before_anything_starts(preset, cache_dir, tmp_path):
    from test_cluster import write_config, zoctl_here

    from transformers import AutoTokenizer

    # the tiny preset's tokenizer beside a model with 100 embedding rows fewer than it has tokens
    tokens = len(AutoTokenizer.from_pretrained(str(preset("tiny-llama"))))
    model = _model_dir_with(tmp_path, preset("tiny-llama"), preset("tiny-llama"), vocab=tokens - 100)
    cfg = write_config(tmp_path, cache_dir, train={"steps": 2})
    r = zoctl_here("up", "--config", str(cfg), "--model", str(model), "--run-dir", str(tmp_path / "run"))
    assert r.returncode == 2, r.stderr
    assert "the tokenizer and the weights disagree" in r.stderr, r.stderr
    assert f"the tokenizer has {tokens} tokens, the model's embedding {tokens - 100} rows" in r.stderr, r.stderr
    assert r.stderr.count("\n") <= 2 and not (tmp_path / "run").exists()


def test_special_token_ids_outside_the_vocabulary_are_refused(preset, tmp_path):
    from transformers import AutoConfig, AutoTokenizer

    from distzo.data.jobdata import check_tokenizer_fits_model
    from distzo.model.modeling import ModelError

    tok = AutoTokenizer.from_pretrained(str(preset("tiny-llama")))
    cfg = AutoConfig.from_pretrained(str(preset("tiny-llama")))
    check_tokenizer_fits_model(tok, cfg, tmp_path)  # the preset agrees with itself
    assert cfg.vocab_size == len(tok)
    tok.add_special_tokens({"additional_special_tokens": ["<extra>"]})  # one past the model's rows
    with pytest.raises(ModelError, match=f"special token id {cfg.vocab_size} is outside the model's vocabulary of "
                                         f"{cfg.vocab_size}"):
        check_tokenizer_fits_model(tok, cfg, tmp_path)
    tok.eos_token = "<extra>"
    with pytest.raises(ModelError, match=f"the eos token '<extra>' has id {cfg.vocab_size}, outside"):
        check_tokenizer_fits_model(tok, cfg, tmp_path)


def test_the_sentencepiece_tokenizer_trains_end_to_end(preset, cache_dir, tmp_path, sp_tok):
    """A model directory with the SentencePiece tokenizer: the job loads, trains a step and evaluates."""
    from distzo.train.reference import ReferenceTrainer

    sp_dir = tmp_path / "sp"
    sentencepiece_tokenizer(sp_dir)
    model = _model_dir_with(tmp_path, preset("tiny-llama"), sp_dir, vocab=len(sp_tok))
    trainer = ReferenceTrainer(small_config(cache_dir, model={"source": str(model)}, train={"steps": 2}))
    assert trainer.job.encoder.eval_candidates  # in-context single tokens: the one-row eval path
    summary = trainer.train(progress=False)
    assert math.isfinite(summary["final_loss"]) and 0 <= summary["dev_accuracy"] <= 1


def word_tokenizer(words: list[str]):  # noqa: ANN201
    """A word-level tokenizer knowing only ``words``: any other word is its unknown token."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(["<unk>", "<s>", "</s>", *words])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>")


def test_the_template_check_judges_only_the_template_and_the_label_words():
    """Issue 25: a check that refused a valid template because of text the user never wrote (a probe sentence
    filled in to find the special prefix). The template's own text and the label words are judged, nothing else."""
    tok = word_tokenizer(["it", "was", "bad", "good", "a", "film", "dull"])  # no "This", "is", "sentence"
    enc = TaskEncoder(tok, "{text} it was", ["bad", "good"], 16)
    assert enc.prefix == [tok.bos_token_id] and [tok.convert_ids_to_tokens(i) for i in enc.label_ids] == [["bad"], ["good"]]
    batch = enc.train_batch([Example("a good film", 1), Example("dull", 0)])
    assert batch.input_ids[0].tolist() == tok.encode("a good film it was good")
    with pytest.raises(DataError, match=r"data.template '\{text\} it seemed': the tokenizer cannot encode ' it seemed'"):
        TaskEncoder(tok, "{text} it seemed", ["bad", "good"], 16)  # "seemed": the template's own word
    with pytest.raises(DataError, match=r"data.label_words: the tokenizer cannot encode 'great'"):
        TaskEncoder(tok, "{text} it was", ["bad", "great"], 16)
