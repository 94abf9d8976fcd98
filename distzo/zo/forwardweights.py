"""The weights a forward reads: one definition for a worker and the reference.

Per seed and coefficient c (= sign * eps), a block's forward weights are made out of place from the fetched
clean block (``perturb_block``), so the master copy is never perturbed and never needs restoring. With update
windows (``server.update_window`` K > 1) the fetched block is the base ``base_version(t, K)`` (``mezo.py``)
and the records after it are replayed on it first (``replay_block``), fused into the perturbation.

16-bit forwards (a GPU fed a 16-bit served copy, or ``train.forward_dtype``; ``forward_weights``): bfloat16
rounding of ``x + eps z`` keeps too little of a perturbation of eps = 1e-3 (SmolLM2-135M: 38% rms error of
the perturbation the forwards see, 1.3% of the elements with equal +eps and -eps copies), so a forward in
compute dtype d reads, for element i with y_i = float32(x_i + c z_i):

    tensors of rank >= 2 (matrices, embeddings):  d(y_i)          (one rounding to d)
    tensors of rank < 2 (norms, biases):          y_i, float32    (the forward runs under torch.autocast(d))

and bfloat16 forwards perturb by eps_bf16 = 4 x eps (``forward_precision``): a power of two times eps keeps
eps's position between the bfloat16 steps of small weights and spans the steps of the large ones (measured
in bench/NOTES.md section 10; ``distzo/train/precision.py`` measures a model's figure). A float32 forward reads y.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch

from distzo.model.blocks import BlockSpec
from distzo.zo.generator import Distribution, perturb_cpu, perturb_device
from distzo.zo.record import UpdateRecord
from distzo.zo.replay import pack, replay_perturb_cpu, replay_perturb_device


BF16_EPS_SCALE = 4.0  # eps_bf16 = 4 x eps unless train.eps_bf16 sets it (bench/NOTES.md section 10)


@dataclass(frozen=True)
class ForwardPrecision:
    """What a job's forwards compute in and the eps they perturb by (``forward_precision``): the same for every
    forward of the job, and g's denominator (``make_update``)."""

    compute_dtype: torch.dtype
    eps: float

    @property
    def wide_vectors(self) -> bool:
        """Tensors of rank < 2 stay float32 in the forward (a 16-bit compute dtype: ``forward_weights``)."""
        return self.compute_dtype != torch.float32


def forward_precision(eps: float, compute_dtype: torch.dtype, eps_bf16: float | None = None) -> ForwardPrecision:
    """The forwards' precision: ``eps`` for float32 and float16 forwards; for bfloat16 ``eps_bf16``, by default
    ``BF16_EPS_SCALE * eps``. ValueError for an eps that is not a finite number > 0 or another compute dtype."""
    if compute_dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise ValueError(f"forwards compute in float32, bfloat16 or float16, not {compute_dtype}")
    if compute_dtype == torch.bfloat16:
        eps = eps_bf16 if eps_bf16 is not None else BF16_EPS_SCALE * eps
    if not (math.isfinite(eps) and eps > 0):
        raise ValueError(f"eps must be a finite number > 0, got {eps}")
    return ForwardPrecision(compute_dtype, float(eps))


@dataclass(frozen=True)
class ForwardWeights:
    """One forward's weights of a block: ``main`` [numel] in the compute dtype, and in a 16-bit forward
    ``vectors``, float32 [``block.vector_numel``]: the block's tensors of rank < 2 packed in block order
    (``BlockSpec.vector_segments``), read from there instead of ``main``. None: everything is in ``main``."""

    main: torch.Tensor
    vectors: torch.Tensor | None = None


def forward_weights(block: BlockSpec, clean: torch.Tensor, dist: Distribution, seed: int = 0,
                    coefs: Sequence[float] = (), compute_dtype: torch.dtype = torch.float32,
                    pending: Sequence[UpdateRecord] = ()) -> list[ForwardWeights]:
    """The weights the forwards of one seed read for ``block``: the definition a worker and the reference share.

    ``clean``: the fetched block ([numel], served dtype, any device); x = clean, or with live ``pending`` records
    the served copy of the step's version rebuilt from it (``replay_block``). Per coefficient c, element i is
    y_i = float32(x_i + c z_i(seed)) (one rounding, float64 inside); ``main`` = y rounded to ``compute_dtype``,
    and in a 16-bit forward ``vectors`` = y of the tensors of rank < 2, unrounded. No coefficient: one entry, x in
    the same two forms (clean forwards, eval). A frozen block is never perturbed. Each part is one fused kernel
    per contiguous range on a GPU (Triton) and on the CPU (numba), with the same bits."""
    coefs = tuple(coefs) if block.trainable else ()
    live = bool(pending) and block.trainable and any(not r.skipped for r in pending)

    def rows(src: torch.Tensor, start: int, dtype: torch.dtype) -> list[torch.Tensor]:
        if live:
            out = replay_block(block, src, pending, dist, seed, coefs, dtype, start=start)
        elif coefs:
            out = perturb_block(src, block.global_offset + start, seed, dist, coefs, dtype)
        else:
            out = [src]
        return [r if r.dtype == dtype else r.to(dtype) for r in out]

    mains = rows(clean, 0, compute_dtype)
    if compute_dtype == torch.float32 or not block.vector_numel:
        return [ForwardWeights(m) for m in mains]
    parts = [rows(clean[a:b], a, torch.float32) for a, b in block.vector_segments()]
    vectors = [torch.cat([p[r] for p in parts]) if len(parts) > 1 else parts[0][r] for r in range(len(mains))]
    return [ForwardWeights(m, v) for m, v in zip(mains, vectors)]


def perturb_block(
    clean: torch.Tensor, global_offset: int, seed: int, dist: Distribution, coefs: Sequence[float], out_dtype: torch.dtype
) -> list[torch.Tensor]:
    """``clean + coef * z(seed)`` for each coefficient, each rounded once from the clean block."""
    if _on_host(clean):
        src = clean if clean.dtype == torch.float32 else clean.to(torch.float32)
        out = np.empty((len(coefs), src.numel()), dtype=np.float32)
        perturb_cpu(src.numpy(), global_offset, seed, dist, coefs, out)
        rows = [torch.from_numpy(out[i]) for i in range(len(coefs))]
        return rows if out_dtype == torch.float32 else [r.to(out_dtype) for r in rows]
    return perturb_device(clean, global_offset, seed, dist, coefs, out_dtype)  # GPU path


def replay_block(block: BlockSpec, clean: torch.Tensor, pending: Sequence[UpdateRecord], dist: Distribution,
                 seed: int = 0, coefs: Sequence[float] = (), out_dtype: torch.dtype = torch.float32,
                 start: int = 0) -> list[torch.Tensor]:
    """The forward weights of a block whose fetched base is ``clean`` ([n] of the served dtype, any device: the
    block's elements start .. start + n) with the ``pending`` records after it (update windows).

    The served copy of the step's version, rebuilt from the base: x = the records applied to float32(clean)
    as ``mezo.apply_update`` applies them (float64 inside, one float32 rounding per record), then rounded to the
    served dtype (``served.py``'s rounding; none for float32, where x is the master bit for bit). The forwards
    then perturb x exactly as they perturb a fetched block: ``float32(x + c * z(seed))`` per coefficient, in
    ``out_dtype`` (one fused pass). With no coefficient: [x] in the served dtype (clean forwards, eval; a node
    group's slice, rebuilt before the gather). A frozen block, or no live record: x = clean."""
    live = [r for r in pending if not r.skipped] if block.trainable else []
    served_dtype = _SERVED_NAMES[clean.dtype]
    if not live:
        return perturb_block(clean, block.global_offset + start, seed, dist, coefs, out_dtype) if coefs else [clean]
    rows, n = max(1, len(coefs)), clean.shape[0]
    decays = any(r.lr * r.weight_decay for r in live)
    pieces = [(max(a, start), min(b, start + n), d) for a, b, d in
              (block.decay_segments() if decays else [(start, start + n, False)])]
    pieces = [(a - start, b - start, d) for a, b, d in pieces if a < b]
    if _on_host(clean):
        x = (clean if clean.dtype == torch.float32 else clean.to(torch.float32)).numpy()
        out = np.empty((rows, n), dtype=np.float32)
        for a, b, seg_decays in pieces:
            replay_perturb_cpu(x[a:b], block.global_offset + start + a, pack(live, seg_decays), seed, dist, coefs,
                               out[:, a:b], served_dtype)
        result = [torch.from_numpy(out[i]) for i in range(rows)]
        want = out_dtype if coefs else clean.dtype
        return result if want == torch.float32 else [r.to(want) for r in result]  # exact for rebuilt served values
    out_t = torch.empty((rows, n), dtype=out_dtype if coefs else clean.dtype, device=clean.device)  # GPU path
    for a, b, seg_decays in pieces:
        replay_perturb_device(clean[a:b], block.global_offset + start + a, pack(live, seg_decays), seed, dist, coefs,
                              out_t[:, a:b], served_dtype)
    return list(out_t.unbind(0))


_SERVED_NAMES = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}


def _on_host(t: torch.Tensor) -> bool:
    """A CPU tensor takes the numba kernels, any other the device path (Triton on CUDA); the tests replace this
    to run the device path on CPU tensors in Triton's interpreter (TRITON_INTERPRET=1)."""
    return t.device.type == "cpu"
