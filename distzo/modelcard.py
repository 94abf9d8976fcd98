"""The model card (``README.md``) an export writes into its model directory, as Hugging Face does.

YAML front matter (``library_name``, ``tags``, ``base_model`` when the source is a Hub-style id)
then the base model, the task, the hyperparameters that decide the trajectory, and the final
metrics. Only the standard library and yaml: the parameter server and the reference both write it.
"""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Any

import yaml

from distzo.errors import counted

CARD_FILE = "README.md"
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")  # owner/name, as the Hub spells ids
METRIC_NAMES = (("zero_shot_dev_loss", "dev loss before training (step 0)"),
                ("zero_shot_dev_accuracy", "dev accuracy before training (step 0)"),
                ("dev_loss", "dev loss at the end"), ("dev_accuracy", "dev accuracy at the end"),
                ("final_loss", "training loss at the end (mean of the last 10 steps)"))


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4f}" if math.isfinite(value) else "n/a"
    return "n/a" if value is None else str(value)


def model_card(cfg: Any, metrics: dict[str, Any], steps_done: int, mode: str = "distributed") -> str:
    """Markdown text of the card. ``cfg``: a JobConfig; ``metrics``: the keys of METRIC_NAMES (missing or
    non-finite ones are shown as n/a); ``steps_done``: training steps applied to the exported weights."""
    source = cfg.model.source
    task = cfg.data.train or "sst2-synth"
    base = source if _HUB_ID.match(source) and not Path(source).exists() else None
    front: dict[str, Any] = {"library_name": "transformers", "tags": ["distzo", "mezo", "zeroth-order", "text-classification"]}
    if base:
        front["base_model"] = base
    t, lay = cfg.train, cfg.layout
    method = {"sgd": "MeZO-SGD", "momentum": f"ZO momentum (mu {t.momentum})",
              "adam": f"ZO-Adam (betas {t.adam_beta1}, {t.adam_beta2}, eps {t.adam_eps})"}[t.optimizer]
    hyper = {
        "optimizer": method + " (zeroth-order, two forwards per direction)",
        "objective": {"loss": "label-token cross-entropy", "accuracy": "minus batch accuracy",
                      "f1": "minus batch macro-F1"}[t.objective],
        "target": {"full": "full model",
                   "lora": f"LoRA (peft; rank {t.lora_rank}, alpha {t.lora_alpha}, modules {', '.join(t.lora_modules)}; "
                           "base frozen)",
                   "prefix": f"prefix tuning (peft; {t.prefix_tokens} tokens per layer, no reparametrization; "
                             "base frozen)"}[t.target],
        "steps (configured / applied)": f"{t.steps} / {steps_done}",
        "learning rate": f"{t.lr} ({t.lr_schedule}, warmup {t.warmup_steps}, min ratio {t.min_lr_ratio})",
        "perturbation scale eps": t.eps,
        "batch size": t.batch_size,
        "weight decay": t.weight_decay,
        "master seed": t.seed,
        "layout": f"{lay.name}, {counted(lay.workers, 'worker')}, q={lay.q}",
        "max sequence length": cfg.data.max_seq_len,
        "template / label words": f"{cfg.data.template!r} / {', '.join(cfg.data.label_words)}",
    }
    lines = ["---", yaml.safe_dump(front, sort_keys=False).rstrip(), "---", "",
             f"# {Path(source).name} fine-tuned on {Path(task).name} with distzo", "",
             f"Fine-tuned by distzo ({mode}) with {method} from **{source}** on the task **{task}**. "
             + {"full": "The weights are the full model in safetensors; ",
                "lora": "The weights are a LoRA adapter in peft's layout (`PeftModel.from_pretrained(base, this "
                        "directory)`), or the merged model when exported with --merge; ",
                "prefix": "The weights are a prefix-tuning adapter in peft's layout (`PeftModel.from_pretrained(base, "
                          "this directory)`); "}[t.target]
             + "the tokenizer files are the base model's.", "",
             "## Hyperparameters", "", "| setting | value |", "|---|---|"]
    lines += [f"| {k} | {v} |" for k, v in hyper.items()]  # as configured, not rounded
    lines += ["", "## Results", "", "| metric | value |", "|---|---|"]
    for key, text in METRIC_NAMES:
        if key == "final_loss" and t.objective != "loss":  # the scalar trained on is minus the batch accuracy
            text = f"training objective at the end ({t.objective}: minus the batch {t.objective}, mean of the last 10 steps)"
        lines.append(f"| {text} | {_fmt(metrics.get(key))} |")
    lines += ["", "Reproduce: `zoctl reference` with this job's config gives the same weights bit for bit "
              "(the distributed run's oracle).", ""]
    return "\n".join(lines)


def write_model_card(out_dir: str | Path, text: str) -> Path:
    path = Path(out_dir) / CARD_FILE
    path.write_text(text, encoding="utf-8")
    return path
