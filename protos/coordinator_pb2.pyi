from protos import common_pb2 as _common_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class WorkerHello(_message.Message):
    __slots__ = ("worker_id", "host", "node_id", "node_rank", "node_size", "device", "pid", "capabilities")
    WORKER_ID_FIELD_NUMBER: _ClassVar[int]
    HOST_FIELD_NUMBER: _ClassVar[int]
    NODE_ID_FIELD_NUMBER: _ClassVar[int]
    NODE_RANK_FIELD_NUMBER: _ClassVar[int]
    NODE_SIZE_FIELD_NUMBER: _ClassVar[int]
    DEVICE_FIELD_NUMBER: _ClassVar[int]
    PID_FIELD_NUMBER: _ClassVar[int]
    CAPABILITIES_FIELD_NUMBER: _ClassVar[int]
    worker_id: str
    host: str
    node_id: str
    node_rank: int
    node_size: int
    device: str
    pid: int
    capabilities: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, worker_id: _Optional[str] = ..., host: _Optional[str] = ..., node_id: _Optional[str] = ..., node_rank: _Optional[int] = ..., node_size: _Optional[int] = ..., device: _Optional[str] = ..., pid: _Optional[int] = ..., capabilities: _Optional[_Iterable[str]] = ...) -> None: ...

class Heartbeat(_message.Message):
    __slots__ = ("assignment_id", "state", "ready")
    ASSIGNMENT_ID_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    READY_FIELD_NUMBER: _ClassVar[int]
    assignment_id: int
    state: str
    ready: bool
    def __init__(self, assignment_id: _Optional[int] = ..., state: _Optional[str] = ..., ready: _Optional[bool] = ...) -> None: ...

class ForwardSpec(_message.Message):
    __slots__ = ("direction", "shard", "sign", "seed", "coef", "want_scores", "candidates")
    DIRECTION_FIELD_NUMBER: _ClassVar[int]
    SHARD_FIELD_NUMBER: _ClassVar[int]
    SIGN_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    COEF_FIELD_NUMBER: _ClassVar[int]
    WANT_SCORES_FIELD_NUMBER: _ClassVar[int]
    CANDIDATES_FIELD_NUMBER: _ClassVar[int]
    direction: int
    shard: int
    sign: int
    seed: int
    coef: float
    want_scores: bool
    candidates: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, direction: _Optional[int] = ..., shard: _Optional[int] = ..., sign: _Optional[int] = ..., seed: _Optional[int] = ..., coef: _Optional[float] = ..., want_scores: _Optional[bool] = ..., candidates: _Optional[_Iterable[int]] = ...) -> None: ...

class BatchData(_message.Message):
    __slots__ = ("shard", "rows", "cols", "input_ids", "attention_mask", "labels")
    SHARD_FIELD_NUMBER: _ClassVar[int]
    ROWS_FIELD_NUMBER: _ClassVar[int]
    COLS_FIELD_NUMBER: _ClassVar[int]
    INPUT_IDS_FIELD_NUMBER: _ClassVar[int]
    ATTENTION_MASK_FIELD_NUMBER: _ClassVar[int]
    LABELS_FIELD_NUMBER: _ClassVar[int]
    shard: int
    rows: int
    cols: int
    input_ids: bytes
    attention_mask: bytes
    labels: bytes
    def __init__(self, shard: _Optional[int] = ..., rows: _Optional[int] = ..., cols: _Optional[int] = ..., input_ids: _Optional[bytes] = ..., attention_mask: _Optional[bytes] = ..., labels: _Optional[bytes] = ...) -> None: ...

class Assignment(_message.Message):
    __slots__ = ("assignment_id", "step", "version", "kind", "forwards", "batches", "deadline_s", "report_digests", "pending")
    ASSIGNMENT_ID_FIELD_NUMBER: _ClassVar[int]
    STEP_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    FORWARDS_FIELD_NUMBER: _ClassVar[int]
    BATCHES_FIELD_NUMBER: _ClassVar[int]
    DEADLINE_S_FIELD_NUMBER: _ClassVar[int]
    REPORT_DIGESTS_FIELD_NUMBER: _ClassVar[int]
    PENDING_FIELD_NUMBER: _ClassVar[int]
    assignment_id: int
    step: int
    version: int
    kind: str
    forwards: _containers.RepeatedCompositeFieldContainer[ForwardSpec]
    batches: _containers.RepeatedCompositeFieldContainer[BatchData]
    deadline_s: float
    report_digests: bool
    pending: _containers.RepeatedCompositeFieldContainer[_common_pb2.UpdateRecord]
    def __init__(self, assignment_id: _Optional[int] = ..., step: _Optional[int] = ..., version: _Optional[int] = ..., kind: _Optional[str] = ..., forwards: _Optional[_Iterable[_Union[ForwardSpec, _Mapping]]] = ..., batches: _Optional[_Iterable[_Union[BatchData, _Mapping]]] = ..., deadline_s: _Optional[float] = ..., report_digests: _Optional[bool] = ..., pending: _Optional[_Iterable[_Union[_common_pb2.UpdateRecord, _Mapping]]] = ...) -> None: ...

class Welcome(_message.Message):
    __slots__ = ("worker_id", "job_config_yaml", "param_servers")
    WORKER_ID_FIELD_NUMBER: _ClassVar[int]
    JOB_CONFIG_YAML_FIELD_NUMBER: _ClassVar[int]
    PARAM_SERVERS_FIELD_NUMBER: _ClassVar[int]
    worker_id: str
    job_config_yaml: str
    param_servers: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, worker_id: _Optional[str] = ..., job_config_yaml: _Optional[str] = ..., param_servers: _Optional[_Iterable[str]] = ...) -> None: ...

class ShutdownWorker(_message.Message):
    __slots__ = ("reason",)
    REASON_FIELD_NUMBER: _ClassVar[int]
    reason: str
    def __init__(self, reason: _Optional[str] = ...) -> None: ...

class CoordinatorMessage(_message.Message):
    __slots__ = ("welcome", "assignment", "shutdown")
    WELCOME_FIELD_NUMBER: _ClassVar[int]
    ASSIGNMENT_FIELD_NUMBER: _ClassVar[int]
    SHUTDOWN_FIELD_NUMBER: _ClassVar[int]
    welcome: Welcome
    assignment: Assignment
    shutdown: ShutdownWorker
    def __init__(self, welcome: _Optional[_Union[Welcome, _Mapping]] = ..., assignment: _Optional[_Union[Assignment, _Mapping]] = ..., shutdown: _Optional[_Union[ShutdownWorker, _Mapping]] = ...) -> None: ...

class Timing(_message.Message):
    __slots__ = ("fetch_s", "gather_s", "h2d_s", "compute_s", "wait_s", "total_s", "bytes_received", "peak_memory_bytes", "peak_block_bytes", "transport")
    FETCH_S_FIELD_NUMBER: _ClassVar[int]
    GATHER_S_FIELD_NUMBER: _ClassVar[int]
    H2D_S_FIELD_NUMBER: _ClassVar[int]
    COMPUTE_S_FIELD_NUMBER: _ClassVar[int]
    WAIT_S_FIELD_NUMBER: _ClassVar[int]
    TOTAL_S_FIELD_NUMBER: _ClassVar[int]
    BYTES_RECEIVED_FIELD_NUMBER: _ClassVar[int]
    PEAK_MEMORY_BYTES_FIELD_NUMBER: _ClassVar[int]
    PEAK_BLOCK_BYTES_FIELD_NUMBER: _ClassVar[int]
    TRANSPORT_FIELD_NUMBER: _ClassVar[int]
    fetch_s: float
    gather_s: float
    h2d_s: float
    compute_s: float
    wait_s: float
    total_s: float
    bytes_received: int
    peak_memory_bytes: int
    peak_block_bytes: int
    transport: str
    def __init__(self, fetch_s: _Optional[float] = ..., gather_s: _Optional[float] = ..., h2d_s: _Optional[float] = ..., compute_s: _Optional[float] = ..., wait_s: _Optional[float] = ..., total_s: _Optional[float] = ..., bytes_received: _Optional[int] = ..., peak_memory_bytes: _Optional[int] = ..., peak_block_bytes: _Optional[int] = ..., transport: _Optional[str] = ...) -> None: ...

class ForwardResult(_message.Message):
    __slots__ = ("spec", "loss", "label_tokens", "tokens", "scores", "loss_sum")
    SPEC_FIELD_NUMBER: _ClassVar[int]
    LOSS_FIELD_NUMBER: _ClassVar[int]
    LABEL_TOKENS_FIELD_NUMBER: _ClassVar[int]
    TOKENS_FIELD_NUMBER: _ClassVar[int]
    SCORES_FIELD_NUMBER: _ClassVar[int]
    LOSS_SUM_FIELD_NUMBER: _ClassVar[int]
    spec: ForwardSpec
    loss: float
    label_tokens: int
    tokens: int
    scores: _containers.RepeatedScalarFieldContainer[float]
    loss_sum: float
    def __init__(self, spec: _Optional[_Union[ForwardSpec, _Mapping]] = ..., loss: _Optional[float] = ..., label_tokens: _Optional[int] = ..., tokens: _Optional[int] = ..., scores: _Optional[_Iterable[float]] = ..., loss_sum: _Optional[float] = ...) -> None: ...

class WorkResult(_message.Message):
    __slots__ = ("assignment_id", "step", "results", "error", "error_kind", "timing", "block_digests")
    ASSIGNMENT_ID_FIELD_NUMBER: _ClassVar[int]
    STEP_FIELD_NUMBER: _ClassVar[int]
    RESULTS_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    ERROR_KIND_FIELD_NUMBER: _ClassVar[int]
    TIMING_FIELD_NUMBER: _ClassVar[int]
    BLOCK_DIGESTS_FIELD_NUMBER: _ClassVar[int]
    assignment_id: int
    step: int
    results: _containers.RepeatedCompositeFieldContainer[ForwardResult]
    error: str
    error_kind: str
    timing: Timing
    block_digests: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, assignment_id: _Optional[int] = ..., step: _Optional[int] = ..., results: _Optional[_Iterable[_Union[ForwardResult, _Mapping]]] = ..., error: _Optional[str] = ..., error_kind: _Optional[str] = ..., timing: _Optional[_Union[Timing, _Mapping]] = ..., block_digests: _Optional[_Iterable[int]] = ...) -> None: ...

class WorkerMessage(_message.Message):
    __slots__ = ("hello", "result", "heartbeat")
    HELLO_FIELD_NUMBER: _ClassVar[int]
    RESULT_FIELD_NUMBER: _ClassVar[int]
    HEARTBEAT_FIELD_NUMBER: _ClassVar[int]
    hello: WorkerHello
    result: WorkResult
    heartbeat: Heartbeat
    def __init__(self, hello: _Optional[_Union[WorkerHello, _Mapping]] = ..., result: _Optional[_Union[WorkResult, _Mapping]] = ..., heartbeat: _Optional[_Union[Heartbeat, _Mapping]] = ...) -> None: ...

class StatusQuery(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class WorkerStatus(_message.Message):
    __slots__ = ("worker_id", "host", "pid", "state", "node_id", "node_rank", "device", "assignments_done", "last_seen_s")
    WORKER_ID_FIELD_NUMBER: _ClassVar[int]
    HOST_FIELD_NUMBER: _ClassVar[int]
    PID_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    NODE_ID_FIELD_NUMBER: _ClassVar[int]
    NODE_RANK_FIELD_NUMBER: _ClassVar[int]
    DEVICE_FIELD_NUMBER: _ClassVar[int]
    ASSIGNMENTS_DONE_FIELD_NUMBER: _ClassVar[int]
    LAST_SEEN_S_FIELD_NUMBER: _ClassVar[int]
    worker_id: str
    host: str
    pid: int
    state: str
    node_id: str
    node_rank: int
    device: str
    assignments_done: int
    last_seen_s: float
    def __init__(self, worker_id: _Optional[str] = ..., host: _Optional[str] = ..., pid: _Optional[int] = ..., state: _Optional[str] = ..., node_id: _Optional[str] = ..., node_rank: _Optional[int] = ..., device: _Optional[str] = ..., assignments_done: _Optional[int] = ..., last_seen_s: _Optional[float] = ...) -> None: ...

class EvalResult(_message.Message):
    __slots__ = ("step", "dev_loss", "dev_accuracy", "dev_examples")
    STEP_FIELD_NUMBER: _ClassVar[int]
    DEV_LOSS_FIELD_NUMBER: _ClassVar[int]
    DEV_ACCURACY_FIELD_NUMBER: _ClassVar[int]
    DEV_EXAMPLES_FIELD_NUMBER: _ClassVar[int]
    step: int
    dev_loss: float
    dev_accuracy: float
    dev_examples: int
    def __init__(self, step: _Optional[int] = ..., dev_loss: _Optional[float] = ..., dev_accuracy: _Optional[float] = ..., dev_examples: _Optional[int] = ...) -> None: ...

class JobStatus(_message.Message):
    __slots__ = ("state", "step", "total_steps", "loss", "final_loss", "tokens_per_second", "train_tokens", "train_seconds", "skipped_steps", "reassignments", "late_reports", "nonfinite_retries", "workers", "evals", "error", "layout", "layout_workers", "resumed_from", "model", "wall_seconds", "assign_s", "wait_s", "update_s", "worker_fetch_s", "worker_compute_s", "worker_wait_s", "worker_gather_s", "bytes_per_step", "worker_h2d_s", "worker_peak_memory_bytes", "error_kind", "perturbation", "perturbation_warning", "activity")
    STATE_FIELD_NUMBER: _ClassVar[int]
    STEP_FIELD_NUMBER: _ClassVar[int]
    TOTAL_STEPS_FIELD_NUMBER: _ClassVar[int]
    LOSS_FIELD_NUMBER: _ClassVar[int]
    FINAL_LOSS_FIELD_NUMBER: _ClassVar[int]
    TOKENS_PER_SECOND_FIELD_NUMBER: _ClassVar[int]
    TRAIN_TOKENS_FIELD_NUMBER: _ClassVar[int]
    TRAIN_SECONDS_FIELD_NUMBER: _ClassVar[int]
    SKIPPED_STEPS_FIELD_NUMBER: _ClassVar[int]
    REASSIGNMENTS_FIELD_NUMBER: _ClassVar[int]
    LATE_REPORTS_FIELD_NUMBER: _ClassVar[int]
    NONFINITE_RETRIES_FIELD_NUMBER: _ClassVar[int]
    WORKERS_FIELD_NUMBER: _ClassVar[int]
    EVALS_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    LAYOUT_FIELD_NUMBER: _ClassVar[int]
    LAYOUT_WORKERS_FIELD_NUMBER: _ClassVar[int]
    RESUMED_FROM_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    WALL_SECONDS_FIELD_NUMBER: _ClassVar[int]
    ASSIGN_S_FIELD_NUMBER: _ClassVar[int]
    WAIT_S_FIELD_NUMBER: _ClassVar[int]
    UPDATE_S_FIELD_NUMBER: _ClassVar[int]
    WORKER_FETCH_S_FIELD_NUMBER: _ClassVar[int]
    WORKER_COMPUTE_S_FIELD_NUMBER: _ClassVar[int]
    WORKER_WAIT_S_FIELD_NUMBER: _ClassVar[int]
    WORKER_GATHER_S_FIELD_NUMBER: _ClassVar[int]
    BYTES_PER_STEP_FIELD_NUMBER: _ClassVar[int]
    WORKER_H2D_S_FIELD_NUMBER: _ClassVar[int]
    WORKER_PEAK_MEMORY_BYTES_FIELD_NUMBER: _ClassVar[int]
    ERROR_KIND_FIELD_NUMBER: _ClassVar[int]
    PERTURBATION_FIELD_NUMBER: _ClassVar[int]
    PERTURBATION_WARNING_FIELD_NUMBER: _ClassVar[int]
    ACTIVITY_FIELD_NUMBER: _ClassVar[int]
    state: str
    step: int
    total_steps: int
    loss: float
    final_loss: float
    tokens_per_second: float
    train_tokens: int
    train_seconds: float
    skipped_steps: int
    reassignments: int
    late_reports: int
    nonfinite_retries: int
    workers: _containers.RepeatedCompositeFieldContainer[WorkerStatus]
    evals: _containers.RepeatedCompositeFieldContainer[EvalResult]
    error: str
    layout: str
    layout_workers: int
    resumed_from: int
    model: str
    wall_seconds: float
    assign_s: float
    wait_s: float
    update_s: float
    worker_fetch_s: float
    worker_compute_s: float
    worker_wait_s: float
    worker_gather_s: float
    bytes_per_step: float
    worker_h2d_s: float
    worker_peak_memory_bytes: int
    error_kind: str
    perturbation: str
    perturbation_warning: str
    activity: str
    def __init__(self, state: _Optional[str] = ..., step: _Optional[int] = ..., total_steps: _Optional[int] = ..., loss: _Optional[float] = ..., final_loss: _Optional[float] = ..., tokens_per_second: _Optional[float] = ..., train_tokens: _Optional[int] = ..., train_seconds: _Optional[float] = ..., skipped_steps: _Optional[int] = ..., reassignments: _Optional[int] = ..., late_reports: _Optional[int] = ..., nonfinite_retries: _Optional[int] = ..., workers: _Optional[_Iterable[_Union[WorkerStatus, _Mapping]]] = ..., evals: _Optional[_Iterable[_Union[EvalResult, _Mapping]]] = ..., error: _Optional[str] = ..., layout: _Optional[str] = ..., layout_workers: _Optional[int] = ..., resumed_from: _Optional[int] = ..., model: _Optional[str] = ..., wall_seconds: _Optional[float] = ..., assign_s: _Optional[float] = ..., wait_s: _Optional[float] = ..., update_s: _Optional[float] = ..., worker_fetch_s: _Optional[float] = ..., worker_compute_s: _Optional[float] = ..., worker_wait_s: _Optional[float] = ..., worker_gather_s: _Optional[float] = ..., bytes_per_step: _Optional[float] = ..., worker_h2d_s: _Optional[float] = ..., worker_peak_memory_bytes: _Optional[int] = ..., error_kind: _Optional[str] = ..., perturbation: _Optional[str] = ..., perturbation_warning: _Optional[str] = ..., activity: _Optional[str] = ...) -> None: ...

class StartJobRequest(_message.Message):
    __slots__ = ("config_yaml",)
    CONFIG_YAML_FIELD_NUMBER: _ClassVar[int]
    config_yaml: str
    def __init__(self, config_yaml: _Optional[str] = ...) -> None: ...

class ControlRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ControlReply(_message.Message):
    __slots__ = ("message", "path", "version")
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    PATH_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    message: str
    path: str
    version: int
    def __init__(self, message: _Optional[str] = ..., path: _Optional[str] = ..., version: _Optional[int] = ...) -> None: ...

class ExportJobRequest(_message.Message):
    __slots__ = ("path", "merge")
    PATH_FIELD_NUMBER: _ClassVar[int]
    MERGE_FIELD_NUMBER: _ClassVar[int]
    path: str
    merge: bool
    def __init__(self, path: _Optional[str] = ..., merge: _Optional[bool] = ...) -> None: ...
