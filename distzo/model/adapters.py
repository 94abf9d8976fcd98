"""Trainable targets other than the full model: LoRA adapters (``train.target: lora``), from ``peft``;
prefixes (``train.target: prefix``) are in ``distzo/model/prefix.py``; ``adapter_from_train`` picks one.

With ``lora`` the skeleton's target linear modules (``train.lora_modules``) are wrapped by peft's
``LoraLayer``: ``y = W x + (alpha / r) B A x`` with ``A`` [r, in], ``B`` [out, r] (Hu et al. 2021,
"LoRA"; MeZO's LoRA setting, Malladi et al. 2023, App. E). The base ``W`` is frozen. Each decoder
layer's adapters are one extra *trainable* block stored right after the layer's frozen block
(``distzo/model/modeling.py``), so a worker fetches the frozen blocks once and only the small adapter
blocks per step, the perturbation touches only trainable blocks, and the server's update skips
the frozen ones.

Initial values are peft's defaults, made deterministic: ``A`` Kaiming-uniform (a = sqrt 5) from a
``torch.Generator`` seeded by ``train.seed``, ``B`` zeros, so the initial model equals the base.
The export is peft's own (``PeftModel.save_pretrained``), loadable with
``PeftModel.from_pretrained(base, out)``; ``merge=True`` writes ``merge_and_unload()``'s plain model.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import nn

from distzo.model.modeldir import ModelError, empty_model
from distzo.model.prefix import MODULE as PREFIX_MODULE
from distzo.model.prefix import PrefixTarget, init_generator

if TYPE_CHECKING:
    from distzo.common.configsections import TrainSection

ADAPTER = "default"  # peft's adapter name: the skeleton's parameter names carry it
BASE_MARK = ".base_layer."  # peft's wrapper puts the frozen linear under this attribute


@dataclass(frozen=True)
class LoraTarget:
    """``train.target: lora`` settings: rank r, scaling alpha (the adapter adds (alpha / r) B A x), the
    target module names (peft ``target_modules``), and the seed of A's initial values."""

    rank: int
    alpha: float
    modules: tuple[str, ...] | None  # None: peft's default for the model's family (q_proj, v_proj; GPT-2's c_attn)
    init_seed: int = 0
    kind = "lora"

    def target_modules(self, config=None) -> list[str]:  # noqa: ANN001 - a transformers config
        """The module names: the configured ones, or peft's default for ``config``'s family (q_proj and v_proj
        where it has none: MeZO's LoRA setting)."""
        if self.modules:
            return list(self.modules)
        from peft.utils.constants import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING as DEFAULTS

        return list(DEFAULTS.get(getattr(config, "model_type", None), ["q_proj", "v_proj"]))

    def peft_config(self, config=None):  # noqa: ANN001, ANN201 - peft.LoraConfig (``config``: the model's)
        from peft import LoraConfig

        return LoraConfig(r=self.rank, lora_alpha=self.alpha, target_modules=self.target_modules(config),
                          lora_dropout=0.0, bias="none", task_type="CAUSAL_LM")

    def inject(self, model: nn.Module, layers_path: str) -> None:
        """Wrap ``model``'s target modules with peft LoRA layers in place (meta parameters stay meta).

        ``layers_path``: the decoder layers' ModuleList (e.g. ``model.decoder.layers``): adapters live
        in the layers' blocks, so every name in ``modules`` must be a linear module of the layers.
        Raises ModelError naming the layers' linear modules when one is not (peft itself only checks
        that some name matches, and a module outside the layers, e.g. ``lm_head``, has no adapter block)."""
        from peft import inject_adapter_in_model

        prefix = layers_path + "."
        linear = sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules()
                         if n.startswith(prefix) and (isinstance(m, nn.Linear) or type(m).__name__ == "Conv1D")})
        unknown = [m for m in self.target_modules(model.config) if m not in linear]
        if unknown:
            raise ModelError(f"train.lora_modules: {unknown} {'is' if len(unknown) == 1 else 'are'} not a linear module "
                             f"of this model's decoder layers; expected names from {linear[:20]}")
        inject_adapter_in_model(self.peft_config(model.config), model, adapter_name=ADAPTER, low_cpu_mem_usage=True)
        for p in model.parameters():
            p.requires_grad_(False)

    def initial_value(self, name: str, shape: tuple[int, ...]) -> torch.Tensor:
        """The initial fp32 value of adapter tensor ``name``: A Kaiming-uniform (seeded by name and
        ``init_seed``, so it does not depend on the order tensors are made in), B zeros."""
        if ".lora_B." in name:
            return torch.zeros(shape, dtype=torch.float32)
        gen = init_generator(self.init_seed, name)
        out = torch.empty(shape, dtype=torch.float32)
        # nn.init.kaiming_uniform_(a=sqrt(5)), peft's init of A: bound = sqrt(6 / ((1 + a^2) fan_in))
        bound = math.sqrt(6.0 / ((1.0 + 5.0) * shape[1]))
        return out.uniform_(-bound, bound, generator=gen)


    def load_into(self, peft_model, adapters: dict[str, torch.Tensor], layers_path: str) -> None:  # noqa: ANN001
        """Copy the blocks' A and B tensors into ``peft_model``'s (same names under ``base_model.model.``)."""
        seen = 0
        for name, p in peft_model.named_parameters():
            if is_adapter(name):
                src = adapters[name.removeprefix("base_model.model.")]
                with torch.no_grad():
                    p.copy_(src.reshape(p.shape))
                seen += 1
        if seen != len(adapters):
            raise RuntimeError(f"export: {len(adapters)} adapter tensors in the blocks, peft's model has {seen}")


def adapter_from_train(train: "TrainSection") -> "LoraTarget | PrefixTarget | None":
    """The adapter settings of ``train`` (None for ``train.target: full``)."""
    if train.target == "lora":
        modules = tuple(train.lora_modules) if train.lora_modules is not None else None
        return LoraTarget(train.lora_rank, float(train.lora_alpha), modules, train.seed)
    if train.target == "prefix":
        return PrefixTarget(train.prefix_tokens, train.seed)
    return None


def is_adapter(name: str) -> bool:
    """Whether parameter ``name`` (the skeleton's) is an adapter tensor (LoRA's A or B, a layer's prefix)."""
    return ".lora_A." in name or ".lora_B." in name or f".{PREFIX_MODULE}." in name


def checkpoint_name(name: str) -> str:
    """The Hugging Face checkpoint's name of a base parameter (peft's ``.base_layer.`` dropped)."""
    return name.replace(BASE_MARK, ".")


def export_adapter(config, base_name, state: dict[str, torch.Tensor], adapter: "LoraTarget | PrefixTarget",  # noqa: ANN001
                   layers_path: str, out, merge: bool = False) -> None:  # noqa: ANN001
    """Write the run's adapter with peft (``adapter_config.json``, ``adapter_model.safetensors``), or with
    ``merge`` (LoRA only) the merged plain model (``save_pretrained``).

    ``state``: the skeleton's parameter name -> tensor (base under ``.base_layer.``, adapters with the
    adapter name, prefixes under ``<layer>.prefix_kv.``), fp32. Raises RuntimeError when a tensor is
    missing, ValueError for ``merge`` with a prefix (peft cannot fold a prefix into the weights)."""
    if merge and adapter.kind != "lora":
        raise ValueError(f"--merge folds a LoRA adapter into the base; train.target {adapter.kind} cannot be merged")
    from peft import get_peft_model

    hf = empty_model(config)
    base = {checkpoint_name(k): v for k, v in state.items() if not is_adapter(k)}
    missing, unexpected = hf.load_state_dict(base, strict=False, assign=True)
    if unexpected:
        raise RuntimeError(f"export: unexpected tensors {unexpected[:5]}")
    hf.tie_weights()
    if base_name is not None:  # a name that works elsewhere (catalog.base_model_name), not this machine's cache
        hf.config._name_or_path = str(base_name)  # noqa: SLF001 - peft records it as the adapter's base model
        hf.name_or_path = str(base_name)  # (the model's own copy, taken from the config when it was built)
    with warnings.catch_warnings():  # peft's PeftModel asks transformers' deprecated is_gradient_checkpointing
        warnings.filterwarnings("ignore", message="`is_gradient_checkpointing` is deprecated", category=FutureWarning)
        peft_model = get_peft_model(hf, adapter.peft_config(hf.config), adapter_name=ADAPTER)
    adapter.load_into(peft_model, {k: v for k, v in state.items() if is_adapter(k)}, layers_path)
    with warnings.catch_warnings():  # peft calls a transformers method transformers calls deprecated
        warnings.simplefilter("ignore", FutureWarning)
        if merge:
            peft_model.merge_and_unload().save_pretrained(str(out), safe_serialization=True)
        else:
            # peft's "auto" asks the Hub whether the base's vocabulary changed, by the base's name: never a network
            # call here (the vocabulary never changes); an adapter on the embedding itself is saved as "auto" would
            targets = getattr(peft_model.peft_config[ADAPTER], "target_modules", None) or ()
            embedding = any(name in targets for name in ("embed_tokens", "lm_head"))
            peft_model.save_pretrained(str(out), safe_serialization=True, save_embedding_layers=embedding)
