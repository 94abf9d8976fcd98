"""The job config: one typed, validated object, loadable from YAML, with defaults that run.

Every service reads the same object; a bad value fails with the field's dotted path and
what is allowed, before anything starts.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

LayoutName = Literal["dual", "pertp", "ddp", "2d"]


class ConfigError(ValueError):
    """A config that does not parse or validate; the message names the field."""


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class ModelSection(_Section):
    source: str = Field("tiny-opt", description="a preset (tiny-opt, tiny-gpt2, tiny-llama, tiny-qwen3, ...), a fetched model (smollm2-135m, see `zoctl fetch`) or a Hugging Face model directory")


class DataSection(_Section):
    train: str | None = Field(None, description="a task name (rotten-tomatoes after `zoctl fetch`, sst2-synth) or a JSONL file of training examples; default: sst2-synth, the shipped SST-2-style task")
    dev: str | None = Field(None, description="JSONL of dev examples (or a task name: its dev split); default: the task's dev split, or the last tenth of a data.train file")
    template: str = "{text} It was"
    label_words: list[str] = Field(default_factory=lambda: ["terrible", "great"], min_length=2)
    max_seq_len: int = Field(64, ge=4, le=1 << 16)
    dev_examples: int | None = Field(None, ge=1, description="evaluate on the first N dev examples only")

    @model_validator(mode="after")
    def _template_has_text(self) -> "DataSection":
        if "{text}" not in self.template:
            raise ValueError("template must contain the placeholder {text}")
        if len(set(self.label_words)) != len(self.label_words):
            raise ValueError("label_words must be distinct")
        return self


class TrainSection(_Section):
    steps: int = Field(1000, ge=1)
    batch_size: int = Field(16, ge=1)
    eps: float = Field(1e-3, gt=0, description="perturbation scale")
    lr: float = Field(5e-4, gt=0)
    lr_schedule: Literal["constant", "linear", "cosine"] = "constant"
    warmup_steps: int = Field(0, ge=0)
    min_lr_ratio: float = Field(0.0, ge=0, le=1)
    weight_decay: float = Field(0.0, ge=0)
    distribution: Literal["rademacher", "gaussian"] = "rademacher"
    seed: int = Field(0, ge=0, lt=1 << 63)
    grad_clip: float | None = Field(None, gt=0, description="clip |g| to this value")
    nonfinite_retries: int = Field(1, ge=0, description="re-runs of a step whose losses are not finite")
    nonfinite_policy: Literal["skip", "stop"] = "skip"
    max_consecutive_skips: int = Field(10, ge=1, description="stop when this many steps in a row are skipped (diverged)")
    eval_every: int = Field(250, ge=0, description="evaluate every N steps (0: only at the end)")
    eval_at_start: bool = Field(True, description="evaluate before the first step (the zero-shot figures)")


class LayoutSection(_Section):
    workers: int = Field(1, ge=1)
    name: LayoutName = "dual"
    q: int = Field(1, ge=1, description="perturbation directions per step")
    node_size: int = Field(1, ge=1, description="workers per node group (sliced fetch + all-gather)")

    @property
    def pertp(self) -> int:
        return 2 if self.name in ("pertp", "2d") else 1

    @property
    def ddp(self) -> int:
        return self.workers // (self.pertp * self.q)

    @model_validator(mode="after")
    def _fits(self) -> "LayoutSection":
        per = self.pertp * self.q
        if self.workers % per:
            raise ValueError(
                f"layout {self.name} with q={self.q} needs a multiple of {per} workers (workers = pertp x ddp x q), got {self.workers}"
            )
        ddp = self.workers // per
        if self.name in ("dual", "pertp") and ddp != 1:
            raise ValueError(
                f"layout {self.name} with q={self.q} uses exactly {per} workers, got {self.workers}; "
                f"use layout {'ddp' if self.name == 'dual' else '2d'} to spread more workers over data shards"
            )
        if self.name in ("ddp", "2d") and ddp < 2:
            raise ValueError(f"layout {self.name} needs at least {2 * per} workers (2 data shards), got {self.workers}")
        if self.workers % self.node_size:
            raise ValueError(f"node_size {self.node_size} must divide the worker count {self.workers}")
        return self


class ServerSection(_Section):
    served_dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    snapshot_every: int = Field(100, ge=0, description="snapshot every N steps (0: never automatically)")
    snapshot_at_start: bool = Field(True, description="snapshot the initial weights when the data directory has none, so recovery never needs the model directory again (benchmarks turn it off)")
    chunk_bytes: int = Field(4 << 20, ge=1 << 20, le=16 << 20, description="data-plane chunk size (1-16 MiB)")
    update_threads: int = Field(1, ge=1, description="threads applying an update (results never depend on it)")
    shared_memory: bool = Field(True, description="offer the shared-memory fetch path to clients on this host")
    shm_dir: str = Field("/dev/shm", description="where shared-memory segments live (a memory-backed directory)")
    export_root: str | None = Field(None, description="exports must be written under this directory (None: anywhere)")
    fetch_timeout_s: float = Field(120.0, gt=0, description="how long a fetch may wait for a version")
    data_dir: str | None = Field(None, description="snapshots and journal (zoctl up: <run dir>/server)")


class RuntimeSection(_Section):
    device: Literal["cpu", "cuda"] = "cpu"
    threads: int = Field(1, ge=1, description="torch compute threads per worker (and for the reference)")
    kernel_threads: int = Field(1, ge=1, description="threads for the perturbation kernels")
    prefetch_blocks: int = Field(2, ge=1, le=64, description="blocks fetched ahead of the one computing")
    copy_threads: int = Field(0, ge=0, le=64, description="threads copying fetched blocks out of the server's shared memory (0: one per core, at most 8)")
    cache_dir: str | None = Field(None, description="where presets are built; default ~/.cache/distzo")


class CoordinatorSection(_Section):
    on_worker_loss: Literal["reassign", "wait"] = Field(
        "reassign", description="a lost worker's forwards go to a live worker now, or wait for a replacement")
    heartbeat_timeout_s: float = Field(15.0, gt=0, description="a worker silent this long is lost")
    assignment_timeout_s: float = Field(600.0, gt=0, description="an assignment not answered in this time is re-assigned")
    max_attempts: int = Field(5, ge=1, description="tries per forward before the step fails")
    server_timeout_s: float = Field(300.0, gt=0, description="how long to wait for an unreachable parameter server")
    worker_wait_s: float = Field(600.0, gt=0, description="how long to wait for the layout's workers to register")


class SecuritySection(_Section):
    token: str | None = Field(None, description="bearer token for state-changing RPCs (prefer token_file)")
    token_file: str | None = Field(None, description="file holding the bearer token (a mounted Secret)")
    tls_cert: str | None = Field(None, description="PEM certificate of this service (enables TLS)")
    tls_key: str | None = Field(None, description="PEM private key of this service")
    tls_ca: str | None = Field(None, description="PEM CA that signed the peers' certificates")
    mutual_tls: bool = Field(False, description="servers require client certificates signed by tls_ca")

    @model_validator(mode="after")
    def _pairs(self) -> "SecuritySection":
        if (self.tls_cert is None) != (self.tls_key is None):
            raise ValueError("tls_cert and tls_key go together")
        if self.mutual_tls and (self.tls_ca is None or self.tls_cert is None):
            raise ValueError("mutual_tls needs tls_ca, tls_cert and tls_key")
        return self

    def resolve_token(self) -> str | None:
        if self.token_file:
            p = Path(self.token_file)
            if not p.is_file():
                raise ConfigError(f"security.token_file {self.token_file!r} does not exist")
            token = p.read_text().strip()
            if not token:
                raise ConfigError(f"security.token_file {self.token_file!r} is empty")
            return token
        return self.token


class JobConfig(_Section):
    model: ModelSection = Field(default_factory=ModelSection)
    data: DataSection = Field(default_factory=DataSection)
    train: TrainSection = Field(default_factory=TrainSection)
    layout: LayoutSection = Field(default_factory=LayoutSection)
    server: ServerSection = Field(default_factory=ServerSection)
    runtime: RuntimeSection = Field(default_factory=RuntimeSection)
    security: SecuritySection = Field(default_factory=SecuritySection)
    coordinator: CoordinatorSection = Field(default_factory=CoordinatorSection)

    @model_validator(mode="after")
    def _batch_fits_layout(self) -> "JobConfig":
        ddp = self.layout.ddp
        if self.train.batch_size % ddp:
            raise ValueError(f"train.batch_size {self.train.batch_size} must be divisible by the {ddp} data shards of layout {self.layout.name}")
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
        try:
            raw = yaml.safe_load(p.read_text())
        except yaml.YAMLError as exc:
            raise ConfigError(f"config file {str(p)!r} is not valid YAML: {exc}") from None
        if raw is not None and not isinstance(raw, dict):
            raise ConfigError(f"config file {str(p)!r} must hold a mapping of sections, got {type(raw).__name__}")
        return cls.from_dict(raw)

    def with_overrides(self, overrides: dict[str, Any]) -> "JobConfig":
        """A copy with dotted-path values replaced (``{"train.steps": 10}``), validated again."""
        raw = self.model_dump()
        for dotted, value in overrides.items():
            if value is None:
                continue
            node = raw
            *parents, leaf = dotted.split(".")
            for key in parents:
                node = node[key]
            node[leaf] = value
        return JobConfig.from_dict(raw)

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.model_dump(), sort_keys=False)


def format_validation_error(exc: ValidationError) -> str:
    lines = []
    for err in exc.errors():
        loc = ".".join(str(x) for x in err["loc"]) or "config"
        msg = err["msg"].removeprefix("Value error, ")
        if err["type"] == "extra_forbidden":
            msg = "unknown field (check the spelling; `zoctl config` prints every field with its default)"
        got = err.get("input")
        shown = "" if err["type"] in ("extra_forbidden", "missing") or isinstance(got, dict) else f" (got {got!r})"
        lines.append(f"{loc}: {msg}{shown}")
    return "invalid config: " + "; ".join(lines)
