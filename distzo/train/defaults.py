"""Defaults chosen by the model: ``train.lr`` and ``train.eps`` when a job leaves them unset (null).

A zeroth-order step moves every perturbed parameter by lr x g x z with |z| = 1, and g scales with the
square root of the number of parameters perturbed, so one learning rate cannot suit every model: 5e-4
trains the 0.26M-parameter tiny-opt and sends SmolLM2-135M's loss from 8 to 233 in 8 steps. The default is

    lr  = LR_AT_100M[target] x (P / 1e8) ** -0.5        P: the model's parameters (its weight files)
    eps = EPS[target]

(MeZO's own grids follow the same pattern: full fine-tuning at 1e-6..1e-7 for 13B parameters, LoRA at
1e-4..5e-5 and prefix tuning at 1e-2..1e-3 with larger eps, section E of Malladi et al. 2023). The
constants were measured on the presets and on smollm2-135m (README, "Defaults"):
``tests/test_defaults.py`` trains every catalog model and preset with every target for 40 steps at them.

Light on purpose (no torch): the parameter count is read from the safetensors headers.
"""

from __future__ import annotations

import json
import math
import struct
from pathlib import Path
from typing import Any
from distzo.data.catalog import resolve_model

EPS = {"full": 1e-3, "lora": 1e-2, "prefix": 1e-1}
LR_AT_100M = {"full": 2e-5, "lora": 1e-3, "prefix": 3e-2}  # lr for a 100M-parameter model, by train.target


def model_parameters(model_dir: str | Path) -> int:
    """Parameters in a model directory's safetensors files (their headers only; tied weights are stored once)."""
    path = Path(model_dir)
    index = path / "model.safetensors.index.json"
    if index.is_file():
        files = sorted({path / f for f in json.loads(index.read_text())["weight_map"].values()})
    else:
        files = sorted(path.glob("*.safetensors"))
    total = 0
    for f in files:
        with f.open("rb") as fh:
            (size,) = struct.unpack("<Q", fh.read(8))
            header = json.loads(fh.read(size))
        total += sum(math.prod(v["shape"]) for k, v in header.items() if k != "__metadata__")
    return total


def job_eps(train: Any) -> float:
    """``train.eps``, or the default for ``train.target`` where it is null (needs no model, unlike the lr)."""
    return train.eps if train.eps is not None else EPS[train.target]


def default_lr(target: str, parameters: int) -> float:
    """The default learning rate for ``target`` on a model of ``parameters`` parameters, to 2 significant digits."""
    lr = LR_AT_100M[target] * (max(parameters, 1) / 1e8) ** -0.5
    return float(f"{lr:.2g}")


def resolve(cfg: Any, model_dir: str | Path | None = None) -> tuple[Any, str]:
    """``cfg`` (a JobConfig) with ``train.lr`` and ``train.eps`` set (the defaults where they are null), and a line
    saying which are in use and why. ``model_dir``: the model's directory (default: resolved from the config)."""
    t = cfg.train
    said = []
    overrides: dict[str, float] = {}
    if t.lr is None:
        if model_dir is None:
            model_dir = resolve_model(cfg.model.source, cfg.runtime.cache_dir)
        params = model_parameters(model_dir)
        overrides["train.lr"] = default_lr(t.target, params)
        said.append(f"lr {overrides['train.lr']:g} (the default for train.target {t.target} on {params / 1e6:.1f}M "
                    "parameters; set train.lr to choose)")
    else:
        said.append(f"lr {t.lr:g}")
    if t.eps is None:
        overrides["train.eps"] = job_eps(t)
        said.append(f"eps {overrides['train.eps']:g} (the default for train.target {t.target})")
    else:
        said.append(f"eps {t.eps:g}")
    if t.lr_schedule != "constant":
        said.append(f"schedule {t.lr_schedule}")
    return (cfg.with_overrides(overrides) if overrides else cfg), ", ".join(said)
