from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable
from typing import ClassVar as _ClassVar, Optional as _Optional

DESCRIPTOR: _descriptor.FileDescriptor

class Tensor(_message.Message):
    __slots__ = ("data", "dtype", "shape")
    DATA_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    SHAPE_FIELD_NUMBER: _ClassVar[int]
    data: bytes
    dtype: str
    shape: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, data: _Optional[bytes] = ..., dtype: _Optional[str] = ..., shape: _Optional[_Iterable[int]] = ...) -> None: ...

class Image(_message.Message):
    __slots__ = ("data", "mime_type")
    DATA_FIELD_NUMBER: _ClassVar[int]
    MIME_TYPE_FIELD_NUMBER: _ClassVar[int]
    data: bytes
    mime_type: str
    def __init__(self, data: _Optional[bytes] = ..., mime_type: _Optional[str] = ...) -> None: ...

class PanAndScanOptions(_message.Message):
    __slots__ = ("enabled", "min_crop_size", "max_num_crops", "min_ratio_to_activate")
    ENABLED_FIELD_NUMBER: _ClassVar[int]
    MIN_CROP_SIZE_FIELD_NUMBER: _ClassVar[int]
    MAX_NUM_CROPS_FIELD_NUMBER: _ClassVar[int]
    MIN_RATIO_TO_ACTIVATE_FIELD_NUMBER: _ClassVar[int]
    enabled: bool
    min_crop_size: int
    max_num_crops: int
    min_ratio_to_activate: float
    def __init__(self, enabled: _Optional[bool] = ..., min_crop_size: _Optional[int] = ..., max_num_crops: _Optional[int] = ..., min_ratio_to_activate: _Optional[float] = ...) -> None: ...
