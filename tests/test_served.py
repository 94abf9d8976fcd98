"""The served 16-bit copy: one rounding (distzo/zo/served.py), written by the update itself."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from distzo.model.blockfeed import MemoryFeed
from distzo.model.blocks import ITEMSIZE
from distzo.model.modeling import BlockModel
from distzo.zo import generator as g
from distzo.zo.generator import Distribution
from distzo.zo.mezo import apply_update
from distzo.zo.record import Direction, UpdateRecord
from distzo.zo.served import cast_into, to_served
from paramserver.store import BlockStore

EDGES = np.array([0.0, -0.0, np.inf, -np.inf, 65504.0, 65519.996, 65520.0, 65536.0, 3.4028235e38, -3.4028235e38,
                  6.1035156e-05, 6.0975552e-05, 5.9604645e-08, 2.9802322e-08, 2.9802326e-08, 8.940697e-08, 1e-45,
                  1.1754942e-38, 1.0, -1.0, 1.00390625, 1.01171875, 0.1], np.float32)


def sample_bits(n: int = 1 << 21) -> np.ndarray:
    """Random fp32 bit patterns over every exponent (NaNs dropped), the edges, and weight-like values."""
    rng = np.random.default_rng(0)
    f = rng.integers(0, 2**32, n, dtype=np.uint64).astype(np.uint32).view(np.float32)
    return np.concatenate([f[~np.isnan(f)], EDGES, (rng.standard_normal(n) * 0.02).astype(np.float32)])


@pytest.mark.parametrize("name,dtype", [("bfloat16", torch.bfloat16), ("float16", torch.float16)])
def test_the_rounding_is_torchs_round_to_nearest_even(name, dtype):
    f = sample_bits()
    ours = np.empty(f.shape, np.uint16)
    cast_into(f, name, ours)
    theirs = torch.from_numpy(f).to(dtype).view(torch.int16).numpy().view(np.uint16)
    assert np.array_equal(ours, theirs)
    # and torch's scalar path on the edges (its vectorized and scalar code paths share it for non-NaN values)
    for x, bits in zip(EDGES, ours[-len(EDGES) - (1 << 21):]):
        assert torch.tensor([float(x)], dtype=torch.float32).to(dtype).view(torch.int16).item() & 0xFFFF == bits


def test_nan_has_one_canonical_served_value():
    nans = np.array([0x7FC00000, 0x7F800001, 0xFFC00001, 0x7FFFFFFF], np.uint32).view(np.float32)
    out = np.empty(4, np.uint16)
    cast_into(nans, "bfloat16", out)
    assert out.tolist() == [0x7FC0] * 4
    cast_into(nans, "float16", out)
    assert out.tolist() == [0x7E00, 0x7E00, 0xFE00, 0x7E00]


@pytest.mark.parametrize("dist", ["rademacher", "gaussian"])
@pytest.mark.parametrize("seeds,coefs", [([21], [2e-3]), ([21, 22], [2e-3, -1e-3])])
@pytest.mark.parametrize("name", ["bfloat16", "float16"])
def test_the_fused_update_writes_the_cast_of_the_new_master(dist, seeds, coefs, name):
    before = g.cpu_threads()
    rng = np.random.default_rng(3)
    w0 = (rng.standard_normal(300_001) * 0.02).astype(np.float32)
    try:
        for threads in (1, 3):
            g.set_cpu_threads(threads)
            fused, plain = w0.copy(), w0.copy()
            served = np.zeros(w0.shape, np.uint16)
            g.update_cpu(fused, 1001, seeds, coefs, 1e-4, dist, served, name)  # unaligned: head, interior, tail
            g.update_cpu(plain, 1001, seeds, coefs, 1e-4, dist)
            want = np.empty(w0.shape, np.uint16)
            cast_into(plain, name, want)
            assert np.array_equal(fused.view(np.uint32), plain.view(np.uint32))
            assert np.array_equal(served, want)
    finally:
        g.set_cpu_threads(before)


def test_bad_served_buffers_are_refused():
    w = np.zeros(10, np.float32)
    with pytest.raises(TypeError, match="uint16 of shape"):
        g.update_cpu(w, 0, [1], [1e-3], 0.0, "rademacher", np.zeros(9, np.uint16), "bfloat16")
    with pytest.raises(TypeError, match="uint16 of shape"):
        g.update_cpu(w, 0, [1], [1e-3], 0.0, "rademacher", np.zeros(10, np.float32), "bfloat16")
    with pytest.raises(ValueError, match="served dtype 'int8'"):
        g.update_cpu(w, 0, [1], [1e-3], 0.0, "rademacher", np.zeros(10, np.uint16), "int8")
    with pytest.raises(ValueError, match="master itself"):
        cast_into(w, "float32", np.zeros(10, np.uint16))
    with pytest.raises(TypeError, match="served output"):
        cast_into(w, "bfloat16", np.zeros(11, np.uint16))


@pytest.mark.parametrize("served", ["bfloat16", "float16"])
def test_the_servers_bytes_are_the_references_bytes(preset, served):
    """BlockStore (fused update + cast) against the reference's path (update, then MemoryFeed's rounding)."""
    bm = BlockModel.from_dir(preset("tiny-opt"))
    buffers = bm.load_block_buffers()
    n = len(bm.manifest.blocks)
    store = BlockStore(bm.manifest, 0, n, served, None, "test")
    for b in range(n):
        store.set_block(b, buffers[b].numpy(), 0)
    records = [UpdateRecord(0, (Direction(5, 0.7),), 1e-3, 0.01), UpdateRecord(1, (Direction(6, -1.1), Direction(7, 0.4)), 1e-3, 0.0),
               UpdateRecord(2, (), 1e-3, 0.0, skipped=True)]
    feed = MemoryFeed(buffers, served_dtype=served)
    for r in records:
        store.apply(r, Distribution.RADEMACHER)
        for spec, buf in zip(bm.manifest.blocks, buffers):
            apply_update(spec, buf, r, Distribution.RADEMACHER)
        for b in range(n):
            ref = feed.get(b)
            assert ref.dtype == getattr(torch, served)
            assert store.served[(0, b)].nbytes == bm.manifest.blocks[b].numel * ITEMSIZE[served]
            assert np.array_equal(store.served[(0, b)], ref.view(torch.uint8).numpy()), (r.step, b)
            assert np.array_equal(store.master[b], buffers[b].numpy())
    assert store.version(0) == 3


def test_to_served_keeps_float32_and_shapes():
    t = torch.randn(3, 5)
    assert to_served(t, "float32") is t
    h = to_served(t, "bfloat16")
    assert h.shape == (3, 5) and h.dtype == torch.bfloat16
    assert torch.equal(h, t.to(torch.bfloat16))
