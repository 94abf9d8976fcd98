"""Defaults that train (issue 25): train.lr and train.eps chosen by the target and the model's size, printed as
training starts; a step the parameter server would refuse stops `zoctl reference` and `zoctl up` alike, and is
never logged as a step that was applied."""

from __future__ import annotations

import math

import pytest

from distzo.common.config import JobConfig
from distzo.data import catalog
from distzo.data.presets import PRESETS
from distzo.train.defaults import EPS, default_lr, model_parameters, resolve

from conftest import small_config

MODELS = [*PRESETS, *(name for name, m in catalog.CATALOG.items() if m.kind == "model")]


def test_the_default_lr_shrinks_with_the_model_and_grows_for_adapters(cache_dir):
    assert default_lr("full", 100_000_000) == 2e-5 and default_lr("full", 400_000_000) == 1e-5
    assert default_lr("full", 10**8) < default_lr("lora", 10**8) < default_lr("prefix", 10**8)
    assert default_lr("full", 13_000_000_000) < 3e-6  # MeZO's full fine-tuning of OPT-13B: 1e-6..1e-7
    cfg = JobConfig.from_dict({"runtime": {"cache_dir": cache_dir}, "train": {"target": "lora"}})
    assert cfg.train.lr is None and cfg.train.eps is None  # null: chosen when the job starts
    done, said = resolve(cfg)
    params = model_parameters(catalog.resolve_model("tiny-opt", cache_dir))
    assert params == 254_144 and done.train.lr == default_lr("lora", params) and done.train.eps == EPS["lora"]
    assert said == (f"lr {done.train.lr:g} (the default for train.target lora on 0.3M parameters; set train.lr to "
                    "choose), eps 0.01 (the default for train.target lora)")
    mine, said = resolve(cfg.with_overrides({"train.lr": 1e-4, "train.eps": 0.05}))
    assert (mine.train.lr, mine.train.eps, said) == (1e-4, 0.05, "lr 0.0001, eps 0.05")


def test_the_lr_in_use_is_printed_as_training_starts(cache_dir, tmp_path, capsys):
    from coordinator.zoctl.cli import main

    assert main(["reference", "--steps", "1", "--set", f"runtime.cache_dir={cache_dir}", "--set",
                 "data.dev_examples=4", "--set", "train.batch_size=2", "--json"]) == 0
    out = capsys.readouterr()
    assert "zoctl: training with lr 0.0004 (the default for train.target full on 0.3M parameters" in out.err


def test_a_refused_update_stops_the_reference_and_the_cluster_alike_and_is_not_logged(cache_dir, tmp_path, capsys):
    """The parameter server refuses an absurd update (server.max_update_step): `zoctl reference` applied it and
    went on, and the coordinator logged the step as applied before the server refused it."""
    from coordinator.job import Job
    from coordinator.registry import Registry
    from coordinator.zoctl.cli import main
    from distzo.data.jobdata import JobData
    from distzo.infra.rpc import Credentials
    from distzo.run.runlog import read_history
    from distzo.train.reference import ReferenceTrainer

    cfg = small_config(cache_dir, train={"lr": 1e3, "eval_at_start": False})
    path = tmp_path / "job.yaml"
    path.write_text(cfg.to_yaml())
    assert main(["reference", "--config", str(path), "--run-dir", str(tmp_path / "ref")]) == 1
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("zoctl reference: training failed: step 0: the update would move weights by ")
    assert "server.max_update_step" in err and not read_history(tmp_path / "ref").steps
    # the coordinator's step, on the reference's forwards: the same words (zoctl up prints "training failed: " + them)
    job = Job(cfg, Registry(), [], Credentials(), run_dir=str(tmp_path / "up"))
    job.data = JobData.load(job.cfg)
    job._setup = lambda: None  # type: ignore[method-assign]
    job._forwards = ReferenceTrainer(job.cfg, job.data)._forwards  # type: ignore[method-assign]
    job._main()
    st = job.status()
    assert st.state == "failed" and f"zoctl reference: training {st.state}: {st.error}" == err
    assert not read_history(tmp_path / "up").steps  # a refused step is not logged as one applied


def _fetched(name: str) -> bool:
    return name in PRESETS or catalog.is_fetched(name)


@pytest.mark.parametrize("model", [pytest.param(m, marks=pytest.mark.skipif(
    not _fetched(m), reason=f"{m} is not fetched: run `zoctl fetch {m}`")) for m in MODELS])
def test_the_defaults_train_every_model_with_every_target_for_40_steps(model, cache_dir):
    """Every catalog model and preset, full, LoRA and prefix, at the defaults: no step refused or skipped, and the
    dev loss on a fixed set lower after 40 steps (deterministic: seeds, data order and perturbations are fixed).
    Rows of 16 tokens in batches of 2 (fetched models, on their task) or 4 (presets) keep the test short: what
    it checks is that the defaults move a model the right way, not how far."""
    from distzo.train.reference import ReferenceTrainer

    real = model in catalog.CATALOG
    data = {"train": "rotten-tomatoes" if real and catalog.is_fetched("rotten-tomatoes") else None,
            "dev_examples": 16, "max_seq_len": 16}
    for target in ("full", "lora", "prefix"):
        cfg = JobConfig.from_dict({"model": {"source": model}, "data": data, "runtime": {"cache_dir": cache_dir},
                                   "train": {"steps": 40, "batch_size": 2 if real else 4, "target": target,
                                             "eval_every": 0}})
        tr = ReferenceTrainer(cfg)
        summary = tr.train(progress=False)  # a refused step raises (UpdateRefused)
        first, last = tr.log.evals[0]["dev_loss"], tr.log.evals[-1]["dev_loss"]
        assert summary["skipped_steps"] == 0 and all(math.isfinite(x) for x in tr.log.losses), (target, tr.log.losses)
        assert last < first, f"{model} {target} at lr {tr.cfg.train.lr}: dev loss {first:.4f} -> {last:.4f}"
