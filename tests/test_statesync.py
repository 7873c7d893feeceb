"""State sync over real gRPC on 127.0.0.1: round trips, limits, hostile servers, pacing, threading."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import math
import socket
import threading

import grpc
import pytest
import torch

from collectives.net.rpc import method_handlers
from collectives.net.transport import Transport
from collectives.net.transportconfig import TransportConfig
from collectives.statesync import (
    FETCH_METHOD,
    SERVICE,
    StateServer,
    StateSnapshot,
    StateSyncConfig,
    StateSyncError,
    StateSyncStalled,
    fetch_state,
    fetch_state_async,
    state_digest,
)
from collectives.statesync import fetch as statefetch
from protos import state_pb2 as pb

pytestmark = pytest.mark.timeout(60)

RUN = "run-a"


@pytest.fixture
def transports():
    """Factory of started Transports (with optional handlers) that closes them all after the test."""
    made: list[Transport] = []

    def make(handlers=(), **options) -> Transport:
        t = Transport(TransportConfig(**options))
        made.append(t)
        t.start(handlers)
        return t

    yield make
    for t in made:
        t.close()


@pytest.fixture
def serve():
    """serve(provider, ...) -> the address of a started StateServer; closes them all after the test."""
    made: list[Transport] = []

    def make(provider, run_id: str = RUN, config: StateSyncConfig = StateSyncConfig(), **options) -> str:
        t = Transport(TransportConfig(**options))
        made.append(t)
        return t.start(StateServer(t, run_id, provider, config).handlers())

    yield make
    for t in made:
        t.close()


def mixed_snapshot() -> StateSnapshot:
    g = torch.Generator().manual_seed(0)
    tensors = {
        "layer.weight": torch.randn(17, 33, generator=g),
        "layer.bias": torch.randn(33, generator=g, dtype=torch.float64),
        "half": torch.randn(5, 3, generator=g).to(torch.float16),
        "brain": torch.randn(7, 11, generator=g).to(torch.bfloat16),
        "step": torch.tensor(123456789012, dtype=torch.int64),
        "mask": torch.rand(13, generator=g) > 0.5,
        "i32": torch.arange(-5, 6, dtype=torch.int32),
        "i16": torch.arange(-3, 4, dtype=torch.int16).reshape(7, 1),
        "i8": torch.tensor([-128, 0, 127], dtype=torch.int8),
        "u8": torch.arange(0, 256, dtype=torch.uint8),
        "empty": torch.empty(0, 4),
    }
    meta = {"outer_lr": 0.7, "momentum": 0.9, "steps": 500, "strategy": "diloco", "nested": {"a": [1, 2, None]}}
    return StateSnapshot(round_id=42, tensors=tensors, meta=meta)


def assert_same(a: StateSnapshot, b: StateSnapshot) -> None:
    assert a.round_id == b.round_id
    assert a.meta == b.meta
    assert list(a.tensors) == list(b.tensors)
    for name in a.tensors:
        x, y = a.tensors[name], b.tensors[name]
        assert x.dtype == y.dtype and x.shape == y.shape, name
        assert torch.equal(x, y), name


# -- behaviour of an honest server --------------------------------------------------------------


def test_mixed_dtypes_and_meta_round_trip_exactly(serve, transports):
    snap = mixed_snapshot()
    address = serve(lambda: snap)
    got = fetch_state(transports(), address, RUN, peer_id="joiner")
    assert_same(snap, got)
    assert state_digest(got) == state_digest(snap)


def test_tensors_spanning_small_chunks_arrive_aligned_writable_and_independent(serve, transports):
    # Odd sizes and 1 KiB chunks: chunks cross tensor boundaries and byte offsets are misaligned on the wire.
    snap = StateSnapshot(
        round_id=3,
        tensors={
            "flag": torch.tensor([True, False, True]),
            "a": torch.arange(1001, dtype=torch.float32),
            "b": torch.arange(3, dtype=torch.int8),
            "c": torch.arange(777, dtype=torch.float64),
            "d": torch.tensor(2.5, dtype=torch.bfloat16),
        },
        meta={},
    )
    config = StateSyncConfig(chunk_bytes=1024)
    address = serve(lambda: snap, config=config)
    got = fetch_state(transports(), address, RUN, config=config)
    assert_same(snap, got)
    for name, t in got.tensors.items():
        assert t.data_ptr() % t.element_size() == 0, name
    got.tensors["a"].add_(1)
    got.tensors["b"].fill_(9)
    assert torch.equal(got.tensors["a"], snap.tensors["a"] + 1)
    assert torch.equal(got.tensors["c"], snap.tensors["c"])  # neighbours untouched
    assert torch.equal(got.tensors["flag"], snap.tensors["flag"])


def test_hundred_megabyte_state_transfers(serve, transports):
    big = torch.rand(25_000_000)  # 100 MB of float32
    snap = StateSnapshot(round_id=1, tensors={"big": big, "step": torch.tensor(1)}, meta={"k": 1})
    address = serve(lambda: snap)
    got = fetch_state(transports(), address, RUN)
    assert torch.equal(got.tensors["big"], big)
    assert state_digest(got) == state_digest(snap)


def test_provider_returning_none_means_no_state(serve, transports):
    address = serve(lambda: None)
    with pytest.raises(StateSyncError, match="no state"):
        fetch_state(transports(), address, RUN)


def test_wrong_run_id_is_refused(serve, transports):
    address = serve(lambda: mixed_snapshot(), run_id="other-run")
    with pytest.raises(StateSyncError, match="FAILED_PRECONDITION.*other-run") as info:
        fetch_state(transports(), address, RUN)
    assert address in str(info.value)


def test_a_wrong_run_id_is_echoed_at_most_100_characters(serve, transports):
    address = serve(lambda: mixed_snapshot(), run_id="other-run")
    with pytest.raises(StateSyncError) as info:
        fetch_state(transports(), address, "x" * 5000)
    assert "x" * 100 in str(info.value) and "x" * 101 not in str(info.value)


def test_invalid_snapshot_from_provider_is_reported(serve, transports):
    address = serve(lambda: StateSnapshot(round_id=1, tensors={"x": torch.zeros(2)}, meta={"lr": math.nan}))
    with pytest.raises(StateSyncError, match="could not snapshot"):
        fetch_state(transports(), address, RUN)


def test_unreachable_address_fails_within_timeout(transports):
    # A socket bound but not listening: connections are refused and nobody else can take the port.
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        address = f"127.0.0.1:{sock.getsockname()[1]}"
        with pytest.raises(StateSyncError, match="UNAVAILABLE") as info:
            fetch_state(transports(), address, RUN, config=StateSyncConfig(timeout_s=10))
    assert address in str(info.value)


@pytest.mark.parametrize("codec_threads", [2, 0])
def test_provider_is_called_once_per_request_off_the_loop(transports, codec_threads):
    calls: list[tuple[int, str]] = []

    def provider() -> StateSnapshot:
        calls.append((threading.get_ident(), threading.current_thread().name))
        return mixed_snapshot()

    server_transport = Transport(TransportConfig(codec_threads=codec_threads))
    server = StateServer(server_transport, RUN, provider)
    try:
        address = server_transport.start(server.handlers())

        async def ident() -> int:
            return threading.get_ident()

        loop_thread = server_transport.submit(ident()).result()
        client = transports()
        fetch_state(client, address, RUN)
        fetch_state(client, address, RUN)
    finally:
        server_transport.close()
    assert len(calls) == 2
    for thread_id, name in calls:
        assert thread_id != loop_thread and thread_id != threading.get_ident()
        assert name.startswith("loconet-codec") or not codec_threads


def test_concurrent_fetches_beyond_the_limit_are_refused(serve, transports):
    entered, release = threading.Event(), threading.Event()

    def provider() -> StateSnapshot:
        entered.set()
        release.wait(20)
        return mixed_snapshot()

    address = serve(provider, config=StateSyncConfig(max_concurrent_fetches=1))
    client = transports()
    first = client.submit(fetch_state_async(client, address, RUN))
    try:
        assert entered.wait(20)
        with pytest.raises(StateSyncError, match="RESOURCE_EXHAUSTED"):
            fetch_state(client, address, RUN)
    finally:
        release.set()
    assert_same(mixed_snapshot(), first.result(timeout=30))


def test_bandwidth_cap_paces_and_counts_the_fetch(serve, transports):
    snap = StateSnapshot(round_id=5, tensors={"x": torch.rand(1 << 20)}, meta={})  # 4 MiB
    nbytes = 4 << 20
    address = serve(lambda: snap, bandwidth_bps=400e6)
    client = transports(bandwidth_bps=400e6)
    before = client.counters.bytes_received
    got = fetch_state(client, address, RUN)
    assert torch.equal(got.tensors["x"], snap.tensors["x"])
    assert client.counters.bytes_received - before >= nbytes
    assert client.counters.received_from[address] >= nbytes


def test_after_a_stall_a_slow_link_gets_the_state_in_messages_that_each_arrive_in_time(serve, transports):
    # A 1 MiB message took 42 s at 200 kbit/s, longer than the 30 s stall timeout: a joiner behind such a link
    # dropped every source, every time, and never got the state. Here: 256 KiB at 400 kbit/s, a 2 s stall timeout.
    snap = StateSnapshot(round_id=5, tensors={"x": torch.rand(1 << 16)}, meta={})
    address = serve(lambda: snap, bandwidth_bps=400e3)
    client = transports()
    config = StateSyncConfig(stall_timeout_s=2.0, min_link_bps=200e3)  # 25 kB messages: 0.5 s each at 400 kbit/s
    with pytest.raises(StateSyncError, match="no data for 2 s"):
        fetch_state(client, address, RUN, config=config)  # one whole-state message: it stalls
    assert client.fetch_chunk_bytes == 25_000
    # Fetched again, as a joiner does: the source's link may still carry the abandoned message for a while.
    for _ in range(3):
        with contextlib.suppress(StateSyncError):
            got = fetch_state(client, address, RUN, config=config)
            break
    assert torch.equal(got.tensors["x"], snap.tensors["x"])
    # That fetch measured its link (at most 400 kbit/s): messages grow only as far as such a link carries in time.
    assert 25_000 <= client.fetch_chunk_bytes <= config.asked_chunk_bytes(link_bps=400e3)


def test_a_fetch_that_crosses_a_fast_link_brings_back_the_sources_own_message_size(serve, transports):
    # A source that stalled once on a fast link made every later fetch of this peer ask for small messages.
    snap = StateSnapshot(round_id=5, tensors={"x": torch.rand(1 << 20)}, meta={})  # 4 MiB
    address = serve(lambda: snap)
    client = transports()
    client.fetch_chunk_bytes = 16 << 10  # as after a stall
    got = fetch_state(client, address, RUN)
    assert torch.equal(got.tensors["x"], snap.tensors["x"])
    assert client.fetch_chunk_bytes == 0


@pytest.mark.parametrize(("config", "streams", "size"), [
    # Half of the shorter stall timeout (a source's 15 s here) at 200 kbit/s, shared by the fetch's streams.
    (StateSyncConfig(stall_timeout_s=30.0, min_link_bps=200e3), 1, 187_500),
    (StateSyncConfig(stall_timeout_s=30.0, min_link_bps=200e3), 4, 46_875),
    (StateSyncConfig(stall_timeout_s=3.0, min_link_bps=200e3), 1, 37_500),  # a result fetch's
    (StateSyncConfig(stall_timeout_s=0.1, min_link_bps=200e3), 1, 16 << 10),  # the floor
    (StateSyncConfig(stall_timeout_s=600.0, serve_stall_timeout_s=600.0, min_link_bps=1e9), 1, 1 << 20),  # the chunk
])
def test_after_a_stall_a_fetch_asks_for_messages_that_cross_its_slowest_link_in_half_the_stall_timeout(
    config, streams, size
):
    assert config.asked_chunk_bytes(streams) == size


def test_a_measured_link_sizes_the_messages_as_the_slowest_link_does():
    config = StateSyncConfig(stall_timeout_s=30.0, min_link_bps=200e3)
    assert config.asked_chunk_bytes(2, link_bps=800e3) == 4 * config.asked_chunk_bytes(2) == 375_000


# -- hostile servers -------------------------------------------------------------------------------


def _identity(data: bytes) -> bytes:
    return data


def raw_server(transports, messages, then_wait: bool = False) -> str:
    """A FetchState server that streams the given serialised messages (then, optionally, hangs)."""

    async def handler(request: bytes, context):
        for message in messages:
            yield message
        if then_wait:
            await asyncio.sleep(3600)

    method = grpc.unary_stream_rpc_method_handler(
        handler, request_deserializer=_identity, response_serializer=_identity
    )
    return transports([method_handlers(SERVICE, {"FetchState": method})]).address


def manifest_for(data: bytes, **overrides) -> pb.StateManifest:
    fields = dict(
        run_id=RUN,
        round_id=1,
        tensors=[pb.TensorEntry(name="x", dtype="uint8", shape=[len(data)], nbytes=len(data))],
        meta_json="{}",
        total_bytes=len(data),
        sha256=hashlib.sha256(data).digest(),
    )
    fields.update(overrides)
    return pb.StateManifest(**fields)


def chunk(offset: int = 0, data: bytes = b"", manifest: pb.StateManifest | None = None) -> bytes:
    return pb.StateChunk(manifest=manifest, offset=offset, data=data).SerializeToString()


DATA = bytes(range(256)) * 8  # 2048 bytes


def fetch_from(transports, address: str, config: StateSyncConfig = StateSyncConfig(timeout_s=20)) -> StateSnapshot:
    return fetch_state(transports(), address, RUN, config=config)


def test_protobuf_encoded_stream_from_another_implementation_is_accepted(transports):
    messages = [chunk(manifest=manifest_for(DATA)), chunk(0, DATA[:1000]), chunk(1000, DATA[1000:])]
    address = raw_server(transports, messages)
    got = fetch_from(transports, address)
    assert bytes(got.tensors["x"].numpy()) == DATA


def test_hash_mismatch_is_rejected(transports):
    bad = manifest_for(DATA, sha256=hashlib.sha256(b"something else").digest())
    address = raw_server(transports, [chunk(manifest=bad), chunk(0, DATA)])
    with pytest.raises(StateSyncError, match="SHA-256"):
        fetch_from(transports, address)


def test_oversized_manifest_is_refused_before_any_data_or_allocation(transports, monkeypatch):
    huge = 1 << 50
    allocations: list[int] = []
    real = statefetch._Receiver

    def spy(layout):
        allocations.append(layout.buffer_bytes)
        return real(layout)

    monkeypatch.setattr(statefetch, "_Receiver", spy)
    entry = pb.TensorEntry(name="x", dtype="uint8", shape=[huge], nbytes=huge)
    m = manifest_for(b"", tensors=[entry], total_bytes=huge)
    # The server sends the manifest and then hangs: the error must come from the manifest alone.
    address = raw_server(transports, [chunk(manifest=m)], then_wait=True)
    with pytest.raises(StateSyncError, match="max_state_bytes") as info:
        fetch_from(transports, address)
    assert "DEADLINE" not in str(info.value)
    assert allocations == []


def test_unknown_dtype_is_rejected(transports):
    m = manifest_for(DATA, tensors=[pb.TensorEntry(name="x", dtype="complex64", shape=[256], nbytes=2048)])
    address = raw_server(transports, [chunk(manifest=m), chunk(0, DATA)])
    with pytest.raises(StateSyncError, match="dtype 'complex64'"):
        fetch_from(transports, address)


def test_shape_that_does_not_match_nbytes_is_rejected(transports):
    m = manifest_for(DATA, tensors=[pb.TensorEntry(name="x", dtype="float32", shape=[2048], nbytes=2048)])
    address = raw_server(transports, [chunk(manifest=m), chunk(0, DATA)])
    with pytest.raises(StateSyncError, match="does not make 2048 bytes"):
        fetch_from(transports, address)


def test_empty_tensor_with_overflowing_dims_is_rejected(transports):
    m = manifest_for(b"", tensors=[pb.TensorEntry(name="x", dtype="float32", shape=[0, 1 << 62, 4], nbytes=0)])
    address = raw_server(transports, [chunk(manifest=m)])
    with pytest.raises(StateSyncError, match="invalid shape"):
        fetch_from(transports, address)


def test_duplicate_tensor_names_are_rejected(transports):
    entry = pb.TensorEntry(name="x", dtype="uint8", shape=[1024], nbytes=1024)
    address = raw_server(transports, [chunk(manifest=manifest_for(DATA, tensors=[entry, entry])), chunk(0, DATA)])
    with pytest.raises(StateSyncError, match="repeats"):
        fetch_from(transports, address)


def test_skipped_offset_is_rejected(transports):
    messages = [chunk(manifest=manifest_for(DATA)), chunk(0, DATA[:1000]), chunk(1500, DATA[1500:])]
    address = raw_server(transports, messages)
    with pytest.raises(StateSyncError, match="offset 1500, expected 1000"):
        fetch_from(transports, address)


def test_more_data_than_announced_is_rejected(transports):
    messages = [chunk(manifest=manifest_for(DATA)), chunk(0, DATA[:1000]), chunk(1000, DATA[1000:] + b"extra")]
    address = raw_server(transports, messages)
    with pytest.raises(StateSyncError, match="past the announced 2048 bytes"):
        fetch_from(transports, address)


def test_stream_ending_early_is_rejected(transports):
    address = raw_server(transports, [chunk(manifest=manifest_for(DATA)), chunk(0, DATA[:1000])])
    with pytest.raises(StateSyncError, match="1000 of 2048 bytes"):
        fetch_from(transports, address)


def test_repeated_manifest_is_rejected(transports):
    m = manifest_for(DATA)
    address = raw_server(transports, [chunk(manifest=m), chunk(0, DATA[:1000]), chunk(1000, DATA[1000:], manifest=m)])
    with pytest.raises(StateSyncError, match="manifest repeated"):
        fetch_from(transports, address)


def test_garbage_chunk_is_rejected(transports):
    address = raw_server(transports, [b"\xff\xff\xff"])
    with pytest.raises(StateSyncError, match="malformed StateChunk"):
        fetch_from(transports, address)


def test_source_that_stops_sending_is_given_up_after_the_stall_timeout(transports):
    address = raw_server(transports, [chunk(manifest=manifest_for(DATA)), chunk(0, DATA[:1000])], then_wait=True)
    config = StateSyncConfig(timeout_s=600, stall_timeout_s=0.5)
    # Its only source stalled: the caller may fetch again with a longer stall timeout (a slow, busy link).
    with pytest.raises(StateSyncStalled, match="no data for 0.5 s"):
        fetch_from(transports, address, config)


def test_a_fetch_whose_source_refuses_fails_as_a_plain_state_sync_error(serve, transports):
    address = serve(lambda: None)  # it holds no state: it refuses at once
    with pytest.raises(StateSyncError, match="no state") as info:
        fetch_state(transports(), address, RUN, config=StateSyncConfig(timeout_s=20, stall_timeout_s=0.5))
    assert type(info.value) is StateSyncError


def test_a_fetch_whose_sources_stalled_and_refused_is_not_a_stall(serve, transports):
    # Only when every source stalled is a longer stall timeout worth a try.
    stalls = raw_server(transports, [], then_wait=True)
    refuses = serve(lambda: None)
    config = StateSyncConfig(timeout_s=20, stall_timeout_s=0.5)
    with pytest.raises(StateSyncError, match="no data for 0.5 s.*no state") as info:
        fetch_state(transports(), [stalls, refuses], RUN, config=config)
    assert type(info.value) is StateSyncError


@pytest.mark.timeout(120)
def test_fetches_their_clients_cancel_mid_stream_end_without_a_grpc_error(serve, transports, caplog):
    # A client that stops and cancels its fetches (the harness's stall event, a joiner killed mid-fetch): the
    # server's next write to each cancelled call failed inside gRPC core, and gRPC logged "ExecuteBatchError raised
    # in core by servicer method [.../FetchState]" with a traceback for it. Such a fetch ended early, as a
    # cancelled one does.
    caplog.set_level(logging.ERROR, logger="grpc")
    snap = StateSnapshot(round_id=1, tensors={"big": torch.rand(4_000_000)}, meta={})
    address = serve(lambda: snap, config=StateSyncConfig(chunk_bytes=64 << 10, max_concurrent_fetches=64,
                                                          max_fetches_per_client=64))
    client = transports()
    request = pb.StateRequest(run_id=RUN, peer_id="quitter").SerializeToString()

    async def open_read_once_and_cancel() -> None:
        calls = [client.channel(address).unary_stream(FETCH_METHOD, request_serializer=_identity,
                                                      response_deserializer=_identity)(request, timeout=60)
                 for _ in range(20)]
        await calls[0].read()
        await asyncio.sleep(1)  # every fetch is under way, unread: the server's writes wait for the client's window
        for call in calls:
            call.cancel()
        await asyncio.sleep(2)  # the server's handlers meet the cancelled calls

    for _ in range(3):
        client.submit(open_read_once_and_cancel()).result(timeout=60)
    assert [r.getMessage() for r in caplog.records if r.name.startswith("grpc")] == []
