from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class StateRequest(_message.Message):
    __slots__ = ("run_id", "peer_id", "result_of_round", "round_id", "expect_sha256", "offset", "length", "manifest_only", "max_chunk_bytes")
    RUN_ID_FIELD_NUMBER: _ClassVar[int]
    PEER_ID_FIELD_NUMBER: _ClassVar[int]
    RESULT_OF_ROUND_FIELD_NUMBER: _ClassVar[int]
    ROUND_ID_FIELD_NUMBER: _ClassVar[int]
    EXPECT_SHA256_FIELD_NUMBER: _ClassVar[int]
    OFFSET_FIELD_NUMBER: _ClassVar[int]
    LENGTH_FIELD_NUMBER: _ClassVar[int]
    MANIFEST_ONLY_FIELD_NUMBER: _ClassVar[int]
    MAX_CHUNK_BYTES_FIELD_NUMBER: _ClassVar[int]
    run_id: str
    peer_id: str
    result_of_round: int
    round_id: int
    expect_sha256: bytes
    offset: int
    length: int
    manifest_only: bool
    max_chunk_bytes: int
    def __init__(self, run_id: _Optional[str] = ..., peer_id: _Optional[str] = ..., result_of_round: _Optional[int] = ..., round_id: _Optional[int] = ..., expect_sha256: _Optional[bytes] = ..., offset: _Optional[int] = ..., length: _Optional[int] = ..., manifest_only: _Optional[bool] = ..., max_chunk_bytes: _Optional[int] = ...) -> None: ...

class TensorEntry(_message.Message):
    __slots__ = ("name", "dtype", "shape", "nbytes")
    NAME_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    SHAPE_FIELD_NUMBER: _ClassVar[int]
    NBYTES_FIELD_NUMBER: _ClassVar[int]
    name: str
    dtype: str
    shape: _containers.RepeatedScalarFieldContainer[int]
    nbytes: int
    def __init__(self, name: _Optional[str] = ..., dtype: _Optional[str] = ..., shape: _Optional[_Iterable[int]] = ..., nbytes: _Optional[int] = ...) -> None: ...

class StateManifest(_message.Message):
    __slots__ = ("run_id", "round_id", "tensors", "meta_json", "total_bytes", "sha256", "block_bytes", "block_sha256")
    RUN_ID_FIELD_NUMBER: _ClassVar[int]
    ROUND_ID_FIELD_NUMBER: _ClassVar[int]
    TENSORS_FIELD_NUMBER: _ClassVar[int]
    META_JSON_FIELD_NUMBER: _ClassVar[int]
    TOTAL_BYTES_FIELD_NUMBER: _ClassVar[int]
    SHA256_FIELD_NUMBER: _ClassVar[int]
    BLOCK_BYTES_FIELD_NUMBER: _ClassVar[int]
    BLOCK_SHA256_FIELD_NUMBER: _ClassVar[int]
    run_id: str
    round_id: int
    tensors: _containers.RepeatedCompositeFieldContainer[TensorEntry]
    meta_json: str
    total_bytes: int
    sha256: bytes
    block_bytes: int
    block_sha256: _containers.RepeatedScalarFieldContainer[bytes]
    def __init__(self, run_id: _Optional[str] = ..., round_id: _Optional[int] = ..., tensors: _Optional[_Iterable[_Union[TensorEntry, _Mapping]]] = ..., meta_json: _Optional[str] = ..., total_bytes: _Optional[int] = ..., sha256: _Optional[bytes] = ..., block_bytes: _Optional[int] = ..., block_sha256: _Optional[_Iterable[bytes]] = ...) -> None: ...

class StateChunk(_message.Message):
    __slots__ = ("manifest", "offset", "data")
    MANIFEST_FIELD_NUMBER: _ClassVar[int]
    OFFSET_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    manifest: StateManifest
    offset: int
    data: bytes
    def __init__(self, manifest: _Optional[_Union[StateManifest, _Mapping]] = ..., offset: _Optional[int] = ..., data: _Optional[bytes] = ...) -> None: ...
