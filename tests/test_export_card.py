"""What an export says about itself: the model card of an adapter, a merged and a full export; file modes;
the report's loss window; no FutureWarning from the adapter export."""

from __future__ import annotations

import os
import warnings

import pytest
import yaml

from distzo.common.config import JobConfig
from distzo.data.presets import preset_dir
from distzo.model.adapters import LoraTarget
from distzo.model.export import export_model_dir
from distzo.model.modeling import BlockModel
from distzo.run.modelcard import model_card
from distzo.run.report import text_report
from distzo.run.runlog import RunHistory

METRICS = {"dev_loss": 1.0, "dev_accuracy": 0.5, "final_loss": 2.0}


def front(card: str) -> dict:
    return yaml.safe_load(card.split("---\n")[1])


def config(target: str = "full", source: str = "tiny-opt") -> JobConfig:
    cfg = JobConfig.from_dict({"train": {"target": "lora" if target != "full" else "full"}})
    train = cfg.train.model_copy(update={"target": target})  # a target the config may not accept yet (prefix)
    return cfg.model_copy(update={"train": train, "model": cfg.model.model_copy(update={"source": source})})


def test_an_adapter_card_says_peft_names_the_base_and_says_it_is_an_adapter():
    card = model_card(config("lora", "HuggingFaceTB/SmolLM2-135M"), METRICS, 20)
    head = front(card)
    assert head["library_name"] == "peft" and head["base_model"] == "HuggingFaceTB/SmolLM2-135M" and "lora" in head["tags"]
    assert "# LoRA adapter for SmolLM2-135M" in card
    assert "LoRA adapter in peft's layout, not a model: it needs its base model **HuggingFaceTB/SmolLM2-135M**" in card
    assert "PeftModel.from_pretrained" in card

    merged = model_card(config("lora"), METRICS, 20, merged=True)
    assert front(merged)["library_name"] == "transformers"
    assert "LoRA adapter merged in" in merged and "not a model" not in merged
    assert "(exported merged into the base)" in merged

    full = model_card(config("full"), METRICS, 20)
    assert front(full)["library_name"] == "transformers" and "adapter" not in full.lower()
    assert "The weights are the full model" in full


def test_the_card_is_generic_on_the_adapter_target():
    card = model_card(config("prefix"), METRICS, 20)
    assert front(card)["library_name"] == "peft" and "prefix" in front(card)["tags"]
    assert "# prefix-tuning adapter for tiny-opt" in card and "prefix-tuning adapter in peft's layout" in card
    assert "| target | prefix-tuning (peft; 5 virtual tokens; base frozen) |" in card


@pytest.mark.parametrize("steps,window", [(3, "1 step"), (1, "1 step"), (12, "6 steps"), (25, "10 steps")])
def test_the_card_and_the_report_name_the_steps_their_loss_means_cover(steps, window):
    """The start and final loss average 10 steps, or half of a shorter run: they never overlap (issue 25)."""
    from coordinator.zoctl.summary import print_summary

    assert f"training loss at the end (mean of the last {window}) | 2.0000 |" in model_card(config(), METRICS, steps)
    history = RunHistory([{"step": i, "loss": 1.0 + i, "tokens": 10, "time_s": 1.0 + i} for i in range(steps)])
    n = int(window.split()[0])
    assert f"(first {window}) -> " in text_report(history) and f"(last {n})" in text_report(history)
    if steps > 1:  # the two means are over different steps, and the summary says which
        assert f"training loss: {1.0 + (n - 1) / 2:.4f}" in text_report(history)
    import contextlib
    import io

    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        print_summary({"steps": steps, "start_loss": 1.0, "final_loss": 2.0, "loss_window": n}, False)
    text = out.getvalue()
    if steps == 1:
        assert "the run's one step: start and final loss are the same step" in text
    else:
        assert f"(mean of steps 0-{n - 1})" in text or f"(step 0)" in text
        assert f"(mean of steps {steps - n}-{steps - 1})" in text or f"(step {steps - 1})" in text


@pytest.mark.parametrize("lora,merge", [(False, False), (True, False), (True, True)])
def test_exported_files_all_follow_the_umask_and_the_adapter_export_warns_nothing(cache_dir, tmp_path, lora, merge):
    model = BlockModel.from_dir(preset_dir("tiny-opt", cache_dir), LoraTarget(8, 16.0, ("q_proj", "v_proj"), 0) if lora else None)
    old = os.umask(0o027)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            out = export_model_dir(model, model.load_block_buffers(), tmp_path / "out", merge=merge)
    finally:
        os.umask(old)
    modes = {p.name: p.stat().st_mode & 0o777 for p in out.iterdir()}
    assert any(name.endswith(".safetensors") for name in modes)
    assert set(modes.values()) == {0o640}, modes  # the safetensors writer's 0600 no more
    assert not [w for w in caught if issubclass(w.category, FutureWarning)], [str(w.message) for w in caught]


def test_an_adapter_names_its_base_by_a_name_that_works_elsewhere(cache_dir, tmp_path):
    """Issue 25: adapter_config.json named the base by an absolute path into this machine's cache. It names the
    catalog's upstream Hub id (a preset: its name), and the card says how to point it at the local copy."""
    import json

    from distzo.data.catalog import base_model_name

    assert base_model_name("smollm2-135m") == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert base_model_name("tiny-opt") == "tiny-opt" and base_model_name("./my-model") == "./my-model"
    model = BlockModel.from_dir(preset_dir("tiny-opt", cache_dir), LoraTarget(8, 16.0, ("q_proj", "v_proj"), 0))
    out = export_model_dir(model, model.load_block_buffers(), tmp_path / "out", base_name=base_model_name("tiny-opt"))
    assert json.loads((out / "adapter_config.json").read_text())["base_model_name_or_path"] == "tiny-opt"
    card = model_card(config("lora", "smollm2-135m"), METRICS, 20)
    assert front(card)["base_model"] == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert "it needs its base model **HuggingFaceTB/SmolLM2-135M-Instruct**" in card
    assert "`zoctl fetch --check smollm2-135m` prints where it is" in card and "base_model_name_or_path" in card
    assert "set `base_model_name_or_path` in `adapter_config.json` to its path" in model_card(config("lora"), METRICS, 20)
