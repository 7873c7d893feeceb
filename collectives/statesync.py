"""State sync: a joining peer streams the current training state from a live peer.

Protocol (``protos/state.proto``, service ``loconet.state.v1.StateSync``)::

    joiner --FetchState(StateRequest{run_id, peer_id, result_of_round})--> server
    joiner <-- StateChunk{manifest, offset=0, data?} --    first chunk: the manifest
    joiner <-- StateChunk{offset, data} ...           --    data chunks, offsets contiguous

A state is an ordered list of named tensors plus a small JSON object of
metadata, taken at a round boundary (``StateSnapshot``). The same stream
serves the committed result of a recent round (``result_of_round``: the
reduced tensor every member of that round holds), so that a peer a round went
on without can apply it instead of fetching the whole state. The server calls its
provider once per request, on a thread off the event loop, and streams the tensors' raw
little-endian bytes, concatenated in manifest order, in chunks of at most
``chunk_bytes`` (a chunk may span several tensors; the first may carry data
after the manifest). The manifest names every tensor's dtype, shape and size,
the total size and the SHA-256 of all the bytes.

The joiner treats everything it receives as hostile: it validates the whole
manifest against its own limits before allocating anything, then allocates one
buffer, checks every chunk's offset and size before copying it, hashes the
bytes as they arrive and compares the digest at the end. Nothing is unpickled.
The returned tensors are views into that one buffer, each aligned to 64 bytes.

Chunks are framed by hand (valid protobuf encodings of ``StateChunk``, as in
``wire.py``), so payloads are never copied through protobuf objects; any
protobuf implementation of ``state.proto`` can talk to this one.

Limitation: tensors travel as the host's bytes, so hosts must be little-endian
(every platform PyTorch ships for).
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import itertools
import json
import logging
import math
import sys
import time
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field

import grpc
import numpy as np
import torch

from collectives.errors import ConfigError, LoconetError
from collectives.transport import HEADER_SLACK_BYTES, Transport, identity, method_handlers
from collectives.wire import encode_varint, read_varint
from protos import state_pb2 as pb

log = logging.getLogger(__name__)

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

_WIRE_VARINT, _WIRE_I64, _WIRE_LEN, _WIRE_I32 = 0, 1, 2, 5
_FIELD_MANIFEST = pb.StateChunk.DESCRIPTOR.fields_by_name["manifest"].number
_FIELD_OFFSET = pb.StateChunk.DESCRIPTOR.fields_by_name["offset"].number
_FIELD_DATA = pb.StateChunk.DESCRIPTOR.fields_by_name["data"].number


class StateSyncError(LoconetError):
    """Fetching, verifying or serving a state failed; the message says what and what to do."""


@dataclass
class StateSnapshot:
    """A training state at a round boundary: named tensors + JSON-able metadata."""

    round_id: int
    # CPU tensors of ALLOWED_DTYPES; insertion order is the manifest order.
    tensors: dict[str, torch.Tensor] = field(default_factory=dict)
    # JSON-serialisable object (json.dumps(..., allow_nan=False) must succeed).
    meta: dict = field(default_factory=dict)


@dataclass(frozen=True)
class StateSyncConfig:
    """Chunking, the limits a joiner enforces on what it receives, and the fetch deadline."""

    chunk_bytes: int = 1 << 20
    # A joiner refuses manifests announcing more than this.
    max_state_bytes: int = 64 << 30
    max_meta_bytes: int = 1 << 20
    max_tensors: int = 100_000
    # Deadline of a whole fetch.
    timeout_s: float = 600.0
    # Longest wait for the next chunk: a source that stops sending (paused, cut off)
    # is given up long before timeout_s, and the joiner asks for another.
    stall_timeout_s: float = 30.0
    # A server serves at most this many fetches at once (each one holds a snapshot copy).
    max_concurrent_fetches: int = 2

    def __post_init__(self) -> None:
        if self.chunk_bytes < 1024:
            raise ConfigError(f"chunk_bytes must be at least 1024, got {self.chunk_bytes}")
        for name in ("max_state_bytes", "max_meta_bytes", "max_tensors", "max_concurrent_fetches"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be positive, got {getattr(self, name)}")
        for name in ("timeout_s", "stall_timeout_s"):
            if not getattr(self, name) > 0:
                raise ConfigError(f"{name} must be positive, got {getattr(self, name)}")


# -- bytes of a snapshot ----------------------------------------------------------------


def _tensor_bytes(t: torch.Tensor) -> np.ndarray:
    """The raw bytes of a tensor as a flat uint8 array (a view when it is already contiguous on the CPU)."""
    t = t.detach()
    if t.device.type != "cpu" or not t.is_contiguous():
        t = t.cpu().contiguous()
    return t.reshape(-1).view(torch.uint8).numpy()


def state_digest(snapshot: StateSnapshot) -> str:
    """Hex SHA-256 of the snapshot's tensor bytes in manifest order (what the manifest carries)."""
    h = hashlib.sha256()
    for t in snapshot.tensors.values():
        h.update(_tensor_bytes(t))
    return h.hexdigest()


@dataclass
class _Encoded:
    """A snapshot ready to stream: its manifest (serialised) and the tensors' bytes."""

    manifest: bytes
    views: list[np.ndarray]
    total_bytes: int
    round_id: int


def _encode_snapshot(snapshot: StateSnapshot, run_id: str, config: StateSyncConfig) -> _Encoded:
    """Check a provider's snapshot, hash its bytes and build its manifest (runs off the event loop)."""
    if not isinstance(snapshot, StateSnapshot):
        raise ValueError(f"the provider returned {type(snapshot).__name__}, not a StateSnapshot")
    if not isinstance(snapshot.round_id, int) or not 0 <= snapshot.round_id < 1 << 64:
        raise ValueError(f"round_id must be an integer in [0, 2**64), got {snapshot.round_id!r}")
    if len(snapshot.tensors) > config.max_tensors:
        raise ValueError(f"{len(snapshot.tensors)} tensors exceed max_tensors ({config.max_tensors})")
    manifest = pb.StateManifest(run_id=run_id, round_id=snapshot.round_id)
    views: list[np.ndarray] = []
    h = hashlib.sha256()
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
        h.update(raw)
        views.append(raw)
        total += raw.nbytes
        dtype = str(t.dtype).removeprefix("torch.")
        manifest.tensors.add(name=name, dtype=dtype, shape=list(t.shape), nbytes=raw.nbytes)
    if total > config.max_state_bytes:
        raise ValueError(f"the state has {total} bytes, more than max_state_bytes ({config.max_state_bytes})")
    meta_json = json.dumps(snapshot.meta, allow_nan=False)
    if not isinstance(snapshot.meta, dict) or len(meta_json.encode()) > config.max_meta_bytes:
        raise ValueError(f"meta must be a JSON object of at most {config.max_meta_bytes} bytes")
    manifest.meta_json = meta_json
    manifest.total_bytes = total
    manifest.sha256 = h.digest()
    return _Encoded(manifest.SerializeToString(), views, total, snapshot.round_id)


def _key(field_number: int, wire: int) -> bytes:
    return encode_varint((field_number << 3) | wire)


_KEY_MANIFEST = _key(_FIELD_MANIFEST, _WIRE_LEN)
_KEY_OFFSET = _key(_FIELD_OFFSET, _WIRE_VARINT)
_KEY_DATA = _key(_FIELD_DATA, _WIRE_LEN)
_KNOWN_WIRE = {_FIELD_MANIFEST: _WIRE_LEN, _FIELD_OFFSET: _WIRE_VARINT, _FIELD_DATA: _WIRE_LEN}


def _chunk_plan(views: list[np.ndarray], chunk_bytes: int) -> Iterator[tuple[int, list[memoryview]]]:
    """(offset, pieces) of each chunk: the concatenated bytes cut into runs of chunk_bytes (the last shorter)."""
    pieces: list[memoryview] = []
    filled = offset = 0
    for view in views:
        mv = memoryview(view)
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


# -- serving ----------------------------------------------------------------------------------


class StateServer:
    """Serves this peer's current state to joiners, and recent rounds' results to late peers (FetchState).

    ``provider`` is called once per request on a thread off the event loop and must return
    a consistent snapshot (copied under the caller's own lock), or None while
    this peer holds no state yet. ``results(round_id)`` returns the committed result
    of a recent round as a snapshot, or None when this peer does not keep it.
    """

    def __init__(
        self,
        transport: Transport,
        run_id: str,
        provider: Callable[[], StateSnapshot | None],
        config: StateSyncConfig = StateSyncConfig(),
        results: Callable[[int], StateSnapshot | None] | None = None,
    ) -> None:
        if not run_id:
            raise ValueError("run_id must be a non-empty string")
        self.transport = transport
        self.run_id = run_id
        self.provider = provider
        self.results = results
        self.config = config
        self._active = 0  # fetches being served (touched on the loop only)
        # Bytes sent to joiners (also in the transport's counters), so reports can tell them apart.
        self.bytes_served = 0

    def handlers(self) -> list[grpc.GenericRpcHandler]:
        """The gRPC handlers of the StateSync service, for ``Transport.start``."""
        method = grpc.unary_stream_rpc_method_handler(
            self._handle_fetch, request_deserializer=identity, response_serializer=identity
        )
        return [method_handlers(SERVICE, {"FetchState": method})]

    def _snapshot(self, result_of_round: int = 0) -> _Encoded | None:
        # Runs off the event loop: the provider copies the state, then it is checked and hashed.
        if result_of_round:
            snapshot = self.results(result_of_round) if self.results is not None else None
        else:
            snapshot = self.provider()
        return None if snapshot is None else _encode_snapshot(snapshot, self.run_id, self.config)

    async def _handle_fetch(self, request: bytes, context: grpc.aio.ServicerContext) -> AsyncIterator[bytes]:
        try:
            req = pb.StateRequest.FromString(request)
        except Exception as exc:  # protobuf's DecodeError and friends
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"malformed StateRequest: {exc}")
        who = f"{req.peer_id[:200]!r} at {context.peer()}" if req.peer_id else context.peer()
        if req.run_id != self.run_id:
            await context.abort(
                grpc.StatusCode.FAILED_PRECONDITION,
                f"this peer serves run {self.run_id!r}, not {req.run_id!r}; fetch from a peer of your own run",
            )
        if self._active >= self.config.max_concurrent_fetches:
            await context.abort(
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                f"this peer is already serving {self._active} state fetches; retry later or ask another peer",
            )
        self._active += 1
        try:
            started = time.monotonic()
            try:
                encoded = await self.transport.run_off_loop(self._snapshot, req.result_of_round)
            except Exception as exc:
                log.exception("the state provider failed while serving %s", who)
                await context.abort(grpc.StatusCode.INTERNAL, f"the serving peer could not snapshot its state: {exc}")
            if encoded is None and req.result_of_round:
                await context.abort(
                    grpc.StatusCode.NOT_FOUND,
                    f"this peer no longer keeps the result of round {req.result_of_round}; fetch the whole state",
                )
            if encoded is None:
                await context.abort(
                    grpc.StatusCode.FAILED_PRECONDITION,
                    "this peer holds no state yet; retry after its first round or ask another peer",
                )
            limit = self.transport.config.message_limit - HEADER_SLACK_BYTES
            if len(encoded.manifest) > limit:
                await context.abort(
                    grpc.StatusCode.FAILED_PRECONDITION,
                    f"the state's manifest ({len(encoded.manifest)} bytes) exceeds the gRPC message limit; raise "
                    "TransportConfig.max_message_bytes on every peer or use fewer tensors",
                )
            sent = 0
            async for message in self._messages(encoded, limit):
                await self.transport.pace_send(context.peer(), len(message))
                self.bytes_served += len(message)
                yield message
                sent += len(message)
            log.info(
                "served round %d state (%d bytes of tensors, %d on the wire) to %s in %.2f s",
                encoded.round_id, encoded.total_bytes, sent, who, time.monotonic() - started,
            )
        except asyncio.CancelledError:
            log.info("state fetch by %s ended early (cancelled or disconnected)", who)
            raise
        finally:
            self._active -= 1

    async def _messages(self, encoded: _Encoded, limit: int) -> AsyncIterator[bytes]:
        """The chunk messages (at most limit bytes each), each framed while the last one is sent."""
        chunk_bytes = min(self.config.chunk_bytes, limit)
        plan = _chunk_plan(encoded.views, chunk_bytes)
        first = next(plan, None)
        if first is not None and len(encoded.manifest) + chunk_bytes > limit:
            yield _frame(encoded.manifest, 0, [])  # the manifest does not fit next to a full chunk
            manifest = None
        else:
            manifest = encoded.manifest
        if first is None:
            yield _frame(manifest, 0, [])
            return
        calls = itertools.chain([(_frame, (manifest, *first))], ((_frame, (None, offset, pieces)) for offset, pieces in plan))
        async for message in self.transport.run_cpu_ahead(calls):
            yield message


# -- fetching -------------------------------------------------------------------------------------


def _parse_chunk(raw: bytes) -> tuple[memoryview | None, int, memoryview]:
    """(manifest bytes or None, offset, data view) of a serialised StateChunk; unknown fields are skipped."""
    buf = memoryview(raw)
    pos, seen = 0, set()
    manifest, offset, data = None, 0, memoryview(b"")
    while pos < len(buf):
        key, pos = read_varint(buf, pos)
        number, wire = key >> 3, key & 7
        if number == 0:
            raise ValueError("field number 0")
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
            length, pos = read_varint(buf, pos)
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
    wire_offset: int  # where its bytes start in the stream
    local_offset: int  # where they go in the joiner's buffer (aligned)


def _check_manifest(
    m: pb.StateManifest, run_id: str, config: StateSyncConfig
) -> tuple[list[_Entry], dict, int]:
    """Validate a received manifest against this joiner's limits; return (entries, meta, buffer size)."""
    if m.run_id != run_id:
        raise ValueError(f"the state is of run {m.run_id!r}, not {run_id!r}")
    if len(m.tensors) > config.max_tensors:
        raise ValueError(f"{len(m.tensors)} tensors exceed max_tensors ({config.max_tensors})")
    if m.total_bytes > config.max_state_bytes:
        raise ValueError(
            f"the state announces {m.total_bytes} bytes, more than max_state_bytes ({config.max_state_bytes}); "
            "raise StateSyncConfig.max_state_bytes if that size is expected"
        )
    if len(m.sha256) != 32:
        raise ValueError(f"sha256 has {len(m.sha256)} bytes, not 32")
    if len(m.meta_json.encode()) > config.max_meta_bytes:
        raise ValueError(f"meta_json exceeds max_meta_bytes ({config.max_meta_bytes})")
    try:
        meta = json.loads(m.meta_json, parse_constant=_reject_constant)
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
    return entries, meta, local


def _reject_constant(name: str) -> None:
    raise ValueError(f"{name} is not allowed in meta_json")


class _Receiver:
    """The joiner's buffer: copies each chunk to its tensors' places and hashes it (Transport.run_cpu, in order)."""

    def __init__(self, entries: list[_Entry], buffer_bytes: int) -> None:
        self.entries = [e for e in entries if e.nbytes]
        self.buffer = torch.empty(buffer_bytes, dtype=torch.uint8)
        self.array = self.buffer.numpy()
        self.hash = hashlib.sha256()
        self.index = 0  # the entry the next byte belongs to

    def absorb(self, offset: int, data: memoryview) -> None:
        """Copy data (stream bytes from offset, already bounds-checked) into place and hash it."""
        self.hash.update(data)
        src = np.frombuffer(data, dtype=np.uint8)
        pos = 0
        while pos < len(src):
            e = self.entries[self.index]
            start = offset + pos - e.wire_offset
            take = min(e.nbytes - start, len(src) - pos)
            self.array[e.local_offset + start : e.local_offset + start + take] = src[pos : pos + take]
            pos += take
            if start + take == e.nbytes:
                self.index += 1

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


def _fail(address: str, problem: str) -> StateSyncError:
    return StateSyncError(f"state fetch from {address} failed: {problem}")


def _rpc_hint(code: grpc.StatusCode) -> str:
    if code == grpc.StatusCode.UNAVAILABLE:
        return "; is that peer running and reachable? try another peer"
    if code == grpc.StatusCode.DEADLINE_EXCEEDED:
        return "; raise StateSyncConfig.timeout_s or fetch from a faster peer"
    if code == grpc.StatusCode.RESOURCE_EXHAUSTED:
        return "; the peer is busy or a message exceeded the size limit: retry later or ask another peer"
    return ""


async def fetch_state_async(
    transport: Transport,
    address: str,
    run_id: str,
    peer_id: str = "",
    config: StateSyncConfig = StateSyncConfig(),
    result_of_round: int = 0,
) -> StateSnapshot:
    """Fetch, verify and return the state served at address (or round result_of_round's result); run on the loop."""
    if sys.byteorder != "little":
        raise StateSyncError("state sync needs a little-endian host")
    started = time.monotonic()
    request = pb.StateRequest(run_id=run_id, peer_id=peer_id, result_of_round=result_of_round).SerializeToString()
    call = transport.channel(address).unary_stream(
        FETCH_METHOD, request_serializer=identity, response_deserializer=identity
    )(request, timeout=config.timeout_s)
    transport.counters.count_sent(address, len(request))
    entries: list[_Entry] | None = None
    receiver: _Receiver | None = None
    manifest = pb.StateManifest()
    meta: dict = {}
    received = 0
    try:
        while True:
            try:
                raw = await asyncio.wait_for(call.read(), config.stall_timeout_s)
            except asyncio.TimeoutError:
                raise _fail(address, f"no data for {config.stall_timeout_s:g} s (the source stalled)") from None
            if raw is grpc.aio.EOF:
                break
            await transport.note_received(address, len(raw))
            try:
                manifest_bytes, offset, data = _parse_chunk(raw)
            except ValueError as exc:
                raise _fail(address, f"malformed StateChunk: {exc}") from None
            if entries is None:
                if manifest_bytes is None:
                    raise _fail(address, "the first chunk carries no manifest")
                try:
                    manifest = pb.StateManifest.FromString(bytes(manifest_bytes))
                    entries, meta, buffer_bytes = _check_manifest(manifest, run_id, config)
                except Exception as exc:  # DecodeError or a failed check
                    raise _fail(address, f"invalid manifest: {exc}") from None
                receiver = _Receiver(entries, buffer_bytes)
            elif manifest_bytes is not None:
                raise _fail(address, "a manifest repeated after the first chunk")
            elif not len(data):
                raise _fail(address, f"an empty data chunk at offset {offset}")
            if offset != received:
                raise _fail(address, f"a chunk at offset {offset}, expected {received}")
            if received + len(data) > manifest.total_bytes:
                raise _fail(address, f"data runs past the announced {manifest.total_bytes} bytes")
            if len(data):
                await transport.run_cpu(receiver.absorb, offset, data)
                received += len(data)
    except grpc.aio.AioRpcError as exc:
        code = exc.code()
        raise _fail(address, f"{code.name}: {exc.details()}{_rpc_hint(code)}") from None
    finally:
        if not call.done():
            call.cancel()
    if entries is None or receiver is None:
        raise _fail(address, "the stream ended without a manifest")
    if received != manifest.total_bytes:
        raise _fail(address, f"the stream ended after {received} of {manifest.total_bytes} bytes")
    if not hmac.compare_digest(receiver.hash.digest(), manifest.sha256):
        raise _fail(address, "the SHA-256 of the received bytes does not match the manifest; fetch again")
    if result_of_round and manifest.round_id != result_of_round:
        raise _fail(address, f"asked for the result of round {result_of_round}, got round {manifest.round_id}'s")
    log.info(
        "fetched round %d state from %s: %d tensors, %d bytes in %.2f s",
        manifest.round_id, address, len(entries), received, time.monotonic() - started,
    )
    try:
        tensors = receiver.tensors(entries)
    except (RuntimeError, TypeError, ValueError) as exc:  # the manifest checks should make this unreachable
        raise _fail(address, f"cannot build the tensors the manifest describes: {exc}") from None
    return StateSnapshot(round_id=manifest.round_id, tensors=tensors, meta=meta)


def fetch_state(
    transport: Transport, address: str, run_id: str, peer_id: str = "", config: StateSyncConfig = StateSyncConfig()
) -> StateSnapshot:
    """Fetch, verify and return the state served at address (blocking; never call it on the transport's loop).

    The returned tensors are writable views into one buffer; clone one to keep it without the rest.
    """
    try:
        on_loop = asyncio.get_running_loop() is transport.loop
    except RuntimeError:
        on_loop = False
    if on_loop:
        raise RuntimeError("fetch_state would block the transport's loop; await fetch_state_async there instead")
    future = transport.submit(fetch_state_async(transport, address, run_id, peer_id, config))
    return future.result()
