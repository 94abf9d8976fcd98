"""Zeroth-order optimizers with per-parameter state kept next to the fp32 master (server side).

Per element i of the flat parameter space, step t (0-based) with directions j = 1..q, the
projected-gradient estimate (the only "gradient" a ZO step has; z regenerated from the seeds):

    d_i = (1/q) sum_j g_j z_{j,i}                                       (float64)

``sgd`` (MeZO-SGD, Malladi et al. 2023, "Fine-Tuning Language Models with Just Forward Passes",
Algorithm 1; no state) is ``distzo.zo.mezo.apply_update``'s fast path and is not repeated here:

    theta <- theta - lr * (d + wd * theta)

``momentum`` (heavy ball on the ZO estimate: MeZO paper, Appendix B "MeZO with momentum";
PyTorch SGD's convention, dampening 0, the decay folded into the direction), one fp32 buffer m:

    m     <- float32(mu * m + (d + wd * theta))
    theta <- float32(theta - lr * m)

``adam`` (Adam, Kingma & Ba 2015, on the ZO estimate as in ZO-AdaMM, Chen et al. NeurIPS 2019,
"ZO-AdaMM: Zeroth-Order Adaptive Momentum Method for Black-Box Optimization"; bias-corrected,
without ZO-AdaMM's AMSGrad max; decoupled weight decay as in AdamW, Loshchilov & Hutter 2019),
two fp32 moments m, v:

    m     <- float32(b1 * m + (1 - b1) * d)
    v     <- float32(b2 * v + (1 - b2) * d * d)
    theta <- float32(theta - lr * ((m / (1 - b1^(t+1))) / (sqrt(v / (1 - b2^(t+1))) + eps) + wd * theta))

The bias-correction count is the step number t + 1 (a skipped step counts as time, it changes
nothing else), so the update stays a pure function of the journal record (step, seeds, g, lr).
b^(t+1) is computed by binary powering with float64 multiplications: IEEE-exact operations only
(as the generator), so every machine computes the same bits. With Rademacher z and q = 1,
d_i^2 = g^2 for every i: v is the same for all parameters and adam acts as momentum with a
step size normalized by the running RMS of g (use gaussian z, or q > 1, for per-parameter scales).

Every step is one fused pass over master, state and (16-bit serving) served copy, in float64 with
one rounding per stored value; the numba kernel (CPU, the server and the reference) and the torch
path (any device; tests check the two agree bitwise) run the same operations in the same order.
State layout: float32 array (numel, width), element-major, so a slice of elements is a contiguous
slice of the state (what a replica fetches) and m and v of one element share a cache line.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch
from numba import njit

from distzo.zo import kernelcache
from distzo.zo.generator import Distribution, _check_offset, update_args, z_torch
from distzo.zo.served import served_kind, to_served
from distzo.zo.threads import run_split
from distzo.zo.zkernels import _ALIGN, _SCRATCH, _projected_sum, _write_served

kernelcache.install()  # before the first @njit(cache=True): caches keyed by every kernel module's source

OPTIMIZERS = ("sgd", "momentum", "adam")
STATE_NAMES = {"sgd": (), "momentum": ("momentum_buffer",), "adam": ("exp_avg", "exp_avg_sq")}  # torch.optim's names
_RULE = {"momentum": 1, "adam": 2}


@dataclass(frozen=True)
class Optimizer:
    """The update rule and its hyperparameters (``train.optimizer`` and friends)."""

    name: str = "sgd"
    momentum: float = 0.9
    beta1: float = 0.9
    beta2: float = 0.999
    eps: float = 1e-8

    def __post_init__(self) -> None:
        if self.name not in OPTIMIZERS:
            raise ValueError(f"unknown optimizer {self.name!r}: expected one of {', '.join(OPTIMIZERS)}")

    @classmethod
    def from_config(cls, train) -> "Optimizer":  # noqa: ANN001 - a TrainSection
        return cls(train.optimizer, train.momentum, train.adam_beta1, train.adam_beta2, train.adam_eps)

    @property
    def width(self) -> int:
        """fp32 state values per parameter (0, 1 or 2)."""
        return len(STATE_NAMES[self.name])

    @property
    def state_names(self) -> tuple[str, ...]:
        return STATE_NAMES[self.name]

    def describe(self) -> str:
        """The rule with the hyperparameters that decide the trajectory (a data directory records it)."""
        if self.name == "momentum":
            return f"momentum(mu={self.momentum!r})"
        if self.name == "adam":
            return f"adam(beta1={self.beta1!r},beta2={self.beta2!r},eps={self.eps!r})"
        return "sgd"

    def new_state(self, numel: int) -> np.ndarray | None:
        """Zeroed state of one block: float32 (numel, width); None for sgd."""
        return np.zeros((numel, self.width), dtype=np.float32) if self.width else None


def power(base: float, exponent: int) -> float:
    """base ** exponent by binary powering with float64 multiplications (bitwise the same everywhere)."""
    result, b, e = 1.0, float(base), int(exponent)
    while e > 0:
        if e & 1:
            result = result * b
        b = b * b
        e >>= 1
    return result


def _hyper(opt: Optimizer, step: int) -> tuple[int, float, float, float, float, float]:
    """(rule, h1, h2, c1, c2, eps) for the kernels: momentum (1, mu, 0, 1, 1, 0); adam (2, b1, b2, 1 - b1^t, 1 - b2^t, eps)."""
    if opt.name == "momentum":
        return 1, float(opt.momentum), 0.0, 1.0, 1.0, 0.0
    if opt.name == "adam":
        t = step + 1
        return 2, float(opt.beta1), float(opt.beta2), 1.0 - power(opt.beta1, t), 1.0 - power(opt.beta2, t), float(opt.eps)
    raise ValueError(f"optimizer {opt.name!r} has no state: use distzo.zo.mezo.apply_update's sgd path")


@njit(nogil=True, cache=True, error_model="numpy")  # IEEE division (no zero check): the loops vectorize
def _stateful_kernel(w, state, start, keys, coefs, lr, decay, rule, h1, h2, c1, c2, eps, gaussian, served, kind):  # noqa: ANN001, ANN202
    # see the module docstring: d accumulated from 0.0 over the directions in order (the update
    # kernels' _projected_sum), then one rounding per stored value; the served copy of the new values
    # written while they are in cache
    words = np.empty(_SCRATCH + 2 * _ALIGN, np.uint32)
    zbuf = np.empty(_SCRATCH + 2 * _ALIGN, np.float32)
    acc = np.empty(_SCRATCH + 2 * _ALIGN, np.float64)
    om1 = 1.0 - h1
    om2 = 1.0 - h2
    for off in range(0, w.shape[0], _SCRATCH):
        n = min(_SCRATCH, w.shape[0] - off)
        base = _projected_sum(acc, words, zbuf, start + off, n, keys, coefs, gaussian)
        a = acc[base : base + n]
        v = w[off : off + n]
        # the state comes flat (C-contiguous 1-D, width values per element): plain indexing vectorizes
        if rule == 1:
            s = state[off : off + n]
            for j in range(n):
                x = np.float64(v[j])
                m = np.float32(h1 * np.float64(s[j]) + (a[j] + decay * x))
                s[j] = m
                v[j] = np.float32(x - lr * np.float64(m))
        else:
            s = state[2 * off : 2 * (off + n)]
            for j in range(n):
                x = np.float64(v[j])
                d = a[j]
                m = np.float32(h1 * np.float64(s[2 * j]) + om1 * d)
                sq = np.float32(h2 * np.float64(s[2 * j + 1]) + (om2 * d) * d)
                s[2 * j] = m
                s[2 * j + 1] = sq
                step = (np.float64(m) / c1) / (np.sqrt(np.float64(sq) / c2) + eps)
                v[j] = np.float32(x - lr * (step + decay * x))
        if kind:
            _write_served(v, served[off : off + n], kind)


_NO_SERVED = np.empty(0, np.uint16)


def update_stateful_cpu(w: np.ndarray, state: np.ndarray, offset: int, step: int, seeds: Sequence[int],
                        coefs: Sequence[float], lr: float, decay: float, opt: Optimizer, dist: Distribution | str,
                        served: np.ndarray | None = None, served_dtype: str = "float32") -> None:
    """In place on a float32 block segment ``w`` [n] and its state [n, width]: one step of ``opt``.

    ``coefs[j]`` = g_j / q (d's coefficients, without lr); ``decay``: the weight decay of this
    segment (0 for biases and norms); ``served`` (uint16 [n]) with a 16-bit ``served_dtype``: the
    served copy, rewritten in the same pass. Raises TypeError for wrong dtypes or shapes."""
    if w.dtype == np.float32 and w.ndim == 1 and (state is None or state.dtype != np.float32 or state.shape != (w.shape[0], opt.width)):
        raise TypeError(f"optimizer {opt.name} needs a float32 state of shape {(w.shape[0], opt.width)}")
    kind, keys, coef_arr, gaussian = update_args(w, offset, seeds, coefs, dist, served, served_dtype)
    rule, h1, h2, c1, c2, eps = _hyper(opt, step)

    if not state.flags.c_contiguous:
        raise TypeError("the optimizer state must be C-contiguous")

    def piece(a: int, b: int) -> None:
        _stateful_kernel(w[a:b], state[a:b].reshape(-1), offset + a, keys, coef_arr, float(lr), float(decay), rule, h1, h2, c1, c2,
                         eps, gaussian, served[a:b] if kind else _NO_SERVED, kind)

    run_split(piece, w.shape[0], offset)


def update_stateful_torch(w: torch.Tensor, state: torch.Tensor, offset: int, step: int, seeds: Sequence[int],
                          coefs: Sequence[float], lr: float, decay: float, opt: Optimizer, dist: Distribution | str,
                          served: torch.Tensor | None = None, served_dtype: str = "float32") -> None:
    """``update_stateful_cpu`` with torch float64 ops on any device, one op per rounding: the same bits."""
    if w.dtype != torch.float32 or state.dtype != torch.float32 or tuple(state.shape) != (w.shape[0], opt.width):
        raise TypeError(f"optimizer {opt.name} needs a float32 block and a float32 state of shape {(w.shape[0], opt.width)}")
    _check_offset(offset, w.shape[0])
    rule, h1, h2, c1, c2, eps = _hyper(opt, step)
    d = torch.zeros(w.shape[0], dtype=torch.float64, device=w.device)
    for seed, coef in zip(seeds, coefs):
        d = d + float(coef) * z_torch(seed, offset, w.shape[0], dist, w.device).to(torch.float64)
    x = w.to(torch.float64)
    if rule == 1:
        m = (h1 * state[:, 0].to(torch.float64) + (d + float(decay) * x)).to(torch.float32)
        state[:, 0] = m
        w.copy_((x - float(lr) * m.to(torch.float64)).to(torch.float32))
    else:
        m = (h1 * state[:, 0].to(torch.float64) + (1.0 - h1) * d).to(torch.float32)
        sq = (h2 * state[:, 1].to(torch.float64) + ((1.0 - h2) * d) * d).to(torch.float32)
        state[:, 0] = m
        state[:, 1] = sq
        upd = (m.to(torch.float64) / c1) / (torch.sqrt(sq.to(torch.float64) / c2) + eps)
        w.copy_((x - float(lr) * (upd + float(decay) * x)).to(torch.float32))
    if served is not None and served_kind(served_dtype):
        served.copy_(to_served(w.cpu(), served_dtype).view(torch.int16))
