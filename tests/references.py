"""The in-process reference, computed once per job config and kept for the session.

Many tests compare a distributed run with ``zoctl reference``'s result for the same flags. The
reference is a pure function of the job config (tests/test_reference.py checks the CLI itself), so
``References.get`` trains it in this process the first time a config is asked for and hands out the
same export, summary and run log after that: a fault run and a plain run of one config, or the
TLS and token checks of the control cluster, share one reference.

Only what cannot change the trained weights or the summary is left out of the key: the security,
coordinator and cluster sections (placement, credentials, timeouts) and the server's settings
other than its served dtype.
"""

from __future__ import annotations

import json
import shutil
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from distzo.common.config import JobConfig
from distzo.common.durable import job_identity

def reference_key(cfg: JobConfig) -> str:
    raw = cfg.model_dump(mode="json")
    for section in ("security", "coordinator", "cluster"):
        raw.pop(section, None)
    # of the server's settings, those the weights depend on (the job identity's: served dtype, update window, ...)
    raw["server"] = {k: v for k, v in job_identity(cfg).items() if k.startswith("server.")}
    return json.dumps(raw, sort_keys=True)


@dataclass
class Reference:
    cfg: JobConfig
    trainer: Any  # the ReferenceTrainer after train(): buffers, opt_state, log, model
    summary: dict[str, Any]
    run_dir: Path  # steps.jsonl, evals.jsonl
    root: Path
    _exports: dict[bool, Path]

    def export(self, merge: bool = False) -> Path:
        """The trained model exported as ``zoctl reference --out`` writes it (``merge``: LoRA merged)."""
        if merge not in self._exports:
            from distzo.model.export import export_model_dir
            from distzo.run.modelcard import model_card, write_model_card

            out = self.root / ("ref-merged" if merge else "ref-export")
            tr = self.trainer
            export_model_dir(tr.model, [b.cpu() for b in tr.buffers], out, merge=merge)
            write_model_card(out, model_card(self.cfg, self.summary, self.cfg.train.steps, mode="reference", merged=merge))
            self._exports[merge] = out
        return self._exports[merge]

    @property
    def out(self) -> Path:
        return self.export(False)


class References:
    def __init__(self, root: Path):
        self.root = root
        self._done: dict[str, Reference] = {}
        self._lock = threading.Lock()
        self.trained = 0  # how many references were really trained (the rest came from the cache)

    def get(self, cfg: JobConfig) -> Reference:
        key = reference_key(cfg)
        with self._lock:
            if key not in self._done:
                self._done[key] = self._train(cfg, self.root / f"ref-{len(self._done)}")
            return self._done[key]

    def for_flags(self, flags: list[str]) -> tuple[Reference, bool]:
        """The reference of ``zoctl reference FLAGS`` (the same parser and config resolution), and --merge."""
        from coordinator.zoctl.cli import build_parser
        from coordinator.zoctl.jobs import job_config_from_args

        args = build_parser().parse_args(["reference", *flags])
        return self.get(job_config_from_args(args)), bool(args.merge)

    def _train(self, cfg: JobConfig, root: Path) -> Reference:
        from distzo.train.reference import ReferenceTrainer

        if root.exists():
            shutil.rmtree(root)
        root.mkdir(parents=True)
        trainer = ReferenceTrainer(cfg)
        summary = trainer.train(out_dir=root / "ref-export", progress=False, run_dir=root / "run")
        self.trained += 1
        return Reference(cfg, trainer, summary, root / "run", root, {False: root / "ref-export"})
