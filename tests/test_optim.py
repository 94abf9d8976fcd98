"""Optimizers with server-side state (train.optimizer momentum / adam): the math, its one
implementation in two code paths (numba, torch) agreeing bitwise, and the typed config."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from distzo.common.config import ConfigError, JobConfig
from distzo.common.dtypes import STATE_VALUES
from distzo.zo import generator
from distzo.zo.generator import Distribution, fill_z
from distzo.zo.mezo import apply_update
from distzo.zo.optim import OPTIMIZERS, STATE_NAMES, Optimizer, power, update_stateful_cpu, update_stateful_torch
from distzo.zo.record import Direction, UpdateRecord

OPTS = {"momentum": Optimizer("momentum", momentum=0.8), "adam": Optimizer("adam", beta1=0.85, beta2=0.99, eps=1e-6)}


def _formula(opt: Optimizer, w: np.ndarray, state: np.ndarray, offset: int, step: int, seeds, gs, lr, wd, dist) -> None:
    """The module docstring's formulas, written out independently with numpy float64 (the oracle)."""
    d = np.zeros(w.shape[0])
    for s, g in zip(seeds, gs):
        z = fill_z(np.empty(w.shape[0], np.float32), s, offset, dist).astype(np.float64)
        d = d + (g / len(seeds)) * z
    x = w.astype(np.float64)
    if opt.name == "momentum":
        m = (opt.momentum * state[:, 0].astype(np.float64) + (d + wd * x)).astype(np.float32)
        state[:, 0] = m
        w[:] = (x - lr * m.astype(np.float64)).astype(np.float32)
    else:
        t = step + 1
        m = (opt.beta1 * state[:, 0].astype(np.float64) + (1 - opt.beta1) * d).astype(np.float32)
        v = (opt.beta2 * state[:, 1].astype(np.float64) + ((1 - opt.beta2) * d) * d).astype(np.float32)
        state[:, 0], state[:, 1] = m, v
        mhat = m.astype(np.float64) / (1 - power(opt.beta1, t))
        vhat = v.astype(np.float64) / (1 - power(opt.beta2, t))
        w[:] = (x - lr * (mhat / (np.sqrt(vhat) + opt.eps) + wd * x)).astype(np.float32)


@pytest.mark.parametrize("name", ["momentum", "adam"])
@pytest.mark.parametrize("dist", ["rademacher", "gaussian"])
@pytest.mark.parametrize("q", [1, 3])
def test_the_kernels_follow_the_formulas_and_agree_bitwise(name, dist, q):
    opt = OPTS[name]
    rng = np.random.default_rng(3)
    n, offset = 5000, 77  # unaligned start, several 4096-element chunks
    w0 = rng.standard_normal(n).astype(np.float32)
    w_cpu, w_ref, w_t = w0.copy(), w0.copy(), torch.from_numpy(w0.copy())
    s_cpu = np.zeros((n, opt.width), np.float32)
    s_ref, s_t = s_cpu.copy(), torch.zeros(n, opt.width)
    for step in range(4):
        seeds = [11 * step + j for j in range(q)]
        gs = [0.7 - 0.4 * step + 0.1 * j for j in range(q)]
        coefs = [g / q for g in gs]
        update_stateful_cpu(w_cpu, s_cpu, offset, step, seeds, coefs, 1e-3, 0.01, opt, dist)
        update_stateful_torch(w_t, s_t, offset, step, seeds, coefs, 1e-3, 0.01, opt, dist)
        _formula(opt, w_ref, s_ref, offset, step, seeds, gs, 1e-3, 0.01, dist)
    assert np.array_equal(w_cpu.view(np.uint32), w_ref.view(np.uint32))
    assert np.array_equal(s_cpu.view(np.uint32), s_ref.view(np.uint32))
    assert np.array_equal(w_cpu.view(np.uint32), w_t.numpy().view(np.uint32))
    assert np.array_equal(s_cpu.view(np.uint32), s_t.numpy().view(np.uint32))
    assert not np.array_equal(w_cpu, w0) and np.all(s_cpu[:, 0] != 0)  # it did move
    if name == "adam":
        assert np.all(s_cpu[:, 1] > 0)


@pytest.mark.parametrize("name", ["momentum", "adam"])
def test_results_do_not_depend_on_threads_or_on_how_the_block_is_cut(name):
    opt = OPTS[name]
    n, offset = (1 << 17) + 301, 5
    w0 = np.random.default_rng(1).standard_normal(n).astype(np.float32)
    outs = []
    before = generator.cpu_threads()
    try:
        for threads, cut in ((1, None), (2, None), (1, 40_003)):
            generator.set_cpu_threads(threads)
            w, s = w0.copy(), np.zeros((n, opt.width), np.float32)
            for step in range(3):
                args = (step, [5 + step, 9], [0.5, -0.25], 1e-3, 0.0, opt, "gaussian")
                if cut is None:
                    update_stateful_cpu(w, s, offset, *args)
                else:  # two segments updated apart: each element's result is its own
                    update_stateful_cpu(w[:cut], s[:cut], offset, *args)
                    update_stateful_cpu(w[cut:], s[cut:], offset + cut, *args)
            outs.append((w, s))
    finally:
        generator.set_cpu_threads(before)
    for w, s in outs[1:]:
        assert np.array_equal(w.view(np.uint32), outs[0][0].view(np.uint32))
        assert np.array_equal(s.view(np.uint32), outs[0][1].view(np.uint32))


@pytest.mark.parametrize("served_dtype", ["bfloat16", "float16"])
def test_the_served_copy_is_written_in_the_same_pass(served_dtype):
    from distzo.zo.served import to_served

    opt = OPTS["adam"]
    w = np.random.default_rng(2).standard_normal(3000).astype(np.float32)
    s = np.zeros((3000, 2), np.float32)
    served = np.zeros(3000, np.uint16)
    update_stateful_cpu(w, s, 0, 0, [4], [0.3], 1e-2, 0.0, opt, "rademacher", served, served_dtype)
    want = to_served(torch.from_numpy(w), served_dtype).view(torch.int16).numpy().view(np.uint16)
    assert np.array_equal(served, want)


def test_apply_update_with_sgd_is_the_stateless_path_bit_for_bit():
    from distzo.model.blocks import BlockSpec, TensorSpec

    spec = BlockSpec(index=0, name="b", global_offset=128,
                     tensors=(TensorSpec("w", (20, 20), 0, True), TensorSpec("b", (200,), 400, False)))
    w0 = torch.from_numpy(np.random.default_rng(5).standard_normal(600).astype(np.float32))
    rec = UpdateRecord(3, (Direction(8, 0.4), Direction(9, -0.2)), 1e-3, 0.05)
    a, b = w0.clone(), w0.clone()
    apply_update(spec, a, rec, Distribution.RADEMACHER)
    apply_update(spec, b, rec, Distribution.RADEMACHER, optimizer=Optimizer("sgd"), state=None)
    assert torch.equal(a.view(torch.int32), b.view(torch.int32))
    # momentum with mu = 0 and no decay is sgd's step with lr * m = lr * d (up to m's fp32 rounding)
    c, st = w0.clone(), torch.zeros(600, 1)
    apply_update(spec, c, rec, Distribution.RADEMACHER, optimizer=Optimizer("momentum", momentum=0.0), state=st)
    assert torch.allclose(c[400:], a[400:], rtol=0, atol=1e-6)  # the bias tensor has no decay in both
    # decay reaches only the tensors whose manifest says so: the same decay segments as sgd
    d0 = torch.zeros(600, 1)
    e = w0.clone()
    apply_update(spec, e, UpdateRecord(0, (Direction(8, 0.0),), 1e-1, 0.5), Distribution.RADEMACHER,
                 optimizer=Optimizer("momentum", momentum=0.0), state=d0)
    assert torch.equal(e[400:], w0[400:]) and not torch.equal(e[:400], w0[:400])


def test_a_skipped_record_changes_neither_weights_nor_state():
    from distzo.model.blocks import BlockSpec, TensorSpec

    spec = BlockSpec(index=0, name="b", global_offset=0, tensors=(TensorSpec("w", (300,), 0, True),))
    w, st = torch.ones(300), torch.full((300, 2), 0.5)
    apply_update(spec, w, UpdateRecord(0, (), 1e-3, 0.0, skipped=True), Distribution.RADEMACHER,
                 optimizer=OPTS["adam"], state=st)
    assert torch.equal(w, torch.ones(300)) and torch.equal(st, torch.full((300, 2), 0.5))
    with pytest.raises(ValueError, match="needs the block's state"):
        apply_update(spec, w, UpdateRecord(0, (Direction(1, 0.1),), 1e-3, 0.0), Distribution.RADEMACHER,
                     optimizer=OPTS["adam"], state=None)
    with pytest.raises(TypeError, match=r"state of shape \(300, 2\)"):
        update_stateful_cpu(w.numpy(), np.zeros((300, 1), np.float32), 0, 0, [1], [0.1], 1e-3, 0.0, OPTS["adam"],
                            "rademacher")


def test_power_is_exact_binary_powering():
    assert power(0.5, 10) == 2.0 ** -10
    assert power(0.9, 0) == 1.0
    assert power(0.999, 1) == 0.999
    assert math.isclose(power(0.999, 1000), 0.999 ** 1000, rel_tol=1e-13)


def test_state_widths_are_one_table():
    assert tuple(STATE_VALUES) == OPTIMIZERS
    assert {o: len(STATE_NAMES[o]) for o in OPTIMIZERS} == STATE_VALUES
    assert [Optimizer(o).width for o in OPTIMIZERS] == [0, 1, 2]
    with pytest.raises(ValueError, match="unknown optimizer 'adamw'"):
        Optimizer("adamw")


@pytest.mark.parametrize("field,value,needle", [
    ("optimizer", "adamw", "train.optimizer: Input should be 'sgd', 'momentum' or 'adam'"),
    ("momentum", 1.0, "train.momentum: Input should be less than 1"),
    ("adam_beta2", -0.1, "train.adam_beta2: Input should be greater than or equal to 0"),
    ("adam_eps", 0.0, "train.adam_eps: Input should be greater than 0"),
    ("objective", "auc", "train.objective: Input should be 'loss', 'accuracy', 'f1' or 'classification'"),
])
def test_the_config_names_a_bad_optimizer_setting(field, value, needle):
    with pytest.raises(ConfigError) as err:
        JobConfig.from_dict({"train": {field: value}})
    assert needle in str(err.value)


def test_the_default_is_sgd_and_job_ids_of_sgd_runs_are_unchanged():
    from distzo.common.durable import job_identity

    cfg = JobConfig()
    assert cfg.train.optimizer == "sgd" and cfg.train.objective == "loss"
    ident = job_identity(cfg)
    assert not any(k.startswith(("train.optimizer", "train.momentum", "train.adam", "train.objective")) for k in ident)
    adam = job_identity(cfg.with_overrides({"train.optimizer": "adam"}))
    assert adam["train.optimizer"] == "adam" and adam["train.adam_beta2"] == 0.999


@pytest.mark.parametrize("served", ["bfloat16", "float32"])
def test_the_plan_gives_server_memory_per_parameter_for_each_optimizer(served):
    from distzo.perf.clusters import CLUSTERS
    from distzo.perf.model import predict
    from distzo.perf.specs import MODELS, LayoutSpec

    m = MODELS["OPT-13B"]
    c = CLUSTERS["h100x8"]
    p = {o: predict(m, c, LayoutSpec(), 32768, served, optimizer=o) for o in OPTIMIZERS}
    per = {"bfloat16": {"sgd": 6, "momentum": 10, "adam": 14}, "float32": {"sgd": 4, "momentum": 8, "adam": 12}}[served]
    assert p["sgd"].server_bytes_per_param == per
    assert "optimizer_state" not in p["sgd"].memory_per_server_host_bytes
    for o, width in (("momentum", 1), ("adam", 2)):
        host = p[o].memory_per_server_host_bytes
        assert host["optimizer_state"] == 4 * width * m.params
        assert host["total"] == pytest.approx(p["sgd"].memory_per_server_host_bytes["total"] + 4 * width * m.params)
        assert p[o].snapshot_headroom_bytes == (4 + 4 * width) * m.params  # copy-on-write copies master and state
        assert p[o].terms_s["server_update"] > p["sgd"].terms_s["server_update"]  # more bytes per update
    with pytest.raises(ValueError, match="optimizer 'adamw'"):
        predict(m, c, LayoutSpec(), 32768, served, optimizer="adamw")


def test_a_bad_optimizer_is_one_line_and_exit_2():
    from test_cluster import zoctl

    r = zoctl("reference", "--optimizer", "adamw", "--steps", "1")
    assert r.returncode == 2
    assert r.stderr.strip().count("\n") == 0 and "train.optimizer" in r.stderr and "'adam'" in r.stderr
    assert "Traceback" not in r.stderr
