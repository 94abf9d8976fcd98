"""Update windows, in process: the K-step pass equals K single passes bit for bit, the replay on a base
equals the master, the base rule, and the Triton replay kernel (in its CPU interpreter) equals numba."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch

from distzo.model.blocks import BlockSpec, TensorSpec
from distzo.zo.forwardweights import perturb_block, replay_block
from distzo.zo.generator import Distribution
from distzo.zo.mezo import apply_update, apply_window, base_version
from distzo.zo.record import Direction, UpdateRecord
from distzo.zo.replay import pack, replay_perturb_device
from distzo.zo.served import to_served


def _block(offset: int = 1_000_003) -> BlockSpec:
    # a matrix (decays), a vector (does not), another matrix: three decay segments, unaligned offsets
    return BlockSpec(index=1, name="layer.0", global_offset=offset, tensors=(
        TensorSpec("w1", (37, 131), 0, True), TensorSpec("b1", (131,), 37 * 131, False),
        TensorSpec("w2", (64, 97), 37 * 131 + 131, True)))


def _records(first: int, count: int, q: int = 1, wd: float = 0.0, skip: int | None = None) -> list[UpdateRecord]:
    rng = np.random.default_rng(first)
    out = []
    for t in range(first, first + count):
        dirs = tuple(Direction(int(rng.integers(0, 1 << 63)), float(rng.normal()) * 3.0) for _ in range(q))
        out.append(UpdateRecord(t, dirs if t != skip else (), 1e-3 * (1 + t % 3), wd, skipped=t == skip))
    return out


def test_base_version_rule() -> None:
    assert [base_version(t, 1) for t in range(6)] == [0, 1, 2, 3, 4, 5]  # K = 1: today's, nothing replayed
    assert [base_version(t, 4) for t in range(12)] == [0, 0, 0, 4 - 4, 0, 0, 0, 4, 4, 4, 4, 8]
    for k in (2, 3, 4, 8):
        for t in range(200):
            b = base_version(t, k)
            assert b % k == 0 and 0 <= t - b <= 2 * k - 2  # a boundary, at most 2K - 2 records to replay
            if b:  # materializable when record b - 1 is journaled (at step b); first read K - 1 steps later
                assert min(s for s in range(300) if base_version(s, k) == b) == b + k - 1
    with pytest.raises(ValueError):
        base_version(-1, 4)
    with pytest.raises(ValueError):
        base_version(3, 0)


@pytest.mark.parametrize("dist", list(Distribution))
@pytest.mark.parametrize("served_dtype", ["float32", "bfloat16", "float16"])
@pytest.mark.parametrize("q,wd", [(1, 0.0), (1, 0.1), (3, 0.05)])
def test_window_pass_is_k_single_passes_bitwise(dist, served_dtype, q, wd) -> None:
    spec = _block()
    rng = np.random.default_rng(7)
    w0 = rng.normal(size=spec.numel).astype(np.float32)
    w0[:5] = [0.0, -0.0, 1e-30, -3.0, np.float32(2.0**-130)]  # signed zeros and subnormals round the same way
    records = _records(10, 8, q=q, wd=wd, skip=13)
    single = torch.from_numpy(w0.copy())
    for r in records:
        apply_update(spec, single, r, dist)
    in_place = w0.copy()
    served = np.empty(spec.numel, np.uint16) if served_dtype != "float32" else None
    apply_window(spec, in_place, in_place, records, dist, served, served_dtype)
    assert np.array_equal(in_place.view(np.uint32), single.numpy().view(np.uint32))
    if served is not None:
        assert np.array_equal(served, to_served(single, served_dtype).view(torch.int16).numpy().view(np.uint16))
    out_of_place = np.empty_like(w0)
    apply_window(spec, w0, out_of_place, records, dist)
    assert np.array_equal(out_of_place.view(np.uint32), single.numpy().view(np.uint32))


@pytest.mark.parametrize("dist", list(Distribution))
@pytest.mark.parametrize("wd", [0.0, 0.1])
def test_replay_reproduces_the_master_and_perturbs_it(dist, wd) -> None:
    spec = _block(offset=5)
    rng = np.random.default_rng(3)
    base = torch.from_numpy(rng.normal(size=spec.numel).astype(np.float32))
    records = _records(4, 6, q=2, wd=wd, skip=6)
    master = base.clone()
    for r in records:
        apply_update(spec, master, r, dist)
    (replayed,) = replay_block(spec, base, records, dist)
    assert torch.equal(replayed.view(torch.int32), master.view(torch.int32))

    plus, minus = replay_block(spec, base, records, dist, seed=99, coefs=[1e-3, -1e-3])
    want = perturb_block(master, spec.global_offset, 99, dist, [1e-3, -1e-3], torch.float32)
    assert torch.equal(plus.view(torch.int32), want[0].view(torch.int32))
    assert torch.equal(minus.view(torch.int32), want[1].view(torch.int32))
    # the torch path (what a GPU without Triton runs) gives the same bits
    out = torch.empty((2, spec.numel), dtype=torch.float32)
    for s, e, decays in spec.decay_segments() if wd else [(0, spec.numel, False)]:
        replay_perturb_device(base[s:e], spec.global_offset + s, pack(records, decays), 99, dist, [1e-3, -1e-3], out[:, s:e])
    assert torch.equal(out[0].view(torch.int32), want[0].view(torch.int32))
    # a 16-bit base: the records replayed in float32 on the rounded values and rounded again, by definition
    # (the served copy of the step's version, rebuilt from the base); then perturbed as any fetched block
    for served in ("bfloat16", "float16"):
        base16 = to_served(base, served)
        ref = base16.float()
        for r in records:
            apply_update(spec, ref, r, dist)
        rebuilt = to_served(ref, served)
        (x16,) = replay_block(spec, base16, records, dist)
        assert x16.dtype == base16.dtype and torch.equal(x16.view(torch.int16), rebuilt.view(torch.int16)), served
        fused = replay_block(spec, base16, records, dist, seed=99, coefs=[1e-3, -1e-3])
        apart = perturb_block(rebuilt, spec.global_offset, 99, dist, [1e-3, -1e-3], torch.float32)
        assert all(torch.equal(f.view(torch.int32), a.view(torch.int32)) for f, a in zip(fused, apart)), served
        # a slice of the block (a node group member rebuilds its slice before the gather)
        part = replay_block(spec, base16[4000:9000], records, dist, start=4000)[0]
        assert torch.equal(part.view(torch.int16), rebuilt[4000:9000].view(torch.int16)), served


def test_a_frozen_block_is_not_replayed() -> None:
    spec = BlockSpec(index=0, name="embed", global_offset=0, tensors=(TensorSpec("e", (10, 16), 0, True),), trainable=False)
    base = torch.randn(spec.numel)
    (x,) = replay_block(spec, base, _records(0, 3), Distribution.RADEMACHER)
    assert torch.equal(x, base)


@pytest.mark.skipif(not __import__("importlib").util.find_spec("triton"), reason="needs triton (the test extra)")
def test_triton_replay_kernel_in_the_interpreter_matches_numba(tmp_path) -> None:
    """The GPU kernel's bits, in Triton's CPU interpreter (a fresh process: TRITON_INTERPRET is read at import)."""
    script = textwrap.dedent("""
        import numpy as np, torch
        from distzo.zo import generator_cuda as gc
        from distzo.zo.generator import Distribution, _key
        from distzo.zo.record import Direction, UpdateRecord
        from distzo.zo.replay import pack, replay_perturb_cpu
        rng = np.random.default_rng(1)
        for gaussian in (False, True):
            dist = Distribution.GAUSSIAN if gaussian else Distribution.RADEMACHER
            recs = [UpdateRecord(t, tuple(Direction(int(rng.integers(0, 1 << 63)), float(rng.normal())) for _ in range(1 + t % 2)),
                                 1e-3, 0.01) for t in range(5)]
            n, off = 3001, (1 << 33) + 77
            x = rng.normal(size=n).astype(np.float32)
            p = pack(recs, True)
            for served, kind in (("float32", 0), ("bfloat16", 1), ("float16", 2)):
                want = np.empty((2, n), np.float32)
                replay_perturb_cpu(x, off, p, 12345, dist, [1e-3, -1e-3], want, served)
                for dt in (torch.float32, torch.bfloat16):
                    out = torch.empty((2, n), dtype=dt)
                    gc.replay_perturb(torch.from_numpy(x), off, p, _key(12345), [1e-3, -1e-3], out, gaussian, kind)
                    assert torch.equal(out, torch.from_numpy(want).to(dt)), (gaussian, dt, served)
                clean = torch.empty((1, n), dtype=torch.float32)
                gc.replay_perturb(torch.from_numpy(x), off, p, _key(12345), [], clean, gaussian, kind)
                only = np.empty((1, n), np.float32)
                replay_perturb_cpu(x, off, p, 0, dist, [], only, served)
                assert np.array_equal(clean.numpy().view(np.uint32), only.view(np.uint32)), (gaussian, served)
        print("ok")
    """)
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    out = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0 and out.stdout.strip().endswith("ok"), out.stderr[-3000:]
