from protos import common_pb2 as _common_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class ManifestRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class TensorInfo(_message.Message):
    __slots__ = ("name", "shape", "offset", "decay")
    NAME_FIELD_NUMBER: _ClassVar[int]
    SHAPE_FIELD_NUMBER: _ClassVar[int]
    OFFSET_FIELD_NUMBER: _ClassVar[int]
    DECAY_FIELD_NUMBER: _ClassVar[int]
    name: str
    shape: _containers.RepeatedScalarFieldContainer[int]
    offset: int
    decay: bool
    def __init__(self, name: _Optional[str] = ..., shape: _Optional[_Iterable[int]] = ..., offset: _Optional[int] = ..., decay: _Optional[bool] = ...) -> None: ...

class BlockInfo(_message.Message):
    __slots__ = ("index", "name", "global_offset", "numel", "tensors", "version", "owned")
    INDEX_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    GLOBAL_OFFSET_FIELD_NUMBER: _ClassVar[int]
    NUMEL_FIELD_NUMBER: _ClassVar[int]
    TENSORS_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    OWNED_FIELD_NUMBER: _ClassVar[int]
    index: int
    name: str
    global_offset: int
    numel: int
    tensors: _containers.RepeatedCompositeFieldContainer[TensorInfo]
    version: int
    owned: bool
    def __init__(self, index: _Optional[int] = ..., name: _Optional[str] = ..., global_offset: _Optional[int] = ..., numel: _Optional[int] = ..., tensors: _Optional[_Iterable[_Union[TensorInfo, _Mapping]]] = ..., version: _Optional[int] = ..., owned: _Optional[bool] = ...) -> None: ...

class ManifestReply(_message.Message):
    __slots__ = ("model_type", "manifest_json", "served_dtype", "distribution", "blocks", "first_block", "end_block", "shm_versions_path", "shm_data_path", "shm_nonce", "server_id", "config_yaml", "model_config_json", "control_port", "update_window")
    MODEL_TYPE_FIELD_NUMBER: _ClassVar[int]
    MANIFEST_JSON_FIELD_NUMBER: _ClassVar[int]
    SERVED_DTYPE_FIELD_NUMBER: _ClassVar[int]
    DISTRIBUTION_FIELD_NUMBER: _ClassVar[int]
    BLOCKS_FIELD_NUMBER: _ClassVar[int]
    FIRST_BLOCK_FIELD_NUMBER: _ClassVar[int]
    END_BLOCK_FIELD_NUMBER: _ClassVar[int]
    SHM_VERSIONS_PATH_FIELD_NUMBER: _ClassVar[int]
    SHM_DATA_PATH_FIELD_NUMBER: _ClassVar[int]
    SHM_NONCE_FIELD_NUMBER: _ClassVar[int]
    SERVER_ID_FIELD_NUMBER: _ClassVar[int]
    CONFIG_YAML_FIELD_NUMBER: _ClassVar[int]
    MODEL_CONFIG_JSON_FIELD_NUMBER: _ClassVar[int]
    CONTROL_PORT_FIELD_NUMBER: _ClassVar[int]
    UPDATE_WINDOW_FIELD_NUMBER: _ClassVar[int]
    model_type: str
    manifest_json: str
    served_dtype: str
    distribution: str
    blocks: _containers.RepeatedCompositeFieldContainer[BlockInfo]
    first_block: int
    end_block: int
    shm_versions_path: str
    shm_data_path: str
    shm_nonce: int
    server_id: str
    config_yaml: str
    model_config_json: str
    control_port: int
    update_window: int
    def __init__(self, model_type: _Optional[str] = ..., manifest_json: _Optional[str] = ..., served_dtype: _Optional[str] = ..., distribution: _Optional[str] = ..., blocks: _Optional[_Iterable[_Union[BlockInfo, _Mapping]]] = ..., first_block: _Optional[int] = ..., end_block: _Optional[int] = ..., shm_versions_path: _Optional[str] = ..., shm_data_path: _Optional[str] = ..., shm_nonce: _Optional[int] = ..., server_id: _Optional[str] = ..., config_yaml: _Optional[str] = ..., model_config_json: _Optional[str] = ..., control_port: _Optional[int] = ..., update_window: _Optional[int] = ...) -> None: ...

class FetchRequest(_message.Message):
    __slots__ = ("block", "version", "rank", "parts", "dtype", "resume_offset")
    BLOCK_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    RANK_FIELD_NUMBER: _ClassVar[int]
    PARTS_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    RESUME_OFFSET_FIELD_NUMBER: _ClassVar[int]
    block: int
    version: int
    rank: int
    parts: int
    dtype: str
    resume_offset: int
    def __init__(self, block: _Optional[int] = ..., version: _Optional[int] = ..., rank: _Optional[int] = ..., parts: _Optional[int] = ..., dtype: _Optional[str] = ..., resume_offset: _Optional[int] = ...) -> None: ...

class ChunkHeader(_message.Message):
    __slots__ = ("block", "version", "dtype", "slice_start", "slice_bytes", "offset", "checksum")
    BLOCK_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    SLICE_START_FIELD_NUMBER: _ClassVar[int]
    SLICE_BYTES_FIELD_NUMBER: _ClassVar[int]
    OFFSET_FIELD_NUMBER: _ClassVar[int]
    CHECKSUM_FIELD_NUMBER: _ClassVar[int]
    block: int
    version: int
    dtype: str
    slice_start: int
    slice_bytes: int
    offset: int
    checksum: int
    def __init__(self, block: _Optional[int] = ..., version: _Optional[int] = ..., dtype: _Optional[str] = ..., slice_start: _Optional[int] = ..., slice_bytes: _Optional[int] = ..., offset: _Optional[int] = ..., checksum: _Optional[int] = ...) -> None: ...

class Chunk(_message.Message):
    __slots__ = ("header", "data")
    HEADER_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    header: ChunkHeader
    data: bytes
    def __init__(self, header: _Optional[_Union[ChunkHeader, _Mapping]] = ..., data: _Optional[bytes] = ...) -> None: ...

class WaitRequest(_message.Message):
    __slots__ = ("block", "version")
    BLOCK_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    block: int
    version: int
    def __init__(self, block: _Optional[int] = ..., version: _Optional[int] = ...) -> None: ...

class WaitReply(_message.Message):
    __slots__ = ("version", "shm_nonce")
    VERSION_FIELD_NUMBER: _ClassVar[int]
    SHM_NONCE_FIELD_NUMBER: _ClassVar[int]
    version: int
    shm_nonce: int
    def __init__(self, version: _Optional[int] = ..., shm_nonce: _Optional[int] = ...) -> None: ...

class UpdateRequest(_message.Message):
    __slots__ = ("record", "job_id", "job_identity_json")
    RECORD_FIELD_NUMBER: _ClassVar[int]
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    JOB_IDENTITY_JSON_FIELD_NUMBER: _ClassVar[int]
    record: _common_pb2.UpdateRecord
    job_id: str
    job_identity_json: str
    def __init__(self, record: _Optional[_Union[_common_pb2.UpdateRecord, _Mapping]] = ..., job_id: _Optional[str] = ..., job_identity_json: _Optional[str] = ...) -> None: ...

class UpdateReply(_message.Message):
    __slots__ = ("step", "duplicate", "journal_bytes")
    STEP_FIELD_NUMBER: _ClassVar[int]
    DUPLICATE_FIELD_NUMBER: _ClassVar[int]
    JOURNAL_BYTES_FIELD_NUMBER: _ClassVar[int]
    step: int
    duplicate: bool
    journal_bytes: int
    def __init__(self, step: _Optional[int] = ..., duplicate: _Optional[bool] = ..., journal_bytes: _Optional[int] = ...) -> None: ...

class SnapshotRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class SnapshotReply(_message.Message):
    __slots__ = ("version", "path", "bytes")
    VERSION_FIELD_NUMBER: _ClassVar[int]
    PATH_FIELD_NUMBER: _ClassVar[int]
    BYTES_FIELD_NUMBER: _ClassVar[int]
    version: int
    path: str
    bytes: int
    def __init__(self, version: _Optional[int] = ..., path: _Optional[str] = ..., bytes: _Optional[int] = ...) -> None: ...

class ExportRequest(_message.Message):
    __slots__ = ("path", "model_card", "merge")
    PATH_FIELD_NUMBER: _ClassVar[int]
    MODEL_CARD_FIELD_NUMBER: _ClassVar[int]
    MERGE_FIELD_NUMBER: _ClassVar[int]
    path: str
    model_card: str
    merge: bool
    def __init__(self, path: _Optional[str] = ..., model_card: _Optional[str] = ..., merge: _Optional[bool] = ...) -> None: ...

class ExportReply(_message.Message):
    __slots__ = ("path", "version")
    PATH_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    path: str
    version: int
    def __init__(self, path: _Optional[str] = ..., version: _Optional[int] = ...) -> None: ...

class ShutdownRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ShutdownReply(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class StatusRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class StatusReply(_message.Message):
    __slots__ = ("versions", "applied_version", "journaled_steps", "snapshot_version", "role", "served_bytes", "first_block", "end_block", "job_id", "job_identity_json", "materialized_version", "update_window")
    VERSIONS_FIELD_NUMBER: _ClassVar[int]
    APPLIED_VERSION_FIELD_NUMBER: _ClassVar[int]
    JOURNALED_STEPS_FIELD_NUMBER: _ClassVar[int]
    SNAPSHOT_VERSION_FIELD_NUMBER: _ClassVar[int]
    ROLE_FIELD_NUMBER: _ClassVar[int]
    SERVED_BYTES_FIELD_NUMBER: _ClassVar[int]
    FIRST_BLOCK_FIELD_NUMBER: _ClassVar[int]
    END_BLOCK_FIELD_NUMBER: _ClassVar[int]
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    JOB_IDENTITY_JSON_FIELD_NUMBER: _ClassVar[int]
    MATERIALIZED_VERSION_FIELD_NUMBER: _ClassVar[int]
    UPDATE_WINDOW_FIELD_NUMBER: _ClassVar[int]
    versions: _containers.RepeatedScalarFieldContainer[int]
    applied_version: int
    journaled_steps: int
    snapshot_version: int
    role: str
    served_bytes: int
    first_block: int
    end_block: int
    job_id: str
    job_identity_json: str
    materialized_version: int
    update_window: int
    def __init__(self, versions: _Optional[_Iterable[int]] = ..., applied_version: _Optional[int] = ..., journaled_steps: _Optional[int] = ..., snapshot_version: _Optional[int] = ..., role: _Optional[str] = ..., served_bytes: _Optional[int] = ..., first_block: _Optional[int] = ..., end_block: _Optional[int] = ..., job_id: _Optional[str] = ..., job_identity_json: _Optional[str] = ..., materialized_version: _Optional[int] = ..., update_window: _Optional[int] = ...) -> None: ...

class DigestRequest(_message.Message):
    __slots__ = ("block",)
    BLOCK_FIELD_NUMBER: _ClassVar[int]
    block: int
    def __init__(self, block: _Optional[int] = ...) -> None: ...

class DigestReply(_message.Message):
    __slots__ = ("block", "version", "xxh3")
    BLOCK_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    XXH3_FIELD_NUMBER: _ClassVar[int]
    block: int
    version: int
    xxh3: int
    def __init__(self, block: _Optional[int] = ..., version: _Optional[int] = ..., xxh3: _Optional[int] = ...) -> None: ...

class FollowRequest(_message.Message):
    __slots__ = ("from_step", "to_step")
    FROM_STEP_FIELD_NUMBER: _ClassVar[int]
    TO_STEP_FIELD_NUMBER: _ClassVar[int]
    from_step: int
    to_step: int
    def __init__(self, from_step: _Optional[int] = ..., to_step: _Optional[int] = ...) -> None: ...
