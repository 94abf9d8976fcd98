"""Blocks: the model cut in execution order, each one contiguous flat buffer with a manifest.

Block 0 holds what runs before the first decoder layer (token and position embeddings),
blocks 1..L one decoder layer each, block L+1 what runs after (final norm, head). A tied
weight is stored once, in the block whose module uses it first; later users (a tied
``lm_head``) read it from there. Element ``i`` of tensor ``t`` in block ``b`` has the
global index ``b.global_offset + t.offset + i`` in the flat parameter space: the index
the perturbation generator uses.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field

import torch

from distzo.common.dtypes import ITEMSIZE  # noqa: F401 - re-exported: the one table of element sizes

DTYPES: dict[str, torch.dtype] = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass(frozen=True)
class TensorSpec:
    """One parameter tensor inside a block's flat fp32 buffer: elements [offset, offset + numel)."""

    name: str  # canonical parameter name in the Hugging Face state dict
    shape: tuple[int, ...]
    offset: int  # element offset inside the block
    decay: bool  # weight decay applies (not to biases and norms: tensors of rank < 2)

    @property
    def numel(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n


@dataclass(frozen=True)
class BlockSpec:
    """A block: the unit the server stores, versions and serves, and a worker fetches and perturbs.

    Its tensors lie back to back in one flat buffer of ``numel`` elements; ``global_offset`` is the
    block's first element in the whole model's flat parameter vector (the generator's counter: the
    perturbation z of element i of the model is the same wherever it is generated)."""

    index: int
    name: str  # "embed", "layer.<i>", "head" (train.target lora: also "lora.<i>", layer i's adapters)
    global_offset: int
    tensors: tuple[TensorSpec, ...]
    trainable: bool = True  # perturbed and updated; False: frozen (train.target lora's base), never changes

    @property
    def numel(self) -> int:
        """Elements in the block's flat buffer."""
        return sum(t.numel for t in self.tensors)

    def decay_segments(self) -> list[tuple[int, int, bool]]:
        """Maximal runs of tensors sharing the decay flag: (start, end, decay)."""
        segs: list[tuple[int, int, bool]] = []
        for t in self.tensors:
            if segs and segs[-1][2] == t.decay and segs[-1][1] == t.offset:
                segs[-1] = (segs[-1][0], t.offset + t.numel, t.decay)
            else:
                segs.append((t.offset, t.offset + t.numel, t.decay))
        return segs

    def vector_segments(self) -> list[tuple[int, int]]:
        """Maximal runs [start, end) of tensors of rank < 2 (norm weights, biases), in block order: what a
        16-bit forward keeps in float32 (``forwardweights.forward_weights``), packed back to back."""
        segs: list[tuple[int, int]] = []
        for t in self.tensors:
            if len(t.shape) >= 2:
                continue
            if segs and segs[-1][1] == t.offset:
                segs[-1] = (segs[-1][0], t.offset + t.numel)
            else:
                segs.append((t.offset, t.offset + t.numel))
        return segs

    @property
    def vector_numel(self) -> int:
        """Elements of the block's tensors of rank < 2."""
        return sum(t.numel for t in self.tensors if len(t.shape) < 2)

    def slice_range(self, rank: int, parts: int) -> tuple[int, int]:
        """Element range [start, end) of slice ``rank`` of ``parts`` (even split, last ones shorter)."""
        if parts < 1:
            raise ValueError(f"slice count must be >= 1, got {parts}")
        if not 0 <= rank < parts:
            raise ValueError(f"slice index {rank} out of range for {parts} slices")
        per = -(-self.numel // parts)
        start = min(rank * per, self.numel)
        return start, min(start + per, self.numel)


@dataclass(frozen=True)
class Manifest:
    """A model cut into blocks (embedding, one per decoder layer, head), in forward order; ``tied``
    maps a tied parameter's name to the one tensor that stores it."""

    model_type: str
    blocks: tuple[BlockSpec, ...]
    tied: dict[str, str] = field(default_factory=dict)  # alias name -> canonical name

    @property
    def numel(self) -> int:
        """Parameters of the model (tied ones once)."""
        return sum(b.numel for b in self.blocks)

    def tensor(self, name: str) -> tuple[BlockSpec, TensorSpec]:
        """The block and tensor that store parameter ``name`` (a tied alias resolves); KeyError if none does."""
        name = self.tied.get(name, name)
        for b in self.blocks:
            for t in b.tensors:
                if t.name == name:
                    return b, t
        raise KeyError(name)

    def to_json(self) -> str:
        """The manifest as JSON (what the server sends in ``GetManifest``); ``trainable`` only where False,
        so a full-target manifest (and its digest in a data directory's state.json) is what it always was."""
        raw = asdict(self)
        for b in raw["blocks"]:
            if b["trainable"]:
                del b["trainable"]
        return json.dumps(raw, sort_keys=True)

    @staticmethod
    def from_json(text: str) -> "Manifest":
        """The inverse of ``to_json``."""
        raw = json.loads(text)
        blocks = tuple(
            BlockSpec(
                index=b["index"],
                name=b["name"],
                global_offset=b["global_offset"],
                tensors=tuple(
                    TensorSpec(name=t["name"], shape=tuple(t["shape"]), offset=t["offset"], decay=t["decay"])
                    for t in b["tensors"]
                ),
                trainable=b.get("trainable", True),
            )
            for b in raw["blocks"]
        )
        return Manifest(model_type=raw["model_type"], blocks=blocks, tied=dict(raw["tied"]))


def build_manifest(
    model_type: str,
    block_of_param: dict[str, int],
    shapes: dict[str, tuple[int, ...]],
    order: list[str],
    num_blocks: int,
    names: dict[int, str],
    tied: dict[str, str],
    trainable: set[int] | None = None,
) -> Manifest:
    """Lay tensors out block by block (in ``order`` within a block) with global offsets.

    ``trainable``: the blocks that are perturbed and updated (None: all)."""
    per_block: list[list[str]] = [[] for _ in range(num_blocks)]
    for name in order:
        per_block[block_of_param[name]].append(name)
    blocks = []
    offset_global = 0
    for b in range(num_blocks):
        tensors = []
        off = 0
        for name in per_block[b]:
            shape = tuple(int(d) for d in shapes[name])
            spec = TensorSpec(name=name, shape=shape, offset=off, decay=len(shape) >= 2)
            tensors.append(spec)
            off += spec.numel
        blocks.append(BlockSpec(index=b, name=names[b], global_offset=offset_global, tensors=tuple(tensors),
                                trainable=trainable is None or b in trainable))
        offset_global += off
    return Manifest(model_type=model_type, blocks=tuple(blocks), tied=dict(tied))


def flatten_block(spec: BlockSpec, tensors: dict[str, torch.Tensor], dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Copy the block's tensors into one new contiguous flat buffer."""
    flat = torch.empty(spec.numel, dtype=dtype)
    for t in spec.tensors:
        src = tensors[t.name]
        if tuple(src.shape) != t.shape:
            raise ValueError(f"tensor {t.name} has shape {tuple(src.shape)}, manifest says {t.shape}")
        flat[t.offset : t.offset + t.numel].copy_(src.reshape(-1))
    return flat


def block_views(spec: BlockSpec, flat: torch.Tensor, vectors: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """Per-tensor views into a flat block buffer (no copies); with ``vectors`` ([``spec.vector_numel``], the
    tensors of rank < 2 packed in block order: a 16-bit forward's float32 ones), those tensors are views of it."""
    if flat.numel() != spec.numel:
        raise ValueError(f"block {spec.index} buffer has {flat.numel()} elements, manifest says {spec.numel}")
    if vectors is None:
        return {t.name: flat[t.offset : t.offset + t.numel].view(t.shape) for t in spec.tensors}
    if vectors.numel() != spec.vector_numel:
        raise ValueError(f"block {spec.index} vectors have {vectors.numel()} elements, manifest says {spec.vector_numel}")
    out, at = {}, 0
    for t in spec.tensors:
        if len(t.shape) < 2:
            out[t.name] = vectors[at : at + t.numel].view(t.shape)
            at += t.numel
        else:
            out[t.name] = flat[t.offset : t.offset + t.numel].view(t.shape)
    return out
