"""The served copy's rounding: fp32 master -> bfloat16 / float16 bits, one definition for every path.

The parameter server keeps an fp32 master and may serve a 16-bit copy (``server.served_dtype``).
The copy is IEEE round-to-nearest-even of each fp32 value, computed with integer operations on
the bits so that the CPU kernels here (numba, also inlined into the fused update of
``generator.py``), the Triton kernels of ``generator_cuda.py`` and Triton's CPU interpreter all
give the same bits:

* **bfloat16**: ``(u + 0x7FFF + ((u >> 16) & 1)) >> 16`` on the fp32 bits ``u``; NaN -> ``0x7FC0``
  (c10's ``round_to_nearest_even``).
* **float16**: rebias the exponent and round the 13 dropped mantissa bits to nearest even;
  values from 65520 up overflow to infinity; below 2^-14 the subnormal result comes from one
  float32 addition of 0.5 (its ulp is 2^-24, the half subnormal step: one exact RNE rounding);
  NaN -> sign | ``0x7E00`` (c10's ``fp16_ieee_from_fp32_value``).

For every non-NaN input these are the bits of ``torch.Tensor.to`` (tests check it over all
exponents); torch's own NaN results differ between its scalar and vectorized CPU paths, ours do not.
Used by the server's update (``mezo.apply_update(..., served=...)``), by ``BlockStore.set_block``
and by the reference's ``MemoryFeed``, so a worker and the reference see the same bytes.
"""

from __future__ import annotations

import numpy as np
import torch
from llvmlite import ir
from numba import njit, types
from numba.core.extending import intrinsic

from distzo.zo import kernelcache
from distzo.zo.threads import run_split

kernelcache.install()  # before the first @njit(cache=True): caches keyed by every kernel module's source

SERVED_KIND = {"float32": 0, "bfloat16": 1, "float16": 2}  # the kernels' integer code
_TORCH = {"bfloat16": torch.bfloat16, "float16": torch.float16}


@intrinsic
def _f32_bits(typingctx, x):  # noqa: ANN001 - numba intrinsic: the uint32 bits of a float32
    if x != types.float32:
        return None

    def codegen(context, builder, signature, args):  # noqa: ANN001
        return builder.bitcast(args[0], ir.IntType(32))

    return types.uint32(types.float32), codegen


@njit(inline="always", cache=True)
def bf16_bits(x):  # noqa: ANN001, ANN201 - float32 -> bfloat16 bits (uint16)
    u = _f32_bits(x)
    if (u & np.uint32(0x7FFFFFFF)) > np.uint32(0x7F800000):
        return np.uint16(0x7FC0)
    return np.uint16((u + np.uint32(0x7FFF) + ((u >> np.uint32(16)) & np.uint32(1))) >> np.uint32(16))


@intrinsic
def _f16_rne_bits(typingctx, x):  # noqa: ANN001 - numba intrinsic: float32 -> float16 (IEEE RNE) bits
    if x != types.float32:
        return None

    def codegen(context, builder, signature, args):  # noqa: ANN001
        # LLVM's fptrunc is IEEE round-to-nearest-even, subnormals and overflow to infinity included;
        # on x86 with F16C it is one vcvtps2ph per 8 values (a branchy integer version ran 3x slower
        # than the bfloat16 cast and bound the fp16-served step); without F16C, compiler-rt's exact
        # routine.
        return builder.bitcast(builder.fptrunc(args[0], ir.HalfType()), ir.IntType(16))

    return types.uint16(types.float32), codegen


@njit(inline="always", cache=True)
def f16_bits(x):  # noqa: ANN001, ANN201 - float32 -> float16 bits (uint16)
    u = _f32_bits(x)
    if (u & np.uint32(0x7FFFFFFF)) > np.uint32(0x7F800000):  # NaN: one canonical quiet NaN, sign kept
        return np.uint16(((u >> np.uint32(16)) & np.uint32(0x8000)) | np.uint32(0x7E00))
    return _f16_rne_bits(x)


@njit(nogil=True, cache=True)
def cast_kernel(src, out, kind):  # noqa: ANN001, ANN201 - fp32 array -> uint16 served bits
    if kind == 1:
        for j in range(src.shape[0]):
            out[j] = bf16_bits(src[j])
    else:
        for j in range(src.shape[0]):
            out[j] = f16_bits(src[j])


def served_kind(served_dtype: str) -> int:
    """The kernels' code for a served dtype (0: float32, no copy; 1: bfloat16; 2: float16)."""
    try:
        return SERVED_KIND[served_dtype]
    except KeyError:
        raise ValueError(f"served dtype {served_dtype!r}: expected one of {', '.join(SERVED_KIND)}") from None


def cast_into(master: np.ndarray, served_dtype: str, out: np.ndarray) -> None:
    """Write the served bits of the fp32 array ``master`` into ``out`` (uint16 of the same length, or uint8 of
    twice it), split over the generator's CPU threads."""
    kind = served_kind(served_dtype)
    if kind == 0:
        raise ValueError("a float32 served copy is the master itself: nothing to cast")
    if master.dtype != np.float32 or master.ndim != 1:
        raise TypeError("cast_into expects a 1-D float32 master")
    bits = out.view(np.uint16) if out.dtype == np.uint8 else out
    if bits.dtype != np.uint16 or bits.shape != master.shape:
        raise TypeError(f"served output must be uint16 of shape {master.shape}, got {out.dtype} {out.shape}")
    run_split(lambda a, b: cast_kernel(master[a:b], bits[a:b], kind), master.shape[0], 0)


def to_served(master: torch.Tensor, served_dtype: str) -> torch.Tensor:
    """The served copy of an fp32 tensor as a tensor of the served dtype (float32: the tensor itself).

    CPU: ``cast_into``. CUDA: torch's cast, the same round-to-nearest-even (identical bits for every
    non-NaN value; GPU-only, the reference's resident mode)."""
    if served_dtype == "float32":
        return master
    if master.device.type != "cpu":
        return master.to(_TORCH[served_dtype])  # GPU-only
    src = master.contiguous().reshape(-1)
    out = torch.empty(src.shape[0], dtype=torch.int16)
    cast_into(src.numpy(), served_dtype, out.numpy().view(np.uint16))
    return out.view(_TORCH[served_dtype]).reshape(master.shape)
