"""The numba kernels under the perturbation generator (``distzo/zo/generator.py``, which documents
the algorithm) and the optimizers' fused updates (``distzo/zo/optim.py``): Philox4x32-10, z chunks of
either distribution, and the fused perturb and update passes, with their constants.

Nothing here checks its arguments: the callers (generator.py, optim.py) validate seeds, offsets
and sizes and split the work over threads in ``_ALIGN``-aligned chunks.
"""

from __future__ import annotations

import math

import numpy as np
from llvmlite import ir
from numba import njit, types
from numba.core.extending import intrinsic

from distzo.zo import kernelcache
from distzo.zo.served import bf16_bits, f16_bits
from distzo.zo.threads import ALIGN

kernelcache.install()  # before the first @njit(cache=True): caches keyed by every kernel module's source


# ----------------------------------------------------------------------------- constants
_M0, _M1 = 0xD2511F53, 0xCD9E8D57  # Philox multipliers
_W0, _W1 = 0x9E3779B9, 0xBB67AE85  # Weyl key increments
_MASK32 = 0xFFFFFFFF
_LN2 = math.log(2.0)
_SQRT_HALF = math.sqrt(0.5)
_TWO_PI_OVER_2_32 = 2.0 * math.pi / 2.0**32
_HALF_QUADRANT = 536870912.0  # 2^29
# Polynomials sized for float32 output (truncation error < 3e-9 relative, far below float32's 6e-8):
# ln(m) = 2*atanh(s) = 2s * sum_k s^(2k)/(2k+1) with |s| <= 0.1716; sin, cos Taylor on [-pi/4, pi/4].
_ATANH = tuple(1.0 / (2 * k + 1) for k in range(6))
_SIN = tuple((-1) ** k / math.factorial(2 * k + 1) for k in range(6))
_COS = tuple((-1) ** k / math.factorial(2 * k) for k in range(7))
_MAGIC_U32 = 0x4330000000000000  # bits of 2^52: OR a u32 into the mantissa, subtract 2^52
_TWO_52 = 4503599627370496.0

_U64_M0, _U64_M1 = np.uint64(_M0), np.uint64(_M1)
_U64_W0, _U64_W1 = np.uint64(_W0), np.uint64(_W1)
_U64_MASK = np.uint64(_MASK32)
_U64_32 = np.uint64(32)

_SCRATCH = 4096  # elements generated per inner chunk (multiple of 128)
_ALIGN = ALIGN  # thread chunks start on Philox-call boundaries of both distributions (threads.py splits so)


# ----------------------------------------------------------------------------- numba kernels
@intrinsic
def _f64_bits(typingctx, x):  # noqa: ANN001 - numba intrinsic signature
    if x != types.float64:
        return None

    def codegen(context, builder, signature, args):  # noqa: ANN001
        return builder.bitcast(args[0], ir.IntType(64))

    return types.int64(types.float64), codegen


@intrinsic
def _bits_f64(typingctx, x):  # noqa: ANN001
    if x != types.int64:
        return None

    def codegen(context, builder, signature, args):  # noqa: ANN001
        return builder.bitcast(args[0], ir.DoubleType())

    return types.float64(types.int64), codegen


@njit(inline="always", cache=True)
def _philox(c0, c1, c2, c3, k0, k1):  # noqa: ANN001, ANN202
    for _ in range(10):
        p0 = _U64_M0 * c0
        p1 = _U64_M1 * c2
        c0, c1, c2, c3 = (p1 >> _U64_32) ^ c1 ^ k0, p1 & _U64_MASK, (p0 >> _U64_32) ^ c3 ^ k1, p0 & _U64_MASK
        k0 = (k0 + _U64_W0) & _U64_MASK
        k1 = (k1 + _U64_W1) & _U64_MASK
    return c0, c1, c2, c3


@njit(nogil=True, cache=True)
def _philox_block(c0, c1, c2, c3, k0, k1):  # noqa: ANN001, ANN202
    return _philox(np.uint64(c0), np.uint64(c1), np.uint64(c2), np.uint64(c3), np.uint64(k0), np.uint64(k1))


@njit(nogil=True, cache=True)
def _philox_words(words, first_counter, k0, k1):  # noqa: ANN001, ANN202
    for i in range(words.shape[0] // 4):
        cnt = first_counter + np.uint64(i)
        x0, x1, x2, x3 = _philox(cnt & _U64_MASK, cnt >> _U64_32, np.uint64(0), np.uint64(0), k0, k1)
        words[4 * i] = np.uint32(x0)
        words[4 * i + 1] = np.uint32(x1)
        words[4 * i + 2] = np.uint32(x2)
        words[4 * i + 3] = np.uint32(x3)


@njit(inline="always", cache=True)
def _u32_to_f64(x):  # noqa: ANN001, ANN202
    return _bits_f64(np.int64(x) | _MAGIC_U32) - _TWO_52


@njit(nogil=True, cache=True, error_model="numpy")
def _box_muller(words, z):  # noqa: ANN001, ANN202
    # error_model="numpy" drops numba's ZeroDivisionError branch so the loop vectorizes
    for k in range(z.shape[0] // 2):
        x0 = words[2 * k]
        x1 = words[2 * k + 1]
        # ln((x0 + 1) / 2^32): split v = m * 2^e exactly via the float64 bits, m in [sqrt(1/2), sqrt(2))
        b = _f64_bits(_u32_to_f64(x0) + 1.0)
        e = ((b >> 52) & 0x7FF) - 1022
        m = _bits_f64((b & 0xFFFFFFFFFFFFF) | (1022 << 52))
        small = np.int64(m < _SQRT_HALF)
        m = m * (1.0 + np.float64(small))
        e = e - small
        s = (m - 1.0) / (m + 1.0)
        t = s * s
        p = _ATANH[5]
        p = p * t + _ATANH[4]
        p = p * t + _ATANH[3]
        p = p * t + _ATANH[2]
        p = p * t + _ATANH[1]
        p = p * t + _ATANH[0]
        ln = np.float64(e - 32) * _LN2 + 2.0 * s * p
        r = math.sqrt(-2.0 * ln)
        q = np.int64(x1 >> np.uint32(30))
        phi = (_u32_to_f64(x1 & np.uint32(0x3FFFFFFF)) - _HALF_QUADRANT) * _TWO_PI_OVER_2_32
        f = phi * phi
        sn = _SIN[5]
        sn = sn * f + _SIN[4]
        sn = sn * f + _SIN[3]
        sn = sn * f + _SIN[2]
        sn = sn * f + _SIN[1]
        sn = sn * f + _SIN[0]
        sn = sn * phi
        cs = _COS[6]
        cs = cs * f + _COS[5]
        cs = cs * f + _COS[4]
        cs = cs * f + _COS[3]
        cs = cs * f + _COS[2]
        cs = cs * f + _COS[1]
        cs = cs * f + _COS[0]
        # rotate by q quadrants with bit selects and sign flips (exact, branch-free)
        odd = -(q & 1)
        bs = _f64_bits(sn)
        bc = _f64_bits(cs)
        first = (bs & odd) | (bc & ~odd)
        second = (bc & odd) | (bs & ~odd)
        z[2 * k] = np.float32(r * _bits_f64(first ^ ((((q + 1) >> 1) & 1) << 63)))
        z[2 * k + 1] = np.float32(r * _bits_f64(second ^ ((q >> 1) << 63)))


@njit(nogil=True, cache=True)
def _rademacher_expand(words, z):  # noqa: ANN001, ANN202
    for wi in range(words.shape[0]):
        x = words[wi]
        for bit in range(32):
            z[32 * wi + bit] = np.float32(1.0) - np.float32(2.0) * np.float32((x >> np.uint32(bit)) & np.uint32(1))


@njit(inline="always", cache=True)
def _z_chunk(gaussian, start, n, k0, k1, words, zbuf):  # noqa: ANN001, ANN202
    """Fill zbuf with z for the aligned range covering [start, start+n); return start's index in it."""
    if gaussian:
        c_first = start >> 2
        c_last = (start + n + 3) >> 2
        count = 4 * (c_last - c_first)
        _philox_words(words[:count], np.uint64(c_first), k0, k1)
        _box_muller(words[:count], zbuf[:count])
        return start - 4 * c_first
    c_first = start >> 7
    c_last = (start + n + 127) >> 7
    count = 128 * (c_last - c_first)
    _philox_words(words[: count // 32], np.uint64(c_first), k0, k1)
    _rademacher_expand(words[: count // 32], zbuf[:count])
    return start - 128 * c_first


@njit(nogil=True, cache=True)
def _fill_kernel(out, start, k0, k1, gaussian):  # noqa: ANN001, ANN202
    words = np.empty(_SCRATCH + 2 * _ALIGN, np.uint32)
    zbuf = np.empty(_SCRATCH + 2 * _ALIGN, np.float32)
    for off in range(0, out.shape[0], _SCRATCH):
        n = min(_SCRATCH, out.shape[0] - off)
        base = _z_chunk(gaussian, start + off, n, np.uint64(k0), np.uint64(k1), words, zbuf)
        # explicit views: LLVM vectorizes these loops, not the offset-indexed form
        o = out[off : off + n]
        z = zbuf[base : base + n]
        for j in range(n):
            o[j] = z[j]


@njit(inline="always", cache=True)
def _perturb_rows(x, z, coefs, out, off, n):  # noqa: ANN001, ANN202
    # out[r, off + j] = float32(x[j] + coefs[r] * z[j]) for each coefficient r: one rounding, float64 inside
    for r in range(coefs.shape[0]):
        c = coefs[r]
        o = out[r, off : off + n]
        for j in range(n):
            o[j] = np.float32(np.float64(x[j]) + c * np.float64(z[j]))


@njit(nogil=True, cache=True)
def _perturb_kernel(clean, out, coefs, start, k0, k1, gaussian):  # noqa: ANN001, ANN202
    # out[r, j] = float32(clean[j] + coefs[r] * z[start + j]) for each requested coefficient r
    words = np.empty(_SCRATCH + 2 * _ALIGN, np.uint32)
    zbuf = np.empty(_SCRATCH + 2 * _ALIGN, np.float32)
    for off in range(0, clean.shape[0], _SCRATCH):
        n = min(_SCRATCH, clean.shape[0] - off)
        base = _z_chunk(gaussian, start + off, n, np.uint64(k0), np.uint64(k1), words, zbuf)
        _perturb_rows(clean[off : off + n], zbuf[base : base + n], coefs, out, off, n)


@njit(inline="always", cache=True)
def _write_served(v, s, kind):  # noqa: ANN001, ANN202
    # the served 16-bit copy of freshly updated (cache-resident) values: same pass over memory
    if kind == 1:
        for j in range(v.shape[0]):
            s[j] = bf16_bits(v[j])
    elif kind == 2:
        for j in range(v.shape[0]):
            s[j] = f16_bits(v[j])


@njit(inline="always", cache=True)
def _projected_sum(acc, words, zbuf, start, n, keys, coefs, gaussian):  # noqa: ANN001, ANN202
    """The projected-gradient sum of one chunk, for the update kernels (here and ``optim.py``):
    ``acc[base + j] = sum_r coefs[r] * z_r[start + j]`` for j in [0, n), float64, the directions in
    order and the sum starting from 0.0 (kept explicit: it decides the sign of a zero sum); returns
    ``base``. ``keys`` [q, 2] uint64 Philox keys, ``coefs`` [q] float64; ``words``, ``zbuf``, ``acc``:
    scratch of ``n + 2 * _ALIGN`` or more (uint32, float32, float64)."""
    if gaussian:
        a = acc[:n]
        for j in range(n):
            a[j] = 0.0
        for r in range(coefs.shape[0]):
            zb = _z_chunk(True, start, n, keys[r, 0], keys[r, 1], words, zbuf)
            c = coefs[r]
            z = zbuf[zb : zb + n]
            for j in range(n):
                a[j] = a[j] + c * np.float64(z[j])
        return 0
    # Rademacher: c * z is +-c exactly, so build the signed sum straight from the bits
    c_first = start >> 7
    c_last = (start + n + 127) >> 7
    nwords = 4 * (c_last - c_first)
    base = start - 128 * c_first
    for r in range(coefs.shape[0]):
        _philox_words(words[:nwords], np.uint64(c_first), keys[r, 0], keys[r, 1])
        c = coefs[r]
        for wi in range(nwords):
            x = words[wi]
            a = acc[32 * wi : 32 * wi + 32]
            if r == 0:
                for bit in range(32):
                    a[bit] = 0.0 + c * (1.0 - 2.0 * np.float64((x >> np.uint32(bit)) & np.uint32(1)))
            else:
                for bit in range(32):
                    a[bit] = a[bit] + c * (1.0 - 2.0 * np.float64((x >> np.uint32(bit)) & np.uint32(1)))
    if coefs.shape[0] == 0:
        a = acc[base : base + n]
        for j in range(n):
            a[j] = 0.0
    return base


@njit(nogil=True, cache=True)
def _update_kernel(w, start, keys, coefs, decay, gaussian, served, kind):  # noqa: ANN001, ANN202
    # w[j] = float32(w[j] - (sum_r coefs[r] * z_r[start + j] + decay * w[j])), the sum from
    # _projected_sum; with kind 1/2 also served[j] = bf16/fp16 bits of the new w[j] (served.py's rounding)
    words = np.empty(_SCRATCH + 2 * _ALIGN, np.uint32)
    zbuf = np.empty(_SCRATCH + 2 * _ALIGN, np.float32)
    acc = np.empty(_SCRATCH + 2 * _ALIGN, np.float64)
    for off in range(0, w.shape[0], _SCRATCH):
        n = min(_SCRATCH, w.shape[0] - off)
        base = _projected_sum(acc, words, zbuf, start + off, n, keys, coefs, gaussian)
        v = w[off : off + n]
        a = acc[base : base + n]
        for j in range(n):
            x = np.float64(v[j])
            v[j] = np.float32(x - (a[j] + decay * x))
        if kind:
            _write_served(v, served[off : off + n], kind)


@njit(nogil=True, cache=True)
def _rademacher_update_aligned(w, start, k0, k1, c, decay, served, kind):  # noqa: ANN001, ANN202
    # one direction, start and length multiples of 128: the same float64 operations as
    # _update_kernel (x - ((0.0 + c*z) + decay*x)), fused into a single pass over w; c*z is
    # selected as +c or -c (exactly c * (+-1), signed zeros included). With kind 1/2 the served
    # copy of each 128 new values is written while they are in L1 (a separate 128-wide loop
    # vectorizes; interleaving it with the update did not)
    for i in range(w.shape[0] // 128):
        cnt = np.uint64(start // 128 + i)
        x0, x1, x2, x3 = _philox(cnt & _U64_MASK, cnt >> _U64_32, np.uint64(0), np.uint64(0), np.uint64(k0), np.uint64(k1))
        for wi in range(4):
            word = np.uint32(x0) if wi == 0 else np.uint32(x1) if wi == 1 else np.uint32(x2) if wi == 2 else np.uint32(x3)
            v = w[128 * i + 32 * wi : 128 * i + 32 * wi + 32]
            for bit in range(32):
                cz = c if ((word >> np.uint32(bit)) & np.uint32(1)) == 0 else -c
                x = np.float64(v[bit])
                v[bit] = np.float32(x - ((0.0 + cz) + decay * x))
        if kind:
            _write_served(w[128 * i : 128 * i + 128], served[128 * i : 128 * i + 128], kind)
