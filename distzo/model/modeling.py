"""Model adapter: any Hugging Face decoder-only causal LM as a parameter-free skeleton + blocks.

One generic mechanism, no per-family files: the model is built with empty (meta)
parameters and its real buffers (rotary tables), the decoder layers are the largest
``nn.ModuleList``, and a tracing run of the family's own causal-LM ``forward`` records
which parameter-owning modules run before the layers (embedding block) and after them
(head block: final norm, ``lm_head``, and whatever the family's forward does to the logits,
such as scaling or soft-capping, runs as its own code). The skeleton's own ``forward`` then
runs with each module's parameters bound, just in time, to views of the block buffers (see
``forward.py``).

The trace also checks, up front, that this binding gives the family's own forward: every
parameter is read only while its module runs (else it would still be empty: the trace
fails), and modules run in block order (a module that runs again after a later block, as
in models that share weights across layers, cannot be streamed block by block). A family
that fails either check, or that ``distzo.model.families`` refuses, is refused by name with the
reason.
"""

from __future__ import annotations

import inspect
import json
import logging
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from transformers import AutoModelForCausalLM, PretrainedConfig

from distzo.model.adapters import LoraTarget, checkpoint_name, is_adapter
from distzo.model.blocks import BlockSpec, Manifest, block_views, build_manifest, flatten_block
from distzo.model.modeldir import BUILD_LOCK, ModelError, check_weight_files, empty_model, read_config, read_safetensors
from distzo.model.prefix import MODULE as PREFIX_MODULE
from distzo.model.prefix import PrefixTarget

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ParamRef:
    attr: str  # parameter attribute on the module ("weight", "bias")
    block: int  # block whose buffer stores it
    name: str  # canonical tensor name in that block


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


def forward_kwargs(model: nn.Module) -> tuple[dict[str, object], bool]:
    """Keyword arguments for the family's causal-LM forward, and whether it takes ``logits_to_keep``."""
    params = inspect.signature(type(model).forward).parameters
    extra: dict[str, object] = {}
    if "use_cache" in params:
        extra["use_cache"] = False
    return extra, "logits_to_keep" in params


def causal_lm_logits(model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                     positions: torch.Tensor | None, extra: dict[str, object], keep: bool,
                     select: bool = True, prefix_layers: nn.ModuleList | None = None) -> torch.Tensor:
    """The family's own forward: logits [B, P, V] at the sorted sequence ``positions`` (all when None).

    ``select=False``: return the logits as the forward gives them (a hook on the output embedding
    has already picked the positions). ``prefix_layers`` (``train.target: prefix``): the decoder layers,
    whose ``PrefixKV`` modules give each layer's prefix (``distzo/model/prefix.py``).
    """
    kwargs = dict(extra)
    kwargs["attention_mask"] = attention_mask
    if prefix_layers is not None:
        kwargs.update(PrefixTarget.forward_inputs(model, prefix_layers, attention_mask))
    if positions is not None and keep:
        kwargs["logits_to_keep"] = positions
    out = model(input_ids=input_ids, **kwargs)
    logits = out.logits if hasattr(out, "logits") else out[0]
    if select and positions is not None and (not keep or logits.shape[1] != positions.numel()):
        logits = logits[:, positions.to(logits.device)]
    return logits


def _trace_call_order(model: nn.Module, layers_path: str, extra: dict[str, object], keep: bool,
                      prefix_layers: nn.ModuleList | None = None) -> list[str]:
    """Names of parameter-owning modules in the order a forward calls them (every call).

    Runs one tiny forward of the family's causal-LM ``forward`` with parameters materialized
    (zeros) the way the engine binds them: a decoder layer's, all of them, from the first call
    into that layer until a call outside it; any other module's only while it runs. The trace
    costs one layer's (or module's) memory at a time, and a parameter read where the engine
    would not have it bound fails the trace (it is still empty).
    """
    order: list[str] = []
    prefix = layers_path + "."
    saved: dict[nn.Module, list[dict[str, object]]] = {}

    def unit_of(name: str) -> str | None:
        return prefix + name[len(prefix) :].split(".")[0] if name.startswith(prefix) else None

    owners = [(name, mod) for name, mod in model.named_modules() if any(True for _ in mod.parameters(recurse=False))]
    layer_members: dict[str, list[nn.Module]] = {}
    for name, mod in owners:
        unit = unit_of(name)
        if unit is not None:
            layer_members.setdefault(unit, []).append(mod)
    current: list[str | None] = [None]

    def materialize(mod: nn.Module) -> None:
        saved.setdefault(mod, []).append(dict(mod._parameters))
        for key, p in mod._parameters.items():
            if p is not None and p.device.type == "meta":
                mod._parameters[key] = torch.zeros(p.shape, dtype=torch.float32)

    def restore(mod: nn.Module) -> None:
        mod._parameters.update(saved[mod].pop())
        if not saved[mod]:
            del saved[mod]

    def pre(mod: nn.Module, args: tuple, name: str) -> None:
        order.append(name)
        if any(isinstance(a, torch.Tensor) and a.device.type == "meta" for a in args):
            # e.g. ``input_ids.to(self.embed_tokens.weight.device)``: read from an empty weight before it is bound
            raise ModelError(f"{type(model).__name__}: module {name!r} is given a tensor on the empty (meta) device: "
                             "the forward uses one of its parameters (its device or values) before calling it")
        unit = unit_of(name)
        if unit != current[0]:
            if current[0] is not None:
                for m in layer_members[current[0]]:
                    restore(m)
            current[0] = unit
            if unit is not None:
                for m in layer_members[unit]:
                    materialize(m)
        if unit is None:
            materialize(mod)

    def post(mod: nn.Module, _args: object, _out: object, name: str) -> None:
        if unit_of(name) is None:
            restore(mod)

    handles = []
    for name, mod in owners:
        handles.append(mod.register_forward_pre_hook(lambda m, a, n=name: pre(m, a, n)))
        handles.append(mod.register_forward_hook(lambda m, a, o, n=name: post(m, a, o, n)))
    try:
        ids = torch.zeros(1, 2, dtype=torch.long)
        with torch.inference_mode():
            logits = causal_lm_logits(model, ids, torch.ones_like(ids), torch.tensor([1]), extra, keep,
                                      prefix_layers=prefix_layers)
        if logits.shape[:2] != (1, 1):
            raise ModelError(f"{type(model).__name__} returned logits of shape {tuple(logits.shape)} for one position")
    except ModelError:
        raise
    except Exception as exc:  # noqa: BLE001 - a forward that cannot run on bound parameters
        raise ModelError(f"{type(model).__name__}'s forward cannot run with its weights streamed block by block "
                         f"(a parameter is read outside its layer or module, or the forward needs more than "
                         f"token ids): {type(exc).__name__}: {str(exc)[:300]}") from exc
    finally:
        for h in handles:
            h.remove()
        for mod, stack in list(saved.items()):
            mod._parameters.update(stack[0])
    return order


class BlockModel:
    """A causal LM skeleton (no parameter memory) plus its block manifest.

    The model is cut into ``num_blocks = L + 2`` blocks in execution order (``distzo/model/blocks.py``):
    block 0 the embeddings, blocks 1..L the decoder layers, block L+1 (``head_block``) the final
    norm and head. ``manifest`` gives each block's tensors and offsets; a block's weights are one
    flat fp32 [numel] buffer, and ``bind`` points the skeleton's parameters at views of it.
    Raises ModelError for a config that is not a supported decoder-only causal LM.

    ``adapter`` (``train.target`` lora or prefix, ``distzo/model/adapters.py``, ``distzo/model/prefix.py``): peft's
    LoRA layers wrap the target modules, or a ``PrefixKV`` module joins each layer; each decoder layer's
    adapter tensors are a trainable block right after the layer's frozen block (``num_blocks = 2 L + 2``;
    the other blocks are frozen). The layer's modules are scheduled in the layer's block and read the
    adapters from the next one, as a tied head reads the embedding.
    """

    def __init__(self, config: PretrainedConfig, source_dir: Path | None = None,
                 adapter: LoraTarget | PrefixTarget | None = None):
        self.config = config
        self.source_dir = source_dir
        self.adapter = adapter
        self.skeleton = empty_model(config)
        self.layers_path, layers = _decoder_layers(self.skeleton)
        if adapter is not None:
            with BUILD_LOCK:
                adapter.inject(self.skeleton, self.layers_path)
        self.prefix_layers = layers if isinstance(adapter, PrefixTarget) else None
        num_layers = len(layers)
        per_layer = 2 if adapter is not None else 1  # the layer's frozen block, then its adapter's block
        self.num_blocks = per_layer * num_layers + 2
        self.head_block = self.num_blocks - 1

        self.forward_extra, self.keeps_logits = forward_kwargs(self.skeleton)
        with BUILD_LOCK:
            call_order = _trace_call_order(self.skeleton, self.layers_path, self.forward_extra, self.keeps_logits,
                                           self.prefix_layers)
        call_index: dict[str, int] = {}
        for i, name in enumerate(call_order):
            call_index.setdefault(name, i)
        layer_prefix = self.layers_path + "."
        first_layer_call = min(
            (i for n, i in call_index.items() if n.startswith(layer_prefix)), default=len(call_order)
        )

        def module_block(mod_name: str) -> int:
            if mod_name.startswith(layer_prefix):
                return 1 + per_layer * int(mod_name[len(layer_prefix) :].split(".")[0])
            idx = call_index.get(mod_name)
            if idx is not None and idx < first_layer_call:
                return 0
            return self.head_block  # after the layers, or never called

        self._check_block_order(call_order, module_block)
        if self.prefix_layers is not None:
            self._check_prefix_read()

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
            block_of_param[canon] = owner + 1 if is_adapter(canon) else owner  # the adapters' own block
            shapes[canon] = tuple(params[pid].shape)
            for _, full, _ in us:
                if full != canon:
                    tied[full] = canon

        names = {0: "embed", self.head_block: "head"}
        names.update({1 + per_layer * i: f"layer.{i}" for i in range(num_layers)})
        if adapter is not None:
            names.update({2 + per_layer * i: f"{adapter.kind}.{i}" for i in range(num_layers)})
        self.manifest: Manifest = build_manifest(
            model_type=config.model_type,
            block_of_param=block_of_param,
            shapes=shapes,
            order=canonical_order,
            num_blocks=self.num_blocks,
            names=names,
            tied=tied,
            trainable=None if adapter is None else {b for b, n in names.items() if n.startswith(f"{adapter.kind}.")},
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

    def _check_block_order(self, call_order: list[str], module_block) -> None:  # noqa: ANN001
        """Refuse a forward that goes back to an earlier block: it cannot be streamed block by block."""
        highest, where = 0, ""
        for name in call_order:
            b = module_block(name)
            if b < highest:
                raise ModelError(
                    f"{self.config.model_type}: module {name!r} (block {b}) runs again after block {highest} "
                    f"({where!r}): its forward reuses weights out of layer order (shared across layers), so it "
                    "cannot be streamed block by block")
            if b > highest:
                highest, where = b, name

    def _check_prefix_read(self) -> None:
        """Refuse a prefix no layer's attention reads: the trace's forward read each layer's once, or it trains nothing."""
        unread = [i for i, layer in enumerate(self.prefix_layers) if layer.get_submodule(PREFIX_MODULE).reads != 1]
        if unread:
            raise ModelError(f"train.target prefix: {self.config.model_type}: layers {unread[:8]} do not read a prefix "
                             "from the key/value cache (use train.target lora or full)")

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_config_json(cls, config_json: str, adapter: LoraTarget | PrefixTarget | None = None) -> "BlockModel":
        """The skeleton from a Hugging Face config alone (workers: no model directory needed)."""
        from transformers.models.auto.configuration_auto import CONFIG_MAPPING

        raw = json.loads(config_json)
        model_type = raw.get("model_type")
        if model_type not in CONFIG_MAPPING:
            raise ModelError(f"unknown model type {model_type!r} in the server's model config")
        return cls(CONFIG_MAPPING[model_type].from_dict(raw), adapter=adapter)

    @classmethod
    def from_dir(cls, model_dir: str | Path, adapter: LoraTarget | PrefixTarget | None = None) -> "BlockModel":
        """The skeleton of a Hugging Face model directory (config.json, refused by family; weights by
        ``load_block_buffers``). A model a job names loads through ``families.load_model``, which also checks
        a family outside the tested ones numerically."""
        return cls(read_config(model_dir), Path(model_dir), adapter)

    # ------------------------------------------------------------------ weights
    def load_block_buffers(self, model_dir: str | Path | None = None) -> list[torch.Tensor]:
        """The model's weights as fp32 flat block buffers (safetensors read by name, else a full load).

        Returns one [blocks[b].numel] float32 CPU tensor per block. Raises ModelError when there is no
        model directory or a safetensors file of it is truncated or damaged."""
        path = Path(model_dir) if model_dir is not None else self.source_dir
        if path is None:
            raise ModelError("no model directory to load weights from")
        check_weight_files(path)
        names = [t.name for b in self.manifest.blocks for t in b.tensors if not is_adapter(t.name)]
        tensors = read_safetensors(path, [checkpoint_name(n) for n in names])
        if tensors is None:
            log.info("loading %s through from_pretrained (checkpoint names differ from the model's)", path)
            model = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32)
            tensors = dict(model.state_dict())
        tensors = {n: tensors[checkpoint_name(n)] for n in names}
        if self.adapter is not None:  # the adapters' initial values (LoRA's B = 0: the initial model is the base)
            tensors.update({t.name: self.adapter.initial_value(t.name, t.shape)
                            for b in self.manifest.blocks for t in b.tensors if is_adapter(t.name)})
        return [flatten_block(spec, tensors) for spec in self.manifest.blocks]

    def state_dict_from_blocks(self, buffers: list[torch.Tensor]) -> dict[str, torch.Tensor]:
        """Hugging Face parameter name -> tensor of its shape, as views of the flat block ``buffers``."""
        state: dict[str, torch.Tensor] = {}
        for spec, buf in zip(self.manifest.blocks, buffers):
            state.update(block_views(spec, buf))
        return state

    def views(self, block: BlockSpec, flat: torch.Tensor, vectors: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """Parameter name -> view of its shape into ``flat``, the block's [numel] buffer (no copy); with ``vectors``
        the tensors of rank < 2 are views of it (``blocks.block_views``)."""
        return block_views(block, flat, vectors)

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
        """Unbind every block: the skeleton holds no weights again."""
        for b in range(self.num_blocks):
            self.unbind_block(b)
