"""The perturbation generator: known answers, golden vectors, invariances, distributions."""

from __future__ import annotations

import math

import os

import numpy as np
import pytest
import torch

from distzo.zo import generator as g

# Random123 tests/kat_vectors, the three "philox4x32 10" lines: counter, key -> output
KAT = [
    ((0, 0, 0, 0), (0, 0), (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)),
    ((0xFFFFFFFF,) * 4, (0xFFFFFFFF,) * 2, (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD)),
    ((0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344), (0xA4093822, 0x299F31D0), (0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1)),
]

# z(seed, offset .. offset+7) as float32 bit patterns; frozen: any change breaks every checkpoint's journal
GOLDEN = {
    ("rademacher", 0, 0): [0xBF800000, 0x3F800000, 0xBF800000, 0x3F800000, 0xBF800000, 0x3F800000, 0xBF800000, 0xBF800000],
    ("rademacher", 12345, 1000003): [0xBF800000, 0x3F800000, 0x3F800000, 0x3F800000, 0xBF800000, 0x3F800000, 0x3F800000, 0xBF800000],
    ("rademacher", 2**63 - 1, 2**40 + 7): [0x3F800000, 0xBF800000, 0x3F800000, 0xBF800000, 0x3F800000, 0x3F800000, 0x3F800000, 0x3F800000],
    ("gaussian", 0, 0): [0x3D40884D, 0xBFAD6601, 0xBF47101A, 0x3DC4488F, 0x3C9D7CE0, 0x3E722D8B, 0x3F3A4CF0, 0xBEE5A3B4],
    ("gaussian", 12345, 1000003): [0xBF39DC0C, 0x3EA3DBA9, 0x3D064BA8, 0x3F8BA485, 0xBDFE7BD0, 0xC00306BD, 0x3F2B96B2, 0xBECFDA7E],
    ("gaussian", 2**63 - 1, 2**40 + 7): [0xBF46EDC7, 0x3E9A4F44, 0x3F274024, 0x3F715832, 0xBF9DC753, 0xBF26929D, 0x3F56EE65, 0x3E940868],
}


def z(seed: int, offset: int, n: int, dist: str) -> np.ndarray:
    out = np.empty(n, np.float32)
    return g.fill_z(out, seed, offset, dist)


@pytest.mark.parametrize("counter,key,expected", KAT)
def test_philox_known_answers(counter, key, expected):
    assert g.philox4x32_10(counter, key) == expected


@pytest.mark.parametrize("dist,seed,offset", list(GOLDEN))
def test_golden_vectors_cpu_and_torch(dist, seed, offset):
    want = np.array(GOLDEN[(dist, seed, offset)], dtype=np.uint32)
    assert np.array_equal(z(seed, offset, 8, dist).view(np.uint32), want)
    assert np.array_equal(g.z_torch(seed, offset, 8, dist, "cpu").numpy().view(np.uint32), want)


def test_rademacher_bits_follow_the_philox_word():
    word = KAT[0][2][0]  # seed 0 = key (0, 0), counter 0: element i takes bit i of word 0
    expected = [1.0 - 2.0 * ((word >> i) & 1) for i in range(32)]
    assert z(0, 0, 32, "rademacher").tolist() == expected


def test_gaussian_matches_box_muller_in_libm():
    x0, x1, x2, x3 = KAT[0][2]  # seed 0, counter 0
    out = z(0, 0, 4, "gaussian")
    for (a, b), (z0, z1) in (((x0, x1), out[0:2]), ((x2, x3), out[2:4])):
        r = math.sqrt(-2.0 * math.log((a + 1) / 2**32))
        theta = (b >> 30) * math.pi / 2 + ((b & 0x3FFFFFFF) - 2**29) * 2 * math.pi / 2**32
        assert z0 == pytest.approx(r * math.cos(theta), rel=1e-6, abs=1e-7)
        assert z1 == pytest.approx(r * math.sin(theta), rel=1e-6, abs=1e-7)


@pytest.mark.parametrize("dist", ["rademacher", "gaussian"])
def test_any_chunking_gives_the_same_values(dist):
    rng = np.random.default_rng(0)
    offset, n = 987_654_321, 300_001
    whole = z(7, offset, n, dist)
    pieces = np.empty(n, np.float32)
    cuts = np.unique(np.concatenate([[0, n], rng.integers(0, n, 40)]))
    for a, b in zip(cuts, cuts[1:]):
        g.fill_z(pieces[a:b], 7, offset + int(a), dist)
    assert np.array_equal(whole, pieces)
    assert np.array_equal(whole, g.z_torch(7, offset, n, dist, "cpu").numpy())


@pytest.mark.parametrize("dist", ["rademacher", "gaussian"])
def test_thread_count_does_not_change_results(dist):
    before = g.cpu_threads()
    try:
        outs = []
        for threads in (1, 2, 3):
            g.set_cpu_threads(threads)
            w = np.linspace(-1, 1, 400_003, dtype=np.float32)
            g.update_cpu(w, 12_345, [3, 4], [1e-3, -5e-4], 1e-4, dist)
            outs.append((z(9, 555, 400_003, dist), w))
        for zz, w in outs[1:]:
            assert np.array_equal(zz, outs[0][0])
            assert np.array_equal(w, outs[0][1])
    finally:
        g.set_cpu_threads(before)


def test_rademacher_is_exactly_plus_minus_one():
    v = z(11, 0, 1 << 20, "rademacher")
    assert set(np.unique(v).tolist()) == {-1.0, 1.0}
    assert abs(v.mean()) < 5 / math.sqrt(v.size)


def test_gaussian_moments():
    v = z(13, 3, 1 << 21, "gaussian").astype(np.float64)
    n = v.size
    assert abs(v.mean()) < 5 / math.sqrt(n)
    assert abs(v.var() - 1.0) < 5 * math.sqrt(2 / n)
    assert abs(((v - v.mean()) ** 3).mean()) < 0.02  # skewness ~ 0
    assert abs((v**4).mean() / v.var() ** 2 - 3.0) < 0.05  # kurtosis ~ 3
    assert np.isfinite(v).all()


def test_different_seeds_and_offsets_are_uncorrelated():
    a = z(1, 0, 1 << 18, "gaussian").astype(np.float64)
    b = z(2, 0, 1 << 18, "gaussian").astype(np.float64)
    c = z(1, 1 << 18, 1 << 18, "gaussian").astype(np.float64)
    for x, y in ((a, b), (a, c)):
        assert abs(np.corrcoef(x, y)[0, 1]) < 0.01


@pytest.mark.parametrize("dist", ["rademacher", "gaussian"])
def test_perturb_is_one_rounding_from_theta(dist):
    rng = np.random.default_rng(1)
    theta = rng.standard_normal(100_003).astype(np.float32) * 0.02
    out = np.empty((2, theta.size), np.float32)
    g.perturb_cpu(theta, 77, 5, dist, [1e-3, -1e-3], out)
    zz = z(5, 77, theta.size, dist).astype(np.float64)
    for row, c in zip(out, (1e-3, -1e-3)):
        exact = theta.astype(np.float64) + c * zz
        assert np.array_equal(row, exact.astype(np.float32))  # rounded once from the float64 sum
    assert not np.array_equal(out[0], theta)


@pytest.mark.parametrize("dist", ["rademacher", "gaussian"])
@pytest.mark.parametrize("seeds,coefs", [([21], [2e-3]), ([21, 22], [2e-3, -1e-3])])
def test_update_formula_and_torch_path(dist, seeds, coefs):
    # offset 1000 is not 128-aligned: the fused one-direction path has a head, interior and tail
    rng = np.random.default_rng(2)
    w = rng.standard_normal(50_001).astype(np.float32)
    decay = 1e-4
    expected = w.astype(np.float64)
    acc = np.zeros_like(expected)
    for s, c in zip(seeds, coefs):
        acc = acc + c * z(s, 1000, w.size, dist).astype(np.float64)
    expected = (expected - (acc + decay * expected)).astype(np.float32)
    w_torch = torch.from_numpy(w.copy())
    g.update_cpu(w, 1000, seeds, coefs, decay, dist)
    g.update_torch(w_torch, 1000, seeds, coefs, decay, dist)
    assert np.array_equal(w, expected)
    assert np.array_equal(w_torch.numpy(), expected)


def test_bad_seed_and_range_are_refused():
    out = np.empty(4, np.float32)
    with pytest.raises(ValueError, match="seed"):
        g.fill_z(out, -1, 0, "gaussian")
    with pytest.raises(ValueError, match="seed"):
        g.fill_z(out, 1 << 63, 0, "gaussian")
    with pytest.raises(ValueError, match="outside"):
        g.fill_z(out, 1, -5, "gaussian")
    with pytest.raises(ValueError):
        g.fill_z(out, 1, 0, "uniform")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("dist", ["rademacher", "gaussian"])
def test_cuda_bits_equal_cpu(dist):
    cpu = z(99, 123_457, 1_000_003, dist)
    gpu = g.z_torch(99, 123_457, 1_000_003, dist, "cuda").cpu().numpy()
    assert np.array_equal(cpu, gpu)


_TRITON_CHECK = """
import numpy as np, torch
from distzo.zo import generator as g
from distzo.zo import generator_cuda as gc
from distzo.zo import served
for gaussian in (False, True):
    dist = g.Distribution.GAUSSIAN if gaussian else g.Distribution.RADEMACHER
    for off, n in ((123_457_001, 3001), (5_000_000_000_123, 700), (0, 128), (3, 5)):
        clean = torch.randn(n)
        outs = gc.perturb(clean, off, g._key(99), [1e-3, -1e-3], torch.float32, gaussian)
        ref = np.empty((2, n), np.float32)
        g.perturb_cpu(clean.numpy(), off, 99, dist, [1e-3, -1e-3], ref)
        assert all(np.array_equal(o.numpy().view(np.uint32), r.view(np.uint32)) for o, r in zip(outs, ref)), (gaussian, off)
        for dt, name in ((torch.bfloat16, "bfloat16"), (torch.float16, "float16")):
            o16 = gc.perturb(clean, off, g._key(99), [1e-3], dt, gaussian)[0]
            want = np.empty(n, np.uint16); served.cast_into(ref[0], name, want)
            assert np.array_equal(o16.view(torch.int16).numpy().view(np.uint16), want), (gaussian, off, name)
        for seeds, coefs, decay in (([5], [1e-3], 0.0), ([5, 6], [1e-3, -2e-3], 0.01)):
            w1 = torch.randn(n)
            w2 = w1.clone()
            s1 = torch.zeros(n, dtype=torch.int16)
            gc.update(w1, off, [g._key(s) for s in seeds], coefs, decay, gaussian, s1, 1)
            s2 = np.empty(n, np.uint16)
            g.update_cpu(w2.numpy(), off, seeds, coefs, decay, dist, s2, "bfloat16")
            assert torch.equal(w1.view(torch.int32), w2.view(torch.int32)), (gaussian, off, seeds)
            assert np.array_equal(s1.numpy().view(np.uint16), s2), (gaussian, off, seeds)
            s3 = torch.zeros(n, dtype=torch.int16)
            w3 = w2.clone(); w4 = w2.clone()
            gc.update(w3, off, [g._key(s) for s in seeds], coefs, decay, gaussian, s3, 2)
            s4 = np.empty(n, np.uint16)
            g.update_cpu(w4.numpy(), off, seeds, coefs, decay, dist, s4, "float16")
            assert np.array_equal(s3.numpy().view(np.uint16), s4), ("f16", gaussian, off, seeds)
# the 16-bit rounding on edge values (subnormal, overflow, inf, NaN)
rng = np.random.default_rng(0)
u = rng.integers(0, 2**32, 20000, dtype=np.uint64).astype(np.uint32)
f = np.concatenate([u.view(np.float32), np.array([0.0, -0.0, np.inf, -np.inf, np.nan, 65519.99, 65520, 6.1035156e-05, 2.9802322e-08, 1e-45], np.float32)])
x = np.empty((1, f.size), np.float32)
g.perturb_cpu(f, 0, 1, g.Distribution.RADEMACHER, [0.0], x)  # x + 0*z: f itself, but -0 may become +0
for dt, name in ((torch.bfloat16, "bfloat16"), (torch.float16, "float16")):
    got = gc.perturb(torch.from_numpy(f), 0, g._key(1), [0.0], dt, False)[0]
    want = np.empty(f.size, np.uint16); served.cast_into(x[0], name, want)
    assert np.array_equal(got.view(torch.int16).numpy().view(np.uint16), want), name
print("ok")
"""


def test_triton_kernels_give_the_cpu_bits_in_the_interpreter():
    """The GPU kernels (generator_cuda.py), run by Triton's CPU interpreter, against the CPU kernels: both
    distributions, perturbed copies in fp32/bf16/fp16, updates with the served bf16/fp16 copy written in the
    same pass, unaligned offsets and offsets past 2^32, and the 16-bit rounding on edge values."""
    import subprocess
    import sys

    pytest.importorskip("triton", reason="triton is part of the test extras ([test])")
    r = subprocess.run([sys.executable, "-c", _TRITON_CHECK], capture_output=True, text=True, timeout=300,
                       env={**os.environ, "TRITON_INTERPRET": "1"})
    assert r.returncode == 0 and r.stdout.strip() == "ok", r.stderr[-3000:]


@pytest.mark.parametrize("coef", [0.0, -0.0, 1e-3, -1e-3])
@pytest.mark.parametrize("decay", [0.0, 1e-4])
def test_update_keeps_the_formulas_signed_zeros(coef, decay):
    """The fused one-direction pass (c*z selected as +c or -c) against the float64 formula on +-0, tiny and
    huge weights: the sum starts from 0.0, so c = 0 and w = -0 give the formula's zero signs."""
    n = 4096 + 300
    w = np.zeros(n, np.float32)
    w[1::4] = -0.0
    w[2::4] = np.float32(1e-40)
    w[3::4] = np.float32(-3e38)
    acc = 0.0 + coef * z(7, 256, n, "rademacher").astype(np.float64)
    x = w.astype(np.float64)
    expected = (x - (acc + decay * x)).astype(np.float32)
    g.update_cpu(w, 256, [7], [coef], decay, "rademacher")  # offset 256: the aligned interior covers most of it
    assert np.array_equal(w.view(np.uint32), expected.view(np.uint32))
