"""Write blocks out as a standard Hugging Face model directory (``save_pretrained`` layout)."""

from __future__ import annotations

import os
import shutil
import uuid
from pathlib import Path

import torch

from distzo.adapters import export_adapter
from distzo.modeling import BlockModel, _empty_model

TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "vocab.json",
    "merges.txt",
    "tokenizer.model",
    "chat_template.jinja",
)


def export_model_dir(model: BlockModel, buffers: list[torch.Tensor], out_dir: str | Path, merge: bool = False) -> Path:
    """Save the weights in ``buffers`` (fp32 blocks) with the model's config and tokenizer files.

    The exported model's parameters are views of the block buffers (no second copy of the
    weights in memory); ``save_pretrained`` writes them as safetensors. A LoRA or prefix run (``model.adapter``)
    writes peft's adapter directory (``PeftModel.from_pretrained(base, out)``), or with ``merge`` (LoRA)
    the merged plain model (``distzo/adapters.py``); ``merge`` is refused for other targets.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if model.adapter is not None:
        export_adapter(model.config, model.source_dir, model.state_dict_from_blocks(buffers), model.adapter,
                       model.layers_path, out, merge)
        _copy_tokenizer(model, out)
        _umask_modes(out)
        return out
    if merge:
        raise ValueError("--merge merges a LoRA adapter into the base: this run trains the full model (train.target full)")
    hf = _empty_model(model.config)
    state = model.state_dict_from_blocks(buffers)
    missing, unexpected = hf.load_state_dict(state, strict=False, assign=True)
    if unexpected:
        raise RuntimeError(f"export: unexpected tensors {unexpected[:5]}")
    untied = [m for m in missing if m not in model.manifest.tied and m not in dict(hf.named_buffers())]
    if untied:
        raise RuntimeError(f"export: tensors missing from the blocks: {untied[:5]}")
    hf.tie_weights()
    hf.save_pretrained(str(out), safe_serialization=True)
    _copy_tokenizer(model, out)
    _umask_modes(out)
    return out


def _umask_modes(out: Path) -> None:
    """Give the safetensors files the mode of every other exported file (0o666 less the umask):
    the safetensors writer makes them 0600. The umask is read from a probe file, since os.umask
    would change it for the whole process (the server's other threads) to read it."""
    probe = out / f".mode-probe-{uuid.uuid4().hex}"
    os.close(os.open(probe, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666))
    try:
        mode = probe.stat().st_mode & 0o777
    finally:
        probe.unlink()
    for f in out.glob("*.safetensors"):
        f.chmod(mode)


def _copy_tokenizer(model: BlockModel, out: Path) -> None:
    if model.source_dir is not None:
        for name in TOKENIZER_FILES:
            src = model.source_dir / name
            if src.is_file():
                shutil.copyfile(src, out / name)
