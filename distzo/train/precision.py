"""What a job's forwards keep of the perturbation: their precision, and a sampled measurement of it.

A forward computing in dtype d reads the weights ``forwardweights.forward_weights`` defines: y± = float32(x ± eps z),
x the served value, rounded to d for tensors of rank >= 2 and kept float32 for tensors of rank < 2. The
perturbation it sees is s = (y+ - y-) / 2. ``measure`` computes, per tensor kind (matrices, embeddings: the
rank >= 2 tensors of the embedding block, 1-D: tensors of rank < 2), on the trainable tensors:

    lost = the fraction of elements with y+ == y- (the forward sees no perturbation there)
    rms  = sqrt(mean(((s - eps z) / eps)^2)), the rms error of the seen perturbation relative to eps

with z of the job's first direction (``plan.direction_seed(train.seed, 0, 0)``) and the forwards' eps
(``job_precision``). The bound is ``BOUND`` (rms <= 5% of eps). A kind of at most ``SAMPLE`` elements is
measured whole; a larger one on ``SAMPLE`` elements in windows of ``WINDOW`` consecutive elements at uniform
random positions (fixed seed: the same sample everywhere), with the standard error of each figure from the
spread of the window means (ratio estimator; neighbours in a row share a magnitude, so the windows, not the
elements, are the independent draws). Weights come from the model directory (the job's initial weights:
``ModelDirSource``, which reads only the sampled rows) or from buffers in memory (``BufferSource``).
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Protocol

import numpy as np
import torch

from distzo.model.adapters import adapter_from_train, checkpoint_name, is_adapter
from distzo.model.blocks import DTYPES, BlockSpec, Manifest, TensorSpec
from distzo.model.families import load_model
from distzo.train.defaults import job_eps
from distzo.train.plan import direction_seed
from distzo.zo.forwardweights import ForwardPrecision, forward_precision, forward_weights
from distzo.zo.generator import Distribution, fill_z
from distzo.zo.served import to_served

BOUND = 0.05  # rms error of the seen perturbation, relative to eps, that a job should stay within
KINDS = ("matrices", "embeddings", "1-D")
SAMPLE = 65536  # elements sampled per kind (a kind this small or smaller is measured whole)
WINDOW = 128  # consecutive elements per sampled window
_SAMPLE_SEED = 29


def forward_dtype_name(cfg) -> str:  # noqa: ANN001 - a JobConfig
    """The dtype a job's forwards compute in: ``train.forward_dtype``, or for ``auto`` float32 on a CPU and the
    served dtype on a GPU (``runtime.device``)."""
    if cfg.train.forward_dtype != "auto":
        return cfg.train.forward_dtype
    return cfg.server.served_dtype if cfg.runtime.device == "cuda" else "float32"


def job_precision(cfg) -> ForwardPrecision:  # noqa: ANN001 - a JobConfig
    """The precision of every forward of the job (reference, workers) and the eps of its g
    (``forwardweights.forward_precision``); a null ``train.eps`` is the target's default (``distzo.train.defaults``)."""
    return forward_precision(job_eps(cfg.train), DTYPES[forward_dtype_name(cfg)], cfg.train.eps_bf16)


def forward_dtypes(compute_dtype: torch.dtype) -> list[torch.dtype]:
    """The dtypes a forward's weights are made in (the kernels to warm up): 16-bit forwards keep 1-D tensors float32."""
    return [compute_dtype] if compute_dtype == torch.float32 else [compute_dtype, torch.float32]


# ----------------------------------------------------------------------------- the figures
@dataclass(frozen=True)
class KindFigure:
    """One tensor kind's figures: ``elements`` in the model (trainable), ``sampled`` of them measured; ``lost`` and
    ``rms`` as in the module docstring, each with its standard error (0.0 when the kind was measured whole)."""

    kind: str
    elements: int
    sampled: int
    lost: float
    lost_se: float
    rms: float
    rms_se: float


@dataclass(frozen=True)
class PerturbationReport:
    """A model's figures at one eps and compute dtype; ``suggestion``: the smallest eps x 2^k (k = 1..6) that keeps
    every kind within ``BOUND`` on the same sample, when one is over it (None otherwise, or when none does)."""

    compute_dtype: str
    served_dtype: str
    eps: float
    kinds: tuple[KindFigure, ...]
    suggestion: float | None = None

    def over(self) -> list[KindFigure]:
        return [k for k in self.kinds if k.rms > BOUND]

    def line(self) -> str:
        """One line: the compute dtype, eps, and per kind the rms error and the lost fraction, with how they were taken."""
        figs = "; ".join(f"{k.kind} {k.rms:.3f}{_se(k.rms_se)} ({100 * k.lost:.1f}% lost)" for k in self.kinds)
        sampled = [f"{k.kind} {k.sampled} of {k.elements} elements" for k in self.kinds if k.sampled < k.elements]
        how = (f"sampled: {', '.join(sampled)} in windows of {WINDOW}, +- one standard error; the rest whole"
               if sampled else "every element")
        return (f"{self.compute_dtype} forwards at eps {self.eps:g} (served {self.served_dtype}) see the perturbation "
                f"with an rms error / eps of {figs or 'nothing: no tensor is perturbed'} ({how})")

    def warning(self) -> str | None:
        """One line when a kind loses more than ``BOUND`` (None otherwise): eps, dtype, the figure, the way out."""
        worst = max(self.over(), key=lambda k: k.rms, default=None)
        if worst is None:
            return None
        setting = "train.eps_bf16" if self.compute_dtype == "bfloat16" else "train.eps"
        way = (f"; {setting} {self.suggestion:g} keeps it within {BOUND:.0%}" if self.suggestion is not None
               else f"; raise {setting}")
        return (f"warning: {self.compute_dtype} forwards at eps {self.eps:g} lose {worst.rms:.0%} (rms) of the perturbation "
                f"of the {_NOUN[worst.kind]}, over the {BOUND:.0%} bound: the projected gradient is measured along "
                f"another direction than the update moves{way}")

    def as_dict(self) -> dict:
        return {**asdict(self), "kinds": [asdict(k) for k in self.kinds], "bound": BOUND}

    def to_json(self) -> str:
        return json.dumps(self.as_dict())


_NOUN = {"matrices": "matrices", "embeddings": "embeddings", "1-D": "1-D tensors (norms, biases)"}


def _se(se: float) -> str:
    return f" +-{se:.3f}" if se > 0 else ""


# ----------------------------------------------------------------------------- where the weights come from
class WeightSource(Protocol):
    def window(self, block: BlockSpec, tensor: TensorSpec, start: int, n: int) -> torch.Tensor:
        """Elements start .. start + n of ``tensor`` (flattened), the master values as float32 [n]."""
        ...


class BufferSource:
    """Flat fp32 block buffers in memory (the reference, the server, tests)."""

    def __init__(self, buffers: list[torch.Tensor]):
        self.buffers = buffers

    def window(self, block: BlockSpec, tensor: TensorSpec, start: int, n: int) -> torch.Tensor:
        a = tensor.offset + start
        return self.buffers[block.index][a : a + n].to(torch.float32).cpu()


class ModelDirSource:
    """A Hugging Face model directory's safetensors, reading only the rows a window spans (memory-mapped);
    adapters (train.target lora/prefix) are their initial values. A checkpoint without safetensors, or without
    one of the names, is loaded whole (``BlockModel.load_block_buffers``)."""

    def __init__(self, model_dir: str | Path, adapter=None):  # noqa: ANN001 - LoraTarget | PrefixTarget | None
        self.path = Path(model_dir)
        self.adapter = adapter
        self._files: dict[str, str] | None = None
        self._open: dict[str, object] = {}
        self._whole: dict[str, torch.Tensor] = {}
        self._fallback: BufferSource | None = None

    def _file_of(self, name: str) -> str | None:
        if self._files is None:
            from safetensors import safe_open

            index, single = self.path / "model.safetensors.index.json", self.path / "model.safetensors"
            if index.is_file():
                self._files = {n: str(self.path / f) for n, f in json.loads(index.read_text())["weight_map"].items()}
            elif single.is_file():
                with safe_open(str(single), framework="pt") as f:
                    self._files = dict.fromkeys(f.keys(), str(single))
            else:
                self._files = {}
        return self._files.get(name)

    def window(self, block: BlockSpec, tensor: TensorSpec, start: int, n: int) -> torch.Tensor:
        if is_adapter(tensor.name):
            whole = self._whole.get(tensor.name)
            if whole is None:
                whole = self._whole[tensor.name] = self.adapter.initial_value(tensor.name, tensor.shape).reshape(-1).float()
            return whole[start : start + n]
        file = self._file_of(checkpoint_name(tensor.name))
        if file is None:
            return self._load_whole().window(block, tensor, start, n)
        handle = self._open.get(file)
        if handle is None:
            from safetensors import safe_open

            handle = self._open[file] = safe_open(file, framework="pt").__enter__()
        piece = handle.get_slice(checkpoint_name(tensor.name))  # type: ignore[attr-defined]
        if len(tensor.shape) == 0:
            return piece[()].reshape(1).float() if start == 0 else torch.empty(0)
        row = tensor.numel // tensor.shape[0]  # elements per index of the first dimension
        r0, r1 = start // row, -(-(start + n) // row)
        rows = piece[r0:r1].reshape(-1).float()
        return rows[start - r0 * row : start - r0 * row + n]

    def _load_whole(self) -> BufferSource:
        if self._fallback is None:
            self._fallback = BufferSource(load_model(self.path, self.adapter).load_block_buffers())
        return self._fallback


# ----------------------------------------------------------------------------- the measurement
def kind_of(block: BlockSpec, tensor: TensorSpec) -> str:
    """``1-D`` for rank < 2, ``embeddings`` for the embedding block's (block 0) other tensors, else ``matrices``."""
    if len(tensor.shape) < 2:
        return "1-D"
    return "embeddings" if block.index == 0 else "matrices"


def _windows(manifest: Manifest, per_kind: int) -> dict[str, tuple[int, list[tuple[BlockSpec, TensorSpec, int, int]]]]:
    """Per kind: (trainable elements, windows (block, tensor, start, n)): every element in windows of ``WINDOW``
    when the kind has at most ``per_kind``, else ``per_kind // WINDOW`` windows at uniform random positions."""
    members: dict[str, list[tuple[BlockSpec, TensorSpec]]] = {k: [] for k in KINDS}
    for b in manifest.blocks:
        if b.trainable:
            for t in b.tensors:
                if t.numel:
                    members[kind_of(b, t)].append((b, t))
    rng = np.random.default_rng(_SAMPLE_SEED)
    out = {}
    for kind, ts in members.items():
        sizes = np.array([t.numel for _, t in ts], dtype=np.int64)
        total = int(sizes.sum())
        if total <= per_kind:
            wins = [(b, t, a, min(WINDOW, t.numel - a)) for b, t in ts for a in range(0, t.numel, WINDOW)]
        else:
            ends = np.cumsum(sizes)
            wins = []
            for pos in rng.integers(0, total, max(1, per_kind // WINDOW)):
                i = int(np.searchsorted(ends, pos, side="right"))
                b, t = ts[i]
                n = min(WINDOW, t.numel)
                wins.append((b, t, min(int(pos - (ends[i] - t.numel)), t.numel - n), n))
        out[kind] = (total, wins)
    return out


def _seen(source: WeightSource, windows: list, eps: float, compute_dtype: torch.dtype, served_dtype: str,
          dist: Distribution, seed: int, vectors: bool = True) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per window: (elements, lost count, sum of squared relative errors), the copies made by ``forward_weights``
    (``vectors`` False: every tensor as a matrix, the definition before 16-bit forwards kept 1-D tensors float32)."""
    sizes, lost, sq = [], [], []
    for block, tensor, start, n in windows:
        x = to_served(source.window(block, tensor, start, n).contiguous(), served_dtype)
        goff = block.global_offset + tensor.offset + start
        shape = (n,) if len(tensor.shape) < 2 and vectors else (1, n)
        one = BlockSpec(index=block.index, name=block.name, global_offset=goff, tensors=(TensorSpec(tensor.name, shape, 0, False),))
        plus, minus = forward_weights(one, x, dist, seed, [eps, -eps], compute_dtype)
        yp = (plus.vectors if plus.vectors is not None else plus.main).double()
        ym = (minus.vectors if minus.vectors is not None else minus.main).double()
        z = torch.from_numpy(fill_z(np.empty(n, np.float32), seed, goff, dist)).double()
        err = ((yp - ym) / 2 - eps * z) / eps
        sizes.append(n)
        lost.append(int((yp == ym).sum()))
        sq.append(float(err.square().sum()))
    return np.array(sizes, np.float64), np.array(lost, np.float64), np.array(sq, np.float64)


def _ratio(num: np.ndarray, sizes: np.ndarray, census: bool) -> tuple[float, float]:
    """sum(num) / sum(sizes) and its standard error over the windows (0.0 for a census)."""
    if not sizes.size or sizes.sum() == 0:
        return math.nan, 0.0
    r = float(num.sum() / sizes.sum())
    m = sizes.size
    if census or m < 2:
        return r, 0.0
    resid = (num - r * sizes) / sizes.mean()
    return r, float(math.sqrt((resid ** 2).sum() / (m * (m - 1))))


def measure(manifest: Manifest, source: WeightSource, precision: ForwardPrecision, served_dtype: str,
            dist: Distribution | str, seed: int, per_kind: int = SAMPLE, suggest: bool = True,
            vectors: bool = True) -> PerturbationReport:
    """The figures of the module docstring for the trainable tensors of ``manifest`` read from ``source``, at the
    forwards' ``precision`` (its eps and compute dtype), the served dtype and z(``seed``) of ``dist``. ``vectors``
    False measures the 16-bit forwards before 1-D tensors stayed float32 (bench/perturbation_kept.py)."""
    dist = Distribution(dist)
    windows = _windows(manifest, per_kind)
    figures, kept = [], {}
    for kind in KINDS:
        total, wins = windows[kind]
        if not wins:
            continue
        sizes, lost, sq = _seen(source, wins, precision.eps, precision.compute_dtype, served_dtype, dist, seed, vectors)
        census = total <= per_kind
        lost_r, lost_se = _ratio(lost, sizes, census)
        ms, ms_se = _ratio(sq, sizes, census)
        rms = math.sqrt(ms)
        figures.append(KindFigure(kind, total, int(sizes.sum()), lost_r, lost_se, rms, ms_se / (2 * rms) if rms > 0 else 0.0))
        kept[kind] = wins
    report = PerturbationReport(_NAMES[precision.compute_dtype], served_dtype, precision.eps, tuple(figures))
    if suggest and report.over() and precision.compute_dtype != torch.float32:
        for k in range(1, 7):
            wider = ForwardPrecision(precision.compute_dtype, precision.eps * 2 ** k)
            ok = True
            for kind, wins in kept.items():
                sizes, _, sq = _seen(source, wins, wider.eps, wider.compute_dtype, served_dtype, dist, seed, vectors)
                ok = ok and math.sqrt(sq.sum() / sizes.sum()) <= BOUND
            if ok:
                return PerturbationReport(report.compute_dtype, served_dtype, precision.eps, report.kinds, wider.eps)
    return report


_NAMES = {v: k for k, v in DTYPES.items()}


def job_report(cfg, manifest: Manifest, model_dir: str | Path | None = None, buffers: list[torch.Tensor] | None = None,
               per_kind: int = SAMPLE) -> PerturbationReport:  # noqa: ANN001 - cfg: a JobConfig
    """The job's figures: its forwards' precision (``job_precision``), served dtype, distribution and first seed,
    on ``buffers`` when given, else on the initial weights in ``model_dir``."""
    source: WeightSource = BufferSource(buffers) if buffers is not None else ModelDirSource(model_dir, adapter_from_train(cfg.train))
    return measure(manifest, source, job_precision(cfg), cfg.server.served_dtype, cfg.train.distribution,
                   direction_seed(cfg.train.seed, 0, 0), per_kind)
