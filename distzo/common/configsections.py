"""The job config's sections (``distzo.common.config.JobConfig`` holds one of each): every field's type,
range, default and description, the checks within one section, and each field's role in the job identity.

A bad value fails with the field's dotted path and what is allowed (``configtext.format_validation_error``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Callable, ClassVar, Literal, NamedTuple

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from distzo.common.configtext import ConfigError, read_utf8
from distzo.common.errors import counted
from distzo.common.wire_sizes import INT32_MAX, INT64_MAX, MAX_DIRECTIONS

LayoutName = Literal["dual", "pertp", "ddp", "2d"]

MAX_TEXT = 4096  # any string field: paths, names, templates
# every number has a range (tests/test_config_data.py checks the schema): a count fits the protobuf field it
# travels in (steps and versions int64, with room for step + 1), a wait fits threading's and gRPC's timeouts
MAX_STEPS = 1 << 62
MAX_COUNT = 1 << 16  # workers, directions' retries, attempts: far beyond any cluster
MAX_WAIT_S = 1e6  # about 11.6 days
Text = Annotated[str, Field(max_length=MAX_TEXT)]


class When(NamedTuple):
    """A field that decides the weights only under a condition on its section (``train.momentum``: only
    with ``train.optimizer momentum``); then it is always in the job identity."""

    applies: Callable[[Any], bool]
    what: str


ALWAYS, NOT = "always", "not"  # identity roles besides When (see Section)


class Section(BaseModel):
    """A config section. How its fields enter the job identity (``distzo.common.durable.job_identity``, what a
    resume must keep): ``IDENTITY`` names a field's role, ``ALWAYS`` (always recorded: the fields job ids
    have held since they exist), ``NOT`` (never: it does not change the weights), or a ``When``; a field not
    named there is in the identity when ``TRAJECTORY`` (recorded when set away from its default, so adding
    a field changes no existing job id) and out of it otherwise."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)  # inf lr: no run
    TRAJECTORY: ClassVar[bool] = True
    IDENTITY: ClassVar[dict[str, Any]] = {}
    PRIVATE: ClassVar[frozenset[str]] = frozenset()  # secrets and paths to them: never in a public view (to_yaml)


class ModelSection(Section):
    IDENTITY = {"source": ALWAYS}
    source: str = Field("tiny-opt", min_length=1, max_length=MAX_TEXT, description="a preset (tiny-opt, tiny-gpt2, tiny-llama, tiny-qwen3, ...), a fetched model (smollm2-135m, see `zoctl fetch`) or a Hugging Face model directory")


class DataSection(Section):
    IDENTITY = dict.fromkeys(("train", "dev", "template", "label_words", "max_seq_len", "dev_examples"), ALWAYS)
    train: Text | None = Field(None, description="a task name (rotten-tomatoes after `zoctl fetch`, sst2-synth) or a JSONL file of training examples; default: sst2-synth, the shipped SST-2-style task")
    dev: Text | None = Field(None, description="JSONL of dev examples (or a task name: its dev split); default: the task's dev split, or the last tenth of a data.train file")
    template: Text = "{text} It was"
    label_words: list[Annotated[str, Field(min_length=1, max_length=256)]] = Field(
        default_factory=lambda: ["terrible", "great"], min_length=2, max_length=1024)
    max_seq_len: int = Field(64, ge=4, le=1 << 16)
    dev_examples: int | None = Field(None, ge=1, le=INT32_MAX, description="evaluate on the first N dev examples only")

    @field_validator("template")
    @classmethod
    def _template_has_text(cls, template: str) -> str:
        if "{text}" not in template:
            raise ValueError("template must contain the placeholder {text}")
        try:
            template.format(text="x")
        except (KeyError, IndexError, ValueError) as exc:
            raise ValueError(f"template {template!r} cannot be filled with only {{text}} ({type(exc).__name__}: "
                             f"{exc}); write a literal brace as {{{{ or }}}}") from None
        return template

    @field_validator("label_words")
    @classmethod
    def _distinct_words(cls, words: list[str]) -> list[str]:
        if any(not w.strip() for w in words):
            raise ValueError("label_words must be non-blank words")
        if len(set(words)) != len(words):
            raise ValueError("label_words must be distinct")
        return words


class TrainSection(Section):
    IDENTITY = {**dict.fromkeys(("batch_size", "eps", "lr", "lr_schedule", "warmup_steps", "min_lr_ratio", "weight_decay",
                                 "distribution", "seed", "grad_clip"), ALWAYS),
                "steps": When(lambda t: t.lr_schedule != "constant", "a decaying lr_schedule spans the run"),
                "momentum": When(lambda t: t.optimizer == "momentum", "optimizer momentum"),
                **dict.fromkeys(("adam_beta1", "adam_beta2", "adam_eps"), When(lambda t: t.optimizer == "adam", "optimizer adam")),
                **dict.fromkeys(("lora_rank", "lora_alpha", "lora_modules"), When(lambda t: t.target == "lora", "target lora")),
                "prefix_tokens": When(lambda t: t.target == "prefix", "target prefix"),
                "eval_every": NOT, "eval_at_start": NOT}  # evaluations read the weights, never change them
    steps: int = Field(1000, ge=1, le=MAX_STEPS)
    batch_size: int = Field(16, ge=1, le=INT32_MAX)
    eps: float | None = Field(None, gt=0, description="perturbation scale; null: the default for train.target "
                              "(1e-3 full, 1e-2 lora, 1e-1 prefix; distzo/train/defaults.py)")
    lr: float | None = Field(None, gt=0, description="learning rate; null: the default for train.target and the "
                             "model's size (distzo/train/defaults.py; zoctl up and zoctl reference print the one in use)")
    eps_bf16: float | None = Field(
        None, gt=0, description="perturbation scale of forwards that compute in bfloat16 (a GPU fed a bfloat16 served "
        "copy): None is 4 x train.eps, which keeps the perturbation bfloat16 rounding leaves within 5% rms on "
        "SmolLM2-135M (distzo/zo/forwardweights.py forward_precision; bench/NOTES.md section 10)")
    forward_dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto", description="what the forwards compute in: auto is float32 on a CPU and the served dtype on a GPU; "
        "a 16-bit dtype on a CPU runs the GPU's arithmetic there (slower, for checks)")
    lr_schedule: Literal["constant", "linear", "cosine"] = "constant"
    warmup_steps: int = Field(0, ge=0, le=MAX_STEPS)
    min_lr_ratio: float = Field(0.0, ge=0, le=1)
    weight_decay: float = Field(0.0, ge=0)
    distribution: Literal["rademacher", "gaussian"] = "rademacher"
    seed: int = Field(0, ge=0, lt=1 << 63)
    grad_clip: float | None = Field(None, gt=0, description="clip |g| to this value")
    nonfinite_retries: int = Field(1, ge=0, le=MAX_COUNT, description="re-runs of a step whose losses are not finite")
    nonfinite_policy: Literal["skip", "stop"] = "skip"
    max_consecutive_skips: int = Field(10, ge=1, le=MAX_STEPS, description="stop when this many steps in a row are skipped (diverged)")
    eval_every: int = Field(250, ge=0, le=MAX_STEPS, description="evaluate every N steps (0: only at the end)")
    eval_at_start: bool = Field(True, description="evaluate before the first step (the zero-shot figures)")
    optimizer: Literal["sgd", "momentum", "adam"] = Field(
        "sgd", description="update rule on the parameter server: sgd (MeZO-SGD, no state), momentum (heavy ball, "
        "one fp32 buffer per parameter) or adam (ZO-Adam, two fp32 moments per parameter); see distzo/zo/optim.py")
    momentum: float = Field(0.9, ge=0, lt=1, description="momentum coefficient mu (train.optimizer momentum)")
    adam_beta1: float = Field(0.9, ge=0, lt=1, description="first-moment decay beta1 (train.optimizer adam)")
    adam_beta2: float = Field(0.999, ge=0, lt=1, description="second-moment decay beta2 (train.optimizer adam)")
    adam_eps: float = Field(1e-8, gt=0, description="denominator offset epsilon of adam (train.optimizer adam)")
    objective: Literal["loss", "accuracy", "f1", "classification"] = Field(
        "loss", description="the scalar each forward returns: loss (mean label-token cross-entropy), classification "
        "(cross-entropy over the label words only: a softmax over their log-likelihoods, MeZO's train_as_classification), accuracy "
        "(minus the batch accuracy of the label words' likelihood ranking: non-differentiable, as in MeZO) or f1 "
        "(minus the macro-F1 of that ranking over the batch's classes)")
    target: Literal["full", "lora", "prefix"] = Field(
        "full", description="what is perturbed and trained: full (every weight), lora (low-rank adapters from peft "
        "on train.lora_modules, the base frozen) or prefix (train.prefix_tokens trained keys and values in front of "
        "every layer's attention, peft's prefix tuning, the base frozen)")
    lora_rank: int = Field(8, ge=1, le=4096, description="LoRA rank r (train.target lora)")
    lora_alpha: float = Field(16.0, gt=0, description="LoRA scaling alpha: the adapter adds (alpha / r) B A x")
    lora_modules: list[Annotated[str, Field(min_length=1, max_length=256)]] | None = Field(
        None, min_length=1, max_length=64,
        description="names of the linear modules that get adapters (peft target_modules); null: peft's default for "
        "the model's family (q_proj and v_proj for Llama, OPT, Qwen, Mistral: MeZO's LoRA; c_attn for GPT-2)")
    prefix_tokens: int = Field(5, ge=1, le=4096, description="prefix length in tokens (train.target prefix)")

    @model_validator(mode="after")
    def _decay_step_below_one(self) -> "TrainSection":
        """The parameter server refuses an update with lr x weight_decay >= 1 (it would flip or zero every weight):
        refused here, before the run, not at its first update (no schedule goes above lr)."""
        if self.lr is not None and self.lr * self.weight_decay >= 1:
            raise ValueError(f"train.lr x train.weight_decay = {self.lr} x {self.weight_decay} = "
                             f"{self.lr * self.weight_decay:g} must be below 1 (each step multiplies a weight by "
                             "1 - lr x weight_decay)")
        return self


class LayoutSection(Section):
    IDENTITY = {"workers": ALWAYS, "name": ALWAYS, "q": ALWAYS,
                "node_size": NOT, "nodes": NOT}  # a node group gathers whole blocks: placement, not arithmetic
    workers: int = Field(1, ge=1, le=MAX_COUNT)
    name: LayoutName = "dual"
    q: int = Field(1, ge=1, le=MAX_DIRECTIONS, description="perturbation directions per step")
    node_size: int = Field(1, ge=1, le=MAX_COUNT, description="workers per node group (sliced fetch + all-gather)")
    nodes: int | None = Field(None, ge=1, le=1 << 16, description="worker nodes (node groups); when set, workers = "
                              "nodes x node_size (the Kubernetes run's shape, k8s/overlays/gpu-run/shape.yaml)")

    @model_validator(mode="before")
    @classmethod
    def _workers_from_nodes(cls, raw: Any) -> Any:
        if isinstance(raw, dict) and raw.get("nodes") is not None and raw.get("workers") is None:
            try:
                return {**raw, "workers": int(raw["nodes"]) * int(raw.get("node_size", 1))}
            except (TypeError, ValueError):
                return raw  # the field validators say what is wrong
        return raw

    @property
    def pertp(self) -> int:
        return 2 if self.name in ("pertp", "2d") else 1

    @property
    def ddp(self) -> int:
        return self.workers // (self.pertp * self.q)

    @model_validator(mode="after")
    def _fits(self) -> "LayoutSection":
        if self.nodes is not None and self.workers != self.nodes * self.node_size:
            raise ValueError(f"workers {self.workers} must be nodes x node_size = {self.nodes} x {self.node_size} "
                             f"(omit workers when nodes is set)")
        per = self.pertp * self.q
        if self.workers % per:
            raise ValueError(
                f"layout {self.name} with q={self.q} needs a multiple of {counted(per, 'worker')} (workers = pertp x ddp x q), got {self.workers}"
            )
        ddp = self.workers // per
        if self.name in ("dual", "pertp") and ddp != 1:
            raise ValueError(
                f"layout {self.name} with q={self.q} uses exactly {counted(per, 'worker')}, got {self.workers}; "
                f"use layout {'ddp' if self.name == 'dual' else '2d'} to spread more workers over data shards"
            )
        if self.name in ("ddp", "2d") and ddp < 2:
            raise ValueError(f"layout {self.name} needs at least {2 * per} workers (2 data shards), got {self.workers}")
        if self.workers % self.node_size:
            raise ValueError(f"node_size {self.node_size} must divide the worker count {self.workers}")
        return self


class ServerSection(Section):
    PRIVATE = frozenset({"data_dir"})  # (zoctl up: inside the run directory, beside the token file)
    IDENTITY = {"served_dtype": ALWAYS,  # paths, threads, timeouts and guards never change the weights
                **dict.fromkeys(("snapshot_every", "snapshot_at_start", "chunk_bytes", "update_threads", "shared_memory",
                                 "shm_dir", "export_root", "fetch_timeout_s", "max_update_step", "data_dir"), NOT)}
    served_dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    snapshot_every: int = Field(100, ge=0, le=MAX_STEPS, description="snapshot every N steps (0: never automatically)")
    snapshot_at_start: bool = Field(True, description="snapshot the initial weights when the data directory has none, so recovery never needs the model directory again (benchmarks turn it off)")
    chunk_bytes: int = Field(4 << 20, ge=1 << 20, le=16 << 20, description="data-plane chunk size (1-16 MiB)")
    update_threads: int = Field(1, ge=1, le=1024, description="threads applying an update (results never depend on it)")
    shared_memory: bool = Field(True, description="offer the shared-memory fetch path to clients on this host")
    shm_dir: Text = Field("/dev/shm", description="where shared-memory segments live (a memory-backed directory)")
    export_root: Text | None = Field(None, description="exports must be written under this directory (None: anywhere)")
    fetch_timeout_s: float = Field(120.0, gt=0, le=MAX_WAIT_S, description="how long a fetch may wait for a version")
    max_update_step: float = Field(1.0, gt=0, description="refuse (before journaling) an update that moves a weight "
                                   "by more than this per unit of z: lr x mean |g| (a diverged or broken run)")
    data_dir: Text | None = Field(None, description="snapshots and journal (zoctl up: <run dir>/server)")
    update_window: int = Field(
        1, ge=1, le=1024, description="update window K: the server materializes the weights every K steps in one "
        "pass over memory (K updates applied element by element: bitwise K single passes) and step t's forwards read "
        "the base distzo.zo.mezo.base_version(t, K), replaying the at most 2K - 2 records after it; 1: every step is "
        "materialized and read as it is. `zoctl plan` recommends K for a cluster (1 on CPU clusters, where the "
        "worker would pay for the replay)")


class RuntimeSection(Section):
    TRAJECTORY = False  # where and how fast: devices, threads, caches
    device: Literal["cpu", "cuda"] = "cpu"
    threads: int = Field(1, ge=1, le=1024, description="torch compute threads per worker (and for the reference)")
    kernel_threads: int = Field(1, ge=1, le=1024, description="threads for the perturbation kernels")
    prefetch_blocks: int = Field(2, ge=1, le=64, description="blocks fetched ahead of the one computing")
    frozen_gpu_bytes: int | None = Field(
        None, ge=0, le=INT64_MAX, description="train.target lora/prefix on a GPU: at most this many bytes of frozen blocks kept in "
        "GPU memory, the rest in the worker's pinned host memory (default: the GPU memory free at the first "
        "assignment less a fifth of the device, kept for activations and the streamed blocks)")
    copy_threads: int = Field(0, ge=0, le=64, description="threads copying fetched blocks out of the server's shared memory (0: one per core, at most 8)")
    cache_dir: Text | None = Field(None, description="where presets are built; default ~/.cache/distzo")


class CoordinatorSection(Section):
    TRAJECTORY = False  # a failure never changes the trajectory: how failures are handled neither
    on_worker_loss: Literal["reassign", "wait"] = Field(
        "reassign", description="a lost worker's forwards go to a live worker now, or wait for a replacement")
    heartbeat_timeout_s: float = Field(15.0, gt=0, le=MAX_WAIT_S, description="a worker silent this long is lost")
    assignment_timeout_s: float = Field(600.0, gt=0, le=MAX_WAIT_S, description="an assignment not answered in this time is re-assigned")
    max_attempts: int = Field(5, ge=1, le=MAX_COUNT, description="tries per forward before the step fails")
    server_timeout_s: float = Field(300.0, gt=0, le=MAX_WAIT_S, description="how long to wait for an unreachable parameter server")
    worker_wait_s: float = Field(600.0, gt=0, le=MAX_WAIT_S, description="how long to wait for the layout's workers to register")


class ClusterSection(Section):
    """Where ``zoctl up`` puts the processes (placement only: it never changes the weights)."""

    TRAJECTORY = False

    hosts: int = Field(1, ge=1, le=64, description="simulated hosts (Linux network namespaces, needs root): the primary "
                       "parameter server and the coordinator on host 0, a replica on every other host, the workers "
                       "spread evenly over all hosts, each fetching from its own host's server; 1: everything on loopback")
    link_rate: str | None = Field(None, pattern=r"^[0-9]+(\.[0-9]+)?([kmgt]?bit|[kmgt]?bps)$", max_length=32,
                                  description="limit each host's link to this rate in both directions (tc tbf, e.g. "
                                  "1gbit, 100mbit); None: unlimited")


class SecuritySection(Section):
    TRAJECTORY = False
    PRIVATE = frozenset({"token", "token_file", "tls_cert", "tls_key", "tls_ca", "mutual_tls"})  # all of it, consistently
    token: str | None = Field(None, min_length=1, max_length=MAX_TEXT, description="bearer token for state-changing RPCs (prefer token_file)")
    token_file: Text | None = Field(None, description="file holding the bearer token (a mounted Secret)")
    tls_cert: Text | None = Field(None, description="PEM certificate of this service (enables TLS)")
    tls_key: Text | None = Field(None, description="PEM private key of this service")
    tls_ca: Text | None = Field(None, description="PEM CA that signed the peers' certificates")
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
            token = read_utf8(p, "security.token_file").strip()
            if not token:
                raise ConfigError(f"security.token_file {self.token_file!r} is empty")
            return token
        return self.token
