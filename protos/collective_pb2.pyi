from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Phase(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    PHASE_UNSPECIFIED: _ClassVar[Phase]
    PHASE_SCATTER: _ClassVar[Phase]
    PHASE_GATHER: _ClassVar[Phase]
PHASE_UNSPECIFIED: Phase
PHASE_SCATTER: Phase
PHASE_GATHER: Phase

class CodecSpec(_message.Message):
    __slots__ = ("name", "block_size", "zstd_level")
    NAME_FIELD_NUMBER: _ClassVar[int]
    BLOCK_SIZE_FIELD_NUMBER: _ClassVar[int]
    ZSTD_LEVEL_FIELD_NUMBER: _ClassVar[int]
    name: str
    block_size: int
    zstd_level: int
    def __init__(self, name: _Optional[str] = ..., block_size: _Optional[int] = ..., zstd_level: _Optional[int] = ...) -> None: ...

class RoundTag(_message.Message):
    __slots__ = ("run_id", "epoch", "round_id", "sender_rank", "group_size", "total_numel", "aggregator")
    RUN_ID_FIELD_NUMBER: _ClassVar[int]
    EPOCH_FIELD_NUMBER: _ClassVar[int]
    ROUND_ID_FIELD_NUMBER: _ClassVar[int]
    SENDER_RANK_FIELD_NUMBER: _ClassVar[int]
    GROUP_SIZE_FIELD_NUMBER: _ClassVar[int]
    TOTAL_NUMEL_FIELD_NUMBER: _ClassVar[int]
    AGGREGATOR_FIELD_NUMBER: _ClassVar[int]
    run_id: str
    epoch: int
    round_id: int
    sender_rank: int
    group_size: int
    total_numel: int
    aggregator: str
    def __init__(self, run_id: _Optional[str] = ..., epoch: _Optional[int] = ..., round_id: _Optional[int] = ..., sender_rank: _Optional[int] = ..., group_size: _Optional[int] = ..., total_numel: _Optional[int] = ..., aggregator: _Optional[str] = ...) -> None: ...

class PartChunk(_message.Message):
    __slots__ = ("tag", "phase", "part_index", "part_numel", "offset", "count", "codec", "weight", "payload")
    TAG_FIELD_NUMBER: _ClassVar[int]
    PHASE_FIELD_NUMBER: _ClassVar[int]
    PART_INDEX_FIELD_NUMBER: _ClassVar[int]
    PART_NUMEL_FIELD_NUMBER: _ClassVar[int]
    OFFSET_FIELD_NUMBER: _ClassVar[int]
    COUNT_FIELD_NUMBER: _ClassVar[int]
    CODEC_FIELD_NUMBER: _ClassVar[int]
    WEIGHT_FIELD_NUMBER: _ClassVar[int]
    PAYLOAD_FIELD_NUMBER: _ClassVar[int]
    tag: RoundTag
    phase: Phase
    part_index: int
    part_numel: int
    offset: int
    count: int
    codec: CodecSpec
    weight: float
    payload: bytes
    def __init__(self, tag: _Optional[_Union[RoundTag, _Mapping]] = ..., phase: _Optional[_Union[Phase, str]] = ..., part_index: _Optional[int] = ..., part_numel: _Optional[int] = ..., offset: _Optional[int] = ..., count: _Optional[int] = ..., codec: _Optional[_Union[CodecSpec, _Mapping]] = ..., weight: _Optional[float] = ..., payload: _Optional[bytes] = ...) -> None: ...

class PushAck(_message.Message):
    __slots__ = ("chunks",)
    CHUNKS_FIELD_NUMBER: _ClassVar[int]
    chunks: int
    def __init__(self, chunks: _Optional[int] = ...) -> None: ...

class StatShare(_message.Message):
    __slots__ = ("tag", "stat_round", "values")
    TAG_FIELD_NUMBER: _ClassVar[int]
    STAT_ROUND_FIELD_NUMBER: _ClassVar[int]
    VALUES_FIELD_NUMBER: _ClassVar[int]
    tag: RoundTag
    stat_round: int
    values: bytes
    def __init__(self, tag: _Optional[_Union[RoundTag, _Mapping]] = ..., stat_round: _Optional[int] = ..., values: _Optional[bytes] = ...) -> None: ...

class StatAck(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class AbortNotice(_message.Message):
    __slots__ = ("tag", "failed_ranks", "reason")
    TAG_FIELD_NUMBER: _ClassVar[int]
    FAILED_RANKS_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    tag: RoundTag
    failed_ranks: _containers.RepeatedScalarFieldContainer[int]
    reason: str
    def __init__(self, tag: _Optional[_Union[RoundTag, _Mapping]] = ..., failed_ranks: _Optional[_Iterable[int]] = ..., reason: _Optional[str] = ...) -> None: ...

class AbortAck(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...
