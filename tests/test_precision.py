"""16-bit forwards that keep the perturbation (issue 29): the definition of the forward weights in forwardweights.py (CPU,
and the GPU's Triton kernels in Triton's interpreter), the eps of each compute dtype, the sampled measurement
of what the forwards keep (on weights chosen so that the figure is known exactly), the 16-bit forward engine on
a few families, and where the figure is shown (zoctl reference's start, zoctl plan)."""

from __future__ import annotations

import math
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch

from distzo.model.blocks import BlockSpec, build_manifest
from distzo.train.precision import BOUND, BufferSource, measure
from distzo.zo.forwardweights import BF16_EPS_SCALE, ForwardPrecision, forward_precision, forward_weights, replay_block
from distzo.zo.generator import Distribution, fill_z
from distzo.zo.record import Direction, UpdateRecord
from distzo.zo.served import to_served

EPS = 2.0 ** -10  # a power of two: x +- eps is exactly a bfloat16 number, a tie or nothing for the weights below
# bfloat16 steps at these magnitudes: 2^-11 = eps/2 (x +- eps exact: error 0), 2^-9 = 2 eps (x +- eps a tie, rounded to
# even: x has an odd last bit, so the copies are x +- 2 eps: error exactly 1, nothing lost), 2^-8 = 4 eps (both
# copies round to x: lost, error exactly 1)
EXACT, DOUBLED, LOST = 0.09375, 0.375 + 2.0 ** -9, 0.75


def test_eps_per_compute_dtype():
    assert forward_precision(1e-3, torch.float32) == ForwardPrecision(torch.float32, 1e-3)
    assert forward_precision(1e-3, torch.float16).eps == 1e-3
    assert forward_precision(1e-3, torch.bfloat16).eps == BF16_EPS_SCALE * 1e-3 == 4e-3
    assert forward_precision(1e-3, torch.bfloat16, 2e-3).eps == 2e-3
    assert forward_precision(1e-3, torch.float32, 2e-3).eps == 1e-3  # eps_bf16 is for bfloat16 forwards only
    assert forward_precision(1e-3, torch.bfloat16).wide_vectors and not forward_precision(1e-3, torch.float32).wide_vectors
    for bad in (0.0, -1e-3, math.inf, math.nan):
        with pytest.raises(ValueError, match="eps"):
            forward_precision(bad, torch.float32)
    with pytest.raises(ValueError, match="float32, bfloat16 or float16"):
        forward_precision(1e-3, torch.float64)


def _block(tensors: list[tuple[str, tuple[int, ...]]], offset: int = 1000, trainable: bool = True) -> BlockSpec:
    m = build_manifest("toy", {n: 0 for n, _ in tensors}, dict(tensors), [n for n, _ in tensors], 1, {0: "layer.0"}, {})
    b = m.blocks[0]
    return BlockSpec(b.index, b.name, offset, b.tensors, trainable)


@pytest.mark.parametrize("served", ["float32", "bfloat16"])
def test_forward_weights_are_the_definition(served):
    """Element i of a forward's weights is float32(x + c z): rounded to the compute dtype for tensors of rank >= 2,
    kept float32 in ``vectors`` for rank < 2 (packed in block order); a float32 forward has no vectors."""
    block = _block([("n1", (40,)), ("w", (30, 20)), ("b", (30,)), ("s", ()), ("w2", (7, 9)), ("n2", (5,))])
    assert block.vector_segments() == [(0, 40), (640, 671), (734, 739)] and block.vector_numel == 76
    clean = to_served(torch.randn(block.numel, generator=torch.Generator().manual_seed(0)), served)
    coefs = [3e-3, -3e-3]
    for dist in Distribution:
        z = fill_z(np.empty(block.numel, np.float32), 77, block.global_offset, dist).astype(np.float64)
        for dt in (torch.bfloat16, torch.float16, torch.float32):
            got = forward_weights(block, clean, dist, 77, coefs, dt)
            for c, w in zip(coefs, got):
                y = torch.from_numpy((clean.double().numpy() + c * z).astype(np.float32))
                assert torch.equal(w.main, y.to(dt))
                if dt == torch.float32:
                    assert w.vectors is None
                else:
                    want = torch.cat([y[a:b] for a, b in block.vector_segments()])
                    assert torch.equal(w.vectors.view(torch.int32), want.view(torch.int32))
        plain = forward_weights(block, clean, dist, compute_dtype=torch.bfloat16)  # no coefficient: x itself
        assert len(plain) == 1 and torch.equal(plain[0].main, clean.to(torch.bfloat16))
        assert torch.equal(plain[0].vectors, torch.cat([clean[a:b].float() for a, b in block.vector_segments()]))


def test_forward_weights_replay_the_pending_records_first_and_never_perturb_a_frozen_block():
    block = _block([("w", (30, 20)), ("b", (30,)), ("norm", (20,))])
    clean = to_served(torch.randn(block.numel, generator=torch.Generator().manual_seed(1)), "bfloat16")
    pending = [UpdateRecord(t, (Direction(100 + t, 0.5 - t),), 1e-3, 0.01) for t in range(3)]
    x = replay_block(block, clean, pending, Distribution.RADEMACHER)[0]  # the step's served copy, rebuilt
    for dt in (torch.bfloat16, torch.float32):
        fused = forward_weights(block, clean, Distribution.RADEMACHER, 5, [2e-3, -2e-3], dt, pending)
        apart = forward_weights(block, x, Distribution.RADEMACHER, 5, [2e-3, -2e-3], dt)
        for f, a in zip(fused, apart):
            assert torch.equal(f.main, a.main)
            assert (f.vectors is None and a.vectors is None) or torch.equal(f.vectors, a.vectors)
    frozen = _block([("w", (30, 20)), ("b", (30,))], trainable=False)
    got = forward_weights(frozen, clean[:frozen.numel], Distribution.RADEMACHER, 5, [2e-3], torch.bfloat16, pending)
    assert len(got) == 1 and torch.equal(got[0].main, clean[:frozen.numel])


@pytest.mark.skipif(not __import__("importlib").util.find_spec("triton"), reason="needs triton (the test extra)")
def test_the_gpu_path_of_the_definition_in_the_triton_interpreter():
    """The device path of forwardweights.forward_weights (Triton: perturb and replay kernels per contiguous range) on CPU
    tensors in Triton's interpreter, against the CPU's numba path: main and vectors, bitwise, with and without pending
    records."""
    script = textwrap.dedent("""
        import torch
        from distzo.zo import forwardweights, generator
        from distzo.zo.forwardweights import forward_weights
        from distzo.zo.generator import Distribution
        from distzo.zo.record import Direction, UpdateRecord
        from distzo.zo.served import to_served
        from test_precision import _block
        block = _block([("n1", (40,)), ("w", (30, 20)), ("b", (30,)), ("w2", (7, 9)), ("n2", (5,))], offset=(1 << 33) + 77)
        pending = [UpdateRecord(t, (Direction(100 + t, 0.5 - t),), 1e-3, 0.01) for t in range(2)]
        host = forwardweights._on_host
        for dist in Distribution:
            for served in ("float32", "bfloat16"):
                clean = to_served(torch.randn(block.numel, generator=torch.Generator().manual_seed(2)), served)
                for dt in (torch.bfloat16, torch.float16, torch.float32):
                    for recs in ((), pending):
                        for coefs in ([4e-3, -4e-3], []):
                            want = forward_weights(block, clean, dist, 9, coefs, dt, recs)
                            forwardweights._on_host, generator._use_triton = (lambda t: False), (lambda t: True)
                            got = forward_weights(block, clean, dist, 9, coefs, dt, recs)
                            forwardweights._on_host, generator._use_triton = host, (lambda t: False)
                            for w, g in zip(want, got):
                                assert torch.equal(w.main.view(torch.int16 if dt != torch.float32 else torch.int32),
                                                   g.main.view(torch.int16 if dt != torch.float32 else torch.int32)), (dist, served, dt)
                                assert (w.vectors is None) == (g.vectors is None)
                                assert w.vectors is None or torch.equal(w.vectors.view(torch.int32), g.vectors.view(torch.int32))
        print("ok")
    """)
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": os.path.dirname(__file__)}
    out = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0 and out.stdout.strip().endswith("ok"), out.stderr[-3000:]


# ----------------------------------------------------------------------------- the measurement
def _known_model():
    """Weights whose figure at eps 2^-10 is known exactly, with random signs: embeddings all EXACT; a matrix with half
    its rows DOUBLED; a norm of LOST and a bias of DOUBLED values (1-D: float32 in the forward, error 0); a head of LOST."""
    shapes = {"embed.weight": (64, 32), "layer.w": (32, 64), "layer.norm": (64,), "layer.bias": (32,), "head.w": (16, 32)}
    manifest = build_manifest("toy", {"embed.weight": 0, "layer.w": 1, "layer.norm": 1, "layer.bias": 1, "head.w": 2},
                              shapes, list(shapes), 3, {0: "embed", 1: "layer.0", 2: "head"}, {})
    g = np.random.default_rng(3)
    w = np.full((32, 64), EXACT)
    w[::2] = DOUBLED
    values = {"embed.weight": np.full(64 * 32, EXACT), "layer.w": w.reshape(-1), "layer.norm": np.full(64, LOST),
              "layer.bias": np.full(32, DOUBLED), "head.w": np.full(16 * 32, LOST)}
    buffers = [torch.from_numpy(np.concatenate([values[t.name] * np.where(g.random(t.numel) < 0.5, -1.0, 1.0)
                                                for t in b.tensors]).astype(np.float32)) for b in manifest.blocks]
    return manifest, buffers


def test_the_measurement_on_weights_whose_figure_is_known_exactly():
    manifest, buffers = _known_model()
    bf16 = measure(manifest, BufferSource(buffers), ForwardPrecision(torch.bfloat16, EPS), "bfloat16", "rademacher", 5)
    figs = {k.kind: k for k in bf16.kinds}
    # matrices: 1024 DOUBLED and 512 LOST elements (error 1 each) of 2048 + 512; every kind is small enough to be
    # measured whole (no standard error)
    m = figs["matrices"]
    assert (m.elements, m.sampled, m.rms_se, m.lost_se) == (2560, 2560, 0.0, 0.0)
    assert m.rms == math.sqrt(1536 / 2560) and m.lost == 512 / 2560
    assert figs["embeddings"].rms == 0.0 and figs["embeddings"].lost == 0.0
    assert figs["1-D"].rms == 0.0 and figs["1-D"].lost == 0.0 and figs["1-D"].elements == 96  # float32 in the forward
    warning = bf16.warning()
    assert warning is not None and "bfloat16" in warning and f"eps {EPS:g}" in warning and "77%" in warning
    assert "matrices" in warning and "train.eps_bf16 0.00390625" in warning  # 2^-8: every value's step divides it
    assert bf16.suggestion == 2.0 ** -8
    for dt in (torch.float16, torch.float32):  # fp16's steps here are at most 2^-11: everything kept
        r = measure(manifest, BufferSource(buffers), ForwardPrecision(dt, EPS), "bfloat16", "rademacher", 5)
        assert all(k.rms == 0.0 and k.lost == 0.0 for k in r.kinds) and r.warning() is None
    assert "every element" in bf16.line() and "matrices 0.775" in bf16.line()


def test_a_sampled_measurement_is_within_its_standard_error():
    """A kind larger than the sample: windows of 128 in rows of 256 that are all DOUBLED (error 1) or all EXACT."""
    shapes = {"w": (512, 256)}
    manifest = build_manifest("toy", {"w": 1}, shapes, ["w"], 2, {0: "embed", 1: "layer.0"}, {})
    g = np.random.default_rng(4)
    tie = g.random(512) < 0.3
    w = np.where(tie[:, None], DOUBLED, EXACT) * np.where(g.random((512, 256)) < 0.5, -1.0, 1.0)
    buffers = [torch.zeros(0), torch.from_numpy(w.reshape(-1).astype(np.float32))]
    truth = math.sqrt(tie.mean())  # every DOUBLED element has error exactly 1
    r = measure(manifest, BufferSource(buffers), ForwardPrecision(torch.bfloat16, EPS), "bfloat16", "rademacher", 5,
                per_kind=4096)
    (m,) = r.kinds
    assert m.sampled == 4096 and m.elements == 512 * 256 and m.rms_se > 0
    assert abs(m.rms - truth) <= 4 * m.rms_se, (m, truth)
    assert "sampled: matrices 4096 of 131072 elements" in r.line()


# ----------------------------------------------------------------------------- 16-bit forwards
# the families whose 16-bit forward ran into mixed dtypes before issue 29 (CPU) or without the norms' output cast
# (hy_v4), and one of each common layout; DISTZO_BF16_FAMILIES=all runs every tested family (106 passed, 2 min here)
FAMILIES_16 = ("mamba", "falcon_mamba", "ergo", "inkling2_text", "inkling2_loop_text", "minimax", "openai-gpt", "xglm",
               "hy_v4", "llama", "opt", "gpt2", "qwen2", "gemma2", "bloom", "gpt_neox", "falcon", "phi")


@pytest.mark.parametrize("model_type", __import__("distzo.model.families").families.TESTED_FAMILIES
                         if os.environ.get("DISTZO_BF16_FAMILIES") == "all" else FAMILIES_16)
def test_a_16_bit_forward_keeps_vectors_in_float32_and_runs_every_family(model_type):
    """On the CPU (bf16 matmuls), a family's tiny model in the engine's 16-bit forward: 1-D tensors float32 and
    matrices bfloat16 in the modules, norms fed bfloat16 give bfloat16, and the losses of both signs close to the
    float32 forward's (before issue 29, mamba, falcon_mamba, ergo, inkling2_text, inkling2_loop_text, minimax,
    openai-gpt and xglm did not run in bfloat16 on the CPU: float32 met bfloat16 in a matmul or a norm)."""
    from transformers import AutoModelForCausalLM
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    from distzo.model import families
    from distzo.model.blockfeed import MemoryFeed
    from distzo.model.blocks import flatten_block
    from distzo.model.forward import ForwardEngine, ForwardJob
    from distzo.model.modeling import BlockModel

    config = families.tiny_config(CONFIG_MAPPING[model_type]())
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        hf = AutoModelForCausalLM.from_config(config).float().eval()
    batch = families._probe_batch(hf.get_input_embeddings().weight.shape[0], 0)
    state = hf.state_dict()
    losses = {}
    for dt in (torch.float32, torch.bfloat16):
        bm = BlockModel(config)
        clean = [flatten_block(spec, state) for spec in bm.manifest.blocks]
        engine = ForwardEngine(bm, compute_dtype=dt)
        seen: dict[str, set] = {"vector": set(), "matrix": set(), "norm_out": set()}

        def look(mod, args, out):  # noqa: ANN001
            params = [p for p in mod._parameters.values() if p is not None]
            for p in params:
                seen["vector" if p.dim() < 2 else "matrix"].add(p.dtype)
            if params and all(p.dim() < 2 for p in params) and isinstance(out, torch.Tensor) and args \
                    and isinstance(args[0], torch.Tensor) and args[0].dtype == dt:
                seen["norm_out"].add(out.dtype)

        hooks = [m.register_forward_hook(look) for m in bm.skeleton.modules()]
        res = engine.run([ForwardJob(batch, seed=1, coef=1e-2), ForwardJob(batch, seed=1, coef=-1e-2)],
                         MemoryFeed(clean, served_dtype="bfloat16"))
        for h in hooks:
            h.remove()
        losses[dt] = [r.loss for r in res]
        if dt == torch.bfloat16:
            assert seen["vector"] <= {torch.float32} and seen["matrix"] <= {torch.bfloat16}, seen
            assert seen["norm_out"] <= {torch.bfloat16}, seen
    for a, b in zip(losses[torch.float32], losses[torch.bfloat16]):
        assert math.isfinite(b) and abs(a - b) <= 2e-2 * abs(a), (model_type, losses)


def test_the_16_bit_forward_rounds_a_norms_output_back_to_the_compute_dtype():
    """The cast that keeps activations in the compute dtype is what makes hy_v4 run (its attention mask follows the
    hidden states' dtype); llama's norms see bfloat16 in and give bfloat16 out, their weights float32."""
    test_a_16_bit_forward_keeps_vectors_in_float32_and_runs_every_family("hy_v4")
    from distzo.model.forward import ForwardEngine

    saved = ForwardEngine._keep_activation_dtype
    try:
        ForwardEngine._keep_activation_dtype = lambda self, m, a, k, out: None  # no cast: the float32 output escapes
        with pytest.raises(RuntimeError, match="BFloat16"):
            test_a_16_bit_forward_keeps_vectors_in_float32_and_runs_every_family("hy_v4")
    finally:
        ForwardEngine._keep_activation_dtype = saved


def test_zoctl_plan_shows_the_figure_when_it_has_the_weights(capsys, cache_dir):
    from coordinator.zoctl.cli import main

    assert main(["plan", "--model", "tiny-llama", "--eps", "1e-4"]) == 0
    out = capsys.readouterr().out
    assert "bfloat16 forwards at eps 0.0004 (served bfloat16) see the perturbation" in out
    assert "warning: bfloat16 forwards at eps 0.0004 lose" in out  # below the bf16 steps of the tiny weights
    assert main(["plan", "--model", "tiny-llama", "--cluster", "cpu-local", "--json"]) == 0
    import json

    kept = json.loads(capsys.readouterr().out)["perturbation"]
    assert kept["compute_dtype"] == "float32" and kept["eps"] == 1e-3 and kept["bound"] == BOUND
    assert main(["plan", "--model", "Llama-3-8B"]) == 0  # a spec without weights: no figure
    assert "see the perturbation" not in capsys.readouterr().out


def test_zoctl_reference_says_what_the_forwards_keep_and_warns_in_one_line(capsys, cache_dir):
    """Over the bound (tiny-llama's weights are near 0.02: their bfloat16 steps are about 1e-4, so eps_bf16 5e-5
    loses most of the perturbation): one warning line at the start naming eps, dtype and the figure; the summary
    carries the figure."""
    from coordinator.zoctl.cli import main

    rc = main(["reference", "--model", "tiny-llama", "--steps", "1", "--json", "--set", f"runtime.cache_dir={cache_dir}",
               "--set", "train.forward_dtype=bfloat16", "--set", "server.served_dtype=bfloat16",
               "--set", "train.eps_bf16=5e-5", "--set", "data.dev_examples=4", "--set", "train.batch_size=2",
               "--set", "train.eval_at_start=false"])
    out, err = capsys.readouterr()
    assert rc == 0, err[-2000:]
    warnings = [line for line in err.splitlines() if "warning: bfloat16 forwards" in line]
    assert len(warnings) == 1 and "at eps 5e-05 lose" in warnings[0] and "% (rms) of the perturbation" in warnings[0]
    assert "train.eps_bf16" in warnings[0]
    import json

    summary = json.loads(out)
    assert summary["perturbation"].startswith("bfloat16 forwards at eps 5e-05 (served bfloat16) see the perturbation")
    assert summary["perturbation_warning"] == warnings[0].removeprefix("zoctl: ")
