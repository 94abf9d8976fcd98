"""Model adapter: any Hugging Face decoder-only causal LM as a parameter-free skeleton + blocks.

One generic mechanism, no per-family files: the model is built with empty (meta)
parameters and its real buffers (rotary tables), the decoder layers are the largest
``nn.ModuleList``, and a tracing forward records which parameter-owning modules run
before the layers (embedding block) and after them (head block). The skeleton's own
``forward`` then runs with each module's parameters bound, just in time, to views of
the block buffers (see ``forward.py``). A new family that follows the usual layout
(embeddings -> layer list -> norm -> lm_head) needs no code.
"""

from __future__ import annotations

import json
import logging
import threading
from dataclasses import dataclass
from pathlib import Path

import torch
from accelerate import init_empty_weights
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, PretrainedConfig

from distzo.errors import BadInput
from distzo.blocks import BlockSpec, Manifest, block_views, build_manifest, flatten_block

log = logging.getLogger(__name__)

SUPPORTED_FAMILIES = ("opt", "gpt2", "llama", "qwen2", "qwen3", "mistral")


class ModelError(BadInput):
    """The model path or config is not a supported causal LM."""


@dataclass(frozen=True)
class ParamRef:
    attr: str  # parameter attribute on the module ("weight", "bias")
    block: int  # block whose buffer stores it
    name: str  # canonical tensor name in that block


def load_config(model_dir: str | Path) -> PretrainedConfig:
    path = Path(model_dir)
    if not path.is_dir():
        raise ModelError(f"model directory {str(path)!r} does not exist")
    if not (path / "config.json").is_file():
        raise ModelError(f"{str(path)!r} is not a Hugging Face model directory: no config.json")
    try:
        config = AutoConfig.from_pretrained(str(path))
    except Exception as exc:  # transformers raises many types for bad configs
        raise ModelError(f"cannot read the model config in {str(path)!r}: {exc}") from exc
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    # encoder families (BERT, RoBERTa) carry is_decoder=False; decoder-only configs do not have it
    encoder = getattr(config, "is_decoder", True) is False or getattr(config, "is_encoder_decoder", False)
    if config.model_type not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES or encoder:
        kind = "an encoder" if encoder else "not a causal language"
        raise ModelError(f"{str(path)!r} holds a {config.model_type!r} model ({kind} model), not a decoder-only causal LM "
                         f"(tested families: {', '.join(SUPPORTED_FAMILIES)})")
    return config


# init_empty_weights patches nn.Module for the whole process: build one model at a time
_BUILD_LOCK = threading.RLock()


def _empty_model(config: PretrainedConfig) -> nn.Module:
    try:
        with _BUILD_LOCK, init_empty_weights(include_buffers=False):
            model = AutoModelForCausalLM.from_config(config, attn_implementation="sdpa")
    except ValueError as exc:
        raise ModelError(f"model type {config.model_type!r} is not a causal language model: {exc}") from exc
    model.tie_weights()
    model.eval()  # no dropout: the loss must be a deterministic function of the weights
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def _decoder_layers(model: nn.Module) -> tuple[str, nn.ModuleList]:
    best: tuple[int, str, nn.ModuleList] | None = None
    for name, mod in model.named_modules():
        if isinstance(mod, nn.ModuleList) and len(mod) > 0:
            size = sum(p.numel() for p in mod.parameters())
            if best is None or size > best[0]:
                best = (size, name, mod)
    if best is None:
        raise ModelError(f"{type(model).__name__} has no list of decoder layers")
    return best[1], best[2]


def _trace_call_order(model: nn.Module) -> list[str]:
    """Names of parameter-owning modules in the order a forward first calls them.

    Runs one tiny forward with each module's parameters materialized (uninitialized) only
    while it runs, so the trace costs one module's memory at a time.
    """
    order: list[str] = []
    seen: set[str] = set()
    handles = []

    def pre(mod: nn.Module, _args: object, name: str) -> None:
        if name not in seen:
            seen.add(name)
            order.append(name)
        mod._distzo_saved = dict(mod._parameters)  # type: ignore[attr-defined]
        for key, p in mod._parameters.items():
            if p is not None:
                mod._parameters[key] = torch.zeros(p.shape, dtype=torch.float32)

    def post(mod: nn.Module, _args: object, _out: object) -> None:
        mod._parameters.update(mod._distzo_saved)  # type: ignore[attr-defined]
        del mod._distzo_saved  # type: ignore[attr-defined]

    for name, mod in model.named_modules():
        if any(True for _ in mod.parameters(recurse=False)):
            handles.append(mod.register_forward_pre_hook(lambda m, a, n=name: pre(m, a, n)))
            handles.append(mod.register_forward_hook(post))
    try:
        ids = torch.zeros(1, 2, dtype=torch.long)
        with torch.inference_mode():
            hidden = model.base_model(input_ids=ids, attention_mask=torch.ones_like(ids)).last_hidden_state
            model.get_output_embeddings()(hidden)
    finally:
        for h in handles:
            h.remove()
    return order


class BlockModel:
    """A causal LM skeleton (no parameter memory) plus its block manifest."""

    def __init__(self, config: PretrainedConfig, source_dir: Path | None = None):
        self.config = config
        self.source_dir = source_dir
        self.skeleton = _empty_model(config)
        self.layers_path, layers = _decoder_layers(self.skeleton)
        num_layers = len(layers)
        self.num_blocks = num_layers + 2
        self.head_block = num_layers + 1

        with _BUILD_LOCK:
            call_order = _trace_call_order(self.skeleton)
        call_index = {name: i for i, name in enumerate(call_order)}
        layer_prefix = self.layers_path + "."
        first_layer_call = min(
            (i for n, i in call_index.items() if n.startswith(layer_prefix)), default=len(call_order)
        )

        def module_block(mod_name: str) -> int:
            if mod_name.startswith(layer_prefix):
                return 1 + int(mod_name[len(layer_prefix) :].split(".")[0])
            idx = call_index.get(mod_name)
            if idx is not None and idx < first_layer_call:
                return 0
            return self.head_block  # after the layers, or never called

        # Which module names use each parameter object, and in what order they run.
        users: dict[int, list[tuple[str, str, int]]] = {}
        params: dict[int, torch.Tensor] = {}
        for mod_name, mod in self.skeleton.named_modules():
            for attr, p in mod._parameters.items():
                if p is None:
                    continue
                full = f"{mod_name}.{attr}" if mod_name else attr
                users.setdefault(id(p), []).append((mod_name, full, module_block(mod_name)))
                params[id(p)] = p
        canonical_order = [n for n, _ in self.skeleton.named_parameters()]  # dedupes tied weights
        canonical_of_id: dict[int, str] = {}
        for mod_name, mod in self.skeleton.named_modules():
            for attr, p in mod._parameters.items():
                if p is not None and id(p) not in canonical_of_id:
                    canonical_of_id[id(p)] = f"{mod_name}.{attr}" if mod_name else attr

        block_of_param: dict[str, int] = {}
        shapes: dict[str, tuple[int, ...]] = {}
        tied: dict[str, str] = {}
        for pid, us in users.items():
            canon = canonical_of_id[pid]
            # a shared weight lives in the block of its earliest user in execution order
            owner = min(us, key=lambda u: (u[2], call_index.get(u[0], len(call_order))))[2]
            block_of_param[canon] = owner
            shapes[canon] = tuple(params[pid].shape)
            for _, full, _ in us:
                if full != canon:
                    tied[full] = canon

        names = {0: "embed", self.head_block: "head"}
        names.update({1 + i: f"layer.{i}" for i in range(num_layers)})
        self.manifest: Manifest = build_manifest(
            model_type=config.model_type,
            block_of_param=block_of_param,
            shapes=shapes,
            order=canonical_order,
            num_blocks=self.num_blocks,
            names=names,
            tied=tied,
        )
        if self.manifest.blocks[0].numel == 0:
            raise ModelError(f"{config.model_type}: found no embedding parameters before the decoder layers")

        # For each parameter-owning module: its block (for scheduling) and where its weights live.
        self.module_block: dict[nn.Module, int] = {}
        self.module_refs: dict[nn.Module, list[ParamRef]] = {}
        self.block_modules: list[list[nn.Module]] = [[] for _ in range(self.num_blocks)]
        for mod_name, mod in self.skeleton.named_modules():
            refs = []
            for attr, p in mod._parameters.items():
                if p is None:
                    continue
                canon = canonical_of_id[id(p)]
                refs.append(ParamRef(attr=attr, block=block_of_param[canon], name=canon))
            if refs:
                b = module_block(mod_name)
                self.module_block[mod] = b
                self.module_refs[mod] = refs
                self.block_modules[b].append(mod)
        # blocks whose weights are read by a module scheduled in a later block (tied heads)
        self.pinned_blocks: frozenset[int] = frozenset(
            r.block for m, refs in self.module_refs.items() for r in refs if r.block < self.module_block[m]
        )
        self._meta_params = {m: dict(m._parameters) for m in self.module_refs}

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_config_json(cls, config_json: str) -> "BlockModel":
        """The skeleton from a Hugging Face config alone (workers: no model directory needed)."""
        from transformers.models.auto.configuration_auto import CONFIG_MAPPING

        raw = json.loads(config_json)
        model_type = raw.get("model_type")
        if model_type not in CONFIG_MAPPING:
            raise ModelError(f"unknown model type {model_type!r} in the server's model config")
        return cls(CONFIG_MAPPING[model_type].from_dict(raw))

    @classmethod
    def from_dir(cls, model_dir: str | Path) -> "BlockModel":
        return cls(load_config(model_dir), Path(model_dir))

    # ------------------------------------------------------------------ weights
    def load_block_buffers(self, model_dir: str | Path | None = None) -> list[torch.Tensor]:
        """The model's weights as fp32 flat block buffers (safetensors read by name, else a full load)."""
        path = Path(model_dir) if model_dir is not None else self.source_dir
        if path is None:
            raise ModelError("no model directory to load weights from")
        check_weight_files(path)
        tensors = _read_safetensors(path, [t.name for b in self.manifest.blocks for t in b.tensors])
        if tensors is None:
            log.info("loading %s through from_pretrained (checkpoint names differ from the model's)", path)
            model = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32)
            tensors = dict(model.state_dict())
        return [flatten_block(spec, tensors) for spec in self.manifest.blocks]

    def state_dict_from_blocks(self, buffers: list[torch.Tensor]) -> dict[str, torch.Tensor]:
        state: dict[str, torch.Tensor] = {}
        for spec, buf in zip(self.manifest.blocks, buffers):
            state.update(block_views(spec, buf))
        return state

    def views(self, block: BlockSpec, flat: torch.Tensor) -> dict[str, torch.Tensor]:
        return block_views(block, flat)

    # ------------------------------------------------------------------ binding
    def bind(self, module: nn.Module, block_views_of: "dict[int, dict[str, torch.Tensor]]") -> None:
        """Point the module's parameters at views of the given blocks' buffers."""
        params = module._parameters
        for ref in self.module_refs[module]:
            params[ref.attr] = block_views_of[ref.block][ref.name]

    def unbind_block(self, block: int) -> None:
        """Give the block's modules their empty parameters back (drops references to buffers)."""
        for mod in self.block_modules[block]:
            mod._parameters.update(self._meta_params[mod])

    def unbind_all(self) -> None:
        for b in range(self.num_blocks):
            self.unbind_block(b)


def _read_safetensors(path: Path, names: list[str]) -> dict[str, torch.Tensor] | None:
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
