"""Shared fixtures: presets built once per session into a temporary cache, the in-process reference computed
once per job config (tests/references.py), tiny models of a family, quiet logs.

Markers (pyproject.toml): ``cluster`` starts service processes (zoctl up, a local cluster), ``hosts`` simulated
hosts (network namespaces, root), ``gpu`` needs a CUDA device. ``pytest -q`` runs everything; a tier while
working: ``pytest -m "not cluster and not hosts"`` (about the unit tests), ``pytest -m cluster``.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from distzo.infra.logs import quiet_transformers

quiet_transformers()
torch.set_num_threads(1)


@pytest.fixture(params=["cpu", pytest.param("cuda", marks=[pytest.mark.gpu, pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs a CUDA device (run on the lent GPU machine, bench/RESULTS.md)")])])
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
    from distzo.data.presets import preset_dir

    def get(name: str) -> Path:
        return preset_dir(name, cache_dir)

    return get


@pytest.fixture(scope="session")
def references(tmp_path_factory: pytest.TempPathFactory):
    """``references.get(cfg)`` / ``references.for_flags(flags)``: the reference of a job config, trained once."""
    from references import References

    return References(tmp_path_factory.mktemp("references"))


@pytest.fixture(scope="session")
def family_dir(preset, tmp_path_factory: pytest.TempPathFactory):
    """``family_dir("bloom")``: a tiny random model of the family beside the presets' tokenizer, built once."""
    built: dict[tuple, Path] = {}
    root = tmp_path_factory.mktemp("families")

    def get(model_type: str, **options) -> Path:
        key = (model_type, tuple(sorted(options.items())))
        if key not in built:
            built[key] = tiny_family_dir(root / f"{model_type}-{len(built)}", preset("tiny-opt"), model_type, **options)
        return built[key]

    return get


def tiny_family_dir(out: Path, tokenizer_dir: Path, model_type: str, **options) -> Path:
    """A tiny random model of the family (distzo.model.families.tiny_config) saved beside the presets' tokenizer
    (its ids: pad 0, bos 1, eos 2)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    from distzo.model import families

    tok = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    cfg = families.tiny_config(CONFIG_MAPPING[model_type](pad_token_id=0, bos_token_id=1, eos_token_id=2, **options),
                               vocab_size=len(tok))
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(cfg).save_pretrained(str(out))
    tok.save_pretrained(str(out))
    return out


def make_model_dir(out: Path, family: str, tokenizer_dir: Path, **sizes: int) -> Path:
    """A custom-size model of a preset family, saved with save_pretrained beside the tokenizer."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from distzo.data.presets import PRESETS

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
    from distzo.common.config import JobConfig

    raw = {"train": {"steps": 4, "batch_size": 4, "lr": 5e-4, "eps": 1e-3}, "data": {"dev_examples": 16},
           "runtime": {"cache_dir": cache_dir}}
    for key, value in sections.items():
        raw.setdefault(key, {}).update(value)
    return JobConfig.from_dict(raw)
