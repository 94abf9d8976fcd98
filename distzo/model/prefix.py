"""Prefix tuning (``train.target: prefix``): trainable keys and values prepended in every layer, from ``peft``.

Li & Liang 2021, "Prefix-Tuning"; MeZO's prefix setting (Malladi et al. 2023, App. E). Each decoder
layer attends to ``n = train.prefix_tokens`` extra positions whose key and value vectors are trained
directly (peft's ``PrefixTuningConfig`` without the reparametrizing MLP); the whole base model is
frozen. Layer ``i``'s prefix is one tensor ``[n, 2 * kv_dim]`` (keys, then values; ``kv_dim`` =
key/value heads x head dim, peft's ``token_dim``) held by a ``PrefixKV`` module added to the layer, and
stored in the layer's trainable block right after its frozen block, as LoRA's adapters are.

Streaming: peft builds every layer's prefix before the forward starts; the block engine cannot (a
layer's prefix arrives with its block). ``PrefixCache`` is a ``DynamicCache`` whose layer ``i`` reads
its prefix from the bound ``PrefixKV`` the moment layer ``i``'s attention first updates the cache, and
reports ``n`` cached positions before that, so masks and positions are those of peft's pre-filled
cache. The attention then sees ``cat([prefix, new])``, the same tensors peft gives it: the export
(``PeftModel.from_pretrained(base, out)``) reproduces the run's logits bit for bit (tested).
"""

from __future__ import annotations

import functools
import hashlib
import inspect
from dataclasses import dataclass

import torch
from torch import nn
from transformers import DynamicCache
from transformers.cache_utils import Cache, DynamicLayer

from distzo.common.errors import counted
from distzo.model.modeldir import ModelError

# families whose streamed prefix gives other logits than peft's PeftModel on a random tiny model
# (bench/prefix_families.py), not yet explained: refused rather than trained into an adapter peft loads otherwise
PREFIX_DIFFERS = {
    "ergo": "the streamed prefix's logits differ from peft's for this family (max 0.56 on a random tiny model, "
            "bench/prefix_families.py; new in transformers 5.25, not investigated)",
}
MODULE = "prefix_kv"  # the module added to each decoder layer; its parameter is ``<layer>.prefix_kv.weight``


class PrefixKV(nn.Module):
    """One layer's prefix: ``weight`` [tokens, 2 * heads * head_dim] (keys, then values), peft's layout.

    Never called: the layer's attention reads it through ``PrefixCache`` while the layer's block is bound."""

    def __init__(self, tokens: int, heads: int, head_dim: int):
        super().__init__()
        self.tokens, self.heads, self.head_dim = tokens, heads, head_dim
        self.reads = 0  # how many forwards' attention read it (the trace checks every layer's does)
        self.weight = nn.Parameter(torch.empty(tokens, 2 * heads * head_dim, device="meta"), requires_grad=False)

    def key_value(self, batch_size: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values, each [batch, heads, tokens, head_dim], as peft's ``get_prompt`` shapes them."""
        self.reads += 1
        kv = self.weight.view(self.tokens, 2, self.heads, self.head_dim).permute(1, 2, 0, 3)
        return kv[0].unsqueeze(0).expand(batch_size, -1, -1, -1), kv[1].unsqueeze(0).expand(batch_size, -1, -1, -1)


class _PrefixLayer(DynamicLayer):
    """A cache layer that holds ``source``'s prefix from its first update on, and says so before it."""

    def __init__(self, source: PrefixKV, batch_size: int):
        super().__init__()
        self.source, self.batch_size = source, batch_size

    def get_seq_length(self) -> int:
        return self.source.tokens if not self.is_initialized else super().get_seq_length()

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):  # noqa: ANN002, ANN003, ANN201
        if not self.is_initialized:
            keys, values = self.source.key_value(self.batch_size)
            if keys.shape[1] != key_states.shape[1] or keys.shape[3] != key_states.shape[3]:
                raise ModelError(f"train.target prefix: peft lays out this config's prefix as "
                                 f"{counted(keys.shape[1], 'head')} of {keys.shape[3]}, and the attention's keys have "
                                 f"{counted(key_states.shape[1], 'head')} of {key_states.shape[3]}: peft's prefix does "
                                 "not fit this family (use train.target lora or full)")
            super().update(keys.to(key_states.dtype), values.to(value_states.dtype))
        return super().update(key_states, value_states, *args, **kwargs)


class PrefixCache(DynamicCache):
    """A ``DynamicCache`` with each layer's prefix, read just in time from the layers' ``PrefixKV`` modules."""

    def __init__(self, sources: list[PrefixKV], batch_size: int):  # noqa: D107 - Cache's own: fixed layers, no data
        Cache.__init__(self, layers=[_PrefixLayer(s, batch_size) for s in sources])


@functools.cache
def _cache_argument(model_class: type) -> str:
    params = inspect.signature(model_class.forward).parameters
    return "cache" if "cache" in params else "past_key_values"


def init_generator(init_seed: int, name: str) -> torch.Generator:
    """The generator of adapter tensor ``name``'s initial values (a LoRA A, a layer's prefix): seeded by
    ``train.seed`` and the name (a stable hash), so a tensor's values do not depend on the order tensors are made in."""
    digest = int.from_bytes(hashlib.sha256(name.encode()).digest()[:8], "little") >> 1
    return torch.Generator().manual_seed((init_seed * 1_000_003 + digest) % (1 << 63))


@dataclass(frozen=True)
class PrefixTarget:
    """``train.target: prefix`` settings: the prefix length in tokens, and the seed of its initial values."""

    tokens: int
    init_seed: int = 0
    kind = "prefix"

    def peft_config(self, config=None):  # noqa: ANN001, ANN201 - peft.PrefixTuningConfig (filled in for config)
        from peft import PrefixTuningConfig

        pc = PrefixTuningConfig(num_virtual_tokens=self.tokens, task_type="CAUSAL_LM")
        if config is not None:
            from peft.utils.other import _prepare_prompt_learning_config  # peft's own layout: one source of truth

            pc = _prepare_prompt_learning_config(pc, config)
        return pc

    def inject(self, model: nn.Module, layers_path: str) -> None:
        """Add a ``PrefixKV`` (meta parameter) to each decoder layer of ``model``.

        Raises ModelError for a model whose layers are not all plain full-attention cache layers (sliding
        windows, linear attention and shared key/values have no place for a prefix here)."""
        config = model.config
        layers = model.get_submodule(layers_path)
        kinds = {type(layer).__name__ for layer in DynamicCache(config=config).layers} - {"DynamicSlidingWindowLayer"}
        reason = None
        if kinds - {"DynamicLayer"} or getattr(config, "num_kv_shared_layers", 0):
            reason = f"its cache has {sorted(kinds - {'DynamicLayer'}) or 'shared key/value'} layers, not attention only"
        elif any(t in config.model_type for t in ("gemma2", "gemma3", "gemma4")):
            reason = "peft gives its prefix through a cache of its own for this family, not implemented here"
        elif config.model_type in PREFIX_DIFFERS:
            reason = PREFIX_DIFFERS[config.model_type]
        elif _cache_argument(type(model)) not in inspect.signature(type(model).forward).parameters:
            reason = "its forward takes no key/value cache"
        if reason is not None:
            raise ModelError(f"train.target prefix: {config.model_type}: {reason} (use train.target lora or full)")
        try:
            pc = self.peft_config(config)
        except ValueError as exc:  # peft cannot read the layers or heads from this config
            raise ModelError(f"train.target prefix: peft cannot lay out a prefix for {config.model_type}: {exc} "
                             "(use train.target lora or full)") from None
        if pc.num_layers != len(layers):
            raise ModelError(f"train.target prefix: {config.model_type}: peft lays out a prefix for "
                             f"{counted(pc.num_layers, 'layer')}, the model has {len(layers)} (use train.target lora or full)")
        heads = pc.num_attention_heads
        for layer in layers:
            layer.add_module(MODULE, PrefixKV(self.tokens, heads, pc.token_dim // heads))

    def initial_value(self, name: str, shape: tuple[int, ...]) -> torch.Tensor:
        """Layer prefix ``name``'s initial fp32 value: N(0, 1), peft's default (an ``nn.Embedding``), seeded
        by ``init_seed`` and the name so it does not depend on the order tensors are made in."""
        return torch.randn(shape, dtype=torch.float32, generator=init_generator(self.init_seed, name))

    @staticmethod
    def forward_inputs(model: nn.Module, layers: nn.ModuleList, attention_mask: torch.Tensor) -> dict[str, object]:
        """The causal LM's extra inputs: the mask with ``tokens`` attended positions in front (float, as
        peft makes it) and the just-in-time ``PrefixCache`` (as ``cache``, or ``past_key_values`` where the
        family's forward has no ``cache`` argument, as before transformers 5.2x)."""
        sources = [layer.get_submodule(MODULE) for layer in layers]
        batch = attention_mask.shape[0]
        ones = torch.ones(batch, sources[0].tokens).to(attention_mask.device)
        return {"attention_mask": torch.cat((ones, attention_mask), dim=1),
                _cache_argument(type(model)): PrefixCache(sources, batch), "use_cache": True}

    def load_into(self, peft_model, adapters: dict[str, torch.Tensor], layers_path: str) -> None:  # noqa: ANN001
        """Copy the layers' prefixes into peft's prompt encoder ([tokens, layers * 2 * kv_dim], layer-major)."""
        n = len(adapters)
        stacked = torch.cat([adapters[f"{layers_path}.{i}.{MODULE}.weight"] for i in range(n)], dim=1)
        weight = peft_model.prompt_encoder["default"].embedding.weight
        if weight.shape != stacked.shape:
            raise RuntimeError(f"export: peft's prefix is {tuple(weight.shape)}, the blocks' {tuple(stacked.shape)}")
        with torch.no_grad():
            weight.copy_(stacked)
