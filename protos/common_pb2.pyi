from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Direction(_message.Message):
    __slots__ = ("seed", "g")
    SEED_FIELD_NUMBER: _ClassVar[int]
    G_FIELD_NUMBER: _ClassVar[int]
    seed: int
    g: float
    def __init__(self, seed: _Optional[int] = ..., g: _Optional[float] = ...) -> None: ...

class UpdateRecord(_message.Message):
    __slots__ = ("step", "directions", "lr", "weight_decay", "skipped")
    STEP_FIELD_NUMBER: _ClassVar[int]
    DIRECTIONS_FIELD_NUMBER: _ClassVar[int]
    LR_FIELD_NUMBER: _ClassVar[int]
    WEIGHT_DECAY_FIELD_NUMBER: _ClassVar[int]
    SKIPPED_FIELD_NUMBER: _ClassVar[int]
    step: int
    directions: _containers.RepeatedCompositeFieldContainer[Direction]
    lr: float
    weight_decay: float
    skipped: bool
    def __init__(self, step: _Optional[int] = ..., directions: _Optional[_Iterable[_Union[Direction, _Mapping]]] = ..., lr: _Optional[float] = ..., weight_decay: _Optional[float] = ..., skipped: _Optional[bool] = ...) -> None: ...
