"""The job config: one typed, validated object, loadable from YAML, with defaults that run.

Every service reads the same object; a bad value fails with the field's dotted path and
what is allowed, before anything starts. Here: the whole config, the checks across its sections,
and loading, overriding and writing it; each section and its fields are in ``configsections.py``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml
from pydantic import Field, ValidationError, model_validator

from distzo.common.configsections import (ClusterSection, CoordinatorSection, DataSection, LayoutSection, ModelSection,
                                          RuntimeSection, SecuritySection, Section, ServerSection, TrainSection)
from distzo.common.configtext import ConfigError, _short, format_validation_error, parse_settings, read_utf8  # noqa: F401 - re-exported
from distzo.common.errors import counted
from distzo.common.wire_sizes import MAX_MESSAGE_BYTES, MESSAGE_HEADROOM, TOKEN_BYTES

EVAL_BATCH_EXAMPLES = 32  # dev examples per eval chunk (one assignment)
MAX_CONFIG_BYTES = 256 << 10  # a job config is a few KB; StartJob's config_yaml has the same bound


class JobConfig(Section):
    model: ModelSection = Field(default_factory=ModelSection)
    data: DataSection = Field(default_factory=DataSection)
    train: TrainSection = Field(default_factory=TrainSection)
    layout: LayoutSection = Field(default_factory=LayoutSection)
    server: ServerSection = Field(default_factory=ServerSection)
    runtime: RuntimeSection = Field(default_factory=RuntimeSection)
    security: SecuritySection = Field(default_factory=SecuritySection)
    coordinator: CoordinatorSection = Field(default_factory=CoordinatorSection)
    cluster: ClusterSection = Field(default_factory=ClusterSection)

    @model_validator(mode="after")
    def _batch_fits_layout(self) -> "JobConfig":
        ddp = self.layout.ddp
        if self.train.batch_size % ddp:
            raise ValueError(f"train.batch_size {self.train.batch_size} must be divisible by the {ddp} data shards of layout {self.layout.name}")
        return self

    @model_validator(mode="after")
    def _window_needs_sgd(self) -> "JobConfig":
        if self.server.update_window > 1 and self.train.optimizer != "sgd":
            raise ValueError(f"server.update_window {self.server.update_window} needs train.optimizer sgd: "
                             f"{self.train.optimizer} keeps per-parameter state on the parameter server, which the "
                             "workers' replay of the pending updates does not have (use server.update_window 1)")
        return self

    @model_validator(mode="after")
    def _hosts_fit_layout(self) -> "JobConfig":
        nodes = self.layout.workers // self.layout.node_size
        if self.cluster.hosts > 1 and nodes % self.cluster.hosts:
            raise ValueError(f"cluster.hosts {self.cluster.hosts} must divide the layout's {counted(nodes, 'node group')} "
                             f"(layout.workers {self.layout.workers} / layout.node_size {self.layout.node_size}): every "
                             f"host runs the same number of workers, e.g. --layout ddp --workers {self.cluster.hosts}")
        return self

    @model_validator(mode="after")
    def _assignments_fit_a_message(self) -> "JobConfig":
        """A shard's batch (or an eval chunk) travels in one gRPC message: refuse one that cannot."""
        budget = (MAX_MESSAGE_BYTES - MESSAGE_HEADROOM) // TOKEN_BYTES  # tokens per assignment
        seq = self.data.max_seq_len
        rows = self.train.batch_size // self.layout.ddp
        if rows * seq > budget:
            raise ValueError(
                f"train.batch_size / data shards x data.max_seq_len = {rows} x {seq} = {rows * seq} tokens per "
                f"assignment ({rows * seq * TOKEN_BYTES / 1e6:.1f} MB), over the {MAX_MESSAGE_BYTES >> 20} MiB gRPC "
                f"message limit (at most {budget} tokens): lower train.batch_size or data.max_seq_len, or add data shards")
        eval_rows = EVAL_BATCH_EXAMPLES * len(self.data.label_words)
        if eval_rows * seq > budget:
            raise ValueError(
                f"an eval chunk of {EVAL_BATCH_EXAMPLES} examples x {len(self.data.label_words)} data.label_words x "
                f"data.max_seq_len {seq} = {eval_rows * seq} tokens is over the {MAX_MESSAGE_BYTES >> 20} MiB gRPC "
                f"message limit (at most {budget} tokens): lower data.max_seq_len")
        return self

    # ------------------------------------------------------------------ loading
    @classmethod
    def from_dict(cls, raw: dict[str, Any] | None) -> "JobConfig":
        try:
            return cls.model_validate(raw or {})
        except ValidationError as exc:
            raise ConfigError(format_validation_error(exc)) from None

    @classmethod
    def from_yaml(cls, path: str | Path) -> "JobConfig":
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config file {str(p)!r} does not exist")
        if p.stat().st_size > MAX_CONFIG_BYTES:
            raise ConfigError(f"config file {str(p)!r} is {p.stat().st_size} bytes; a job config is at most {MAX_CONFIG_BYTES}")
        return cls.from_yaml_text(read_utf8(p, "config file"), f"config file {str(p)!r}")

    @classmethod
    def from_yaml_text(cls, text: str, what: str = "the job config") -> "JobConfig":
        """The config of YAML ``text`` (a file's, StartJob's, the server manifest's, a worker's welcome).

        Empty text is the default config. Raises ConfigError naming ``what`` when the text is not
        YAML, is not a mapping of sections, or does not validate.
        """
        try:
            raw = yaml.safe_load(text) if text else {}
        except yaml.YAMLError as exc:
            raise ConfigError(f"{what} is not valid YAML: {_short(str(exc), 300)}") from None
        if raw is not None and not isinstance(raw, dict):
            raise ConfigError(f"{what} must hold a mapping of sections, got {type(raw).__name__}")
        return cls.from_dict(raw)

    def with_overrides(self, overrides: dict[str, Any], keep_none: bool = False) -> "JobConfig":
        """A copy with dotted-path values replaced (``{"train.steps": 10}``), validated again.

        A None value is skipped (an absent flag) unless ``keep_none`` (then it sets the field to null).
        Raises ConfigError for a path that names no section, or a value the field refuses.
        """
        raw = self.model_dump()
        for dotted, value in overrides.items():
            if value is None and not keep_none:
                continue
            node = raw
            *parents, leaf = dotted.split(".")
            for depth, key in enumerate(parents):
                if not isinstance(node, dict) or key not in node or not isinstance(node[key], dict):
                    where = ".".join(parents[:depth + 1])
                    known = ", ".join(k for k, v in node.items() if isinstance(v, dict)) if isinstance(node, dict) else ""
                    raise ConfigError(f"invalid config: {dotted}: {where!r} is not a config section"
                                      + (f" (sections: {known})" if known else "")
                                      + "; `zoctl config` prints every field with its default")
                node = node[key]
            node[leaf] = value
        if raw["layout"].get("nodes") is not None and "layout.workers" not in overrides:
            raw["layout"].pop("workers", None)  # derived from nodes x node_size again
        return JobConfig.from_dict(raw)

    def to_yaml(self, redact: bool = False, public: bool = False) -> str:
        """The config as YAML; ``redact``: without secrets (security.token is null), for anything shown or sent;
        ``public``: also without the paths of secrets and private state (each section's PRIVATE fields at
        their defaults), for what a client without the token may read."""
        raw = self.model_dump()
        if redact or public:
            raw["security"]["token"] = None
        if public:
            for name in type(self).model_fields:
                section = getattr(self, name)
                for field in section.PRIVATE:
                    info = type(section).model_fields[field]
                    raw[name][field] = info.default_factory() if info.default_factory is not None else info.default
        return yaml.safe_dump(raw, sort_keys=False)
