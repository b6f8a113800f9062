from proto.tessera.common.v1 import tensor_pb2 as _tensor_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class PreprocessRequest(_message.Message):
    __slots__ = ("images", "pan_and_scan")
    IMAGES_FIELD_NUMBER: _ClassVar[int]
    PAN_AND_SCAN_FIELD_NUMBER: _ClassVar[int]
    images: _containers.RepeatedCompositeFieldContainer[_tensor_pb2.Image]
    pan_and_scan: _tensor_pb2.PanAndScanOptions
    def __init__(self, images: _Optional[_Iterable[_Union[_tensor_pb2.Image, _Mapping]]] = ..., pan_and_scan: _Optional[_Union[_tensor_pb2.PanAndScanOptions, _Mapping]] = ...) -> None: ...

class CropBox(_message.Message):
    __slots__ = ("x0", "y0", "x1", "y1")
    X0_FIELD_NUMBER: _ClassVar[int]
    Y0_FIELD_NUMBER: _ClassVar[int]
    X1_FIELD_NUMBER: _ClassVar[int]
    Y1_FIELD_NUMBER: _ClassVar[int]
    x0: int
    y0: int
    x1: int
    y1: int
    def __init__(self, x0: _Optional[int] = ..., y0: _Optional[int] = ..., x1: _Optional[int] = ..., y1: _Optional[int] = ...) -> None: ...

class PreprocessedImage(_message.Message):
    __slots__ = ("tiles", "num_crops", "crop_boxes", "width", "height")
    TILES_FIELD_NUMBER: _ClassVar[int]
    NUM_CROPS_FIELD_NUMBER: _ClassVar[int]
    CROP_BOXES_FIELD_NUMBER: _ClassVar[int]
    WIDTH_FIELD_NUMBER: _ClassVar[int]
    HEIGHT_FIELD_NUMBER: _ClassVar[int]
    tiles: _tensor_pb2.Tensor
    num_crops: int
    crop_boxes: _containers.RepeatedCompositeFieldContainer[CropBox]
    width: int
    height: int
    def __init__(self, tiles: _Optional[_Union[_tensor_pb2.Tensor, _Mapping]] = ..., num_crops: _Optional[int] = ..., crop_boxes: _Optional[_Iterable[_Union[CropBox, _Mapping]]] = ..., width: _Optional[int] = ..., height: _Optional[int] = ...) -> None: ...

class PreprocessResponse(_message.Message):
    __slots__ = ("images",)
    IMAGES_FIELD_NUMBER: _ClassVar[int]
    images: _containers.RepeatedCompositeFieldContainer[PreprocessedImage]
    def __init__(self, images: _Optional[_Iterable[_Union[PreprocessedImage, _Mapping]]] = ...) -> None: ...

class EncodeRequest(_message.Message):
    __slots__ = ("images", "pan_and_scan")
    IMAGES_FIELD_NUMBER: _ClassVar[int]
    PAN_AND_SCAN_FIELD_NUMBER: _ClassVar[int]
    images: _containers.RepeatedCompositeFieldContainer[_tensor_pb2.Image]
    pan_and_scan: _tensor_pb2.PanAndScanOptions
    def __init__(self, images: _Optional[_Iterable[_Union[_tensor_pb2.Image, _Mapping]]] = ..., pan_and_scan: _Optional[_Union[_tensor_pb2.PanAndScanOptions, _Mapping]] = ...) -> None: ...

class EncodedImage(_message.Message):
    __slots__ = ("soft_tokens", "num_crops", "cache_key", "cache_hit")
    SOFT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    NUM_CROPS_FIELD_NUMBER: _ClassVar[int]
    CACHE_KEY_FIELD_NUMBER: _ClassVar[int]
    CACHE_HIT_FIELD_NUMBER: _ClassVar[int]
    soft_tokens: _tensor_pb2.Tensor
    num_crops: int
    cache_key: str
    cache_hit: bool
    def __init__(self, soft_tokens: _Optional[_Union[_tensor_pb2.Tensor, _Mapping]] = ..., num_crops: _Optional[int] = ..., cache_key: _Optional[str] = ..., cache_hit: _Optional[bool] = ...) -> None: ...

class EncodeResponse(_message.Message):
    __slots__ = ("images",)
    IMAGES_FIELD_NUMBER: _ClassVar[int]
    images: _containers.RepeatedCompositeFieldContainer[EncodedImage]
    def __init__(self, images: _Optional[_Iterable[_Union[EncodedImage, _Mapping]]] = ...) -> None: ...

class GetInfoRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class VisionInfo(_message.Message):
    __slots__ = ("model", "d_model", "tokens_per_tile", "image_size", "dtype", "max_image_bytes", "max_image_pixels", "formats", "max_message_bytes")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    D_MODEL_FIELD_NUMBER: _ClassVar[int]
    TOKENS_PER_TILE_FIELD_NUMBER: _ClassVar[int]
    IMAGE_SIZE_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    MAX_IMAGE_BYTES_FIELD_NUMBER: _ClassVar[int]
    MAX_IMAGE_PIXELS_FIELD_NUMBER: _ClassVar[int]
    FORMATS_FIELD_NUMBER: _ClassVar[int]
    MAX_MESSAGE_BYTES_FIELD_NUMBER: _ClassVar[int]
    model: str
    d_model: int
    tokens_per_tile: int
    image_size: int
    dtype: str
    max_image_bytes: int
    max_image_pixels: int
    formats: _containers.RepeatedScalarFieldContainer[str]
    max_message_bytes: int
    def __init__(self, model: _Optional[str] = ..., d_model: _Optional[int] = ..., tokens_per_tile: _Optional[int] = ..., image_size: _Optional[int] = ..., dtype: _Optional[str] = ..., max_image_bytes: _Optional[int] = ..., max_image_pixels: _Optional[int] = ..., formats: _Optional[_Iterable[str]] = ..., max_message_bytes: _Optional[int] = ...) -> None: ...
