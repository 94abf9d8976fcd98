"""A Hugging Face model directory on disk: its config, checked to be a causal LM distzo can
train, and its safetensors weights (read by name, and checked for damage before anything starts).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from transformers import AutoConfig, PretrainedConfig

from distzo.common.errors import BadInput


class ModelError(BadInput):
    """The model path or config is not a supported causal LM."""


def load_config(model_dir: str | Path, verify: bool = True) -> PretrainedConfig:
    """The model directory's config, refused (ModelError) unless it is a supported decoder-only causal LM.

    ``verify``: for a family outside ``families.TESTED_FAMILIES``, also check numerically, on a
    small random model of the same config, that the block forward equals transformers' forward.
    """
    path = Path(model_dir)
    if not path.is_dir():
        raise ModelError(f"model directory {str(path)!r} does not exist")
    if not (path / "config.json").is_file():
        raise ModelError(f"{str(path)!r} is not a Hugging Face model directory: no config.json")
    try:
        config = AutoConfig.from_pretrained(str(path))
    except Exception as exc:  # transformers raises many types for bad configs
        raise ModelError(f"cannot read the model config in {str(path)!r}: {exc}") from exc
    from distzo.model import families

    reason = families.refusal(config)
    if reason is not None:
        raise ModelError(f"{str(path)!r} holds a {config.model_type!r} model, not a decoder-only causal LM that "
                         f"distzo can train: {reason}")
    if verify:
        families.verify_untested(config, where=str(path))
    return config


def read_safetensors(path: Path, names: list[str]) -> dict[str, torch.Tensor] | None:
    """The tensors ``names`` of the checkpoint in ``path`` as fp32 (sharded or single file); None when
    there is no safetensors checkpoint or it lacks one of them."""
    from safetensors import safe_open

    files: dict[str, str] = {}
    index = path / "model.safetensors.index.json"
    single = path / "model.safetensors"
    if index.is_file():
        weight_map = json.loads(index.read_text())["weight_map"]
        files = {n: str(path / f) for n, f in weight_map.items()}
    elif single.is_file():
        with safe_open(str(single), framework="pt") as f:
            files = {n: str(single) for n in f.keys()}
    else:
        return None
    if any(n not in files for n in names):
        return None
    out: dict[str, torch.Tensor] = {}
    by_file: dict[str, list[str]] = {}
    for n in names:
        by_file.setdefault(files[n], []).append(n)
    for fname, ns in by_file.items():
        with safe_open(fname, framework="pt") as f:
            for n in ns:
                out[n] = f.get_tensor(n).to(torch.float32)
    return out


def check_weight_files(model_dir: str | Path) -> None:
    """Fail early (ModelError naming the file) on a safetensors checkpoint that is truncated or damaged.

    Opening a file reads its header and checks the file holds every byte the header promises:
    cheap (no tensor is read), and done before any process starts.
    """
    from safetensors import SafetensorError, safe_open

    path = Path(model_dir)
    index = path / "model.safetensors.index.json"
    try:
        if index.is_file():
            files = sorted({path / f for f in json.loads(index.read_bytes())["weight_map"].values()})
        else:
            files = sorted(path.glob("*.safetensors"))
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        raise ModelError(f"{str(index)!r} is not a readable safetensors index (JSON with a weight_map)") from None
    for f in files:
        try:
            with safe_open(str(f), framework="pt"):
                pass
        except (SafetensorError, OSError) as exc:
            raise ModelError(f"model weights {str(f)!r} cannot be read ({str(exc)[:120]}): the file is truncated or "
                             "damaged; fetch or save the model again") from None
