"""The format of state sync: snapshots, the manifest, framing, parsing, and the limits a joiner enforces.

A state is an ordered list of named tensors plus a small JSON object of
metadata, taken at a round boundary (``StateSnapshot``). Its bytes are the
tensors' raw little-endian bytes concatenated in manifest order. The manifest
(``protos/state.proto``) names every tensor's dtype, shape and size, the total
size, the SHA-256 of all the bytes, and the SHA-256 of every ``block_bytes``-sized
block of them (the last one shorter), so a joiner can verify any block whichever
donor sent it.

A joiner treats everything it receives as hostile: ``_check_manifest`` validates
the whole manifest against its own limits before anything is allocated (block
size within bounds, one 32-byte hash per block, sizes that add up), then
``_Receiver`` allocates one buffer and copies received bytes to their tensors'
places; nothing is unpickled. The returned tensors are views into that one
buffer, each aligned to 64 bytes.

Chunks are framed by hand (valid protobuf encodings of ``StateChunk``, as in
``collectives/net/wire.py``), so payloads are never copied through protobuf objects; any
protobuf implementation of ``state.proto`` can talk to this one.

Limitation: tensors travel as the host's bytes, so hosts must be little-endian
(every platform PyTorch ships for).
"""

from __future__ import annotations

import bisect
import hashlib
import json
import math
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from collectives.errors import ConfigError, LoconetError
from collectives.net.wire import encode_varint, read_key, read_length, read_varint
from protos import state_pb2 as pb

SERVICE = "loconet.state.v1.StateSync"
FETCH_METHOD = f"/{SERVICE}/FetchState"

ALLOWED_DTYPES: tuple[torch.dtype, ...] = (
    torch.float32,
    torch.float64,
    torch.float16,
    torch.bfloat16,
    torch.int64,
    torch.int32,
    torch.int16,
    torch.int8,
    torch.uint8,
    torch.bool,
)
_DTYPES_BY_NAME = {str(d).removeprefix("torch."): d for d in ALLOWED_DTYPES}
_ITEMSIZE = {d: torch.empty((), dtype=d).element_size() for d in ALLOWED_DTYPES}
MAX_NAME_CHARS = 1024
MAX_NDIM = 64
# Each received tensor starts at a multiple of this in the joiner's buffer.
ALIGN_BYTES = 64
# Bounds on a manifest's block size: smaller blocks make manifests huge, larger ones make a
# lost donor cost too much re-fetching. A joiner rejects a manifest outside them.
MIN_BLOCK_BYTES = 4 << 10
# The smallest response message a fetch may ask for (StateRequest.max_chunk_bytes): smaller would cost a server
# more per byte than the link does.
MIN_CHUNK_BYTES = 16 << 10
MAX_BLOCK_BYTES = 1 << 30
_SHA256_BYTES = 32
_EMPTY_SHA256 = hashlib.sha256(b"").digest()

_WIRE_VARINT, _WIRE_I64, _WIRE_LEN, _WIRE_I32 = 0, 1, 2, 5
_FIELD_MANIFEST = pb.StateChunk.DESCRIPTOR.fields_by_name["manifest"].number
_FIELD_OFFSET = pb.StateChunk.DESCRIPTOR.fields_by_name["offset"].number
_FIELD_DATA = pb.StateChunk.DESCRIPTOR.fields_by_name["data"].number


class StateSyncError(LoconetError):
    """Fetching, verifying or serving a state failed; the message says what and what to do."""


class StateMismatch(StateSyncError):
    """No donor held the state the joiner expected (another round or digest); ``source`` is the first refused."""

    def __init__(self, message: str, source: str) -> None:
        super().__init__(message)
        self.source = source


class StateSyncStalled(StateSyncError):
    """Every source of a fetch failed by stalling: none sent data within the stall timeout (rather than refusing,
    being gone or sending bad data). On a slow, busy link that is every source at once: fetch again with a longer
    ``stall_timeout_s``."""


class ResultNotYet(StateSyncError):
    """A result was asked of a round newer than any this member has committed (it may be committing it now)."""


@dataclass(frozen=True)
class ExpectedState:
    """The state a joiner accepts: round 0 or digest "" mean any (e.g. what the coordinator recorded)."""

    round_id: int = 0
    sha256_hex: str = ""

    def __post_init__(self) -> None:
        if not isinstance(self.round_id, int) or self.round_id < 0:
            raise ConfigError(f"expected round must be a non-negative integer, got {self.round_id!r}")
        text = self.sha256_hex
        if text and (len(text) != 2 * _SHA256_BYTES or any(c not in "0123456789abcdef" for c in text)):
            raise ConfigError(f"expected digest must be 64 lowercase hex digits or empty, got {text!r:.80}")


@dataclass(frozen=True)
class FetchReport:
    """How a fetch went: what it got, how long it took and where its bytes came from."""

    round_id: int
    total_bytes: int
    seconds: float
    # Verified tensor bytes taken from each source (they add up to total_bytes).
    bytes_by_source: dict[str, int]
    # Blocks that went back to the queue because their source failed, stalled, refused or lied.
    retried_blocks: int
    # Tensor bytes received but not kept (unverified blocks of failed sources).
    discarded_bytes: int = 0


@dataclass
class StateSnapshot:
    """A training state at a round boundary: named tensors + JSON-able metadata."""

    round_id: int
    # CPU tensors of ALLOWED_DTYPES; insertion order is the manifest order.
    tensors: dict[str, torch.Tensor] = field(default_factory=dict)
    # JSON-serialisable object (json.dumps(..., allow_nan=False) must succeed).
    meta: dict = field(default_factory=dict)
    # Set on a fetched snapshot: how the fetch went.
    report: FetchReport | None = None


@dataclass(frozen=True)
class StateSyncConfig:
    """Chunking, pinning and serving bounds of a donor; the limits and timeouts of a joiner."""

    chunk_bytes: int = 1 << 20
    # A joiner refuses manifests announcing more than this.
    max_state_bytes: int = 64 << 30
    max_meta_bytes: int = 1 << 20
    max_tensors: int = 100_000
    # Deadline of a whole fetch.
    timeout_s: float = 600.0
    # Longest wait for the next chunk: a source that stops sending (paused, cut off)
    # is given up long before timeout_s, and its blocks go to the other sources.
    stall_timeout_s: float = 30.0
    # The slowest link a fetch must work over (bits/s): once a fetch stalled, the peer asks for messages small
    # enough to cross it, shared by its parallel streams, in half the stall timeouts (a 1 MiB message took 42 s at
    # 200 kbit/s, and such a joiner never got the state).
    min_link_bps: float = 200_000.0
    # A server serves at most this many fetches at once, and this many to one client (its peer id,
    # else its connection). Fetches of one round share one pinned copy of the state.
    max_concurrent_fetches: int = 8
    max_fetches_per_client: int = 2
    # A fetch whose client reads nothing for this long is cancelled, freeing its slot.
    serve_stall_timeout_s: float = 15.0
    # The state's bytes are verified in blocks of this size (the donor's setting is in its manifest).
    block_bytes: int = 4 << 20
    # A donor keeps the snapshots of at most this many rounds pinned, each while fetches of it run
    # and pin_grace_s after the last one ends (a joiner's next stripe of it comes within that).
    max_pinned: int = 2
    pin_grace_s: float = 30.0
    # A joiner asks one source for at most this many consecutive blocks per request.
    max_stripe_blocks: int = 16
    # A member asked for the result of a round newer than its own last commit waits this long for that
    # commit: the coordinator names a just-committed round to a late peer before every member has applied it.
    result_wait_s: float = 1.0

    def __post_init__(self) -> None:
        if self.chunk_bytes < 1024:
            raise ConfigError(f"chunk_bytes must be at least 1024, got {self.chunk_bytes}")
        if not self.min_link_bps > 0:
            raise ConfigError(f"min_link_bps must be positive, got {self.min_link_bps}")
        for name in (
            "max_state_bytes", "max_meta_bytes", "max_tensors", "max_concurrent_fetches",
            "max_fetches_per_client", "max_pinned", "max_stripe_blocks",
        ):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be positive, got {getattr(self, name)}")
        for name in ("timeout_s", "stall_timeout_s", "serve_stall_timeout_s"):
            if not getattr(self, name) > 0:
                raise ConfigError(f"{name} must be positive, got {getattr(self, name)}")
        for name in ("pin_grace_s", "result_wait_s"):
            if not getattr(self, name) >= 0:
                raise ConfigError(f"{name} must be 0 or more, got {getattr(self, name)}")
        if not MIN_BLOCK_BYTES <= self.block_bytes <= MAX_BLOCK_BYTES:
            raise ConfigError(
                f"block_bytes must be in [{MIN_BLOCK_BYTES}, {MAX_BLOCK_BYTES}], got {self.block_bytes}"
            )

    def asked_chunk_bytes(self, streams: int = 1, link_bps: float | None = None) -> int:
        """The message size a fetch asks its sources for after a stall: one crosses a link of link_bps (default
        min_link_bps) shared by ``streams`` in half of both stall timeouts, the fetch's and a source's (at least
        MIN_CHUNK_BYTES, at most chunk_bytes)."""
        window = min(self.stall_timeout_s, self.serve_stall_timeout_s)
        rate = self.min_link_bps if link_bps is None else link_bps
        fits = int(window * rate / 8 / 2 / max(1, streams))
        return max(MIN_CHUNK_BYTES, min(self.chunk_bytes, fits))


# The defaults, for signatures (a frozen dataclass: sharing it is safe).
DEFAULT_CONFIG = StateSyncConfig()


# -- bytes of a snapshot ----------------------------------------------------------------


def _tensor_bytes(t: torch.Tensor) -> np.ndarray:
    """The raw bytes of a tensor as a flat uint8 array (a view when it is already contiguous on the CPU)."""
    t = t.detach()
    if t.device.type != "cpu" or not t.is_contiguous():
        t = t.cpu().contiguous()
    return t.reshape(-1).view(torch.uint8).numpy()


def layout_digest(entries: Iterable[tuple[str, str, Sequence[int]]], bytes_sha256: bytes) -> str:
    """The run's digest of a state (hex): SHA-256 over its tensors' names, dtypes and shapes in order, and the
    SHA-256 of their concatenated bytes. The layout is in it so that a donor cannot serve the right bytes under
    swapped names (two same-sized layers exchanged)."""
    h = hashlib.sha256(b"loconet-state/v2\n")
    for name, dtype, shape in entries:
        h.update(json.dumps([name, dtype, [int(d) for d in shape]]).encode() + b"\n")
    h.update(bytes_sha256)
    return h.hexdigest()


def state_digest(snapshot: StateSnapshot) -> str:
    """The run's digest of a snapshot (layout_digest of its tensors, in manifest order)."""
    h = hashlib.sha256()
    for t in snapshot.tensors.values():
        h.update(_tensor_bytes(t))
    entries = [(name, str(t.dtype).removeprefix("torch."), tuple(t.shape)) for name, t in snapshot.tensors.items()]
    return layout_digest(entries, h.digest())


def manifest_digest(manifest: pb.StateManifest) -> str:
    """The run's digest of the state a manifest announces (what state_digest gives for that snapshot)."""
    return layout_digest(((e.name, e.dtype, tuple(e.shape)) for e in manifest.tensors), manifest.sha256)


@dataclass
class _Encoded:
    """A snapshot ready to stream: its manifest (serialised) and the tensors' bytes."""

    manifest: bytes
    views: list[np.ndarray]
    total_bytes: int
    round_id: int
    sha256: bytes


def _pieces(views: list[np.ndarray], start: int, end: int) -> Iterator[memoryview]:
    """The bytes [start, end) of the concatenated views, as views of them."""
    pos = 0
    for view in views:
        lo, hi = max(start, pos), min(end, pos + view.nbytes)
        if lo < hi:
            yield memoryview(view)[lo - pos : hi - pos]
        pos += view.nbytes
        if pos >= end:
            return


def _encode_snapshot(snapshot: StateSnapshot, run_id: str, config: StateSyncConfig) -> _Encoded:
    """Check a provider's snapshot, hash its bytes and blocks and build its manifest (runs off the event loop)."""
    if not isinstance(snapshot, StateSnapshot):
        raise ValueError(f"the provider returned {type(snapshot).__name__}, not a StateSnapshot")
    if not isinstance(snapshot.round_id, int) or not 0 <= snapshot.round_id < 1 << 64:
        raise ValueError(f"round_id must be an integer in [0, 2**64), got {snapshot.round_id!r}")
    if len(snapshot.tensors) > config.max_tensors:
        raise ValueError(f"{len(snapshot.tensors)} tensors exceed max_tensors ({config.max_tensors})")
    manifest = pb.StateManifest(run_id=run_id, round_id=snapshot.round_id, block_bytes=config.block_bytes)
    views: list[np.ndarray] = []
    total = 0
    for name, t in snapshot.tensors.items():
        if not isinstance(name, str) or not 0 < len(name) <= MAX_NAME_CHARS:
            raise ValueError(
                f"tensor names must be non-empty strings of at most {MAX_NAME_CHARS} chars, got {name!r:.80}"
            )
        if not isinstance(t, torch.Tensor) or t.dtype not in ALLOWED_DTYPES:
            what = t.dtype if isinstance(t, torch.Tensor) else type(t).__name__
            raise ValueError(f"tensor {name!r} is {what}; allowed: {', '.join(_DTYPES_BY_NAME)}")
        raw = _tensor_bytes(t)
        views.append(raw)
        total += raw.nbytes
        dtype = str(t.dtype).removeprefix("torch.")
        manifest.tensors.add(name=name, dtype=dtype, shape=list(t.shape), nbytes=raw.nbytes)
    if total > config.max_state_bytes:
        raise ValueError(f"the state has {total} bytes, more than max_state_bytes ({config.max_state_bytes})")
    meta_json = json.dumps(snapshot.meta, allow_nan=False)
    if not isinstance(snapshot.meta, dict) or len(meta_json.encode()) > config.max_meta_bytes:
        raise ValueError(f"meta must be a JSON object of at most {config.max_meta_bytes} bytes")
    whole = hashlib.sha256()
    for start in range(0, total, config.block_bytes):
        block = hashlib.sha256()
        for piece in _pieces(views, start, min(start + config.block_bytes, total)):
            block.update(piece)
            whole.update(piece)
        manifest.block_sha256.append(block.digest())
    manifest.meta_json = meta_json
    manifest.total_bytes = total
    manifest.sha256 = whole.digest()
    return _Encoded(manifest.SerializeToString(), views, total, snapshot.round_id, manifest.sha256)


# -- framing ---------------------------------------------------------------------------------


def _key(field_number: int, wire: int) -> bytes:
    return encode_varint((field_number << 3) | wire)


_KEY_MANIFEST = _key(_FIELD_MANIFEST, _WIRE_LEN)
_KEY_OFFSET = _key(_FIELD_OFFSET, _WIRE_VARINT)
_KEY_DATA = _key(_FIELD_DATA, _WIRE_LEN)
_KNOWN_WIRE = {_FIELD_MANIFEST: _WIRE_LEN, _FIELD_OFFSET: _WIRE_VARINT, _FIELD_DATA: _WIRE_LEN}


def _chunk_plan(
    views: list[np.ndarray], chunk_bytes: int, start: int = 0, end: int | None = None
) -> Iterator[tuple[int, list[memoryview]]]:
    """(offset, pieces) of each chunk: the bytes [start, end) cut into runs of chunk_bytes (the last shorter)."""
    end = sum(v.nbytes for v in views) if end is None else end
    pieces: list[memoryview] = []
    filled, offset = 0, start
    for mv in _pieces(views, start, end):
        pos = 0
        while pos < len(mv):
            take = min(chunk_bytes - filled, len(mv) - pos)
            pieces.append(mv[pos : pos + take])
            filled += take
            pos += take
            if filled == chunk_bytes:
                yield offset, pieces
                offset, pieces, filled = offset + filled, [], 0
    if filled:
        yield offset, pieces


def _frame(manifest: bytes | None, offset: int, pieces: list[memoryview]) -> bytes:
    """One serialised StateChunk (the one copy of the payload happens here)."""
    head = [_KEY_MANIFEST, encode_varint(len(manifest)), manifest] if manifest is not None else []
    size = sum(len(p) for p in pieces)
    data = [_KEY_DATA, encode_varint(size), *pieces] if size else []
    return b"".join([*head, _KEY_OFFSET, encode_varint(offset), *data])


# -- parsing and checking ---------------------------------------------------------------------


def _parse_chunk(raw: bytes) -> tuple[memoryview | None, int, memoryview]:
    """(manifest bytes or None, offset, data view) of a serialised StateChunk; unknown fields are skipped."""
    buf = memoryview(raw)
    pos, seen = 0, set()
    manifest, offset, data = None, 0, memoryview(b"")
    while pos < len(buf):
        # Field numbers beyond protobuf's range and overlong keys are refused (ProtocolError), as protobuf does.
        number, wire, pos = read_key(buf, pos)
        if number in _KNOWN_WIRE:
            if wire != _KNOWN_WIRE[number]:
                raise ValueError(f"field {number} has wire type {wire}")
            if number in seen:
                raise ValueError(f"field {number} repeated in one chunk")
            seen.add(number)
        if wire == _WIRE_VARINT:
            value, pos = read_varint(buf, pos)
            if number == _FIELD_OFFSET:
                offset = value
        elif wire == _WIRE_LEN:
            length, pos = read_length(buf, pos)
            if pos + length > len(buf):
                raise ValueError("a field runs past the end of the chunk")
            if number == _FIELD_MANIFEST:
                manifest = buf[pos : pos + length]
            elif number == _FIELD_DATA:
                data = buf[pos : pos + length]
            pos += length
        elif wire in (_WIRE_I64, _WIRE_I32):
            pos += 8 if wire == _WIRE_I64 else 4
            if pos > len(buf):
                raise ValueError("a field runs past the end of the chunk")
        else:
            raise ValueError(f"unsupported wire type {wire}")
    return manifest, offset, data


@dataclass
class _Entry:
    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    nbytes: int
    wire_offset: int  # where its bytes start in the concatenated bytes
    local_offset: int  # where they go in the joiner's buffer (aligned)


@dataclass
class _Layout:
    """What a checked manifest promises: the tensors, where they go, and how the bytes are verified."""

    entries: list[_Entry]
    meta: dict
    buffer_bytes: int
    total_bytes: int
    # Block k is bytes [k * block_bytes, min((k + 1) * block_bytes, total)); its SHA-256 is block_sha256[k].
    block_bytes: int
    block_sha256: list[bytes]

    @property
    def blocks(self) -> int:
        return len(self.block_sha256)

    def block_end(self, block: int) -> int:
        return min((block + 1) * self.block_bytes, self.total_bytes)


def _check_blocks(m: pb.StateManifest) -> tuple[int, list[bytes]]:
    """(block size, block hashes) a manifest announces, checked; one block of the whole state when it has none."""
    if m.block_bytes == 0 and not m.block_sha256:
        # A manifest without block hashes (another implementation): the whole state is one block.
        return max(m.total_bytes, 1), [m.sha256] if m.total_bytes else []
    if not MIN_BLOCK_BYTES <= m.block_bytes <= MAX_BLOCK_BYTES:
        raise ValueError(f"block_bytes {m.block_bytes} is outside [{MIN_BLOCK_BYTES}, {MAX_BLOCK_BYTES}]")
    blocks = -(-m.total_bytes // m.block_bytes)
    if len(m.block_sha256) != blocks:
        raise ValueError(
            f"{len(m.block_sha256)} block hashes for {m.total_bytes} bytes in blocks of {m.block_bytes}; "
            f"expected {blocks}"
        )
    if any(len(h) != _SHA256_BYTES for h in m.block_sha256):
        raise ValueError(f"a block hash is not {_SHA256_BYTES} bytes long")
    # With at most one block, the block hashes and the whole digest cover the same bytes.
    if blocks == 1 and m.block_sha256[0] != m.sha256:
        raise ValueError("the only block's hash differs from the state's sha256")
    if blocks == 0 and m.sha256 != _EMPTY_SHA256:
        raise ValueError("an empty state's sha256 is not the SHA-256 of no bytes")
    return m.block_bytes, list(m.block_sha256)


def _check_manifest(m: pb.StateManifest, run_id: str, config: StateSyncConfig) -> _Layout:
    """Validate a received manifest against this joiner's limits (before anything is allocated)."""
    if m.run_id != run_id:
        raise ValueError(f"the state is of run {m.run_id!r}, not {run_id!r}")
    if len(m.tensors) > config.max_tensors:
        raise ValueError(f"{len(m.tensors)} tensors exceed max_tensors ({config.max_tensors})")
    if m.total_bytes > config.max_state_bytes:
        raise ValueError(
            f"the state announces {m.total_bytes} bytes, more than max_state_bytes ({config.max_state_bytes}); "
            "raise StateSyncConfig.max_state_bytes if that size is expected"
        )
    if len(m.sha256) != _SHA256_BYTES:
        raise ValueError(f"sha256 has {len(m.sha256)} bytes, not {_SHA256_BYTES}")
    block_bytes, block_sha256 = _check_blocks(m)
    if len(m.meta_json.encode()) > config.max_meta_bytes:
        raise ValueError(f"meta_json exceeds max_meta_bytes ({config.max_meta_bytes})")
    try:
        meta = json.loads(m.meta_json, parse_constant=_reject_constant, parse_float=_finite_float)
    except (ValueError, RecursionError) as exc:
        raise ValueError(f"meta_json is not valid JSON: {exc}") from None
    if not isinstance(meta, dict):
        raise ValueError(f"meta_json is a JSON {type(meta).__name__}, not an object")
    entries: list[_Entry] = []
    names: set[str] = set()
    wire = local = 0
    for e in m.tensors:
        if not 0 < len(e.name) <= MAX_NAME_CHARS:
            raise ValueError(f"a tensor name is empty or longer than {MAX_NAME_CHARS} chars: {e.name!r:.80}")
        if e.name in names:
            raise ValueError(f"tensor name {e.name!r} repeats")
        names.add(e.name)
        dtype = _DTYPES_BY_NAME.get(e.dtype)
        if dtype is None:
            raise ValueError(f"tensor {e.name!r} has dtype {e.dtype!r:.40}; allowed: {', '.join(_DTYPES_BY_NAME)}")
        # Bounded so that an empty tensor's strides (products of the other dims) fit in int64.
        if len(e.shape) > MAX_NDIM or any(d < 0 for d in e.shape) or math.prod(max(d, 1) for d in e.shape) >= 1 << 62:
            raise ValueError(f"tensor {e.name!r} has an invalid shape {list(e.shape)[:MAX_NDIM + 1]}")
        if math.prod(e.shape) * _ITEMSIZE[dtype] != e.nbytes:
            raise ValueError(f"tensor {e.name!r}: shape {list(e.shape)} of {e.dtype} does not make {e.nbytes} bytes")
        if wire + e.nbytes > m.total_bytes:
            raise ValueError("the tensors' sizes add up to more than total_bytes")
        entries.append(_Entry(e.name, dtype, tuple(e.shape), e.nbytes, wire, local))
        wire += e.nbytes
        local += -(-e.nbytes // ALIGN_BYTES) * ALIGN_BYTES
    if wire != m.total_bytes:
        raise ValueError(f"the tensors' sizes add up to {wire} bytes, but total_bytes says {m.total_bytes}")
    return _Layout(entries, meta, local, m.total_bytes, block_bytes, block_sha256)


def _reject_constant(name: str) -> None:
    raise ValueError(f"{name} is not allowed in meta_json")


def _finite_float(text: str) -> float:
    # A literal beyond the float range (1e999) parses to an infinity without passing parse_constant.
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(f"the number {text[:40]} in meta_json is out of the float range")
    return value


class _Receiver:
    """The joiner's buffer: copies received bytes to their tensors' places, from any offset, in any order.

    ``write`` runs on codec threads (Transport.run_cpu), several streams at once into disjoint ranges.
    """

    def __init__(self, layout: _Layout) -> None:
        self.entries = [e for e in layout.entries if e.nbytes]
        self._starts = [e.wire_offset for e in self.entries]
        self.buffer = torch.empty(layout.buffer_bytes, dtype=torch.uint8)
        self.array = self.buffer.numpy()

    def write(self, offset: int, data: memoryview) -> None:
        """Copy data (stream bytes from offset, already bounds-checked) into place."""
        src = np.frombuffer(data, dtype=np.uint8)
        index = bisect.bisect_right(self._starts, offset) - 1
        pos = 0
        while pos < len(src):
            e = self.entries[index]
            start = offset + pos - e.wire_offset
            take = min(e.nbytes - start, len(src) - pos)
            self.array[e.local_offset + start : e.local_offset + start + take] = src[pos : pos + take]
            pos += take
            index += 1

    def digest(self) -> bytes:
        """SHA-256 of the received bytes in manifest order (what the manifest's sha256 must be)."""
        h = hashlib.sha256()
        for e in self.entries:
            h.update(self.array[e.local_offset : e.local_offset + e.nbytes])
        return h.digest()

    def tensors(self, entries: list[_Entry]) -> dict[str, torch.Tensor]:
        """The received tensors: views of the buffer, each at an aligned offset."""
        typed = {d: self.buffer.view(d) for d in {e.dtype for e in entries}}  # the size is a multiple of ALIGN_BYTES
        out = {}
        for e in entries:
            strides = [1] * len(e.shape)
            for i in range(len(e.shape) - 2, -1, -1):
                strides[i] = strides[i + 1] * max(e.shape[i + 1], 1)
            out[e.name] = typed[e.dtype].as_strided(e.shape, strides, e.local_offset // _ITEMSIZE[e.dtype])
        return out
