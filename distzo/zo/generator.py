"""The perturbation generator: counter-based z(seed, index), identical on every device.

Algorithm (documented here because every service depends on it bit for bit):

* Random bits come from Philox4x32-10 (Salmon et al., SC'11; Random123 known-answer
  vectors are checked in the tests). The key is the 64-bit seed split into two 32-bit
  words ``(seed & 0xffffffff, seed >> 32)``; the counter is ``(c & 0xffffffff, c >> 32, 0, 0)``.
* **Rademacher**: element ``i`` uses counter ``c = i >> 7`` and bit ``i & 31`` of output
  word ``(i >> 5) & 3``; ``z = +1`` when the bit is 0, ``-1`` when it is 1.
* **Gaussian**: element ``i`` uses counter ``c = i >> 2``. Output words ``(x0, x1)`` feed
  elements ``4c`` and ``4c+1``, ``(x2, x3)`` feed ``4c+2`` and ``4c+3``, by Box-Muller:
  ``r = sqrt(-2 ln((x0 + 1) / 2^32))``, angle ``q*pi/2 + phi`` with quadrant ``q = x1 >> 30``
  and ``phi = ((x1 & 0x3fffffff) - 2^29) * 2pi / 2^32`` in ``[-pi/4, pi/4)``;
  ``z = (float32(r*cos), float32(r*sin))``. ``ln``, ``sin`` and ``cos`` are fixed polynomials
  evaluated in float64 with only IEEE-exact operations (+, -, *, /, sqrt, bit moves), in a
  fixed order and never fused, so the CPU kernels here and the torch path (CUDA) return the
  same bits; no libm call whose last bit could differ between machines.
* Every value is a pure function of ``(seed, i)``: any slice can be generated, perturbed or
  updated alone, in any order, on any device or thread count, with the same result.

The arithmetic built on z (also one rounding each, float64 inside):
* perturb: ``out = float32(theta + c * z)``
* update:  ``w = float32(w - (sum_j a_j * z_j + d * w))`` with directions applied in order.

The CPU path is numba-compiled (the kernels are in ``zkernels.py``; vectorized, GIL released) and split across
a thread pool in 128-aligned chunks (``threads.py``); the torch path runs on whatever device its tensors live on;
on CUDA, both distributions go through the fused Triton kernels of ``generator_cuda.py`` when Triton is installed.
"""

from __future__ import annotations

import functools
from enum import Enum
from typing import Sequence

import numpy as np
import torch

from distzo.zo.served import cast_kernel, served_kind, to_served
from distzo.zo.threads import cpu_threads, run_split, set_cpu_threads  # noqa: F401 - the CPU API's thread count
from distzo.zo.zkernels import (_ALIGN, _ATANH, _COS, _HALF_QUADRANT, _LN2, _M0, _M1, _MAGIC_U32, _MASK32, _SIN,
                             _SQRT_HALF, _TWO_52, _TWO_PI_OVER_2_32, _W0, _W1, _fill_kernel, _perturb_kernel,
                             _philox_block, _rademacher_update_aligned, _update_kernel)

SEED_LIMIT = 1 << 63  # seeds are non-negative int64 so they travel through protobuf/JSON unchanged


class Distribution(str, Enum):
    RADEMACHER = "rademacher"
    GAUSSIAN = "gaussian"


# ----------------------------------------------------------------------------- CPU API
def check_seed(seed: int) -> int:
    seed = int(seed)
    if not 0 <= seed < SEED_LIMIT:
        raise ValueError(f"seed {seed} is out of range: expected an integer in [0, 2^63)")
    return seed


def _key(seed: int) -> tuple[int, int]:
    seed = check_seed(seed)
    return seed & _MASK32, seed >> 32


def _check_offset(offset: int, n: int) -> None:
    if offset < 0 or offset + n > SEED_LIMIT:
        raise ValueError(f"element range [{offset}, {offset + n}) is outside [0, 2^63)")


def philox4x32_10(counter: Sequence[int], key: Sequence[int]) -> tuple[int, int, int, int]:
    """One Philox4x32-10 block (for known-answer tests and documentation)."""
    out = _philox_block(*[int(c) & _MASK32 for c in counter], *[int(k) & _MASK32 for k in key])
    return tuple(int(x) for x in out)  # type: ignore[return-value]


def fill_z(out: np.ndarray, seed: int, offset: int, dist: Distribution | str) -> np.ndarray:
    """Write z(seed, offset + j) into the float32 array ``out`` (CPU)."""
    if out.dtype != np.float32 or out.ndim != 1:
        raise TypeError("fill_z expects a 1-D float32 array")
    _check_offset(offset, out.shape[0])
    k0, k1 = _key(seed)
    gaussian = Distribution(dist) is Distribution.GAUSSIAN
    run_split(lambda a, b: _fill_kernel(out[a:b], offset + a, k0, k1, gaussian), out.shape[0], offset)
    return out


def perturb_cpu(
    clean: np.ndarray, offset: int, seed: int, dist: Distribution | str, coefs: Sequence[float], out: np.ndarray
) -> np.ndarray:
    """``out[r] = float32(clean + coefs[r] * z)`` for every coefficient, z generated once per chunk."""
    if clean.dtype != np.float32 or clean.ndim != 1:
        raise TypeError("perturb expects a 1-D float32 clean buffer")
    coef_arr = np.asarray(coefs, dtype=np.float64)
    if out.dtype != np.float32 or out.shape != (coef_arr.shape[0], clean.shape[0]):
        raise TypeError(f"perturb output must be float32 of shape {(coef_arr.shape[0], clean.shape[0])}")
    _check_offset(offset, clean.shape[0])
    k0, k1 = _key(seed)
    gaussian = Distribution(dist) is Distribution.GAUSSIAN
    run_split(
        lambda a, b: _perturb_kernel(clean[a:b], out[:, a:b], coef_arr, offset + a, k0, k1, gaussian),
        clean.shape[0],
        offset,
    )
    return out


_NO_SERVED = np.empty(0, np.uint16)


def update_args(w: np.ndarray, offset: int, seeds: Sequence[int], coefs: Sequence[float], dist: Distribution | str,
                served: np.ndarray | None, served_dtype: str) -> tuple[int, np.ndarray, np.ndarray, bool]:
    """The checked arguments of an update kernel (``update_cpu``, ``optim.update_stateful_cpu``): the
    served copy's kind (0: none), the Philox keys [len(seeds), 2] uint64, the coefficients as float64,
    and whether z is Gaussian. TypeError/ValueError for a wrong buffer, served copy, offset or count."""
    if w.dtype != np.float32 or w.ndim != 1:
        raise TypeError("update expects a 1-D float32 buffer")
    if len(seeds) != len(coefs):
        raise ValueError("one coefficient per seed")
    _check_offset(offset, w.shape[0])
    kind = served_kind(served_dtype) if served is not None else 0
    if kind and (served.dtype != np.uint16 or served.shape != w.shape):  # type: ignore[union-attr]
        raise TypeError(f"the served copy must be uint16 of shape {w.shape}")
    keys = np.array([_key(s) for s in seeds], dtype=np.uint64).reshape(len(seeds), 2)
    return kind, keys, np.asarray(coefs, dtype=np.float64), Distribution(dist) is Distribution.GAUSSIAN


def update_cpu(
    w: np.ndarray, offset: int, seeds: Sequence[int], coefs: Sequence[float], decay: float, dist: Distribution | str,
    served: np.ndarray | None = None, served_dtype: str = "float32",
) -> None:
    """In place: ``w = float32(w - (sum_r coefs[r] * z(seeds[r]) + decay * w))``.

    ``served`` (uint16, w's length) with ``served_dtype`` bfloat16/float16: also write the served copy
    of the new w (``served.py``'s rounding) in the same pass, so it costs no second trip through memory."""
    kind, keys, coef_arr, gaussian = update_args(w, offset, seeds, coefs, dist, served, served_dtype)
    out = served if kind else _NO_SERVED
    decay = float(decay)

    def part(a: int, b: int) -> np.ndarray:
        return out[a:b] if kind else out

    def piece(a: int, b: int) -> None:
        if gaussian or len(seeds) != 1:
            _update_kernel(w[a:b], offset + a, keys, coef_arr, decay, gaussian, part(a, b), kind)
            return
        # single Rademacher direction: fused pass over the 128-aligned interior
        lo = min(b, a + (-(offset + a)) % _ALIGN)
        hi = max(lo, b - (offset + b) % _ALIGN)
        if lo > a:
            _update_kernel(w[a:lo], offset + a, keys, coef_arr, decay, False, part(a, lo), kind)
        if hi > lo:
            _rademacher_update_aligned(w[lo:hi], offset + lo, int(keys[0, 0]), int(keys[0, 1]), float(coef_arr[0]), decay,
                                       part(lo, hi), kind)
        if b > hi:
            _update_kernel(w[hi:b], offset + hi, keys, coef_arr, decay, False, part(hi, b), kind)

    run_split(piece, w.shape[0], offset)


def warm_up(device: torch.device | str | None = None, dist: Distribution | str = Distribution.RADEMACHER,
            out_dtypes: Sequence[torch.dtype] = (torch.float32,), directions: int = 1) -> None:
    """Load (or compile) every CPU kernel once, so the first real step does not pay for it; with a CUDA
    ``device``, also the Triton variants a worker or trainer launches (perturbed copies in ``out_dtypes``,
    updates of up to ``directions`` seeds)."""
    if device is not None and torch.device(device).type == "cuda" and _triton_available():  # GPU-only
        from distzo.zo import generator_cuda  # Triton: optional, GPU only

        generator_cuda.warm_up(torch.device(device), Distribution(dist) is Distribution.GAUSSIAN, out_dtypes, directions)
    buf = np.zeros(300, np.float32)
    out = np.empty((2, 300), np.float32)
    for dist in Distribution:
        fill_z(buf, 1, 5, dist)
        perturb_cpu(buf, 5, 1, dist, [1e-3, -1e-3], out)
        for kind in ("float32", "bfloat16", "float16"):
            served = np.empty(300, np.uint16) if kind != "float32" else None
            update_cpu(buf, 5, [1], [1e-3], 0.0, dist, served, kind)
            update_cpu(buf, 5, [1, 2], [1e-3, 1e-3], 0.0, dist, served, kind)
    cast_kernel(buf, np.empty(300, np.uint16), 1)
    cast_kernel(buf, np.empty(300, np.uint16), 2)


# ----------------------------------------------------------------------------- torch path
# Same algorithm with int64/float64 tensor ops, one op per rounding, so it runs on CUDA with
# the CPU kernels' bits. Slower on CPU; used on GPUs and as an independent check in tests.
_T_MASK = _MASK32
_TORCH_CHUNK = 1 << 22


def _t_mulhilo(a: torch.Tensor, m: int) -> tuple[torch.Tensor, torch.Tensor]:
    p = a * m  # int64 wraps; the low 64 bits of the unsigned product are exact
    return (p >> 32) & _T_MASK, p & _T_MASK


def _t_philox(counters: torch.Tensor, k0: int, k1: int) -> torch.Tensor:
    c0 = counters & _T_MASK
    c1 = (counters >> 32) & _T_MASK
    c2 = torch.zeros_like(counters)
    c3 = torch.zeros_like(counters)
    for _ in range(10):
        hi0, lo0 = _t_mulhilo(c0, _M0)
        hi1, lo1 = _t_mulhilo(c2, _M1)
        c0, c1, c2, c3 = hi1 ^ c1 ^ k0, lo1, hi0 ^ c3 ^ k1, lo0
        k0 = (k0 + _W0) & _MASK32
        k1 = (k1 + _W1) & _MASK32
    return torch.stack([c0, c1, c2, c3], dim=1).reshape(-1)  # words in counter order


def _t_u32_to_f64(x: torch.Tensor) -> torch.Tensor:
    return (x | _MAGIC_U32).view(torch.float64) - _TWO_52


def _t_horner(coefs: Sequence[float], x: torch.Tensor) -> torch.Tensor:
    acc = torch.full_like(x, coefs[-1])
    for c in reversed(coefs[:-1]):
        acc = acc * x
        acc = acc + c
    return acc


def _t_box_muller(words: torch.Tensor) -> torch.Tensor:
    x0 = words[0::2]
    x1 = words[1::2]
    b = (_t_u32_to_f64(x0) + 1.0).view(torch.int64)
    e = ((b >> 52) & 0x7FF) - 1022
    m = ((b & 0xFFFFFFFFFFFFF) | (1022 << 52)).view(torch.float64)
    small = (m < _SQRT_HALF).to(torch.int64)
    m = m * (small.to(torch.float64) + 1.0)
    e = e - small
    s = (m - 1.0) / (m + 1.0)
    p = _t_horner(_ATANH, s * s)
    ln = (e - 32).to(torch.float64) * _LN2 + (s * 2.0) * p
    r = torch.sqrt(ln * -2.0)
    q = (x1 >> 30) & 3
    phi = (_t_u32_to_f64(x1 & 0x3FFFFFFF) - _HALF_QUADRANT) * _TWO_PI_OVER_2_32
    f = phi * phi
    sn = _t_horner(_SIN, f) * phi
    cs = _t_horner(_COS, f)
    odd = -(q & 1)
    bs = sn.view(torch.int64)
    bc = cs.view(torch.int64)
    first = (bs & odd) | (bc & ~odd)
    second = (bc & odd) | (bs & ~odd)
    first = (first ^ ((((q + 1) >> 1) & 1) << 63)).view(torch.float64)
    second = (second ^ ((q >> 1) << 63)).view(torch.float64)
    z = torch.stack([(r * first).to(torch.float32), (r * second).to(torch.float32)], dim=1)
    return z.reshape(-1)


def _t_z_range(seed: int, start: int, n: int, gaussian: bool, device: torch.device) -> torch.Tensor:
    k0, k1 = _key(seed)
    if gaussian:
        c_first, c_last = start >> 2, (start + n + 3) >> 2
        counters = torch.arange(c_first, c_last, dtype=torch.int64, device=device)
        z = _t_box_muller(_t_philox(counters, k0, k1))
        base = start - 4 * c_first
    else:
        c_first, c_last = start >> 7, (start + n + 127) >> 7
        counters = torch.arange(c_first, c_last, dtype=torch.int64, device=device)
        words = _t_philox(counters, k0, k1)
        bits = (words.unsqueeze(1) >> torch.arange(32, device=device)) & 1
        z = 1.0 - 2.0 * bits.reshape(-1).to(torch.float32)
        base = start - 128 * c_first
    return z[base : base + n]


def z_torch(seed: int, offset: int, n: int, dist: Distribution | str, device: torch.device | str) -> torch.Tensor:
    """z(seed, offset + j) for j < n as a float32 tensor on ``device``."""
    _check_offset(offset, n)
    gaussian = Distribution(dist) is Distribution.GAUSSIAN
    device = torch.device(device)
    out = torch.empty(n, dtype=torch.float32, device=device)
    for a in range(0, n, _TORCH_CHUNK):
        b = min(n, a + _TORCH_CHUNK)
        out[a:b] = _t_z_range(seed, offset + a, b - a, gaussian, device)
    return out


def perturb_torch(
    clean: torch.Tensor, offset: int, seed: int, dist: Distribution | str, coef: float, out_dtype: torch.dtype
) -> torch.Tensor:
    """``dtype(clean + coef * z)`` on clean's device, float64 inside (bits equal perturb_cpu for float32)."""
    out = torch.empty(clean.shape[0], dtype=out_dtype, device=clean.device)
    for a in range(0, clean.shape[0], _TORCH_CHUNK):
        b = min(clean.shape[0], a + _TORCH_CHUNK)
        z = z_torch(seed, offset + a, b - a, dist, clean.device).to(torch.float64)
        out[a:b] = (clean[a:b].to(torch.float64) + z * float(coef)).to(torch.float32).to(out_dtype)
    return out


def update_torch(
    w: torch.Tensor, offset: int, seeds: Sequence[int], coefs: Sequence[float], decay: float, dist: Distribution | str,
    served: torch.Tensor | None = None, served_dtype: str = "float32",
) -> None:
    """In-place update of a float32 tensor, same bits as update_cpu (``served``: int16 tensor for the
    16-bit served copy of the new values, written in the same pass on CUDA)."""
    if w.dtype != torch.float32:
        raise TypeError("update expects a float32 master buffer")
    _check_offset(offset, w.shape[0])
    kind = served_kind(served_dtype) if served is not None else 0
    if _use_triton(w):
        from distzo.zo import generator_cuda  # Triton: optional, GPU only

        generator_cuda.update(w, offset, [_key(s) for s in seeds], [float(c) for c in coefs], decay,
                              Distribution(dist) is Distribution.GAUSSIAN, served if kind else None, kind)
        return
    for a in range(0, w.shape[0], _TORCH_CHUNK):
        b = min(w.shape[0], a + _TORCH_CHUNK)
        acc = torch.zeros(b - a, dtype=torch.float64, device=w.device)
        for seed, coef in zip(seeds, coefs):
            acc = acc + z_torch(seed, offset + a, b - a, dist, w.device).to(torch.float64) * float(coef)
        x = w[a:b].to(torch.float64)
        w[a:b] = (x - (acc + x * float(decay))).to(torch.float32)
    if kind:
        served.copy_(to_served(w.cpu(), served_dtype).view(torch.int16))  # type: ignore[union-attr]


def perturb_device(
    clean: torch.Tensor, offset: int, seed: int, dist: Distribution | str, coefs: Sequence[float], out_dtype: torch.dtype
) -> list[torch.Tensor]:
    """perturb_torch for several coefficients on clean's device: one fused kernel (z made once) where it can."""
    _check_offset(offset, clean.shape[0])
    if _use_triton(clean):
        from distzo.zo import generator_cuda  # Triton: optional, GPU only

        return generator_cuda.perturb(clean, offset, _key(seed), [float(c) for c in coefs], out_dtype,
                                      Distribution(dist) is Distribution.GAUSSIAN)
    return [perturb_torch(clean, offset, seed, dist, c, out_dtype) for c in coefs]


def _use_triton(t: torch.Tensor) -> bool:
    # GPU-only: the fused Triton kernels (both distributions)
    return t.is_cuda and t.is_contiguous() and _triton_available()


@functools.cache
def _triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True
