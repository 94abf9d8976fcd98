"""The model card (``README.md``) an export writes into its model directory, as Hugging Face does.

YAML front matter (``library_name``, ``tags``, ``base_model`` when the source is a Hub-style id)
then the base model, the task, the hyperparameters that decide the trajectory, and the final
metrics. Only the standard library and yaml: the parameter server and the reference both write it.

An adapter export (``train.target`` other than full, not merged: peft's adapter directory) says so:
``library_name: peft``, the base model it must be loaded on, and how; a merged or full export is a
plain transformers model directory.
"""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Any

import yaml

from distzo.common.errors import counted
from distzo.data.catalog import base_model_name
from distzo.run.runlog import loss_window
from distzo.train.defaults import job_eps
from distzo.train.precision import forward_dtype_name, job_precision

CARD_FILE = "README.md"
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")  # owner/name, as the Hub spells ids
METRIC_NAMES = (("zero_shot_dev_loss", "dev loss before training (step 0)"),
                ("zero_shot_dev_accuracy", "dev accuracy before training (step 0)"),
                ("dev_loss", "dev loss at the end"), ("dev_accuracy", "dev accuracy at the end"),
                ("final_loss", "training loss at the end (mean of the last {window})"))


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4f}" if math.isfinite(value) else "n/a"
    return "n/a" if value is None else str(value)


ADAPTER_NAMES = {"lora": "LoRA", "prefix": "prefix-tuning"}  # train.target -> the method's usual name


def _target_text(t: Any) -> str:
    """The hyperparameters row of train.target."""
    if t.target == "full":
        return "full model"
    if t.target == "lora":
        modules = ", ".join(t.lora_modules) if t.lora_modules else "peft's default for the model's family"
        return f"LoRA (peft; rank {t.lora_rank}, alpha {t.lora_alpha}, modules {modules}; base frozen)"
    if t.target == "prefix":
        return f"prefix-tuning (peft; {t.prefix_tokens} virtual tokens; base frozen)"
    return f"{t.target} (peft; base frozen)"


def _local_base(source: str, upstream: str) -> str:
    """How to load the adapter on a local copy of its base (adapter_config.json names ``upstream``)."""
    if upstream != source:  # a fetched model: distzo trained on its converted copy in the cache
        return (f"distzo trained it on its own copy of the base, `{source}` (`zoctl fetch --check {source}` prints where "
                "it is; it can differ from the Hub release, e.g. a dequantized file): for the run's logits, load that "
                "directory as `base`, or set `base_model_name_or_path` in `adapter_config.json` to it; ")
    if not _HUB_ID.match(source):
        return (f"`{source}` is a local name or directory: load `base` from your copy of it, or set "
                "`base_model_name_or_path` in `adapter_config.json` to its path; ")
    return ""


def model_card(cfg: Any, metrics: dict[str, Any], steps_done: int, mode: str = "distributed", merged: bool = False) -> str:
    """Markdown text of the card. ``cfg``: a JobConfig; ``metrics``: the keys of METRIC_NAMES (missing or
    non-finite ones are shown as n/a); ``steps_done``: training steps applied to the exported weights;
    ``merged``: an adapter target exported merged into the base (a plain model directory)."""
    source = cfg.model.source
    task = cfg.data.train or "sst2-synth"
    t, lay = cfg.train, cfg.layout
    adapter = t.target != "full" and not merged  # the export is peft's adapter directory
    kind = ADAPTER_NAMES.get(t.target, t.target)
    upstream = base_model_name(source)  # a fetched model's Hub id (what the adapter names as its base)
    base = upstream if _HUB_ID.match(upstream) and not Path(upstream).exists() else None
    tags = ["distzo", "mezo", "zeroth-order", "text-classification"] + ([t.target] if t.target != "full" else [])
    front: dict[str, Any] = {"library_name": "peft" if adapter else "transformers", "tags": tags}
    if base:
        front["base_model"] = base
    method = {"sgd": "MeZO-SGD", "momentum": f"ZO momentum (mu {t.momentum})",
              "adam": f"ZO-Adam (betas {t.adam_beta1}, {t.adam_beta2}, eps {t.adam_eps})"}[t.optimizer]
    hyper = {
        "optimizer": method + " (zeroth-order, two forwards per direction)",
        "objective": {"loss": "label-token cross-entropy", "accuracy": "minus batch accuracy",
                      "f1": "minus batch macro-F1",
                      "classification": "cross-entropy over the label words"}[t.objective],
        "target": _target_text(t) + (" (exported merged into the base)" if merged else ""),
        "steps (configured / applied)": f"{t.steps} / {steps_done}",
        "learning rate": f"{t.lr} ({t.lr_schedule}, warmup {t.warmup_steps}, min ratio {t.min_lr_ratio})",
        "perturbation scale eps": _eps_text(cfg),
        "batch size": t.batch_size,
        "weight decay": t.weight_decay,
        "master seed": t.seed,
        "layout": f"{lay.name}, {counted(lay.workers, 'worker')}, q={lay.q}",
        "max sequence length": cfg.data.max_seq_len,
        "template / label words": f"{cfg.data.template!r} / {', '.join(cfg.data.label_words)}",
    }
    if adapter:
        what = (f"This directory is a {kind} adapter in peft's layout, not a model: it needs its base model "
                f"**{upstream}**. Load it with `PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), "
                "this directory)`" + ("; an export with `--merge` writes the merged plain model instead; "
                                      if t.target == "lora" else "; ") + _local_base(source, upstream))
    elif t.target != "full":
        what = (f"The weights are the base model with the trained {kind} adapter merged in (peft's "
                "`merge_and_unload`): a plain model directory for `AutoModelForCausalLM`; ")
    else:
        what = "The weights are the full model in safetensors; "
    title = f"{kind} adapter for {Path(source).name}" if adapter else Path(source).name
    lines = ["---", yaml.safe_dump(front, sort_keys=False).rstrip(), "---", "",
             f"# {title} fine-tuned on {Path(task).name} with distzo", "",
             f"Fine-tuned by distzo ({mode}) with {method} from **{source}** on the task **{task}**. "
             + what + "the tokenizer files are the base model's.", "",
             "## Hyperparameters", "", "| setting | value |", "|---|---|"]
    lines += [f"| {k} | {v} |" for k, v in hyper.items()]  # as configured, not rounded
    lines += ["", "## Results", "", "| metric | value |", "|---|---|"]
    window = counted(loss_window(steps_done), "step")  # TrainLog.final_loss's window
    for key, text in METRIC_NAMES:
        text = text.format(window=window)
        if key == "final_loss" and t.objective != "loss":  # the scalar trained on is minus the batch accuracy
            text = f"training objective at the end ({t.objective}: minus the batch {t.objective}, mean of the last {window})"
        lines.append(f"| {text} | {_fmt(metrics.get(key))} |")
    lines += ["", "Reproduce: `zoctl reference` with this job's config gives the same weights bit for bit "
              "(the distributed run's oracle).", ""]
    return "\n".join(lines)


def write_model_card(out_dir: str | Path, text: str) -> Path:
    path = Path(out_dir) / CARD_FILE
    path.write_text(text, encoding="utf-8")
    return path


def _eps_text(cfg: Any) -> str:
    """train.eps, and what the forwards perturbed by when they computed in 16 bits (issue 29). ``cfg``: a JobConfig."""
    used, eps = job_precision(cfg), job_eps(cfg.train)
    if forward_dtype_name(cfg) == "float32":
        return f"{eps}"
    return f"{eps} ({forward_dtype_name(cfg)} forwards: {used.eps:g}, 1-D tensors in float32)"
