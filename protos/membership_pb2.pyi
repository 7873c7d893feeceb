from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class JoinRequest(_message.Message):
    __slots__ = ("run_id", "address", "peer_id", "last_round", "epoch", "has_state", "name", "codecs", "state_digest", "public_key", "host_id", "own_state", "algorithm", "settings")
    RUN_ID_FIELD_NUMBER: _ClassVar[int]
    ADDRESS_FIELD_NUMBER: _ClassVar[int]
    PEER_ID_FIELD_NUMBER: _ClassVar[int]
    LAST_ROUND_FIELD_NUMBER: _ClassVar[int]
    EPOCH_FIELD_NUMBER: _ClassVar[int]
    HAS_STATE_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    CODECS_FIELD_NUMBER: _ClassVar[int]
    STATE_DIGEST_FIELD_NUMBER: _ClassVar[int]
    PUBLIC_KEY_FIELD_NUMBER: _ClassVar[int]
    HOST_ID_FIELD_NUMBER: _ClassVar[int]
    OWN_STATE_FIELD_NUMBER: _ClassVar[int]
    ALGORITHM_FIELD_NUMBER: _ClassVar[int]
    SETTINGS_FIELD_NUMBER: _ClassVar[int]
    run_id: str
    address: str
    peer_id: str
    last_round: int
    epoch: int
    has_state: bool
    name: str
    codecs: _containers.RepeatedScalarFieldContainer[str]
    state_digest: str
    public_key: bytes
    host_id: str
    own_state: bool
    algorithm: str
    settings: str
    def __init__(self, run_id: _Optional[str] = ..., address: _Optional[str] = ..., peer_id: _Optional[str] = ..., last_round: _Optional[int] = ..., epoch: _Optional[int] = ..., has_state: _Optional[bool] = ..., name: _Optional[str] = ..., codecs: _Optional[_Iterable[str]] = ..., state_digest: _Optional[str] = ..., public_key: _Optional[bytes] = ..., host_id: _Optional[str] = ..., own_state: _Optional[bool] = ..., algorithm: _Optional[str] = ..., settings: _Optional[str] = ...) -> None: ...

class PeerCredential(_message.Message):
    __slots__ = ("run_id", "peer_id", "address", "public_key", "issuer_key", "signature")
    RUN_ID_FIELD_NUMBER: _ClassVar[int]
    PEER_ID_FIELD_NUMBER: _ClassVar[int]
    ADDRESS_FIELD_NUMBER: _ClassVar[int]
    PUBLIC_KEY_FIELD_NUMBER: _ClassVar[int]
    ISSUER_KEY_FIELD_NUMBER: _ClassVar[int]
    SIGNATURE_FIELD_NUMBER: _ClassVar[int]
    run_id: str
    peer_id: str
    address: str
    public_key: bytes
    issuer_key: bytes
    signature: bytes
    def __init__(self, run_id: _Optional[str] = ..., peer_id: _Optional[str] = ..., address: _Optional[str] = ..., public_key: _Optional[bytes] = ..., issuer_key: _Optional[bytes] = ..., signature: _Optional[bytes] = ...) -> None: ...

class JoinResponse(_message.Message):
    __slots__ = ("peer_id", "lease_s", "heartbeat_s", "epoch", "last_committed_round", "sync_from", "missed", "state_digest", "wait", "wait_reason", "sync_sources", "credential", "holders_finished")
    PEER_ID_FIELD_NUMBER: _ClassVar[int]
    LEASE_S_FIELD_NUMBER: _ClassVar[int]
    HEARTBEAT_S_FIELD_NUMBER: _ClassVar[int]
    EPOCH_FIELD_NUMBER: _ClassVar[int]
    LAST_COMMITTED_ROUND_FIELD_NUMBER: _ClassVar[int]
    SYNC_FROM_FIELD_NUMBER: _ClassVar[int]
    MISSED_FIELD_NUMBER: _ClassVar[int]
    STATE_DIGEST_FIELD_NUMBER: _ClassVar[int]
    WAIT_FIELD_NUMBER: _ClassVar[int]
    WAIT_REASON_FIELD_NUMBER: _ClassVar[int]
    SYNC_SOURCES_FIELD_NUMBER: _ClassVar[int]
    CREDENTIAL_FIELD_NUMBER: _ClassVar[int]
    HOLDERS_FINISHED_FIELD_NUMBER: _ClassVar[int]
    peer_id: str
    lease_s: float
    heartbeat_s: float
    epoch: int
    last_committed_round: int
    sync_from: str
    missed: _containers.RepeatedCompositeFieldContainer[CommittedRound]
    state_digest: str
    wait: bool
    wait_reason: str
    sync_sources: _containers.RepeatedScalarFieldContainer[str]
    credential: PeerCredential
    holders_finished: bool
    def __init__(self, peer_id: _Optional[str] = ..., lease_s: _Optional[float] = ..., heartbeat_s: _Optional[float] = ..., epoch: _Optional[int] = ..., last_committed_round: _Optional[int] = ..., sync_from: _Optional[str] = ..., missed: _Optional[_Iterable[_Union[CommittedRound, _Mapping]]] = ..., state_digest: _Optional[str] = ..., wait: _Optional[bool] = ..., wait_reason: _Optional[str] = ..., sync_sources: _Optional[_Iterable[str]] = ..., credential: _Optional[_Union[PeerCredential, _Mapping]] = ..., holders_finished: _Optional[bool] = ...) -> None: ...

class PeerMetrics(_message.Message):
    __slots__ = ("step", "steps_per_s", "loss", "bytes_sent", "bytes_received", "activity", "samples", "eval_loss", "privacy_epsilon", "spread", "refusals")
    class RefusalsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: int
        def __init__(self, key: _Optional[str] = ..., value: _Optional[int] = ...) -> None: ...
    STEP_FIELD_NUMBER: _ClassVar[int]
    STEPS_PER_S_FIELD_NUMBER: _ClassVar[int]
    LOSS_FIELD_NUMBER: _ClassVar[int]
    BYTES_SENT_FIELD_NUMBER: _ClassVar[int]
    BYTES_RECEIVED_FIELD_NUMBER: _ClassVar[int]
    ACTIVITY_FIELD_NUMBER: _ClassVar[int]
    SAMPLES_FIELD_NUMBER: _ClassVar[int]
    EVAL_LOSS_FIELD_NUMBER: _ClassVar[int]
    PRIVACY_EPSILON_FIELD_NUMBER: _ClassVar[int]
    SPREAD_FIELD_NUMBER: _ClassVar[int]
    REFUSALS_FIELD_NUMBER: _ClassVar[int]
    step: int
    steps_per_s: float
    loss: float
    bytes_sent: int
    bytes_received: int
    activity: str
    samples: int
    eval_loss: float
    privacy_epsilon: float
    spread: float
    refusals: _containers.ScalarMap[str, int]
    def __init__(self, step: _Optional[int] = ..., steps_per_s: _Optional[float] = ..., loss: _Optional[float] = ..., bytes_sent: _Optional[int] = ..., bytes_received: _Optional[int] = ..., activity: _Optional[str] = ..., samples: _Optional[int] = ..., eval_loss: _Optional[float] = ..., privacy_epsilon: _Optional[float] = ..., spread: _Optional[float] = ..., refusals: _Optional[_Mapping[str, int]] = ...) -> None: ...

class HeartbeatRequest(_message.Message):
    __slots__ = ("run_id", "peer_id", "last_round", "metrics", "state_digest", "round_id", "round_epoch", "holds_results", "held_results")
    RUN_ID_FIELD_NUMBER: _ClassVar[int]
    PEER_ID_FIELD_NUMBER: _ClassVar[int]
    LAST_ROUND_FIELD_NUMBER: _ClassVar[int]
    METRICS_FIELD_NUMBER: _ClassVar[int]
    STATE_DIGEST_FIELD_NUMBER: _ClassVar[int]
    ROUND_ID_FIELD_NUMBER: _ClassVar[int]
    ROUND_EPOCH_FIELD_NUMBER: _ClassVar[int]
    HOLDS_RESULTS_FIELD_NUMBER: _ClassVar[int]
    HELD_RESULTS_FIELD_NUMBER: _ClassVar[int]
    run_id: str
    peer_id: str
    last_round: int
    metrics: PeerMetrics
    state_digest: str
    round_id: int
    round_epoch: int
    holds_results: bool
    held_results: _containers.RepeatedCompositeFieldContainer[HeldResult]
    def __init__(self, run_id: _Optional[str] = ..., peer_id: _Optional[str] = ..., last_round: _Optional[int] = ..., metrics: _Optional[_Union[PeerMetrics, _Mapping]] = ..., state_digest: _Optional[str] = ..., round_id: _Optional[int] = ..., round_epoch: _Optional[int] = ..., holds_results: _Optional[bool] = ..., held_results: _Optional[_Iterable[_Union[HeldResult, _Mapping]]] = ...) -> None: ...

class HeldResult(_message.Message):
    __slots__ = ("round_id", "epoch", "digest")
    ROUND_ID_FIELD_NUMBER: _ClassVar[int]
    EPOCH_FIELD_NUMBER: _ClassVar[int]
    DIGEST_FIELD_NUMBER: _ClassVar[int]
    round_id: int
    epoch: int
    digest: str
    def __init__(self, round_id: _Optional[int] = ..., epoch: _Optional[int] = ..., digest: _Optional[str] = ...) -> None: ...

class HeartbeatResponse(_message.Message):
    __slots__ = ("known", "epoch", "last_committed_round", "run_step", "round_step", "heartbeat_s", "round_over", "since_commit_s", "hold")
    KNOWN_FIELD_NUMBER: _ClassVar[int]
    EPOCH_FIELD_NUMBER: _ClassVar[int]
    LAST_COMMITTED_ROUND_FIELD_NUMBER: _ClassVar[int]
    RUN_STEP_FIELD_NUMBER: _ClassVar[int]
    ROUND_STEP_FIELD_NUMBER: _ClassVar[int]
    HEARTBEAT_S_FIELD_NUMBER: _ClassVar[int]
    ROUND_OVER_FIELD_NUMBER: _ClassVar[int]
    SINCE_COMMIT_S_FIELD_NUMBER: _ClassVar[int]
    HOLD_FIELD_NUMBER: _ClassVar[int]
    known: bool
    epoch: int
    last_committed_round: int
    run_step: int
    round_step: int
    heartbeat_s: float
    round_over: str
    since_commit_s: float
    hold: _containers.RepeatedCompositeFieldContainer[CommittedRound]
    def __init__(self, known: _Optional[bool] = ..., epoch: _Optional[int] = ..., last_committed_round: _Optional[int] = ..., run_step: _Optional[int] = ..., round_step: _Optional[int] = ..., heartbeat_s: _Optional[float] = ..., round_over: _Optional[str] = ..., since_commit_s: _Optional[float] = ..., hold: _Optional[_Iterable[_Union[CommittedRound, _Mapping]]] = ...) -> None: ...

class LeaveRequest(_message.Message):
    __slots__ = ("run_id", "peer_id", "reason", "last_round", "state_digest", "metrics")
    RUN_ID_FIELD_NUMBER: _ClassVar[int]
    PEER_ID_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    LAST_ROUND_FIELD_NUMBER: _ClassVar[int]
    STATE_DIGEST_FIELD_NUMBER: _ClassVar[int]
    METRICS_FIELD_NUMBER: _ClassVar[int]
    run_id: str
    peer_id: str
    reason: str
    last_round: int
    state_digest: str
    metrics: PeerMetrics
    def __init__(self, run_id: _Optional[str] = ..., peer_id: _Optional[str] = ..., reason: _Optional[str] = ..., last_round: _Optional[int] = ..., state_digest: _Optional[str] = ..., metrics: _Optional[_Union[PeerMetrics, _Mapping]] = ...) -> None: ...

class LeaveResponse(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class QuorumRequest(_message.Message):
    __slots__ = ("run_id", "peer_id", "last_round", "tag", "state_digest", "known_members", "min_members", "member_changes", "step", "packed_members", "round_format")
    RUN_ID_FIELD_NUMBER: _ClassVar[int]
    PEER_ID_FIELD_NUMBER: _ClassVar[int]
    LAST_ROUND_FIELD_NUMBER: _ClassVar[int]
    TAG_FIELD_NUMBER: _ClassVar[int]
    STATE_DIGEST_FIELD_NUMBER: _ClassVar[int]
    KNOWN_MEMBERS_FIELD_NUMBER: _ClassVar[int]
    MIN_MEMBERS_FIELD_NUMBER: _ClassVar[int]
    MEMBER_CHANGES_FIELD_NUMBER: _ClassVar[int]
    STEP_FIELD_NUMBER: _ClassVar[int]
    PACKED_MEMBERS_FIELD_NUMBER: _ClassVar[int]
    ROUND_FORMAT_FIELD_NUMBER: _ClassVar[int]
    run_id: str
    peer_id: str
    last_round: int
    tag: str
    state_digest: str
    known_members: bytes
    min_members: int
    member_changes: bool
    step: int
    packed_members: bool
    round_format: str
    def __init__(self, run_id: _Optional[str] = ..., peer_id: _Optional[str] = ..., last_round: _Optional[int] = ..., tag: _Optional[str] = ..., state_digest: _Optional[str] = ..., known_members: _Optional[bytes] = ..., min_members: _Optional[int] = ..., member_changes: _Optional[bool] = ..., step: _Optional[int] = ..., packed_members: _Optional[bool] = ..., round_format: _Optional[str] = ...) -> None: ...

class IndexedMember(_message.Message):
    __slots__ = ("index", "member")
    INDEX_FIELD_NUMBER: _ClassVar[int]
    MEMBER_FIELD_NUMBER: _ClassVar[int]
    index: int
    member: Member
    def __init__(self, index: _Optional[int] = ..., member: _Optional[_Union[Member, _Mapping]] = ...) -> None: ...

class Member(_message.Message):
    __slots__ = ("peer_id", "address", "host_id", "registration")
    PEER_ID_FIELD_NUMBER: _ClassVar[int]
    ADDRESS_FIELD_NUMBER: _ClassVar[int]
    HOST_ID_FIELD_NUMBER: _ClassVar[int]
    REGISTRATION_FIELD_NUMBER: _ClassVar[int]
    peer_id: str
    address: str
    host_id: str
    registration: int
    def __init__(self, peer_id: _Optional[str] = ..., address: _Optional[str] = ..., host_id: _Optional[str] = ..., registration: _Optional[int] = ...) -> None: ...

class CommittedRound(_message.Message):
    __slots__ = ("round_id", "epoch", "tag", "members", "result_digest")
    ROUND_ID_FIELD_NUMBER: _ClassVar[int]
    EPOCH_FIELD_NUMBER: _ClassVar[int]
    TAG_FIELD_NUMBER: _ClassVar[int]
    MEMBERS_FIELD_NUMBER: _ClassVar[int]
    RESULT_DIGEST_FIELD_NUMBER: _ClassVar[int]
    round_id: int
    epoch: int
    tag: str
    members: _containers.RepeatedCompositeFieldContainer[Member]
    result_digest: str
    def __init__(self, round_id: _Optional[int] = ..., epoch: _Optional[int] = ..., tag: _Optional[str] = ..., members: _Optional[_Iterable[_Union[Member, _Mapping]]] = ..., result_digest: _Optional[str] = ...) -> None: ...

class QuorumResponse(_message.Message):
    __slots__ = ("action", "round_id", "epoch", "members", "rank", "sync_from", "last_committed_round", "missed", "policy", "seed", "candidates", "state_digest", "sync_sources", "members_digest", "run_step", "round_step", "members_base", "members_removed", "members_added", "pending_tag", "members_packed", "since_commit_s", "members_step")
    class Action(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
        __slots__ = ()
        ACTION_UNSPECIFIED: _ClassVar[QuorumResponse.Action]
        ROUND: _ClassVar[QuorumResponse.Action]
        RESYNC: _ClassVar[QuorumResponse.Action]
    ACTION_UNSPECIFIED: QuorumResponse.Action
    ROUND: QuorumResponse.Action
    RESYNC: QuorumResponse.Action
    ACTION_FIELD_NUMBER: _ClassVar[int]
    ROUND_ID_FIELD_NUMBER: _ClassVar[int]
    EPOCH_FIELD_NUMBER: _ClassVar[int]
    MEMBERS_FIELD_NUMBER: _ClassVar[int]
    RANK_FIELD_NUMBER: _ClassVar[int]
    SYNC_FROM_FIELD_NUMBER: _ClassVar[int]
    LAST_COMMITTED_ROUND_FIELD_NUMBER: _ClassVar[int]
    MISSED_FIELD_NUMBER: _ClassVar[int]
    POLICY_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    CANDIDATES_FIELD_NUMBER: _ClassVar[int]
    STATE_DIGEST_FIELD_NUMBER: _ClassVar[int]
    SYNC_SOURCES_FIELD_NUMBER: _ClassVar[int]
    MEMBERS_DIGEST_FIELD_NUMBER: _ClassVar[int]
    RUN_STEP_FIELD_NUMBER: _ClassVar[int]
    ROUND_STEP_FIELD_NUMBER: _ClassVar[int]
    MEMBERS_BASE_FIELD_NUMBER: _ClassVar[int]
    MEMBERS_REMOVED_FIELD_NUMBER: _ClassVar[int]
    MEMBERS_ADDED_FIELD_NUMBER: _ClassVar[int]
    PENDING_TAG_FIELD_NUMBER: _ClassVar[int]
    MEMBERS_PACKED_FIELD_NUMBER: _ClassVar[int]
    SINCE_COMMIT_S_FIELD_NUMBER: _ClassVar[int]
    MEMBERS_STEP_FIELD_NUMBER: _ClassVar[int]
    action: QuorumResponse.Action
    round_id: int
    epoch: int
    members: _containers.RepeatedCompositeFieldContainer[Member]
    rank: int
    sync_from: str
    last_committed_round: int
    missed: _containers.RepeatedCompositeFieldContainer[CommittedRound]
    policy: str
    seed: int
    candidates: _containers.RepeatedScalarFieldContainer[str]
    state_digest: str
    sync_sources: _containers.RepeatedScalarFieldContainer[str]
    members_digest: bytes
    run_step: int
    round_step: int
    members_base: bytes
    members_removed: _containers.RepeatedScalarFieldContainer[int]
    members_added: _containers.RepeatedCompositeFieldContainer[IndexedMember]
    pending_tag: str
    members_packed: bytes
    since_commit_s: float
    members_step: int
    def __init__(self, action: _Optional[_Union[QuorumResponse.Action, str]] = ..., round_id: _Optional[int] = ..., epoch: _Optional[int] = ..., members: _Optional[_Iterable[_Union[Member, _Mapping]]] = ..., rank: _Optional[int] = ..., sync_from: _Optional[str] = ..., last_committed_round: _Optional[int] = ..., missed: _Optional[_Iterable[_Union[CommittedRound, _Mapping]]] = ..., policy: _Optional[str] = ..., seed: _Optional[int] = ..., candidates: _Optional[_Iterable[str]] = ..., state_digest: _Optional[str] = ..., sync_sources: _Optional[_Iterable[str]] = ..., members_digest: _Optional[bytes] = ..., run_step: _Optional[int] = ..., round_step: _Optional[int] = ..., members_base: _Optional[bytes] = ..., members_removed: _Optional[_Iterable[int]] = ..., members_added: _Optional[_Iterable[_Union[IndexedMember, _Mapping]]] = ..., pending_tag: _Optional[str] = ..., members_packed: _Optional[bytes] = ..., since_commit_s: _Optional[float] = ..., members_step: _Optional[int] = ...) -> None: ...

class RoundReport(_message.Message):
    __slots__ = ("bytes_sent", "bytes_received", "wall_s", "waited_for", "waited_s")
    BYTES_SENT_FIELD_NUMBER: _ClassVar[int]
    BYTES_RECEIVED_FIELD_NUMBER: _ClassVar[int]
    WALL_S_FIELD_NUMBER: _ClassVar[int]
    WAITED_FOR_FIELD_NUMBER: _ClassVar[int]
    WAITED_S_FIELD_NUMBER: _ClassVar[int]
    bytes_sent: int
    bytes_received: int
    wall_s: float
    waited_for: str
    waited_s: float
    def __init__(self, bytes_sent: _Optional[int] = ..., bytes_received: _Optional[int] = ..., wall_s: _Optional[float] = ..., waited_for: _Optional[str] = ..., waited_s: _Optional[float] = ...) -> None: ...

class CommitRequest(_message.Message):
    __slots__ = ("run_id", "peer_id", "round_id", "epoch", "ok", "failed_peers", "reason", "report")
    RUN_ID_FIELD_NUMBER: _ClassVar[int]
    PEER_ID_FIELD_NUMBER: _ClassVar[int]
    ROUND_ID_FIELD_NUMBER: _ClassVar[int]
    EPOCH_FIELD_NUMBER: _ClassVar[int]
    OK_FIELD_NUMBER: _ClassVar[int]
    FAILED_PEERS_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    REPORT_FIELD_NUMBER: _ClassVar[int]
    run_id: str
    peer_id: str
    round_id: int
    epoch: int
    ok: bool
    failed_peers: _containers.RepeatedScalarFieldContainer[str]
    reason: str
    report: RoundReport
    def __init__(self, run_id: _Optional[str] = ..., peer_id: _Optional[str] = ..., round_id: _Optional[int] = ..., epoch: _Optional[int] = ..., ok: _Optional[bool] = ..., failed_peers: _Optional[_Iterable[str]] = ..., reason: _Optional[str] = ..., report: _Optional[_Union[RoundReport, _Mapping]] = ...) -> None: ...

class CommitResponse(_message.Message):
    __slots__ = ("commit", "reason", "epoch", "dropped")
    COMMIT_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    EPOCH_FIELD_NUMBER: _ClassVar[int]
    DROPPED_FIELD_NUMBER: _ClassVar[int]
    commit: bool
    reason: str
    epoch: int
    dropped: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, commit: _Optional[bool] = ..., reason: _Optional[str] = ..., epoch: _Optional[int] = ..., dropped: _Optional[_Iterable[str]] = ...) -> None: ...

class StatusRequest(_message.Message):
    __slots__ = ("run_id",)
    RUN_ID_FIELD_NUMBER: _ClassVar[int]
    run_id: str
    def __init__(self, run_id: _Optional[str] = ...) -> None: ...

class StatusResponse(_message.Message):
    __slots__ = ("json",)
    JSON_FIELD_NUMBER: _ClassVar[int]
    json: str
    def __init__(self, json: _Optional[str] = ...) -> None: ...

class SessionCall(_message.Message):
    __slots__ = ("call_id", "heartbeat", "quorum", "commit", "cancel")
    CALL_ID_FIELD_NUMBER: _ClassVar[int]
    HEARTBEAT_FIELD_NUMBER: _ClassVar[int]
    QUORUM_FIELD_NUMBER: _ClassVar[int]
    COMMIT_FIELD_NUMBER: _ClassVar[int]
    CANCEL_FIELD_NUMBER: _ClassVar[int]
    call_id: int
    heartbeat: HeartbeatRequest
    quorum: QuorumRequest
    commit: CommitRequest
    cancel: bool
    def __init__(self, call_id: _Optional[int] = ..., heartbeat: _Optional[_Union[HeartbeatRequest, _Mapping]] = ..., quorum: _Optional[_Union[QuorumRequest, _Mapping]] = ..., commit: _Optional[_Union[CommitRequest, _Mapping]] = ..., cancel: _Optional[bool] = ...) -> None: ...

class SessionReply(_message.Message):
    __slots__ = ("call_id", "code", "details", "retry_after_ms", "heartbeat", "quorum", "commit")
    CALL_ID_FIELD_NUMBER: _ClassVar[int]
    CODE_FIELD_NUMBER: _ClassVar[int]
    DETAILS_FIELD_NUMBER: _ClassVar[int]
    RETRY_AFTER_MS_FIELD_NUMBER: _ClassVar[int]
    HEARTBEAT_FIELD_NUMBER: _ClassVar[int]
    QUORUM_FIELD_NUMBER: _ClassVar[int]
    COMMIT_FIELD_NUMBER: _ClassVar[int]
    call_id: int
    code: int
    details: str
    retry_after_ms: int
    heartbeat: HeartbeatResponse
    quorum: QuorumResponse
    commit: CommitResponse
    def __init__(self, call_id: _Optional[int] = ..., code: _Optional[int] = ..., details: _Optional[str] = ..., retry_after_ms: _Optional[int] = ..., heartbeat: _Optional[_Union[HeartbeatResponse, _Mapping]] = ..., quorum: _Optional[_Union[QuorumResponse, _Mapping]] = ..., commit: _Optional[_Union[CommitResponse, _Mapping]] = ...) -> None: ...
