"""Fuzzing what a joiner parses from a donor (collectives/statesync/format.py, collectives/statesync/fetch.py).

Three levels: one StateChunk's framing (``_parse_chunk``, against protobuf
itself), one manifest's checks (``_check_manifest`` and the buffer it makes
``_Receiver`` build), and whole fetches (``fetch_state_async``) from fake
donors on a fake transport that serve honest, lying, broken, stalled or
mutated streams to the joiner's real fetch logic (stripes, retries, hashes).

What must hold: anything is parsed or refused with ValueError (chunks,
manifests) or StateSyncError (fetches), never another exception or a hang; an
accepted manifest describes tensors that fit its buffer exactly; a fetch that
succeeds returns exactly the bytes of the state it was expected to get, and
one from honest donors over clean streams succeeds.
"""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import json
import math

import grpc
import pytest
import torch
from fuzzgen import U64_MAX, messages, mutated, texts, uint64s
from google.protobuf.message import DecodeError
from hypothesis import strategies as st

from collectives.statesync.fetch import fetch_state_async
from collectives.statesync.format import (
    ALIGN_BYTES,
    MAX_NDIM,
    ExpectedState,
    StateSnapshot,
    StateSyncConfig,
    StateSyncError,
    _check_manifest,
    _chunk_plan,
    _encode_snapshot,
    _frame,
    _parse_chunk,
    _Receiver,
    state_digest,
)
from protos import state_pb2 as pb

RUN = "run"
DTYPES = ("float32", "float64", "float16", "bfloat16", "int64", "int32", "int16", "int8", "uint8", "bool")
# Small limits, so that whatever a manifest announces is cheap to allocate.
SMALL = StateSyncConfig(chunk_bytes=1024, block_bytes=4096, max_state_bytes=1 << 20, max_meta_bytes=4096,
                        max_tensors=64)
CHUNK_FIELDS = [f.number for f in pb.StateChunk.DESCRIPTOR.fields]
MANIFEST_FIELDS = [f.number for f in pb.StateManifest.DESCRIPTOR.fields]


# -- one chunk --------------------------------------------------------------------------------


def frames() -> st.SearchStrategy[bytes]:
    """StateChunks as a donor frames them: an optional manifest, an offset, data pieces."""
    manifest = st.one_of(st.none(), st.binary(max_size=64), messages(MANIFEST_FIELDS, max_fields=6))
    pieces = st.lists(st.binary(max_size=40).map(memoryview), max_size=3)
    return st.builds(_frame, manifest, uint64s(), pieces)


def test_parse_chunk_reads_or_refuses_any_bytes_as_protobuf_reads_them(fuzz):
    def check(raw: bytes) -> None:
        try:
            manifest, offset, data = _parse_chunk(raw)
        except ValueError:
            return
        assert 0 <= offset <= U64_MAX
        try:
            reference = pb.StateChunk.FromString(raw)
        except DecodeError:  # only the manifest's insides can be what protobuf refuses
            assert manifest is not None
            with pytest.raises(DecodeError):
                pb.StateManifest.FromString(bytes(manifest))
            return
        assert offset == reference.offset and bytes(data) == reference.data
        assert (manifest is not None) == reference.HasField("manifest")

    fuzz.run(check, st.one_of(st.binary(max_size=64), messages(CHUNK_FIELDS, MANIFEST_FIELDS), frames(),
                              mutated(frames())))


def test_framed_chunks_parse_to_what_was_framed(fuzz):
    def check(manifest: bytes | None, offset: int, pieces: list[bytes]) -> None:
        manifest_view, got_offset, data = _parse_chunk(_frame(manifest, offset, [memoryview(p) for p in pieces]))
        assert (None if manifest_view is None else bytes(manifest_view)) == manifest
        assert (got_offset, bytes(data)) == (offset, b"".join(pieces))

    pieces = st.lists(st.binary(max_size=50), max_size=4)
    fuzz.run(check, st.one_of(st.none(), st.binary(max_size=100)), uint64s(), pieces)


# -- one manifest ------------------------------------------------------------------------------


def entries() -> st.SearchStrategy[pb.TensorEntry]:
    """Tensor entries: mostly self-consistent, sometimes with any dtype, shape or size."""
    int64s = st.one_of(st.integers(-2, 8), st.sampled_from([-(1 << 63), (1 << 62), (1 << 63) - 1]),
                       st.integers(-(1 << 63), (1 << 63) - 1))

    def consistent(name: str, dtype: str, shape: list[int]) -> pb.TensorEntry:
        itemsize = torch.empty((), dtype=getattr(torch, dtype)).element_size()
        return pb.TensorEntry(name=name, dtype=dtype, shape=shape, nbytes=math.prod(shape) * itemsize)

    names = st.one_of(st.text(min_size=1, max_size=4), st.just(""), st.just("x" * 1025))
    good = st.builds(consistent, names, st.sampled_from(DTYPES), st.lists(st.integers(0, 6), max_size=3))
    wild = st.builds(pb.TensorEntry, name=names, dtype=st.one_of(st.sampled_from(DTYPES), st.text(max_size=8)),
                     shape=st.lists(int64s, max_size=MAX_NDIM + 2), nbytes=uint64s())
    return st.one_of(good, good, wild)


META = st.one_of(
    st.just("{}"),
    st.sampled_from(['{"a": 1e999}', '{"a": -1e400}', '{"a": NaN}', '{"a": Infinity}', "[]", "1", '"x"', "{",
                     '{"a": ' + "9" * 5000 + "}", "[" * 10_000 + "]" * 10_000, '{"a": {"b": [1, 2.5, null, true]}}']),
    texts(),
)


@st.composite
def manifests(draw) -> pb.StateManifest:
    """Manifests whose sizes and hashes add up (so the deep checks run), with a few fields then set to anything."""
    tensors = draw(st.lists(entries(), max_size=6))
    total = min(sum(t.nbytes for t in tensors), U64_MAX)
    block = draw(st.sampled_from([0, 4096, 8192, 1, 1 << 31]))
    blocks = -(-total // block) if block else 0
    digest = hashlib.sha256(b"").digest() if total == 0 else bytes(range(32))
    hashes = [digest if blocks == 1 else bytes([k % 256]) * 32 for k in range(min(blocks, 300))]
    m = pb.StateManifest(run_id=RUN, round_id=draw(uint64s()), tensors=tensors, meta_json=draw(META),
                         total_bytes=total, sha256=digest, block_bytes=block, block_sha256=hashes)
    for name in draw(st.lists(st.sampled_from(["run_id", "total_bytes", "sha256", "block_bytes", "block_sha256"]),
                              max_size=2, unique=True)):
        if name == "run_id":
            m.run_id = draw(texts())
        elif name in ("total_bytes", "block_bytes"):
            setattr(m, name, draw(uint64s()))
        elif name == "sha256":
            m.sha256 = draw(st.binary(max_size=40))
        else:
            del m.block_sha256[:]
            m.block_sha256.extend(draw(st.lists(st.binary(min_size=31, max_size=33), max_size=4)))
    return m


def parsed_manifests() -> st.SearchStrategy[pb.StateManifest | None]:
    """Manifests as a donor's bytes could make them (None when protobuf refuses the bytes)."""

    def parse(raw: bytes) -> pb.StateManifest | None:
        try:
            return pb.StateManifest.FromString(raw)
        except DecodeError:
            return None

    tensor_fields = [f.number for f in pb.TensorEntry.DESCRIPTOR.fields]
    return messages(MANIFEST_FIELDS, tensor_fields).map(parse)


def test_check_manifest_accepts_only_manifests_whose_tensors_fit_their_buffer(fuzz):
    def check(m: pb.StateManifest | None) -> None:
        if m is None:
            return
        try:
            layout = _check_manifest(m, RUN, SMALL)
        except ValueError:
            return
        assert layout.total_bytes == m.total_bytes == sum(e.nbytes for e in layout.entries) <= SMALL.max_state_bytes
        # The blocks cover the bytes exactly, each with a 32-byte hash.
        assert all(len(h) == 32 for h in layout.block_sha256)
        if layout.total_bytes:
            assert (layout.blocks - 1) * layout.block_bytes < layout.total_bytes <= layout.blocks * layout.block_bytes
        # The metadata is a JSON object a donor could have sent (json.dumps(..., allow_nan=False) holds for it).
        assert isinstance(layout.meta, dict)
        json.dumps(layout.meta, allow_nan=False)
        receiver = _Receiver(layout)
        tensors = receiver.tensors(layout.entries)
        end = 0
        for e in layout.entries:
            t = tensors[e.name]
            assert e.local_offset % ALIGN_BYTES == 0 and e.local_offset >= end
            assert (t.dtype, tuple(t.shape), t.numel() * t.element_size()) == (e.dtype, e.shape, e.nbytes)
            end = e.local_offset + e.nbytes
            assert end <= layout.buffer_bytes
        if layout.total_bytes:
            # Every tensor's bytes are where the receiver writes them: write the whole state, read it back.
            data = bytes(k % 251 for k in range(layout.total_bytes))
            receiver.write(0, memoryview(data))
            assert state_bytes(StateSnapshot(0, tensors)) == data

    fuzz.run(check, st.one_of(manifests(), parsed_manifests()))


# -- whole fetches from fake donors --------------------------------------------------------------


class FakeCall:
    """A FetchState response: its messages, then the end of the stream, an error, or a stall."""

    def __init__(self, replies: list[bytes], end: str) -> None:
        self.replies = replies
        self.end = end
        self.finished = False

    async def read(self):
        if self.replies:
            return self.replies.pop(0)
        if self.end == "stall":
            await asyncio.sleep(3600)
        self.finished = True
        if self.end in ("OK", ""):
            return grpc.aio.EOF
        raise grpc.aio.AioRpcError(getattr(grpc.StatusCode, self.end), grpc.aio.Metadata(), grpc.aio.Metadata(),
                                   details="fake donor")

    def done(self) -> bool:
        return self.finished

    def cancel(self) -> bool:
        self.finished = True
        return True


class FakeDonor:
    """Serves a snapshot as collectives/statesync/server.py frames it, with the fuzzer's mutations per request."""

    def __init__(self, snapshot: StateSnapshot, chunk_bytes: int, faults: dict[int, list]) -> None:
        self.snapshot = snapshot
        self.encoded = _encode_snapshot(snapshot, RUN, SMALL)
        self.chunk_bytes = chunk_bytes
        self.faults = faults
        self.requests = 0
        self.mutated_manifest = False

    def state_bytes(self) -> bytes:
        return state_bytes(self.snapshot)

    def layout(self) -> list[tuple[str, torch.dtype, tuple[int, ...]]]:
        return [(name, t.dtype, tuple(t.shape)) for name, t in self.snapshot.tensors.items()]

    def respond(self, raw_request: bytes) -> FakeCall:
        req = pb.StateRequest.FromString(raw_request)
        faults = self.faults.get(self.requests, [])
        self.requests += 1
        enc = self.encoded
        if req.run_id != RUN or (req.expect_sha256 and req.expect_sha256 != enc.sha256):
            return FakeCall([], "FAILED_PRECONDITION")
        if req.HasField("round_id") and req.round_id != enc.round_id:
            return FakeCall([], "NOT_FOUND")
        start, end = req.offset, enc.total_bytes if req.length == 0 else req.offset + req.length
        if start > enc.total_bytes or end > enc.total_bytes:
            return FakeCall([], "OUT_OF_RANGE")
        if req.manifest_only or start >= end:
            replies = [_frame(enc.manifest, start, [])]
        else:
            plan = list(_chunk_plan(enc.views, self.chunk_bytes, start, end))
            replies = [
                _frame(enc.manifest if i == 0 else None, offset, pieces) for i, (offset, pieces) in enumerate(plan)
            ]
        end_with = "OK"
        for fault in faults:
            end_with = self._apply(fault, replies) or end_with
        return FakeCall(replies, end_with)

    def _apply(self, fault: tuple, replies: list[bytes]) -> str | None:
        kind, i, arg = fault
        if kind in ("UNAVAILABLE", "NOT_FOUND", "stall"):
            del replies[i % (len(replies) + 1):]
            return kind
        if not replies:
            return None
        i %= len(replies)
        self.mutated_manifest |= i == 0 and kind in ("flip", "cut", "replace")
        if kind == "flip" and replies[i]:
            pos = arg % len(replies[i])
            replies[i] = replies[i][:pos] + bytes([replies[i][pos] ^ (arg % 255 + 1)]) + replies[i][pos + 1:]
        elif kind == "cut":
            replies[i] = replies[i][: arg % (len(replies[i]) + 1)]
        elif kind == "drop":
            del replies[i]
        elif kind == "repeat":
            replies.insert(i, replies[i])
        elif kind == "swap":
            j = arg % len(replies)
            replies[i], replies[j] = replies[j], replies[i]
        elif kind == "replace":
            replies[i] = pb.StateChunk(offset=arg, data=bytes(arg % 64)).SerializeToString()
        return None


class FakeTransport:
    """The parts of collectives.net.transport.Transport a fetch uses, serving from FakeDonors."""

    class _Counters:
        def count_sent(self, address: str, nbytes: int) -> None:
            pass

    def __init__(self, donors: dict[str, FakeDonor]) -> None:
        self.donors = donors
        self.counters = self._Counters()
        self.fetch_chunk_bytes = 0  # the donors' own chunk size, as a Transport's until a fetch stalls

    def channel(self, address: str):
        donor = self.donors[address]

        class Channel:
            def unary_stream(self, method, request_serializer, response_deserializer):
                return lambda raw, timeout: donor.respond(raw)

        return Channel()

    async def note_received(self, sender: str, nbytes: int) -> None:
        pass

    async def run_cpu(self, fn, *args):
        return fn(*args)


@st.composite
def snapshots(draw, round_id: int) -> StateSnapshot:
    """A small state of a few tensors of any allowed dtype (up to ~55 KB: up to 14 blocks of 4 KB)."""
    names = draw(st.lists(st.text(min_size=1, max_size=3), min_size=0, max_size=4, unique=True))
    seed = draw(st.integers(0, 1 << 16))
    g = torch.Generator().manual_seed(seed)
    tensors = {}
    for name in names:
        dtype = getattr(torch, draw(st.sampled_from(DTYPES)))
        shape = draw(st.lists(st.integers(0, 12), max_size=3))
        itemsize = torch.empty((), dtype=dtype).element_size()
        size = (math.prod(shape) * itemsize,)
        raw = torch.randint(0, 2 if dtype == torch.bool else 256, size, generator=g, dtype=torch.uint8)
        tensors[name] = raw.view(dtype).reshape(shape)
    return StateSnapshot(round_id=round_id, tensors=tensors, meta={"seed": seed})


FAULTS = st.lists(
    st.tuples(
        st.sampled_from(["flip", "cut", "drop", "repeat", "swap", "replace", "UNAVAILABLE", "NOT_FOUND", "stall"]),
        st.integers(0, 8),
        st.integers(0, 1 << 16),
    ),
    max_size=2,
)


def state_bytes(snapshot: StateSnapshot) -> bytes:
    return b"".join(bytes(t.contiguous().view(-1).view(torch.uint8).numpy()) for t in snapshot.tensors.values())


async def fetch(data: st.DataObject) -> None:
    honest = data.draw(snapshots(7), label="state")
    donors: dict[str, FakeDonor] = {}
    clean = True
    for k in range(data.draw(st.integers(1, 3), label="donors")):
        lies = data.draw(st.booleans(), label=f"donor {k} lies")
        snapshot = data.draw(snapshots(7), label=f"donor {k} state") if lies else honest
        faults = data.draw(st.dictionaries(st.integers(0, 4), FAULTS, max_size=2), label=f"donor {k} faults")
        chunk_bytes = data.draw(st.sampled_from([1024, 3000, 5000]), label="chunk bytes")
        donors[f"d{k}:1"] = FakeDonor(snapshot, chunk_bytes, faults)
        clean &= not lies and not any(faults.values())
    expect = data.draw(st.sampled_from(["none", "digest", "round", "both"]), label="expect")
    expected = ExpectedState(
        round_id=7 if expect in ("round", "both") else 0,
        sha256_hex=state_digest(honest) if expect in ("digest", "both") else "",
    )
    result_of_round = data.draw(st.sampled_from([0, 0, 0, 7, 8]), label="result of round")
    stripe_blocks = data.draw(st.integers(1, 4), label="stripe blocks")
    config = dataclasses.replace(SMALL, timeout_s=10, stall_timeout_s=0.02, max_stripe_blocks=stripe_blocks)
    transport = FakeTransport(donors)
    try:
        async with asyncio.timeout(30):
            got = await fetch_state_async(transport, list(donors), RUN, "joiner", config, result_of_round, expected)
    except StateSyncError:
        assert not (clean and result_of_round in (0, 7)), "a fetch from honest donors over clean streams failed"
        return
    got_bytes = state_bytes(got)
    assert got.report is not None and got.report.total_bytes == len(got_bytes)
    assert sum(got.report.bytes_by_source.values()) == got.report.total_bytes
    if expected.sha256_hex:
        assert got_bytes == state_bytes(honest), "a fetch returned other bytes than the expected state's"
    # Whichever donor's manifest was taken, the bytes are that donor's state, verified block by block;
    # unless a manifest was mutated, so are the tensors' names, dtypes and shapes.
    sources = [d for d in donors.values() if d.state_bytes() == got_bytes]
    assert sources, "a fetch returned bytes no donor holds"
    if not any(d.mutated_manifest for d in donors.values()):
        layout = [(name, t.dtype, tuple(t.shape)) for name, t in got.tensors.items()]
        assert any(layout == d.layout() for d in sources)


@pytest.mark.fuzz_weight(2)
def test_fetch_returns_the_expected_state_or_refuses_with_state_sync_error(fuzz):
    fuzz.run(lambda data: asyncio.run(fetch(data)), st.data())
