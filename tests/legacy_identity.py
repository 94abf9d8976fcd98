"""The job identity as it was written by hand before issue 28 (frozen): job ids recorded then must stay
valid (tests/test_identity.py). Not used by distzo itself."""

from __future__ import annotations

from typing import Any


def job_identity(cfg: Any) -> dict[str, Any]:
    """The config fields that decide the weights (dotted names), from a ``JobConfig``."""
    t, d, lay = cfg.train, cfg.data, cfg.layout
    ident: dict[str, Any] = {
        "model.source": cfg.model.source,
        "data.train": d.train, "data.dev": d.dev, "data.dev_examples": d.dev_examples,
        "data.template": d.template, "data.label_words": list(d.label_words), "data.max_seq_len": d.max_seq_len,
        "train.batch_size": t.batch_size, "train.eps": t.eps, "train.lr": t.lr, "train.lr_schedule": t.lr_schedule,
        "train.warmup_steps": t.warmup_steps, "train.min_lr_ratio": t.min_lr_ratio,
        "train.weight_decay": t.weight_decay, "train.distribution": t.distribution, "train.seed": t.seed,
        "train.grad_clip": t.grad_clip,
        "layout.name": lay.name, "layout.workers": lay.workers, "layout.q": lay.q,
        "server.served_dtype": cfg.server.served_dtype,
    }
    if t.optimizer != "sgd":  # the state's update rule decides the weights (absent for sgd: older job ids unchanged)
        ident["train.optimizer"] = t.optimizer
        ident.update({f"train.{k}": getattr(t, k) for k in
                      (("momentum",) if t.optimizer == "momentum" else ("adam_beta1", "adam_beta2", "adam_eps"))})
    if t.objective != "loss":
        ident["train.objective"] = t.objective
    if t.lr_schedule != "constant":  # the decay spans the run: its length is part of the trajectory
        ident["train.steps"] = t.steps
    return ident
