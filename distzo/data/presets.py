"""Tiny models and the shipped task: built locally, never downloaded.

A preset is a ``transformers`` config with seeded random weights, saved with
``save_pretrained`` beside a byte-level BPE tokenizer trained here with ``tokenizers`` on
the shipped task's text. Presets are built once into a cache directory (atomically, so
concurrent processes agree on one copy) and loaded back through the normal loading path.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Callable

from distzo.common.cache import atomic_build, cache_root

DATASET_DIR = Path(__file__).resolve().parent / "datasets" / "sst2_synth"
DEFAULT_TRAIN = DATASET_DIR / "train.jsonl"
DEFAULT_DEV = DATASET_DIR / "dev.jsonl"
SPECIAL_TOKENS = ["<pad>", "<s>", "</s>", "<unk>"]
VOCAB_SIZE = 1024
_BUILD_VERSION = "1"  # bump when a preset's definition changes: old cache entries are ignored


def _opt(vocab: int, **kw: Any):  # noqa: ANN202
    from transformers import OPTConfig

    return OPTConfig(vocab_size=vocab, hidden_size=kw.get("hidden", 64), word_embed_proj_dim=kw.get("hidden", 64),
                     num_hidden_layers=kw.get("layers", 4), ffn_dim=4 * kw.get("hidden", 64),
                     num_attention_heads=kw.get("heads", 4), max_position_embeddings=kw.get("positions", 256),
                     pad_token_id=0, bos_token_id=1, eos_token_id=2, dropout=0.0, attention_dropout=0.0)


def _gpt2(vocab: int, **kw: Any):  # noqa: ANN202
    from transformers import GPT2Config

    return GPT2Config(vocab_size=vocab, n_embd=kw.get("hidden", 64), n_layer=kw.get("layers", 4), n_head=kw.get("heads", 4),
                      n_positions=kw.get("positions", 256), bos_token_id=1, eos_token_id=2, pad_token_id=0,
                      resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)


def _llama(vocab: int, **kw: Any):  # noqa: ANN202
    from transformers import LlamaConfig

    return LlamaConfig(vocab_size=vocab, hidden_size=kw.get("hidden", 64), intermediate_size=3 * kw.get("hidden", 64) - 16,
                       num_hidden_layers=kw.get("layers", 4), num_attention_heads=kw.get("heads", 4), num_key_value_heads=2,
                       max_position_embeddings=kw.get("positions", 256), pad_token_id=0, bos_token_id=1, eos_token_id=2,
                       tie_word_embeddings=False)


def _qwen3(vocab: int, **kw: Any):  # noqa: ANN202
    from transformers import Qwen3Config

    hidden = kw.get("hidden", 64)
    return Qwen3Config(vocab_size=vocab, hidden_size=hidden, intermediate_size=3 * hidden - 16,
                       num_hidden_layers=kw.get("layers", 4), num_attention_heads=kw.get("heads", 4), num_key_value_heads=2,
                       head_dim=hidden // kw.get("heads", 4), max_position_embeddings=kw.get("positions", 256),
                       pad_token_id=0, bos_token_id=1, eos_token_id=2, tie_word_embeddings=True)


def _qwen2(vocab: int, **kw: Any):  # noqa: ANN202
    from transformers import Qwen2Config

    hidden = kw.get("hidden", 64)
    return Qwen2Config(vocab_size=vocab, hidden_size=hidden, intermediate_size=3 * hidden - 16,
                       num_hidden_layers=kw.get("layers", 4), num_attention_heads=kw.get("heads", 4), num_key_value_heads=2,
                       max_position_embeddings=kw.get("positions", 256), pad_token_id=0, bos_token_id=1, eos_token_id=2)


def _mistral(vocab: int, **kw: Any):  # noqa: ANN202
    from transformers import MistralConfig

    hidden = kw.get("hidden", 64)
    return MistralConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=3 * hidden - 16,
                         num_hidden_layers=kw.get("layers", 4), num_attention_heads=kw.get("heads", 4), num_key_value_heads=2,
                         max_position_embeddings=kw.get("positions", 256), pad_token_id=0, bos_token_id=1, eos_token_id=2)


# name -> (config factory, size keywords)
PRESETS: dict[str, tuple[Callable[..., Any], dict[str, int]]] = {
    "tiny-opt": (_opt, {}),
    "tiny-gpt2": (_gpt2, {}),
    "tiny-llama": (_llama, {}),
    "tiny-qwen3": (_qwen3, {}),
    "tiny-qwen2": (_qwen2, {}),
    "tiny-mistral": (_mistral, {}),
    # a preset whose forward dominates start-up and overheads (benchmarks)
    "small-opt": (_opt, {"hidden": 256, "layers": 8, "heads": 8}),
    # ~26M parameters (~100 MB fp32): transport and update benchmarks
    "medium-opt": (_opt, {"hidden": 512, "layers": 8, "heads": 8}),
    # many thin layers: resident-memory tests (layers dominate the size)
    "deep-opt": (_opt, {"hidden": 128, "layers": 24, "heads": 4}),
}


def _corpus_lines() -> list[str]:
    lines = []
    for p in (DEFAULT_TRAIN, DEFAULT_DEV):
        for line in p.read_text().splitlines():
            if line.strip():
                lines.append(json.loads(line)["text"] + " It was great. It was terrible.")
    return lines


def build_tokenizer(out_dir: Path) -> None:
    """Train a byte-level BPE on the shipped task and save it in transformers' layout."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=VOCAB_SIZE, special_tokens=SPECIAL_TOKENS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(_corpus_lines(), trainer=trainer)
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", 1)])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>", unk_token="<unk>")
    fast.save_pretrained(str(out_dir))


def _tokenizer_dir(cache: Path) -> Path:
    digest = hashlib.sha256(b"".join(p.read_bytes() for p in (DEFAULT_TRAIN, DEFAULT_DEV))).hexdigest()[:12]
    return atomic_build(cache / f"tokenizer-{_BUILD_VERSION}-{digest}", build_tokenizer)


def preset_config(name: str, cache_dir: str | None = None) -> Any:
    """The transformers config of a preset as ``preset_dir`` builds it: its vocabulary is the trained
    tokenizer's (built once, cached), not VOCAB_SIZE, the BPE trainer's upper bound."""
    if name not in PRESETS:
        raise KeyError(name)
    from transformers import AutoTokenizer

    factory, sizes = PRESETS[name]
    return factory(len(AutoTokenizer.from_pretrained(str(_tokenizer_dir(cache_root(cache_dir))))), **sizes)


def preset_dir(name: str, cache_dir: str | None = None) -> Path:
    """Build (once) and return the directory of a preset model."""
    if name not in PRESETS:
        raise KeyError(name)
    cache = cache_root(cache_dir)
    tok_dir = _tokenizer_dir(cache)
    factory, sizes = PRESETS[name]

    def build(out: Path) -> None:
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(str(tok_dir))
        config = factory(len(tokenizer), **sizes)
        seed = int.from_bytes(hashlib.sha256(name.encode()).digest()[:4], "little")
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = AutoModelForCausalLM.from_config(config)
        model.save_pretrained(str(out), safe_serialization=True)
        tokenizer.save_pretrained(str(out))

    return atomic_build(cache / f"{name}-{_BUILD_VERSION}-{tok_dir.name.rsplit('-', 1)[1]}", build)
