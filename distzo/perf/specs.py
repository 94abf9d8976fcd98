"""What the step-time model (``distzo/perf/model.py``) is applied to besides the hardware: a model
(parameters, blocks, FLOPs) and a layout (pertp x ddp x q workers). The hardware, named clusters and one
calibrated on this machine, is in ``clusters.py``.

Units: parameters and elements are counts; ``fmt_params`` prints them for tables.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from distzo.common.errors import counted


# ----------------------------------------------------------------------------- model
@dataclass(frozen=True)
class ModelSpec:
    """A decoder-only LM as the cost model sees it: a parameter count and the shapes of its blocks."""

    name: str
    params: int
    layers: int
    hidden: int
    ffn: int
    vocab: int
    heads: int
    kv_heads: int
    tied: bool
    positions: int = 0  # rows of a learned position embedding (OPT, GPT-2); 0 with rotary embeddings
    gated: bool = False  # gated MLP (SwiGLU: gate and up projections both of size ffn)

    @property
    def embed_params(self) -> int:
        return (self.vocab + self.positions) * self.hidden

    @property
    def head_params(self) -> int:
        return 0 if self.tied else self.vocab * self.hidden

    @property
    def layer_params(self) -> int:
        """One decoder layer (final norms and other small tensors spread over the layers)."""
        return max(1, (self.params - self.embed_params - self.head_params) // self.layers)

    @property
    def num_blocks(self) -> int:
        return self.layers + 2

    def largest_block(self, include_embed: bool = True) -> int:
        """Parameters of the largest block (a big vocabulary makes the embedding or head the largest)."""
        sizes = [self.layer_params, self.head_params]
        if include_embed:
            sizes.append(self.embed_params)
        return max(sizes)

    @classmethod
    def opt(cls, name: str, hidden: int, layers: int, ffn: int, heads: int, vocab: int = 50272,
            max_positions: int = 2048) -> "ModelSpec":
        """An OPT model: learned positions (2 offset rows), biases, pre-LayerNorm, tied head."""
        positions = max_positions + 2
        layer = 4 * (hidden * hidden + hidden) + 2 * 2 * hidden + 2 * hidden * ffn + ffn + hidden
        params = (vocab + positions) * hidden + layers * layer + 2 * hidden
        return cls(name, params, layers, hidden, ffn, vocab, heads, heads, True, positions=positions)

    @classmethod
    def llama(cls, name: str, hidden: int, layers: int, ffn: int, heads: int, kv_heads: int, vocab: int,
              tied: bool = False) -> "ModelSpec":
        """A Llama model: grouped-query attention, SwiGLU MLP, RMSNorm, no biases, rotary positions."""
        kv = kv_heads * (hidden // heads)
        layer = 2 * hidden * hidden + 2 * hidden * kv + 3 * hidden * ffn + 2 * hidden
        params = vocab * hidden + layers * layer + hidden + (0 if tied else vocab * hidden)
        return cls(name, params, layers, hidden, ffn, vocab, heads, kv_heads, tied, gated=True)

    @classmethod
    def from_hf_config(cls, config: Any, name: str | None = None) -> "ModelSpec":
        """Any ``transformers`` causal-LM config (OPT, GPT-2, Llama family): the parameter count
        is exact, counted on a weightless (meta-device) instance of the model."""
        import torch
        from transformers import AutoModelForCausalLM

        with torch.device("meta"):  # thread-local: no weights are allocated
            model = AutoModelForCausalLM.from_config(config)
        params = sum(p.numel() for p in model.parameters())  # tied weights counted once
        gated = any("gate_proj" in n for n, _ in model.named_parameters())

        def first(*names: str, default: Any = None) -> Any:
            for n in names:
                v = getattr(config, n, None)
                if v is not None:
                    return v
            return default

        hidden = int(first("hidden_size", "n_embd", "d_model"))
        heads = int(first("num_attention_heads", "n_head"))
        model_type = getattr(config, "model_type", "")
        positions = 0
        if model_type == "opt":
            positions = int(config.max_position_embeddings) + 2
        elif model_type == "gpt2":
            positions = int(config.n_positions)
        return cls(
            name=name or getattr(config, "name_or_path", "") or model_type or "model",
            params=int(params),
            layers=int(first("num_hidden_layers", "n_layer")),
            hidden=hidden,
            ffn=int(first("ffn_dim", "intermediate_size", "n_inner", default=4 * hidden)),
            vocab=int(config.vocab_size),
            heads=heads,
            kv_heads=int(first("num_key_value_heads", default=heads)),
            tied=bool(getattr(config, "tie_word_embeddings", True)),
            positions=positions,
            gated=gated,
        )

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


# Published architectures (OPT: Zhang et al. 2022, Table 1 / the facebook/opt-* configs; Llama 3:
# the meta-llama config.json files). Parameter counts computed from the shapes, see ModelSpec.opt/llama.
_OPT = [("OPT-1.3B", 2048, 24, 32), ("OPT-2.7B", 2560, 32, 32), ("OPT-6.7B", 4096, 32, 32), ("OPT-13B", 5120, 40, 40),
        ("OPT-30B", 7168, 48, 56), ("OPT-66B", 9216, 64, 72), ("OPT-175B", 12288, 96, 96)]
MODELS: dict[str, ModelSpec] = {n: ModelSpec.opt(n, hidden=d, layers=L, ffn=4 * d, heads=h) for n, d, L, h in _OPT}
MODELS.update({
    "Llama-3-8B": ModelSpec.llama("Llama-3-8B", hidden=4096, layers=32, ffn=14336, heads=32, kv_heads=8, vocab=128256),
    "Llama-3-70B": ModelSpec.llama("Llama-3-70B", hidden=8192, layers=80, ffn=28672, heads=64, kv_heads=8, vocab=128256),
    "Llama-3-405B": ModelSpec.llama("Llama-3-405B", hidden=16384, layers=126, ffn=53248, heads=128, kv_heads=8,
                                    vocab=128256),
})


# ----------------------------------------------------------------------------- layout
@dataclass(frozen=True)
class LayoutSpec:
    """``workers = pertp x ddp x q``: pertp 1 (dual: a worker runs both signs) or 2 (one sign each)."""

    pertp: int = 1
    ddp: int = 1
    q: int = 1

    def __post_init__(self) -> None:
        if self.pertp not in (1, 2) or self.ddp < 1 or self.q < 1:
            raise ValueError(f"bad layout pertp={self.pertp} ddp={self.ddp} q={self.q} (pertp 1 or 2, ddp and q >= 1)")

    @property
    def workers(self) -> int:
        return self.pertp * self.ddp * self.q

    @property
    def name(self) -> str:
        if self.ddp == 1:
            return "dual" if self.pertp == 1 else "pertp"
        return "ddp" if self.pertp == 1 else "2d"

    @property
    def forwards_per_worker(self) -> int:
        return 2 // self.pertp

    @classmethod
    def from_name(cls, name: str, workers: int, q: int = 1) -> "LayoutSpec":
        """The layout the config's ``layout`` section means (same rules as distzo.common.configsections.LayoutSection)."""
        if name not in ("dual", "pertp", "ddp", "2d"):
            raise ValueError(f"unknown layout {name!r} (dual, pertp, ddp, 2d)")
        pertp = 2 if name in ("pertp", "2d") else 1
        per = pertp * q
        if q < 1 or workers % per:
            raise ValueError(f"layout {name} with q={q} needs a multiple of {counted(per, 'worker')}, the cluster has {counted(workers, 'worker')}")
        ddp = workers // per
        if name in ("dual", "pertp") and ddp != 1:
            better = "ddp" if name == "dual" else "2d"
            raise ValueError(f"layout {name} with q={q} uses exactly {counted(per, 'worker')}, the cluster has {counted(workers, 'worker')}: "
                             f"use layout {better}, or a larger q")
        if name in ("ddp", "2d") and ddp < 2:
            raise ValueError(f"layout {name} needs at least {2 * per} workers (2 data shards), the cluster has {counted(workers, 'worker')}")
        return cls(pertp, ddp, q)

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "pertp": self.pertp, "ddp": self.ddp, "q": self.q, "workers": self.workers}


def fmt_params(n: float) -> str:
    """1.3e9 -> '1.32B' (for tables)."""
    for unit, scale in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= scale:
            return f"{n / scale:.{2 if n / scale < 100 else 1}f}{unit}"
    return str(int(n))
