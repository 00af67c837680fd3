from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class VariantInfo(_message.Message):
    __slots__ = ("variant_id", "sha256", "size_bytes", "params", "accuracy", "method", "name", "arch", "sparsity", "compression", "latency_ms_b1", "level", "params_ratio", "signature", "onnx_id", "onnx_size_bytes", "onnx_signature", "precision", "parent_id")
    VARIANT_ID_FIELD_NUMBER: _ClassVar[int]
    SHA256_FIELD_NUMBER: _ClassVar[int]
    SIZE_BYTES_FIELD_NUMBER: _ClassVar[int]
    PARAMS_FIELD_NUMBER: _ClassVar[int]
    ACCURACY_FIELD_NUMBER: _ClassVar[int]
    METHOD_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    ARCH_FIELD_NUMBER: _ClassVar[int]
    SPARSITY_FIELD_NUMBER: _ClassVar[int]
    COMPRESSION_FIELD_NUMBER: _ClassVar[int]
    LATENCY_MS_B1_FIELD_NUMBER: _ClassVar[int]
    LEVEL_FIELD_NUMBER: _ClassVar[int]
    PARAMS_RATIO_FIELD_NUMBER: _ClassVar[int]
    SIGNATURE_FIELD_NUMBER: _ClassVar[int]
    ONNX_ID_FIELD_NUMBER: _ClassVar[int]
    ONNX_SIZE_BYTES_FIELD_NUMBER: _ClassVar[int]
    ONNX_SIGNATURE_FIELD_NUMBER: _ClassVar[int]
    PRECISION_FIELD_NUMBER: _ClassVar[int]
    PARENT_ID_FIELD_NUMBER: _ClassVar[int]
    variant_id: str
    sha256: str
    size_bytes: int
    params: int
    accuracy: float
    method: str
    name: str
    arch: str
    sparsity: float
    compression: float
    latency_ms_b1: float
    level: int
    params_ratio: float
    signature: bytes
    onnx_id: str
    onnx_size_bytes: int
    onnx_signature: bytes
    precision: str
    parent_id: str
    def __init__(self, variant_id: _Optional[str] = ..., sha256: _Optional[str] = ..., size_bytes: _Optional[int] = ..., params: _Optional[int] = ..., accuracy: _Optional[float] = ..., method: _Optional[str] = ..., name: _Optional[str] = ..., arch: _Optional[str] = ..., sparsity: _Optional[float] = ..., compression: _Optional[float] = ..., latency_ms_b1: _Optional[float] = ..., level: _Optional[int] = ..., params_ratio: _Optional[float] = ..., signature: _Optional[bytes] = ..., onnx_id: _Optional[str] = ..., onnx_size_bytes: _Optional[int] = ..., onnx_signature: _Optional[bytes] = ..., precision: _Optional[str] = ..., parent_id: _Optional[str] = ...) -> None: ...

class ListVariantsRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ListVariantsResponse(_message.Message):
    __slots__ = ("variants", "portfolio_id", "version", "expires_at_unix", "signature")
    VARIANTS_FIELD_NUMBER: _ClassVar[int]
    PORTFOLIO_ID_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    EXPIRES_AT_UNIX_FIELD_NUMBER: _ClassVar[int]
    SIGNATURE_FIELD_NUMBER: _ClassVar[int]
    variants: _containers.RepeatedCompositeFieldContainer[VariantInfo]
    portfolio_id: str
    version: int
    expires_at_unix: int
    signature: bytes
    def __init__(self, variants: _Optional[_Iterable[_Union[VariantInfo, _Mapping]]] = ..., portfolio_id: _Optional[str] = ..., version: _Optional[int] = ..., expires_at_unix: _Optional[int] = ..., signature: _Optional[bytes] = ...) -> None: ...

class FetchVariantRequest(_message.Message):
    __slots__ = ("variant_id", "offset")
    VARIANT_ID_FIELD_NUMBER: _ClassVar[int]
    OFFSET_FIELD_NUMBER: _ClassVar[int]
    variant_id: str
    offset: int
    def __init__(self, variant_id: _Optional[str] = ..., offset: _Optional[int] = ...) -> None: ...

class VariantChunk(_message.Message):
    __slots__ = ("offset", "data", "total_size", "sha256")
    OFFSET_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    TOTAL_SIZE_FIELD_NUMBER: _ClassVar[int]
    SHA256_FIELD_NUMBER: _ClassVar[int]
    offset: int
    data: bytes
    total_size: int
    sha256: str
    def __init__(self, offset: _Optional[int] = ..., data: _Optional[bytes] = ..., total_size: _Optional[int] = ..., sha256: _Optional[str] = ...) -> None: ...
