"""The generator's GPU kernels (Triton): Rademacher perturbation and update in one pass each.

The torch path in ``generator.py`` builds z with dozens of int64 tensor ops per element and
runs at well under 1% of the GPU's memory bandwidth; these kernels compute Philox4x32-10 in
registers and touch each weight once. Same counter layout, same float64 operations and
roundings as the CPU kernels (fused multiply-add is turned off), so the bits are the CPU's.
Each element recomputes its counter's Philox block (128 elements share one): integer work
is cheap next to the memory traffic.

Used for CUDA tensors when Triton is importable; the tests also run these kernels in Triton's
CPU interpreter (``TRITON_INTERPRET=1``) against the CPU bits.
"""

from __future__ import annotations

from typing import Sequence

import torch
import triton
import triton.language as tl

BLOCK = 1024


@triton.jit
def _philox_word(counter, k0, k1, word):
    # Philox4x32-10 on (counter lo, counter hi, 0, 0) with key (k0, k1), in uint64 lanes
    # masked to 32 bits (as the torch path); returns word `word` (0..3) of the output.
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
    return tl.where(word == 0, c0, tl.where(word == 1, c1, tl.where(word == 2, c2, c3)))


@triton.jit
def _rademacher_z(g, k0, k1):
    # z in {+1, -1} for global element indices g (uint64): bit (g % 32) of word (g / 32 % 4)
    # of Philox block g / 128
    w = _philox_word(g >> 7, k0, k1, (g >> 5) & 3)
    return 1.0 - 2.0 * ((w >> (g & 31)) & 1).to(tl.float64)


@triton.jit
def _perturb_kernel(clean_ptr, out_ptr, coefs_ptr, n, offset, k0, k1,
                    NC: tl.constexpr, OUT_F32: tl.constexpr, BLOCK: tl.constexpr):
    idx = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = idx < n
    z = _rademacher_z((idx + offset).to(tl.uint64), k0.to(tl.uint64), k1.to(tl.uint64))
    x = tl.load(clean_ptr + idx, mask=mask).to(tl.float32).to(tl.float64)
    for c in tl.static_range(NC):
        y = (x + z * tl.load(coefs_ptr + c)).to(tl.float32)  # rounded once to fp32, as on the CPU
        if OUT_F32:
            tl.store(out_ptr + c * n + idx, y, mask=mask)
        else:
            tl.store(out_ptr + c * n + idx, y.to(out_ptr.dtype.element_ty, fp_downcast_rounding="rtne"), mask=mask)


@triton.jit
def _update_kernel(w_ptr, keys_ptr, coefs_ptr, decay_ptr, n, offset, NS: tl.constexpr, BLOCK: tl.constexpr):
    idx = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = idx < n
    g = (idx + offset).to(tl.uint64)
    acc = tl.zeros([BLOCK], dtype=tl.float64)
    for s in tl.static_range(NS):
        z = _rademacher_z(g, tl.load(keys_ptr + 2 * s).to(tl.uint64), tl.load(keys_ptr + 2 * s + 1).to(tl.uint64))
        acc = acc + z * tl.load(coefs_ptr + s)
    x = tl.load(w_ptr + idx, mask=mask).to(tl.float64)
    tl.store(w_ptr + idx, (x - (acc + x * tl.load(decay_ptr))).to(tl.float32), mask=mask)


def _grid(n: int) -> tuple[int]:
    return (triton.cdiv(n, BLOCK),)


def rademacher_perturb(clean: torch.Tensor, offset: int, key: tuple[int, int], coefs: Sequence[float],
                       out_dtype: torch.dtype) -> list[torch.Tensor]:
    """``out_dtype(float32(clean + coef * z))`` for each coefficient, z generated once."""
    n = clean.numel()
    out = torch.empty((len(coefs), n), dtype=out_dtype, device=clean.device)
    c = torch.tensor(list(coefs), dtype=torch.float64, device=clean.device)
    if n:
        _perturb_kernel[_grid(n)](clean.contiguous(), out, c, n, offset, key[0], key[1], NC=len(coefs),
                                  OUT_F32=out_dtype == torch.float32, BLOCK=BLOCK, enable_fp_fusion=False)
    return list(out.unbind(0))


def rademacher_update(w: torch.Tensor, offset: int, keys: Sequence[tuple[int, int]], coefs: Sequence[float],
                      decay: float) -> None:
    """In place: ``w = float32(w - (sum_j coef_j z_j + decay * w))``, float64 inside."""
    n = w.numel()
    if not n:
        return
    k = torch.tensor([x for key in keys for x in key], dtype=torch.int64, device=w.device)
    c = torch.tensor(list(coefs), dtype=torch.float64, device=w.device)
    d = torch.tensor([float(decay)], dtype=torch.float64, device=w.device)
    _update_kernel[_grid(n)](w, k, c, d, n, offset, NS=len(keys), BLOCK=BLOCK, enable_fp_fusion=False)
