"""What a run trains, as the step-time model (``distzo/perf/model.py``) sees it: the whole model
(``train.target full``) or small trainable adapter blocks next to a frozen base (``lora``, ``prefix``).

With a frozen base the server holds the fp32 master (and served copy) of every parameter but
optimizer state only for the trainable ones; a worker fetches the frozen blocks once and keeps
them, so per step only the trainable blocks travel, are perturbed and are updated.

LoRA's trainable parameters (Hu et al. 2022, "LoRA: Low-Rank Adaptation of Large Language Models"):
a target linear module of shape in -> out gets A [r, in] and B [out, r], r (in + out) parameters
per module per decoder layer (peft, ``bias="none"``). The shapes below follow each family's module
names; attention projections assume head_dim = hidden / heads (true of the catalog's models and
the presets; a model with a wider head_dim has more).

A prefix's trainable parameters (Li & Liang 2021; peft's layout, ``distzo/model/prefix.py``): per decoder
layer ``tokens`` keys and values of the key/value heads, tokens x 2 x kv_heads x head_dim.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

from distzo.perf.specs import ModelSpec


@dataclass(frozen=True)
class TargetSpec:
    """``name``: train.target; ``adapter_params``: trainable parameters added to a frozen base (0: full)."""

    name: str = "full"
    adapter_params: int = 0
    detail: str = ""  # e.g. "rank 8 on q_proj, v_proj"

    @property
    def frozen_base(self) -> bool:
        return self.name != "full"

    def trainable(self, model: ModelSpec) -> int:
        """Parameters perturbed, updated and given optimizer state."""
        return self.adapter_params if self.frozen_base else model.params

    def frozen(self, model: ModelSpec) -> int:
        """Parameters that never change (a worker fetches them once)."""
        return model.params if self.frozen_base else 0

    def total(self, model: ModelSpec) -> int:
        """Every parameter the server holds a master of."""
        return model.params + (self.adapter_params if self.frozen_base else 0)


FULL = TargetSpec()


def module_shapes(model: ModelSpec) -> dict[str, list[tuple[int, int]]]:
    """(in, out) of each linear module name of a decoder layer (Llama/Qwen/Mistral, OPT, GPT-2 names)."""
    h, f = model.hidden, model.ffn
    kv = model.kv_heads * (h // model.heads)
    return {"q_proj": [(h, h)], "k_proj": [(h, kv)], "v_proj": [(h, kv)], "o_proj": [(h, h)], "out_proj": [(h, h)],
            "gate_proj": [(h, f)], "up_proj": [(h, f)], "down_proj": [(f, h)], "fc1": [(h, f)], "fc2": [(f, h)],
            "c_attn": [(h, 3 * h)], "c_fc": [(h, f)], "c_proj": [(h, h), (f, h)]}  # GPT-2: attn and mlp c_proj


def lora_target(model: ModelSpec, rank: int, modules: Sequence[str]) -> TargetSpec:
    """The LoRA target of rank ``rank`` on ``modules`` (train.lora_modules). Raises ValueError for a
    rank below 1 or a module name without a known shape."""
    if rank < 1:
        raise ValueError(f"LoRA rank {rank}: expected an integer >= 1")
    shapes = module_shapes(model)
    unknown = [m for m in modules if m not in shapes]
    if unknown or not modules:
        raise ValueError(f"LoRA modules {list(unknown or modules)}: expected names of a decoder layer's linear modules "
                         f"({', '.join(shapes)})")
    per_layer = sum(rank * (i + o) for m in dict.fromkeys(modules) for i, o in shapes[m])
    return TargetSpec("lora", model.layers * per_layer, f"rank {rank} on {', '.join(dict.fromkeys(modules))}")


def prefix_target(model: ModelSpec, tokens: int) -> TargetSpec:
    """The prefix target of ``tokens`` virtual tokens (train.prefix_tokens). Raises ValueError below 1."""
    if tokens < 1:
        raise ValueError(f"prefix tokens {tokens}: expected an integer >= 1")
    kv = model.kv_heads * (model.hidden // model.heads)
    return TargetSpec("prefix", model.layers * tokens * 2 * kv, f"{tokens} tokens")
