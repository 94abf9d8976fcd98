"""Shared fixtures: presets built once per session into a temporary cache, quiet logs."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from distzo.logs import quiet_transformers

quiet_transformers()
torch.set_num_threads(1)


@pytest.fixture(params=["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs a CUDA device (run on the lent GPU machine, bench/RESULTS.md)"))])
def device(request: pytest.FixtureRequest) -> str:
    """The worker tests run on both: CPU everywhere, CUDA where a GPU is visible."""
    return request.param


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory: pytest.TempPathFactory) -> str:
    shared = os.environ.get("DISTZO_TEST_CACHE")  # reuse between local runs if set
    if shared:
        Path(shared).mkdir(parents=True, exist_ok=True)
        return shared
    return str(tmp_path_factory.mktemp("distzo-cache"))


@pytest.fixture(scope="session")
def preset(cache_dir: str):
    from distzo.presets import preset_dir

    def get(name: str) -> Path:
        return preset_dir(name, cache_dir)

    return get


def make_model_dir(out: Path, family: str, tokenizer_dir: Path, **sizes: int) -> Path:
    """A custom-size model of a preset family, saved with save_pretrained beside the tokenizer."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from distzo.presets import PRESETS

    factory, _ = PRESETS[family]
    tok = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(factory(len(tok), **sizes))
    model.save_pretrained(str(out))
    tok.save_pretrained(str(out))
    return out


def small_config(cache_dir: str, **sections):
    """A JobConfig for fast tests: few steps, small batch, the session's preset cache, and the lr and eps the tests
    were written with (tiny-opt's default would be 6e-4: tests/test_defaults.py covers the defaults)."""
    from distzo.config import JobConfig

    raw = {"train": {"steps": 4, "batch_size": 4, "lr": 5e-4, "eps": 1e-3}, "data": {"dev_examples": 16},
           "runtime": {"cache_dir": cache_dir}}
    for key, value in sections.items():
        raw.setdefault(key, {}).update(value)
    return JobConfig.from_dict(raw)
