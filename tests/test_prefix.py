"""train.target prefix: frozen base, a trainable prefix block per layer, peft's logits, refusals. (zoctl up ==
zoctl reference with a prefix: tests/test_matrix.py.)"""

from __future__ import annotations

import json
import warnings

import pytest
import torch
from transformers import AutoModelForCausalLM
from transformers.models.auto.configuration_auto import CONFIG_MAPPING

from distzo.model import families
from distzo.model.forward import ForwardJob
from distzo.model.modeling import BlockModel, ModelError
from distzo.model.prefix import PrefixTarget
from distzo.train.reference import ReferenceTrainer

from conftest import small_config
from test_cluster import zoctl, zoctl_here

PREFIX = {"target": "prefix", "lr": 1e-2, "eps": 1e-2}


def test_prefix_trains_only_the_prefixes_and_exports_what_peft_loads(cache_dir, tmp_path):
    from peft import PeftModel

    cfg = small_config(cache_dir, train={**PREFIX, "steps": 3, "prefix_tokens": 4})
    tr = ReferenceTrainer(cfg)
    blocks = tr.model.manifest.blocks
    layers = tr.model.config.num_hidden_layers
    assert [b.name for b in blocks if b.trainable] == [f"prefix.{i}" for i in range(layers)]
    assert sum(b.numel for b in blocks if b.trainable) == layers * 4 * 2 * tr.model.config.hidden_size
    before = [b.clone() for b in tr.buffers]
    tr.train(out_dir=tmp_path / "out", progress=False)
    for spec, a, b in zip(blocks, before, tr.buffers):
        assert torch.equal(a, b) != spec.trainable, spec.name  # frozen blocks unchanged, every prefix block moved

    # peft's adapter directory; loaded on the base, its logits are the run's model's, bit for bit
    assert json.loads((tmp_path / "out" / "adapter_config.json").read_text())["peft_type"] == "PREFIX_TUNING"
    batch = next(iter(tr.job.eval_chunks()))[1]
    ours = tr.engine.run([ForwardJob(batch, want_logits=True)], tr.feed())[0].logits
    base = AutoModelForCausalLM.from_pretrained(str(tr.job.model_dir), dtype=torch.float32)
    peft_model = PeftModel.from_pretrained(base, str(tmp_path / "out")).eval()
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # peft passes past_key_values, deprecated in transformers 5.2x
        theirs = peft_model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
    real = batch.attention_mask.bool()
    assert torch.equal(ours[real], theirs[real])
    with torch.no_grad():
        plain = AutoModelForCausalLM.from_pretrained(str(tr.job.model_dir), dtype=torch.float32)
        zero_shot = plain(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
    assert not torch.equal(zero_shot[real], theirs[real])  # the prefix changes the model



def test_the_model_card_of_a_prefix_export_names_the_prefix():
    from distzo.common.config import JobConfig
    from distzo.run.modelcard import model_card

    card = model_card(JobConfig.from_dict({"train": {"target": "prefix", "prefix_tokens": 4}}), {}, 0)
    assert "| target | prefix-tuning (peft; 4 virtual tokens" in card and "prefix-tuning adapter" in card
    assert "LoRA" not in card and "--merge" not in card  # a prefix cannot be merged


# learned positions (opt, gpt2), grouped-query rotary (llama), alibi (bloom), partial rotary (gpt_neox),
# sliding-window masks (mistral), Conv1D projections (gpt2)
@pytest.mark.parametrize("model_type", ["opt", "gpt2", "llama", "bloom", "gpt_neox", "mistral"])
def test_the_streamed_prefix_gives_peft_s_logits_bit_for_bit(model_type):
    assert families.compare_prefix_with_peft(families.tiny_config(CONFIG_MAPPING[model_type]())) == 0.0


@pytest.mark.parametrize("model_type,needle", [
    ("gemma2", "peft gives its prefix through a cache of its own"),
    ("mamba", "not attention only"),
    ("falcon", "keys have 1 head of 8: peft's prefix does not fit this family"),  # multi-query: peft lays out 4
    ("mpt", "peft cannot lay out a prefix"),
    ("openai-gpt", "takes no key/value cache"),
    ("ergo", "logits differ from peft's"),
])
def test_families_a_prefix_does_not_fit_are_refused_by_name(model_type, needle):
    config = families.tiny_config(CONFIG_MAPPING[model_type]())
    with pytest.raises(ModelError, match="train.target prefix") as err:
        BlockModel(config, adapter=PrefixTarget(3))
    assert needle in str(err.value)
    assert BlockModel(config).num_blocks == config.num_hidden_layers + 2  # the family itself still trains in full



def test_a_layer_count_peft_reads_otherwise_is_refused_by_name():
    # longcat_flash's num_hidden_layers (4) counts two attention sublayers in each of its 2 decoder layers
    config = families.tiny_config(CONFIG_MAPPING["longcat_flash"]())
    with pytest.raises(ModelError) as err:
        BlockModel(config, adapter=PrefixTarget(3))
    assert str(err.value) == ("train.target prefix: longcat_flash: peft lays out a prefix for 4 layers, the model has 2 "
                              "(use train.target lora or full)")

@pytest.mark.parametrize("setting,needle", [
    (["--set", "train.prefix_tokens=0"], "train.prefix_tokens"),
    (["--merge", "--out", "OUT"], "--target lora"),
    # a prefix takes positions: tiny-opt has 256 learned ones
    (["--set", "data.max_seq_len=254"], "data.max_seq_len 254 + train.prefix_tokens 5 exceeds the model's 256"),
    ([], None),  # control: the same command without the bad setting runs
])
def test_bad_prefix_settings_are_one_line_and_exit_2(cache_dir, tmp_path, setting, needle):
    setting = [str(tmp_path / "out") if s == "OUT" else s for s in setting]
    call = zoctl if needle == "train.prefix_tokens" else zoctl_here  # one through the process, the rest its main()
    r = call("reference", "--target", "prefix", *setting, "--steps", "1", "--set", f"runtime.cache_dir={cache_dir}",
             "--set", "data.dev_examples=8", "--set", "train.batch_size=4")
    if needle is None:
        assert r.returncode == 0, r.stderr[-2000:]
        return
    assert r.returncode == 2, r.stderr[-2000:]
    assert r.stderr.strip().count("\n") == 0 and needle in r.stderr, r.stderr
    assert "Traceback" not in r.stderr
