"""A Hugging Face model directory on disk: its config, checked to be a causal LM of a family distzo can
train (the refusals by family), its safetensors weights (read by name, and checked for damage before
anything starts), and the family's model built empty (meta parameters) from the config.
"""

from __future__ import annotations

import json
import threading
from pathlib import Path

import torch
from accelerate import init_empty_weights
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, PretrainedConfig

from distzo.common.errors import BadInput


class ModelError(BadInput):
    """The model path or config is not a supported causal LM."""


# init_empty_weights patches nn.Module for the whole process: build one model at a time
BUILD_LOCK = threading.RLock()


# families transformers maps to a causal-LM class that distzo cannot train, with the reason
UNSUPPORTED: dict[str, str] = {
    "bert-generation": "its BertGenerationDecoder attends to later tokens unless built as a decoder (is_decoder): "
                       "not a causal LM as configured",
    "trocr": "its TrOCRForCausalLM is the text decoder of a vision encoder-decoder, and transformers computes its "
             "loss without the causal shift",
    "hrm_text": "its forward runs the same layers several times (recurrent reasoning loops), so weights are reused "
                "out of layer order and cannot be streamed block by block",
    "llama4_text": "its forward moves the token ids to the embedding weight's device before the embedding runs, "
                   "which a streamed (not yet bound) weight does not have",
}



def refusal(config: PretrainedConfig) -> str | None:
    """Why distzo cannot train this config's family (None: it can, subject to the block-order trace)."""
    from transformers.models.auto import modeling_auto as auto

    mt = config.model_type
    if getattr(config, "is_encoder_decoder", False):
        return "it is an encoder-decoder model (its decoder attends to an encoder's output)"
    causal = auto.MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.get(mt)
    if causal is None:
        return "transformers has no causal-LM class for this family (tested families: see README, 'Model families')"
    if mt in auto.MODEL_FOR_MASKED_LM_MAPPING_NAMES:
        return (f"it is an encoder family (transformers lists it for masked language modeling); its {causal} "
                "is the bidirectional encoder run as a decoder")
    if mt in auto.MODEL_FOR_SEQ_TO_SEQ_CAUSAL_LM_MAPPING_NAMES:
        return f"its {causal} is the decoder half of an encoder-decoder family (made to attend to an encoder)"
    if causal.endswith("ForConditionalGeneration"):
        return f"transformers' causal-LM class for it is the multimodal {causal}, which needs more than token ids"
    return UNSUPPORTED.get(mt)


def read_config(model_dir: str | Path) -> PretrainedConfig:
    """The model directory's config, refused (ModelError) unless it is a decoder-only causal LM of a family
    distzo can train (``refusal``). The numeric check of a family outside the tested ones is the model package's
    top, ``distzo.model.families.load_config``: it runs the block-streaming forward, which builds on this module."""
    path = Path(model_dir)
    if not path.is_dir():
        raise ModelError(f"model directory {str(path)!r} does not exist")
    if not (path / "config.json").is_file():
        raise ModelError(f"{str(path)!r} is not a Hugging Face model directory: no config.json")
    try:
        config = AutoConfig.from_pretrained(str(path))
    except Exception as exc:  # transformers raises many types for bad configs
        raise ModelError(f"cannot read the model config in {str(path)!r}: {exc}") from exc
    reason = refusal(config)
    if reason is not None:
        raise ModelError(f"{str(path)!r} holds a {config.model_type!r} model, not a decoder-only causal LM that "
                         f"distzo can train: {reason}")
    return config


def empty_model(config: PretrainedConfig) -> nn.Module:
    """The family's causal-LM class on meta parameters; attention as transformers picks it (sdpa, else eager):
    the weightless skeleton the blocks run on (``modeling.py``), and the model an export loads them into."""
    try:
        with BUILD_LOCK, init_empty_weights(include_buffers=False):
            model = AutoModelForCausalLM.from_config(config)
    except Exception as exc:  # noqa: BLE001 - transformers raises many kinds for configs it cannot build
        raise ModelError(f"transformers cannot build a {config.model_type!r} causal LM from this config: "
                         f"{type(exc).__name__}: {exc}") from exc
    model.tie_weights()
    model.eval()  # no dropout: the loss must be a deterministic function of the weights
    for p in model.parameters():
        p.requires_grad_(False)
    return model


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
