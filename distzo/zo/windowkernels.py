"""The numba kernels of update windows (``distzo/zo/replay.py`` packs their arguments and splits the work).

Both apply several update records to each element in step order, with exactly the float64
operations and the one float32 rounding per record of the single-step update kernel
(``zkernels._update_kernel``): ``w = float32(w - (sum_j a_j z_j + d * w))``. So K records applied
here are bitwise K single-step passes; only the memory traffic differs (one read and one write of
each element for the whole window, the record loop running on a chunk that stays in L1).

* ``window_kernel``: the server's K-step pass, fp32 source to fp32 destination (the same array
  for an in-place pass), writing the 16-bit served copy of the result in the same pass.
* ``replay_perturb_kernel``: a worker's replay of the pending records on its (clean) base block,
  rounded to the served dtype (the served copy of the step's version, rebuilt from the base), then
  ``float32(x + c * z)`` for each perturbation coefficient, still in L1; with no coefficient it
  writes the rebuilt served values themselves (clean forwards: eval, and a node group's slice).

Records are packed as arrays: record r has directions ``rec_start[r] .. rec_start[r + 1]`` of
``keys`` ([D, 2] uint64 Philox keys) and ``coefs`` ([D] float64, lr * g / q), and the decay factor
``decay[r]`` (lr * weight_decay, 0 where the segment does not decay).
"""

from __future__ import annotations

import numpy as np
from llvmlite import ir
from numba import njit, types
from numba.core.extending import intrinsic

from distzo.zo import kernelcache
from distzo.zo.served import bf16_bits, f16_bits
from distzo.zo.zkernels import (_ALIGN, _SCRATCH, _U64_32, _U64_MASK, _perturb_rows, _philox, _projected_sum, _write_served,
                             _z_chunk)

kernelcache.install()  # before the first @njit(cache=True): caches keyed by every kernel module's source


@intrinsic
def _f32_of_bits(typingctx, u):  # noqa: ANN001 - numba intrinsic: the float32 whose bits are the uint32 u
    if u != types.uint32:
        return None

    def codegen(context, builder, signature, args):  # noqa: ANN001
        return builder.bitcast(args[0], ir.FloatType())

    return types.float32(types.uint32), codegen


@intrinsic
def _f32_of_f16_bits(typingctx, h):  # noqa: ANN001 - numba intrinsic: float16 bits -> float32 (exact)
    if h != types.uint16:
        return None

    def codegen(context, builder, signature, args):  # noqa: ANN001
        return builder.fpext(builder.bitcast(args[0], ir.HalfType()), ir.FloatType())

    return types.float32(types.uint16), codegen


@njit(inline="always", cache=True)
def _round_served(v, kind):  # noqa: ANN001, ANN202
    # v rounded to the served dtype and back (exact): served.py's bfloat16 / float16 rounding
    if kind == 1:
        for j in range(v.shape[0]):
            v[j] = _f32_of_bits(np.uint32(np.uint32(bf16_bits(v[j])) << np.uint32(16)))
    elif kind == 2:
        for j in range(v.shape[0]):
            v[j] = _f32_of_f16_bits(f16_bits(v[j]))


@njit(inline="always", cache=True)
def _apply_records(v, acc, words, zbuf, start, n, keys, coefs, rec_start, decay, gaussian):  # noqa: ANN001, ANN202
    # every record on the n values of v (global elements start ..), in step order, one rounding each
    for r in range(decay.shape[0]):
        base = _projected_sum(acc, words, zbuf, start, n, keys[rec_start[r]:rec_start[r + 1]],
                              coefs[rec_start[r]:rec_start[r + 1]], gaussian)
        a = acc[base : base + n]
        d = decay[r]
        for j in range(n):
            x = np.float64(v[j])
            v[j] = np.float32(x - (a[j] + d * x))


@njit(nogil=True, cache=True)
def window_kernel(src, dst, start, keys, coefs, rec_start, decay, gaussian, served, kind):  # noqa: ANN001, ANN201
    """dst = the records applied to src (dst may be src); with kind 1/2 also served = its 16-bit bits."""
    words = np.empty(_SCRATCH + 2 * _ALIGN, np.uint32)
    zbuf = np.empty(_SCRATCH + 2 * _ALIGN, np.float32)
    acc = np.empty(_SCRATCH + 2 * _ALIGN, np.float64)
    same = src.ctypes.data == dst.ctypes.data
    for off in range(0, dst.shape[0], _SCRATCH):
        n = min(_SCRATCH, dst.shape[0] - off)
        v = dst[off : off + n]
        if not same:
            s = src[off : off + n]
            for j in range(n):
                v[j] = s[j]
        _apply_records(v, acc, words, zbuf, start + off, n, keys, coefs, rec_start, decay, gaussian)
        if kind:
            _write_served(v, served[off : off + n], kind)


@njit(nogil=True, cache=True, error_model="numpy")
def rademacher_window_aligned(src, dst, start, k0, k1, c, decay, served, kind):  # noqa: ANN001, ANN201
    """window_kernel for records of one Rademacher direction each, start and length multiples of 128:
    per 128 elements and record one Philox call, ``0.0 + c * z`` selected as ``0.0 + c`` or ``0.0 + (-c)``
    (exactly the product's sum), the 128 values in L1 across the records (``k0``, ``k1``, ``c``,
    ``decay``: per record). Measured variants: bench/NOTES.md, section 9."""
    nrec = c.shape[0]
    plus = np.empty(nrec, np.float64)
    minus = np.empty(nrec, np.float64)
    for r in range(nrec):
        plus[r] = 0.0 + c[r]
        minus[r] = 0.0 + (-c[r])
    shift = np.arange(32).astype(np.uint32)
    same = src.ctypes.data == dst.ctypes.data
    for i in range(dst.shape[0] // 128):
        cnt = np.uint64(start // 128 + i)
        lo = cnt & _U64_MASK
        hi = cnt >> _U64_32
        if not same:
            s = src[128 * i : 128 * i + 128]
            o = dst[128 * i : 128 * i + 128]
            for j in range(128):
                o[j] = s[j]
        for r in range(nrec):
            x0, x1, x2, x3 = _philox(lo, hi, np.uint64(0), np.uint64(0), np.uint64(k0[r]), np.uint64(k1[r]))
            p = plus[r]
            m = minus[r]
            d = decay[r]
            for wi in range(4):
                word = np.uint32(x0) if wi == 0 else np.uint32(x1) if wi == 1 else np.uint32(x2) if wi == 2 else np.uint32(x3)
                v = dst[128 * i + 32 * wi : 128 * i + 32 * wi + 32]
                for bit in range(32):
                    cz = p if ((word >> shift[bit]) & np.uint32(1)) == 0 else m
                    x = np.float64(v[bit])
                    v[bit] = np.float32(x - (cz + d * x))
        if kind:
            _write_served(dst[128 * i : 128 * i + 128], served[128 * i : 128 * i + 128], kind)


@njit(nogil=True, cache=True)
def replay_perturb_kernel(clean, out, pcoefs, start, pk0, pk1, gaussian, keys, coefs, rec_start, decay, kind):  # noqa: ANN001, ANN201
    """out[r] = float32(x + pcoefs[r] * z(pk)) with x = the records replayed on clean (float32) and rounded
    to the served dtype ``kind`` (0 float32: no rounding); with no pcoefs, out[0] = x itself."""
    words = np.empty(_SCRATCH + 2 * _ALIGN, np.uint32)
    zbuf = np.empty(_SCRATCH + 2 * _ALIGN, np.float32)
    acc = np.empty(_SCRATCH + 2 * _ALIGN, np.float64)
    x = np.empty(_SCRATCH, np.float32)
    for off in range(0, clean.shape[0], _SCRATCH):
        n = min(_SCRATCH, clean.shape[0] - off)
        v = x[:n]
        s = clean[off : off + n]
        for j in range(n):
            v[j] = s[j]
        _apply_records(v, acc, words, zbuf, start + off, n, keys, coefs, rec_start, decay, gaussian)
        _round_served(v, kind)
        if pcoefs.shape[0] == 0:
            o = out[0, off : off + n]
            for j in range(n):
                o[j] = v[j]
            continue
        base = _z_chunk(gaussian, start + off, n, np.uint64(pk0), np.uint64(pk1), words, zbuf)
        _perturb_rows(v, zbuf[base : base + n], pcoefs, out, off, n)
