"""A job's identity is derived from the config schema (issue 28, kind 3): every field that changes the
trajectory is in it, the others are not, checked field by field over the whole schema, in the run
directory's record (run.json) and the parameter server's (state.json, tests/test_durability.py)."""

from __future__ import annotations

import importlib.util
import typing
from pathlib import Path
from typing import Any

import pytest

from distzo.common.config import JobConfig
from distzo.common.durable import JobMismatch, check_same_job, job_id, job_identity, record_job

# What does NOT change the weights, written here independently of the schema's own marks: placement,
# threads, ports, paths, timeouts, guards, credentials, evaluation cadence. Any other field, including
# one added later (e.g. server.update_window), must be part of the identity.
NOT_TRAJECTORY = {
    "train.eval_every", "train.eval_at_start", "layout.node_size", "layout.nodes",
    *(f"server.{f}" for f in ("snapshot_every", "snapshot_at_start", "chunk_bytes", "update_threads", "shared_memory",
                              "shm_dir", "export_root", "fetch_timeout_s", "max_update_step", "data_dir")),
    "runtime.*", "security.*", "coordinator.*", "cluster.*",
}
# fields that decide the weights only in some jobs: (the setting that makes them matter)
CONDITIONAL = {
    "train.steps": {"train.lr_schedule": "cosine"},
    "train.momentum": {"train.optimizer": "momentum"},
    **{f"train.{f}": {"train.optimizer": "adam"} for f in ("adam_beta1", "adam_beta2", "adam_eps")},
    **{f"train.{f}": {"train.target": "lora"} for f in ("lora_rank", "lora_alpha", "lora_modules")},
    "train.prefix_tokens": {"train.target": "prefix"},
}
# a valid other value where "the next value" is not one, or needs a companion setting
SPECIAL: dict[str, dict[str, Any]] = {
    "model.source": {"model.source": "tiny-llama"},
    "data.template": {"data.template": "{text} Overall"},
    "data.label_words": {"data.label_words": ["bad", "good"]},
    "layout.workers": {"layout.workers": 4},
    "layout.name": {"layout.name": "dual", "layout.workers": 1},
    "layout.q": {"layout.q": 2, "layout.workers": 4},
    "layout.node_size": {"layout.node_size": 2},
    "layout.nodes": {"layout.nodes": 2},
    "security.token": {"security.token": "s3cret"},
    "security.tls_cert": {"security.tls_cert": "/c.pem", "security.tls_key": "/k.pem"},
    "security.tls_key": {"security.tls_cert": "/c.pem", "security.tls_key": "/k.pem"},
    "security.mutual_tls": {"security.mutual_tls": True, "security.tls_ca": "/ca.pem", "security.tls_cert": "/c.pem",
                            "security.tls_key": "/k.pem"},
    "cluster.hosts": {"cluster.hosts": 2},
    "cluster.link_rate": {"cluster.link_rate": "1gbit"},
    "train.min_lr_ratio": {"train.min_lr_ratio": 0.5},
    "train.batch_size": {"train.batch_size": 16},
    "train.weight_decay": {"train.weight_decay": 0.01},
    "train.lora_modules": {"train.lora_modules": ["q_proj"]},
}
BASE = {"layout.name": "ddp", "layout.workers": 2, "train.batch_size": 8}  # room for hosts, nodes, node groups


def fields() -> list[str]:
    return [f"{s}.{f}" for s, info in JobConfig.model_fields.items() for f in info.annotation.model_fields]


def trajectory(key: str) -> bool:
    return key not in NOT_TRAJECTORY and f"{key.split('.')[0]}.*" not in NOT_TRAJECTORY


def other_value(cfg: JobConfig, key: str) -> dict[str, Any]:
    """Overrides giving ``key`` another valid value."""
    if key in SPECIAL:
        return SPECIAL[key]
    section, field = key.split(".")
    info = type(getattr(cfg, section)).model_fields[field]
    value = getattr(getattr(cfg, section), field)
    kind = info.annotation
    if typing.get_origin(kind) is typing.Literal:
        return {key: next(c for c in typing.get_args(kind) if c != value)}
    if isinstance(value, bool):
        return {key: not value}
    if isinstance(value, int):
        return {key: value + 1}
    if isinstance(value, float):
        return {key: value / 2}
    if isinstance(value, list):
        return {key: [*value[:-1], value[-1] + "x"]}
    if value is None:  # an optional setting: a number or a text
        args = [a for a in typing.get_args(kind) if a is not type(None)]
        text = any(a is str or typing.get_origin(a) is typing.Annotated for a in args)
        return {key: "/some/where.jsonl" if text else 1}
    return {key: value + "x"}


@pytest.mark.parametrize("key", fields())
def test_each_field_is_in_the_identity_exactly_when_it_changes_the_trajectory(key, tmp_path):
    base = JobConfig().with_overrides({**BASE, **CONDITIONAL.get(key, {})})
    changed = base.with_overrides(other_value(base, key))
    a, b = job_identity(base), job_identity(changed)
    record_job(tmp_path / "run.json", base)
    if not trajectory(key):
        assert job_id(a) == job_id(b), f"{key} is not a trajectory setting but changes the job id"
        check_same_job(tmp_path / "run.json", changed, "the run directory")  # a resume may change it
        return
    assert key in {k for k in set(a) | set(b) if a.get(k) != b.get(k)}, f"{key} changes the trajectory, not the job id"
    with pytest.raises(JobMismatch, match=f"{key.replace('.', '[.]')} is .* there and .* here"):
        check_same_job(tmp_path / "run.json", changed, "the run directory")  # a resume changing it: refused by name
    if key in CONDITIONAL:  # where it does not matter, it is not part of the job
        plain = JobConfig().with_overrides(BASE)
        assert job_id(job_identity(plain)) == job_id(job_identity(plain.with_overrides(other_value(plain, key))))


def test_adding_a_field_changes_no_existing_job_id_and_ids_match_the_old_list():
    """Job ids recorded before the identity was derived (a hand-written list) stay valid: a field that was
    not in that list enters the identity only when set away from its default."""
    spec = importlib.util.spec_from_file_location("legacy", Path(__file__).with_name("legacy_identity.py"))
    legacy = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(legacy)  # type: ignore[union-attr]
    for overrides in ({}, {"train.optimizer": "momentum"}, {"train.optimizer": "adam", "train.adam_beta2": 0.99},
                      {"train.lr_schedule": "cosine", "train.steps": 77}, {"train.objective": "f1"},
                      {"layout.name": "ddp", "layout.workers": 4, "layout.node_size": 2}, {"train.grad_clip": 1.0}):
        cfg = JobConfig().with_overrides(overrides)
        assert job_id(job_identity(cfg)) == job_id(legacy.job_identity(cfg)), overrides
    lora = JobConfig().with_overrides({"train.target": "lora"})
    assert job_identity(lora)["train.lora_alpha"] == 16.0  # the case: recorded, so a resume cannot change it
