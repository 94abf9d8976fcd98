"""MeZO-SGD, the one implementation of its math (reference trainer, server and workers).

(train.optimizer momentum / adam: the update with per-parameter state, ``distzo/zo/optim.py``.)

One step t with directions j = 1..q (seed s_j), DDP shards d = 1..D, step size eps:

    S±_{j,d} = summed label-token loss at theta ± eps * z(s_j) on shard d, over N_d tokens   (forward.py)
    l±_j     = sum_d S±_{j,d} / sum_d N_d                         sign_losses (token-weighted)
    g_j      = (l+_j - l-_j) / (2 eps)                            projected_gradients
    g_j      = clip(g_j, ±clip)                                  (when configured)
    theta   <- theta - lr_t * ((1/q) sum_j g_j z(s_j) + wd * theta)   apply_update
                                                  (wd = 0 for biases and norms)

Perturbed weights are made out of place from the clean block (``perturb_block``), so the
master copy is never perturbed and never needs restoring. A step whose losses are not all
finite is not applied (``UpdateRecord.skipped``): it still advances the version.

Update windows (``server.update_window`` K, DESIGN.md section 12): step t's forwards read the
materialized version ``base_version(t, K)`` and replay the records from it to t - 1 on it
(``replay_block``), rebuilding the served copy of version t: with a float32 served copy that is the
master bit for bit (the same operations, in the same order); with a 16-bit one it is, by definition,
the records replayed in float32 on the rounded base and rounded again, then perturbed as any fetched
block. The server materializes K records in one pass (``apply_window``), bitwise K single passes.

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
from typing import Mapping, Sequence

import numpy as np
import torch

from distzo.model.blocks import BlockSpec
from distzo.zo.generator import Distribution, check_seed, perturb_cpu, perturb_device, update_cpu, update_torch
from distzo.zo.optim import Optimizer, update_stateful_cpu, update_stateful_torch
from distzo.zo.replay import pack, replay_perturb_cpu, replay_perturb_device, window_cpu
from distzo.zo.served import cast_into


@dataclass(frozen=True)
class Direction:
    seed: int
    g: float


@dataclass(frozen=True)
class UpdateRecord:
    """Everything the server needs to apply step ``step``: a few bytes, journaled."""

    step: int
    directions: tuple[Direction, ...]
    lr: float
    weight_decay: float
    skipped: bool = False

    def validate(self) -> None:
        if self.step < 0:
            raise ValueError(f"step must be >= 0, got {self.step}")
        if not (math.isfinite(self.lr) and self.lr >= 0):
            raise ValueError(f"lr must be a finite number >= 0, got {self.lr}")
        if not (math.isfinite(self.weight_decay) and self.weight_decay >= 0):
            raise ValueError(f"weight_decay must be a finite number >= 0, got {self.weight_decay}")
        if not self.skipped and not self.directions:
            raise ValueError("an update that is not skipped needs at least one (seed, g) direction")
        for d in self.directions:
            check_seed(d.seed)
            if not math.isfinite(d.g):
                raise ValueError(f"projected gradient g for seed {d.seed} is not finite ({d.g})")

    def step_size(self) -> float:
        """The most one weight moves per unit of z: lr * (1/q) sum_j |g_j| (apply_update's coefficients)."""
        if self.skipped or not self.directions:
            return 0.0
        return sum(abs(self.lr * d.g / len(self.directions)) for d in self.directions)

    def check_bounds(self, max_step: float) -> None:
        """Refuse an update whose applied step is non-finite or absurd (ValueError): checked before journaling.

        ``max_step`` bounds lr * (1/q) sum_j |g_j|, the move of a weight per unit of z; the decay
        factor lr * weight_decay must stay below 1 (at 1 or more it flips or zeroes the weights).
        """
        self.validate()
        step = self.step_size()
        if not math.isfinite(step) or step > max_step:
            raise ValueError(f"the update would move weights by {step:.3g} per unit of z (lr {self.lr:.3g} x |g|); "
                             f"the server refuses steps over {max_step:g} (server.max_update_step): "
                             "a diverged or broken run, not a training step")
        decay = self.lr * self.weight_decay
        if not self.skipped and not decay < 1.0:
            raise ValueError(f"lr x weight_decay is {decay:.3g}: at 1 or more the decay flips or zeroes the weights")


# ----------------------------------------------------------------------------- forward side
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


def sign_losses(losses: Mapping[tuple[int, int, int], tuple[float, int]], q: int, shards: int) -> dict[tuple[int, int], float]:
    """l_{j,sign} = sum_d S_{j,d,sign} / sum_d N_{j,d,sign}: the mean loss over every label token of the batch.

    ``losses[(j, d, sign)] = (S, N)``: shard d's summed cross-entropy over its N label tokens. Adding
    sums and counts makes the loss the same function of the batch whatever the number of shards
    (up to float rounding); a mean of per-shard means would weight an example by 1/(its shard's N).
    """
    out = {}
    for j in range(q):
        for sign in (1, -1):
            total, count = 0.0, 0
            for d in range(shards):
                s, n = losses[(j, d, sign)]
                total += s
                count += n
            out[(j, sign)] = total / count if count else math.nan
    return out


def projected_gradients(losses: Mapping[tuple[int, int, int], tuple[float, int]], q: int, shards: int, eps: float) -> list[float]:
    """g_j = (l+_j - l-_j) / (2 eps), l±_j token-weighted over the shards (``sign_losses``)."""
    per = sign_losses(losses, q, shards)
    return [(per[(j, 1)] - per[(j, -1)]) / (2.0 * eps) for j in range(q)]


def clip_gradient(g: float, clip: float | None) -> float:
    if clip is None or not math.isfinite(g):
        return g
    return max(-clip, min(clip, g))


def learning_rate(step: int, base_lr: float, schedule: str, total_steps: int, warmup_steps: int = 0, min_ratio: float = 0.0) -> float:
    """lr at ``step`` (0-based): linear warmup, then constant, linear or cosine decay to min_ratio * base."""
    if warmup_steps > 0 and step < warmup_steps:
        return base_lr * (step + 1) / warmup_steps
    if schedule == "constant":
        return base_lr
    span = max(1, total_steps - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / span)
    if schedule == "linear":
        factor = 1.0 - progress
    elif schedule == "cosine":
        factor = 0.5 * (1.0 + math.cos(math.pi * progress))
    else:
        raise ValueError(f"unknown lr schedule {schedule!r}: expected constant, linear or cosine")
    return base_lr * (min_ratio + (1.0 - min_ratio) * factor)


@dataclass
class StepOutcome:
    record: UpdateRecord
    loss: float  # mean of (l+ + l-)/2 over directions (nan when skipped)
    nonfinite: bool = False
    loss_plus: float = math.nan  # mean of the l+ losses (nan when skipped)
    loss_minus: float = math.nan  # mean of the l- losses


def make_update(
    step: int,
    seeds: Sequence[int],
    losses: Mapping[tuple[int, int, int], tuple[float, int]],
    shards: int,
    eps: float,
    lr: float,
    weight_decay: float,
    clip: float | None,
) -> StepOutcome:
    """Turn one step's (summed loss, label tokens) per forward into its update record.

    Skipped when a loss is not finite: no g, no loss, nothing averaged from non-finite values.
    """
    q = len(seeds)
    sums = [losses[(j, d, s)][0] for j in range(q) for d in range(shards) for s in (1, -1)]
    if not all(math.isfinite(v) for v in sums):
        return StepOutcome(UpdateRecord(step, (), lr, weight_decay, skipped=True), math.nan, nonfinite=True)
    gs = projected_gradients(losses, q, shards, eps)
    dirs = tuple(Direction(seed=s, g=clip_gradient(g, clip)) for s, g in zip(seeds, gs))
    per = sign_losses(losses, q, shards)
    plus, minus = [per[(j, 1)] for j in range(q)], [per[(j, -1)] for j in range(q)]
    return StepOutcome(UpdateRecord(step, dirs, lr, weight_decay), (sum(plus) + sum(minus)) / (2 * q),
                       loss_plus=sum(plus) / q, loss_minus=sum(minus) / q)


# ----------------------------------------------------------------------------- server side
def apply_update(block: BlockSpec, buffer: torch.Tensor, record: UpdateRecord, dist: Distribution,
                 served: np.ndarray | torch.Tensor | None = None, served_dtype: str = "float32",
                 optimizer: Optimizer | None = None, state: np.ndarray | torch.Tensor | None = None) -> None:
    """theta <- theta - lr * ((1/q) sum_j g_j z_j + wd * theta) on one fp32 block, in place.

    ``served``: the block's 16-bit served copy (uint16 array on CPU, int16 tensor on a GPU, the block's
    length) for ``served_dtype`` bfloat16/float16, rewritten from the new values in the same pass
    (``distzo/zo/served.py``'s rounding). ``optimizer`` momentum/adam: the stateful rules of
    ``distzo/zo/optim.py`` instead, updating ``state`` (float32 [numel, width], numpy on CPU) in the same
    pass; sgd or None: the rule above, no state. A skipped record, or a frozen block (``block.trainable``
    False: train.target lora's base weights), changes nothing."""
    if record.skipped or not block.trainable:
        return
    q = len(record.directions)
    seeds = [d.seed for d in record.directions]
    decay = record.lr * record.weight_decay
    if served is not None and served_dtype == "float32":
        raise ValueError("a float32 served copy is the master itself: pass served=None")
    if optimizer is not None and optimizer.width:
        _apply_stateful(block, buffer, record, dist, served, served_dtype, optimizer, state)
        return
    coefs = [record.lr * d.g / q for d in record.directions]
    # without weight decay every tensor gets the same update: one call over the whole block (fewer,
    # longer kernel runs; the per-element arithmetic, and so the bits, are the same)
    segments = block.decay_segments() if decay else [(0, buffer.shape[0], False)]
    for start, end, decays in segments:
        seg = buffer[start:end]
        out = served[start:end] if served is not None else None
        if buffer.device.type == "cpu":
            update_cpu(seg.numpy(), block.global_offset + start, seeds, coefs, decay if decays else 0.0, dist,
                       out, served_dtype)
        else:
            update_torch(seg, block.global_offset + start, seeds, coefs, decay if decays else 0.0, dist,
                         out, served_dtype)


def _apply_stateful(block: BlockSpec, buffer: torch.Tensor, record: UpdateRecord, dist: Distribution,
                    served: np.ndarray | torch.Tensor | None, served_dtype: str, optimizer: Optimizer,
                    state: np.ndarray | torch.Tensor | None) -> None:
    """momentum/adam on one block: d's coefficients g_j / q, lr and the decay passed apart (optim.py)."""
    if state is None:
        raise ValueError(f"optimizer {optimizer.name} needs the block's state (float32 [{block.numel}, {optimizer.width}])")
    q = len(record.directions)
    seeds = [d.seed for d in record.directions]
    coefs = [d.g / q for d in record.directions]
    wd = record.weight_decay
    segments = block.decay_segments() if wd else [(0, buffer.shape[0], False)]
    for start, end, decays in segments:
        out = served[start:end] if served is not None else None
        args = (block.global_offset + start, record.step, seeds, coefs, record.lr, wd if decays else 0.0, optimizer, dist,
                out, served_dtype)
        if buffer.device.type == "cpu":
            st = state if isinstance(state, np.ndarray) else state.numpy()
            update_stateful_cpu(buffer[start:end].numpy(), st[start:end], *args)
        else:
            update_stateful_torch(buffer[start:end], state[start:end], *args)


# ----------------------------------------------------------------------------- update windows
def base_version(step: int, window: int) -> int:
    """The materialized version that step ``step``'s forwards (and an eval after ``step`` steps) read.

    ``max(0, K * floor((step + 1) / K) - K)`` for window K: the newest multiple of K that is at least
    K - 1 steps old. The server starts materializing base B when record B - 1 is journaled and the
    first step to read B is B + K - 1, so it has K - 1 steps of time and no worker waits for it; the
    forwards replay records base..step-1 (at most 2K - 2). K = 1: the step itself, nothing to replay.
    Raises ValueError for a negative step or a window below 1."""
    if step < 0 or window < 1:
        raise ValueError(f"base_version needs step >= 0 and window >= 1, got step {step}, window {window}")
    return max(0, window * ((step + 1) // window) - window)


def apply_window(block: BlockSpec, src: np.ndarray, dst: np.ndarray, records: Sequence[UpdateRecord], dist: Distribution,
                 served: np.ndarray | None = None, served_dtype: str = "float32") -> None:
    """dst <- ``records`` applied to the fp32 block ``src`` in step order, in one pass (``dst`` may be ``src``).

    Bitwise ``apply_update`` once per record (tests prove it for both distributions, weight decay and
    every served dtype); ``served`` (uint16, the block's length) for bfloat16/float16 gets the served copy
    of the result. A frozen block, or records that are all skipped, leave the values as they are (copied to
    ``dst``, cast to ``served``). SGD only: stateful optimizers keep K = 1 (config.py refuses the rest)."""
    live = [r for r in records if not r.skipped] if block.trainable else []
    if served is not None and served_dtype == "float32":
        raise ValueError("a float32 served copy is the master itself: pass served=None")
    if not live:
        if dst is not src:
            np.copyto(dst, src)
        if served is not None:
            cast_into(dst, served_dtype, served)
        return
    decays = any(r.lr * r.weight_decay for r in live)
    for start, end, seg_decays in (block.decay_segments() if decays else [(0, src.shape[0], False)]):
        window_cpu(src[start:end], dst[start:end], block.global_offset + start, pack(live, seg_decays), dist,
                   served[start:end] if served is not None else None, served_dtype)


def replay_block(block: BlockSpec, clean: torch.Tensor, pending: Sequence[UpdateRecord], dist: Distribution,
                 seed: int = 0, coefs: Sequence[float] = (), out_dtype: torch.dtype = torch.float32,
                 start: int = 0) -> list[torch.Tensor]:
    """The forward weights of a block whose fetched base is ``clean`` ([n] of the served dtype, any device: the
    block's elements start .. start + n) with the ``pending`` records after it (update windows).

    The served copy of the step's version, rebuilt from the base: x = the records applied to float32(clean)
    as ``apply_update`` applies them (float64 inside, one float32 rounding per record), then rounded to the
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
