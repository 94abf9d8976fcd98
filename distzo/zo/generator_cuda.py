"""The generator's GPU kernels (Triton): perturbation and update in one pass each, both distributions.

Same algorithm, counter layout, float64 operations and roundings as the CPU kernels of
``generator.py`` (fused multiply-add turned off; float64 constants loaded from memory, since
Triton types a float literal as float32), so the bits are the CPU's. Each program works on
whole Philox counters and generates each Philox output **once**: a Rademacher tile is
``[R counters, 128 elements]`` (one Philox call feeds 128 elements), a Gaussian tile
``[R counters, 4 elements]`` (one call feeds two Box-Muller pairs). Global element ``g`` of
counter ``c`` is ``128c + j`` (or ``4c + j``); elements outside ``[offset, offset + n)`` are masked.

16-bit outputs (perturbed copies in bf16/fp16, the served copy an update can write) are
rounded with ``served.py``'s integer formula, so Triton's CPU interpreter (``TRITON_INTERPRET=1``,
used by the tests) gives the GPU's bits too.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch
import triton
import triton.language as tl

from distzo.zo import zkernels as zk  # the Box-Muller constants, the same as the CPU kernels'

R_RADEMACHER = 8  # counters per program: 1024 elements
R_GAUSSIAN = 256  # counters per program: 1024 elements
_CONSTS: dict[torch.device, torch.Tensor] = {}
# float64 constants of the Box-Muller path, in this order (indices used in the kernels)
_CONST_VALUES = [*zk._ATANH, *zk._SIN, *zk._COS, zk._LN2, zk._SQRT_HALF, zk._TWO_PI_OVER_2_32]  # 6 + 6 + 7 + 3
_OUT_KIND = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}


@triton.jit
def _philox4(counter, k0, k1):
    # Philox4x32-10 on (counter lo, counter hi, 0, 0), key (k0, k1), in uint64 lanes masked to 32 bits
    c0 = counter & 0xFFFFFFFF
    c1 = counter >> 32
    c2 = tl.zeros_like(counter)
    c3 = tl.zeros_like(counter)
    for _ in tl.static_range(10):
        p0 = c0 * 0xD2511F53
        p1 = c2 * 0xCD9E8D57
        n0 = (p1 >> 32) ^ c1 ^ k0
        n2 = (p0 >> 32) ^ c3 ^ k1
        c1 = p1 & 0xFFFFFFFF
        c3 = p0 & 0xFFFFFFFF
        c0 = n0
        c2 = n2
        k0 = (k0 + 0x9E3779B9) & 0xFFFFFFFF
        k1 = (k1 + 0xBB67AE85) & 0xFFFFFFFF
    return c0, c1, c2, c3


@triton.jit
def _rademacher_tile(c_first, k0, k1, R: tl.constexpr):
    # z for the [R, 128] elements of counters c_first .. c_first + R - 1 (uint64 counters)
    cnt = c_first + tl.arange(0, R).to(tl.uint64)
    x0, x1, x2, x3 = _philox4(cnt, k0, k1)
    col = tl.arange(0, 128)[None, :]
    sel = col >> 5
    w = tl.where(sel == 0, x0[:, None], tl.where(sel == 1, x1[:, None], tl.where(sel == 2, x2[:, None], x3[:, None])))
    z = 1.0 - 2.0 * ((w >> (col & 31).to(tl.uint64)) & 1).to(tl.float64)
    gidx = cnt[:, None].to(tl.int64) * 128 + col
    return gidx, z


@triton.jit
def _horner(consts_ptr, FIRST: tl.constexpr, COUNT: tl.constexpr, x):
    acc = tl.load(consts_ptr + FIRST + COUNT - 1) + tl.zeros_like(x)
    for i in tl.static_range(COUNT - 1):
        acc = acc * x
        acc = acc + tl.load(consts_ptr + FIRST + COUNT - 2 - i)
    return acc


@triton.jit
def _u32_to_f64(x):
    return (x.to(tl.int64) | 0x4330000000000000).to(tl.float64, bitcast=True) - 4503599627370496.0


@triton.jit
def _box_muller(a, b, consts_ptr):
    # (a, b) Philox words -> (first, second) float32, the CPU's _box_muller operation by operation
    bits = (_u32_to_f64(a) + 1.0).to(tl.int64, bitcast=True)
    e = ((bits >> 52) & 0x7FF) - 1022
    m = ((bits & 0xFFFFFFFFFFFFF) | 0x3FE0000000000000).to(tl.float64, bitcast=True)  # exponent of 0.5
    small = m < tl.load(consts_ptr + 20)
    m = m * tl.where(small, 2.0, 1.0).to(tl.float64)
    e = e - small.to(tl.int64)
    s = (m - 1.0) / (m + 1.0)  # float64 division and sqrt lower to the IEEE-rounded div.rn.f64 / sqrt.rn.f64
    p = _horner(consts_ptr, 0, 6, s * s)
    ln = (e - 32).to(tl.float64) * tl.load(consts_ptr + 19) + (2.0 * s) * p
    r = tl.sqrt(-2.0 * ln)
    q = (b >> 30).to(tl.int64)
    phi = (_u32_to_f64(b & 0x3FFFFFFF) - 536870912.0) * tl.load(consts_ptr + 21)
    f = phi * phi
    sn = _horner(consts_ptr, 6, 6, f) * phi
    cs = _horner(consts_ptr, 12, 7, f)
    odd = (q & 1) == 1
    first = tl.where(odd, sn, cs)
    second = tl.where(odd, cs, sn)
    first = tl.where((((q + 1) >> 1) & 1) == 1, -first, first)  # negation is exact: the CPU's sign-bit flip
    second = tl.where((q >> 1) == 1, -second, second)
    return (r * first).to(tl.float32), (r * second).to(tl.float32)


@triton.jit
def _gaussian_tile(c_first, k0, k1, consts_ptr, R: tl.constexpr):
    # z for the [R, 4] elements of counters c_first ..: pair (x0, x1) -> 4c, 4c+1; (x2, x3) -> 4c+2, 4c+3
    cnt = c_first + tl.arange(0, R).to(tl.uint64)
    x0, x1, x2, x3 = _philox4(cnt, k0, k1)
    pair = tl.arange(0, 2)[None, :]
    a = tl.where(pair == 0, x0[:, None], x2[:, None])
    b = tl.where(pair == 0, x1[:, None], x3[:, None])
    first, second = _box_muller(a, b, consts_ptr)
    z = tl.reshape(tl.join(first, second), (R, 4)).to(tl.float64)
    gidx = cnt[:, None].to(tl.int64) * 4 + tl.arange(0, 4)[None, :]
    return gidx, z


@triton.jit
def _z_tile(c_first, k0, k1, consts_ptr, GAUSSIAN: tl.constexpr, R: tl.constexpr):
    if GAUSSIAN:
        gidx, z = _gaussian_tile(c_first, k0, k1, consts_ptr, R)
    else:
        gidx, z = _rademacher_tile(c_first, k0, k1, R)
    return gidx, z


@triton.jit
def _bits16(y, KIND: tl.constexpr):
    # served.py's rounding of float32 y to bf16 (KIND 1) / fp16 (KIND 2) bits, as int16
    u = y.to(tl.uint32, bitcast=True)
    a = u & 0x7FFFFFFF
    nan = a > 0x7F800000
    if KIND == 1:
        h = tl.where(nan, 0x7FC0, (u + 0x7FFF + ((u >> 16) & 1)) >> 16)
    else:
        sign = (u >> 16) & 0x8000
        r = a - 0x38000000
        r = (r + 0x0FFF + ((r >> 13) & 1)) >> 13
        e = (a >> 23).to(tl.int32)
        mant = ((a & 0x7FFFFF) | 0x800000).to(tl.int64)
        shift = tl.maximum(tl.minimum(126 - e, 25), 1).to(tl.int64)  # only used below 2^-14, where it is 14..25
        sub = mant >> shift
        rem = mant & ((1 << shift) - 1)
        half = 1 << (shift - 1)
        sub = sub + ((rem > half) | ((rem == half) & ((sub & 1) == 1))).to(tl.int64)
        h = tl.where(a >= 0x38800000, r, sub.to(tl.uint32))
        h = tl.where(a >= 0x477FF000, 0x7C00, h)
        h = tl.where(nan, 0x7E00, h) | sign
    return h.to(tl.int32).to(tl.int16)


# integer arguments are not specialized: no recompilation for each block's size and alignment
@triton.jit(do_not_specialize=["n", "offset", "c_first", "k0", "k1"])
def _perturb_kernel(clean_ptr, out_ptr, coefs_ptr, consts_ptr, n, offset, c_first, k0, k1,
                    NC: tl.constexpr, OUT_KIND: tl.constexpr, GAUSSIAN: tl.constexpr, R: tl.constexpr):
    first = c_first.to(tl.uint64) + tl.program_id(0).to(tl.uint64) * R
    gidx, z = _z_tile(first, k0.to(tl.uint64), k1.to(tl.uint64), consts_ptr, GAUSSIAN, R)
    idx = gidx - offset
    mask = (idx >= 0) & (idx < n)
    x = tl.load(clean_ptr + idx, mask=mask, other=0.0).to(tl.float32).to(tl.float64)
    for c in tl.static_range(NC):
        y = (x + z * tl.load(coefs_ptr + c)).to(tl.float32)  # rounded once to fp32, as on the CPU
        if OUT_KIND == 0:
            tl.store(out_ptr + c * n + idx, y, mask=mask)
        else:
            tl.store(out_ptr + c * n + idx, _bits16(y, OUT_KIND), mask=mask)


@triton.jit(do_not_specialize=["n", "offset", "c_first"])
def _update_kernel(w_ptr, served_ptr, keys_ptr, coefs_ptr, decay_ptr, consts_ptr, n, offset, c_first,
                   NS: tl.constexpr, SERVED: tl.constexpr, GAUSSIAN: tl.constexpr, R: tl.constexpr):
    first = c_first.to(tl.uint64) + tl.program_id(0).to(tl.uint64) * R
    gidx, z = _z_tile(first, tl.load(keys_ptr).to(tl.uint64), tl.load(keys_ptr + 1).to(tl.uint64), consts_ptr, GAUSSIAN, R)
    acc = 0.0 + z * tl.load(coefs_ptr)  # the CPU's sum starts from 0.0 (it decides the sign of a zero sum)
    for s in tl.static_range(1, NS):
        gidx, z = _z_tile(first, tl.load(keys_ptr + 2 * s).to(tl.uint64), tl.load(keys_ptr + 2 * s + 1).to(tl.uint64),
                          consts_ptr, GAUSSIAN, R)
        acc = acc + z * tl.load(coefs_ptr + s)
    idx = gidx - offset
    mask = (idx >= 0) & (idx < n)
    x = tl.load(w_ptr + idx, mask=mask, other=0.0).to(tl.float64)
    y = (x - (acc + x * tl.load(decay_ptr))).to(tl.float32)
    tl.store(w_ptr + idx, y, mask=mask)
    if SERVED != 0:
        tl.store(served_ptr + idx, _bits16(y, SERVED), mask=mask)


@triton.jit(do_not_specialize=["n", "offset", "c_first", "k0", "k1", "nrec"])
def _replay_perturb_kernel(clean_ptr, out_ptr, coefs_ptr, consts_ptr, keys_ptr, rcoefs_ptr, rstart_ptr, decay_ptr,
                           n, offset, c_first, k0, k1, nrec,
                           NC: tl.constexpr, OUT_KIND: tl.constexpr, GAUSSIAN: tl.constexpr, R: tl.constexpr,
                           SERVED: tl.constexpr):
    # update windows: replay the pending records on the base tile (the CPU's window arithmetic: float64
    # inside, the sum over a record's directions from 0.0, one float32 rounding per record), then
    # perturb it; nothing but the base is read from memory and only the outputs are written
    first = c_first.to(tl.uint64) + tl.program_id(0).to(tl.uint64) * R
    gidx, z = _z_tile(first, k0.to(tl.uint64), k1.to(tl.uint64), consts_ptr, GAUSSIAN, R)
    idx = gidx - offset
    mask = (idx >= 0) & (idx < n)
    x = tl.load(clean_ptr + idx, mask=mask, other=0.0).to(tl.float32)
    for r in range(0, nrec):
        acc = tl.zeros_like(z)
        for d in range(tl.load(rstart_ptr + r), tl.load(rstart_ptr + r + 1)):
            _, zr = _z_tile(first, tl.load(keys_ptr + 2 * d).to(tl.uint64), tl.load(keys_ptr + 2 * d + 1).to(tl.uint64),
                            consts_ptr, GAUSSIAN, R)
            acc = acc + zr * tl.load(rcoefs_ptr + d)
        xd = x.to(tl.float64)
        x = (xd - (acc + xd * tl.load(decay_ptr + r))).to(tl.float32)
    if SERVED == 1:  # the served copy of the step's version, rebuilt: served.py's rounding, and back (exact)
        x = (_bits16(x, 1).to(tl.uint16).to(tl.uint32) << 16).to(tl.float32, bitcast=True)
    elif SERVED == 2:
        x = _bits16(x, 2).to(tl.float16, bitcast=True).to(tl.float32)
    if NC == 0:
        if OUT_KIND == 0:
            tl.store(out_ptr + idx, x, mask=mask)
        else:
            tl.store(out_ptr + idx, _bits16(x, OUT_KIND), mask=mask)
    for c in tl.static_range(NC):
        y = (x.to(tl.float64) + z * tl.load(coefs_ptr + c)).to(tl.float32)
        if OUT_KIND == 0:
            tl.store(out_ptr + c * n + idx, y, mask=mask)
        else:
            tl.store(out_ptr + c * n + idx, _bits16(y, OUT_KIND), mask=mask)


def _consts(device: torch.device) -> torch.Tensor:
    t = _CONSTS.get(device)
    if t is None:
        t = torch.tensor(_CONST_VALUES, dtype=torch.float64, device=device)
        _CONSTS[device] = t
    return t


def _layout(offset: int, n: int, gaussian: bool) -> tuple[int, int, tuple[int]]:
    """(first counter, counters per program, grid) covering elements [offset, offset + n)."""
    per, r = (4, R_GAUSSIAN) if gaussian else (128, R_RADEMACHER)
    c_first = offset // per
    c_last = -(-(offset + n) // per)
    return c_first, r, (triton.cdiv(c_last - c_first, r),)


def perturb(clean: torch.Tensor, offset: int, key: tuple[int, int], coefs: Sequence[float], out_dtype: torch.dtype,
            gaussian: bool) -> list[torch.Tensor]:
    """``out_dtype(float32(clean + coef * z))`` for each coefficient, z generated once per element."""
    n = clean.numel()
    out = torch.empty((len(coefs), n), dtype=out_dtype, device=clean.device)
    c = torch.tensor(list(coefs), dtype=torch.float64, device=clean.device)
    if n:
        kind = _OUT_KIND[out_dtype]
        c_first, r, grid = _layout(offset, n, gaussian)
        _perturb_kernel[grid](clean.contiguous(), out if kind == 0 else out.view(torch.int16), c, _consts(clean.device),
                              n, offset, c_first, key[0], key[1], NC=len(coefs), OUT_KIND=kind, GAUSSIAN=gaussian, R=r,
                              enable_fp_fusion=False)
    return list(out.unbind(0))


def replay_perturb(clean: torch.Tensor, offset: int, packed, key: tuple[int, int], coefs: Sequence[float],  # noqa: ANN001
                   out: torch.Tensor, gaussian: bool, served: int = 0) -> None:
    """``out[r] = out.dtype(float32(x + coefs[r] * z))`` with x = ``packed`` (``replay.PackedRecords``) replayed on
    ``clean`` ([n], float32 or 16-bit) and rounded to the served dtype ``served`` (0 float32, 1 bfloat16, 2
    float16); with no coefficient ``out[0]`` = x. ``out``: [max(1, len(coefs)), n], rows may be strided views
    (written through a contiguous buffer then)."""
    n = clean.numel()
    if not n:
        return
    dev = clean.device
    work = out if out.is_contiguous() else torch.empty(out.shape, dtype=out.dtype, device=dev)
    c = torch.tensor(list(coefs) or [0.0], dtype=torch.float64, device=dev)
    keys = torch.from_numpy(packed.keys.view(np.int64).reshape(-1).copy()).to(dev)
    rcoefs = torch.from_numpy(packed.coefs).to(dev)
    rstart = torch.from_numpy(packed.rec_start).to(dev)
    decay = torch.from_numpy(packed.decay).to(dev)
    kind = _OUT_KIND[out.dtype]
    c_first, r, grid = _layout(offset, n, gaussian)
    _replay_perturb_kernel[grid](clean.contiguous(), work if kind == 0 else work.view(torch.int16), c, _consts(dev), keys,
                                 rcoefs, rstart, decay, n, offset, c_first, key[0], key[1], packed.count,
                                 NC=len(coefs), OUT_KIND=kind, GAUSSIAN=gaussian, R=r, SERVED=served,
                                 enable_fp_fusion=False)
    if work is not out:
        out.copy_(work)


def update(w: torch.Tensor, offset: int, keys: Sequence[tuple[int, int]], coefs: Sequence[float], decay: float,
           gaussian: bool, served: torch.Tensor | None = None, served_kind: int = 0) -> None:
    """In place: ``w = float32(w - (sum_j coef_j z_j + decay * w))``, float64 inside; with ``served``
    (int16, w's length) and kind 1/2 also its bf16/fp16 bits, in the same pass."""
    n = w.numel()
    if not n:
        return
    k = torch.tensor([x for key in keys for x in key], dtype=torch.int64, device=w.device)
    c = torch.tensor(list(coefs), dtype=torch.float64, device=w.device)
    d = torch.tensor([float(decay)], dtype=torch.float64, device=w.device)
    c_first, r, grid = _layout(offset, n, gaussian)
    _update_kernel[grid](w, served if served is not None else w, k, c, d, _consts(w.device), n, offset, c_first,
                         NS=len(keys), SERVED=served_kind if served is not None else 0, GAUSSIAN=gaussian, R=r,
                         enable_fp_fusion=False)


def warm_up(device: torch.device, gaussian: bool, out_dtypes: Sequence[torch.dtype], directions: int = 1) -> None:
    """Compile (or load from Triton's cache) the variants a worker or trainer will launch, before the clock."""
    x = torch.zeros(300, dtype=torch.float32, device=device)
    for dt in out_dtypes:
        for nc in (1, 2):
            perturb(x, 5, (1, 2), [1e-3] * nc, dt, gaussian)
    served = torch.zeros(300, dtype=torch.int16, device=device)
    for ns in range(1, directions + 1):
        update(x, 5, [(1, 2)] * ns, [1e-3] * ns, 0.0, gaussian)
        for kind in (1, 2):
            update(x, 5, [(1, 2)] * ns, [1e-3] * ns, 0.0, gaussian, served, kind)
    torch.cuda.synchronize(device)
