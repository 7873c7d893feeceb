"""Pinned snapshots, byte ranges and striped fetches from several donors (real gRPC on 127.0.0.1)."""

from __future__ import annotations

import dataclasses
import hashlib
import threading
import time

import grpc
import pytest
import torch

from collectives.net.rpc import identity
from collectives.net.transport import Transport
from collectives.net.transportconfig import TransportConfig
from collectives.reduce.results import ResultStore
from collectives.statesync import (
    FETCH_METHOD,
    MAX_BLOCK_BYTES,
    MIN_BLOCK_BYTES,
    ExpectedState,
    StateMismatch,
    StateServer,
    StateSnapshot,
    StateSyncConfig,
    StateSyncError,
    fetch_state,
    fetch_state_async,
    manifest_digest,
    state_digest,
)
from collectives.statesync import format as stateformat
from protos import state_pb2 as pb

pytestmark = pytest.mark.timeout(120)

RUN = "run-s"
BLOCK = 64 << 10
# Small blocks and stripes so that a few megabytes make many of each.
CFG = StateSyncConfig(block_bytes=BLOCK, chunk_bytes=16 << 10, max_stripe_blocks=4, timeout_s=60, stall_timeout_s=10)


def make_state(round_id: int, nbytes: int = 2 << 20, seed: int = 0) -> StateSnapshot:
    """A deterministic state of about nbytes whose bytes depend on round_id and seed (odd sizes on purpose)."""
    g = torch.Generator().manual_seed(round_id * 1000 + seed)
    floats = torch.rand(nbytes // 4 - 3, generator=g)
    return StateSnapshot(
        round_id=round_id,
        tensors={"w": floats, "tail": torch.randint(0, 255, (9,), dtype=torch.uint8, generator=g)},
        meta={"round": round_id},
    )


def raw_bytes(snapshot: StateSnapshot) -> bytes:
    return b"".join(stateformat._tensor_bytes(t).tobytes() for t in snapshot.tensors.values())


def assert_same(a: StateSnapshot, b: StateSnapshot) -> None:
    assert a.round_id == b.round_id and a.meta == b.meta and list(a.tensors) == list(b.tensors)
    for name in a.tensors:
        assert torch.equal(a.tensors[name], b.tensors[name]), name


@pytest.fixture
def net():
    """Factories of started donors (StateServer + Transport) and clients; everything is closed after the test."""
    made: list[Transport] = []

    class Net:
        def donor(
            self, provider, config: StateSyncConfig = CFG, results=None, **options
        ) -> tuple[str, StateServer, Transport]:
            t = Transport(TransportConfig(**options))
            server = StateServer(t, RUN, provider, config, results=results)
            made.append(t)
            return t.start(server.handlers()), server, t

        def client(self, **options) -> Transport:
            t = Transport(TransportConfig(**options))
            made.append(t)
            t.start(())
            return t

    yield Net()
    for t in made:
        t.close()


async def raw_fetch(client: Transport, address: str, **fields) -> tuple[pb.StateManifest, bytes]:
    """One FetchState call read to its end: (manifest, the data bytes in order)."""
    request = pb.StateRequest(run_id=RUN, **fields).SerializeToString()
    call = client.channel(address).unary_stream(
        FETCH_METHOD, request_serializer=identity, response_deserializer=identity
    )
    manifest, data = None, bytearray()
    async for raw in call(request, timeout=30):
        m, _, chunk = stateformat._parse_chunk(raw)
        if m is not None:
            manifest = pb.StateManifest.FromString(bytes(m))
        data += chunk
    return manifest, bytes(data)


def open_unread(client: Transport, address: str, **fields) -> grpc.aio.UnaryStreamCall:
    """Open a FetchState call that nobody reads (flow control then blocks the server's writes)."""

    async def start() -> grpc.aio.UnaryStreamCall:
        request = pb.StateRequest(run_id=RUN, **fields).SerializeToString()
        method = client.channel(address).unary_stream(
            FETCH_METHOD, request_serializer=identity, response_deserializer=identity
        )
        return method(request, timeout=60)

    return client.submit(start()).result()


def wait_until(condition, timeout_s: float = 30.0) -> None:
    give_up = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < give_up, "condition not reached in time"
        time.sleep(0.01)


# -- pins and ranges ----------------------------------------------------------------------------------


def test_a_pinned_round_is_served_after_the_provider_moved_on(net):
    current = {"round": 5}
    address, server, _ = net.donor(lambda: make_state(current["round"]))
    client = net.client()
    assert fetch_state(client, address, RUN, config=CFG).round_id == 5
    current["round"] = 6
    got = fetch_state(client, address, RUN, config=CFG, expect=ExpectedState(round_id=5))
    assert_same(got, make_state(5))
    # A stripe of round 5 too, although the provider is at round 6.
    manifest, data = client.submit(raw_fetch(client, address, round_id=5, offset=BLOCK, length=3 * BLOCK)).result()
    assert manifest.round_id == 5 and data == raw_bytes(make_state(5))[BLOCK : 4 * BLOCK]
    assert fetch_state(client, address, RUN, config=CFG).round_id == 6
    assert server.pinned_rounds() == [5, 6]


@pytest.mark.parametrize(
    ("fields", "start", "end"),
    [
        ({}, 0, None),
        ({"offset": BLOCK, "length": BLOCK}, BLOCK, 2 * BLOCK),
        ({"offset": 3 * BLOCK}, 3 * BLOCK, None),
        ({"offset": 100, "length": 7}, 100, 107),
        ({"manifest_only": True}, 0, 0),
    ],
)
def test_a_range_request_streams_exactly_those_bytes_after_the_manifest(net, fields, start, end):
    snapshot = make_state(3)
    address, _, _ = net.donor(lambda: snapshot)
    client = net.client()
    manifest, data = client.submit(raw_fetch(client, address, **fields)).result()
    assert manifest.round_id == 3 and manifest_digest(manifest) == state_digest(snapshot)
    assert manifest.block_bytes == BLOCK and len(manifest.block_sha256) == -(-manifest.total_bytes // BLOCK)
    assert data == raw_bytes(snapshot)[start:end]


@pytest.mark.parametrize(
    ("fields", "code", "words"),
    [
        ({"round_id": 2}, grpc.StatusCode.NOT_FOUND, "no longer holds round 2"),
        ({"expect_sha256": hashlib.sha256(b"other").digest()}, grpc.StatusCode.FAILED_PRECONDITION, "not the expected"),
        ({"offset": 3 << 20}, grpc.StatusCode.OUT_OF_RANGE, "of a state of"),
        ({"offset": 10, "length": 3 << 20}, grpc.StatusCode.OUT_OF_RANGE, "of a state of"),
    ],
)
def test_requests_a_donor_cannot_serve_are_refused_with_a_reason(net, fields, code, words):
    address, _, _ = net.donor(lambda: make_state(3))
    client = net.client()
    with pytest.raises(grpc.aio.AioRpcError) as info:
        client.submit(raw_fetch(client, address, **fields)).result()
    assert info.value.code() == code and words in info.value.details()


def test_fetches_of_the_current_round_share_one_snapshot_when_the_caller_names_it(net):
    calls = []

    def provider() -> StateSnapshot:
        calls.append(1)
        return make_state(4)

    t = Transport(TransportConfig())
    server = StateServer(t, RUN, provider, CFG, current_round=lambda: 4)
    try:
        address = t.start(server.handlers())
        for _ in range(3):
            assert_same(fetch_state(net.client(), address, RUN, config=CFG), make_state(4))
    finally:
        t.close()
    assert len(calls) == 1


def test_a_donor_whose_provider_is_at_another_round_refuses_without_a_snapshot(net):
    calls = []
    t = Transport(TransportConfig())
    server = StateServer(t, RUN, lambda: calls.append(1) or make_state(4), CFG, current_round=lambda: 4)
    try:
        address = t.start(server.handlers())
        client = net.client()
        with pytest.raises(grpc.aio.AioRpcError, match="no longer holds round 3"):
            client.submit(raw_fetch(client, address, round_id=3, manifest_only=True)).result()
    finally:
        t.close()
    assert calls == []


def test_an_idle_pin_is_dropped_after_its_grace_period(net):
    address, server, _ = net.donor(lambda: make_state(8), StateSyncConfig(block_bytes=BLOCK, pin_grace_s=0.2))
    fetch_state(net.client(), address, RUN)
    assert server.pinned_rounds() in ([8], [])  # within its grace period, unless that already ended
    wait_until(lambda: server.pinned_rounds() == [])
    wait_until(lambda: not server._pins)  # the copy itself is freed too


def test_with_every_pin_in_use_another_round_is_refused_and_the_current_state_is_the_newest_pin(net):
    current = {"round": 5}
    config = StateSyncConfig(block_bytes=BLOCK, max_pinned=1, serve_stall_timeout_s=60, timeout_s=30)
    address, server, _ = net.donor(lambda: make_state(current["round"], 16 << 20), config)
    holder, client = net.client(), net.client()
    call = open_unread(holder, address)  # keeps round 5's pin in use
    wait_until(lambda: server.pinned_rounds() == [5])
    current["round"] = 6
    with pytest.raises(grpc.aio.AioRpcError) as info:
        client.submit(raw_fetch(client, address, round_id=6, manifest_only=True)).result()
    assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and "pinned snapshots" in info.value.details()
    assert server.refused == 1
    assert fetch_state(client, address, RUN, config=config).round_id == 5

    async def cancel() -> None:
        call.cancel()

    holder.submit(cancel()).result()
    wait_until(lambda: server._active == 0)
    assert fetch_state(client, address, RUN, config=config).round_id == 6
    assert server.pinned_rounds() == [6]


# -- striped fetches -------------------------------------------------------------------------------------


def test_a_fetch_from_three_donors_takes_stripes_from_each(net):
    snapshot = make_state(9)
    addresses = [net.donor(lambda: snapshot)[0] for _ in range(3)]
    got = fetch_state(net.client(), addresses, RUN, "joiner", CFG)
    assert_same(got, snapshot)
    report = got.report
    assert report.round_id == 9 and report.total_bytes == len(raw_bytes(snapshot))
    assert set(report.bytes_by_source) == set(addresses) and all(n > 0 for n in report.bytes_by_source.values())
    assert sum(report.bytes_by_source.values()) == report.total_bytes
    assert report.retried_blocks == 0 and report.discarded_bytes == 0


def test_donors_whose_metadata_differs_serve_stripes_of_the_same_bytes(net):
    def with_meta(name: str) -> StateSnapshot:
        snapshot = make_state(9)
        snapshot.meta = {"peer": name}  # per-peer counters differ; the tensors do not
        return snapshot

    first, _, _ = net.donor(lambda: with_meta("a"))
    second, _, _ = net.donor(lambda: with_meta("b"))
    got = fetch_state(net.client(), [first, second], RUN, config=CFG)
    assert got.meta == {"peer": "a"} and set(got.report.bytes_by_source) == {first, second}
    assert state_digest(got) == state_digest(make_state(9))


def test_a_donor_killed_mid_fetch_leaves_its_verified_blocks_and_the_others_finish(net):
    snapshot = make_state(11, 6 << 20)
    donors = [net.donor(lambda: snapshot, bandwidth_bps=16e6) for _ in range(3)]
    (first, first_server, first_transport), addresses = donors[0], [d[0] for d in donors]
    client = net.client()
    future = client.submit(fetch_state_async(client, addresses, RUN, "joiner", CFG))
    wait_until(lambda: first_server.bytes_served >= 1 << 20)
    first_transport.close(grace_s=0)
    got = future.result(timeout=60)
    assert_same(got, snapshot)
    report = got.report
    assert report.bytes_by_source[first] > 0  # what it verified before dying was kept
    assert sum(report.bytes_by_source.values()) == report.total_bytes  # every block verified exactly once
    # Only the killed donor's unfinished stripe was thrown away and fetched again.
    assert report.discarded_bytes < CFG.max_stripe_blocks * BLOCK
    assert report.retried_blocks <= CFG.max_stripe_blocks


def test_a_donor_with_another_state_of_the_round_serves_none_of_it(net):
    honest, other = make_state(12), make_state(12, seed=1)
    good, _, _ = net.donor(lambda: honest)
    divergent, _, _ = net.donor(lambda: other)
    got = fetch_state(net.client(), [good, divergent], RUN, config=CFG)
    assert_same(got, honest)
    assert divergent not in got.report.bytes_by_source
    assert got.report.retried_blocks >= 1  # the stripe it had claimed went to the honest donor


def corrupting(server: StateServer) -> None:
    """Make server flip one byte of every data chunk it sends (its manifest stays right)."""
    real = server._messages

    async def messages(*args):
        async for message in real(*args):
            _, _, data = stateformat._parse_chunk(message)
            yield message[:-1] + bytes([message[-1] ^ 1]) if len(data) else message  # data is the last field

    server._messages = messages


def test_a_donor_sending_corrupt_blocks_is_dropped_and_its_blocks_come_from_the_others(net):
    snapshot = make_state(13)
    a, _, _ = net.donor(lambda: snapshot)
    liar, liar_server, _ = net.donor(lambda: snapshot)
    corrupting(liar_server)
    b, _, _ = net.donor(lambda: snapshot)
    got = fetch_state(net.client(), [a, liar, b], RUN, config=CFG)
    assert_same(got, snapshot)
    assert liar not in got.report.bytes_by_source and got.report.retried_blocks >= 1


def test_a_fetch_fails_naming_the_donor_and_its_bad_block_when_no_donor_is_left(net):
    liar, liar_server, _ = net.donor(lambda: make_state(13))
    corrupting(liar_server)
    with pytest.raises(StateSyncError, match=r"block 0 \(bytes 0-65536\) does not match its SHA-256") as info:
        fetch_state(net.client(), liar, RUN, config=CFG)
    assert liar in str(info.value)


@pytest.mark.parametrize(
    ("expect", "words"),
    [
        (ExpectedState(round_id=6), "no longer holds round 6"),
        (ExpectedState(round_id=5, sha256_hex=hashlib.sha256(b"x").hexdigest()), "not the expected"),
        (ExpectedState(sha256_hex=hashlib.sha256(b"x").hexdigest()), "not the expected"),
    ],
)
def test_a_donor_without_the_expected_state_is_refused_as_a_mismatch(net, expect, words):
    address, _, _ = net.donor(lambda: make_state(5))
    with pytest.raises(StateMismatch, match=words) as info:
        fetch_state(net.client(), address, RUN, config=CFG, expect=expect)
    assert info.value.source == address and address in str(info.value)


def test_the_next_donor_serves_when_the_first_holds_another_state(net):
    wanted = make_state(5)
    stale, _, _ = net.donor(lambda: make_state(4))
    good, _, _ = net.donor(lambda: wanted)
    expect = ExpectedState(5, state_digest(wanted))
    got = fetch_state(net.client(), [stale, good], RUN, config=CFG, expect=expect)
    assert_same(got, wanted)
    assert set(got.report.bytes_by_source) == {good}


def test_a_paced_fetch_slower_than_the_rounds_returns_its_rounds_exact_state(net):
    current = {"round": 1}
    calls = []
    stop = threading.Event()

    def provider() -> StateSnapshot:
        round_id = current["round"]
        calls.append(round_id)
        return make_state(round_id, 4 << 20)

    def rounds() -> None:  # a new round every 20 ms while the fetch takes about a second
        while not stop.wait(0.02):
            current["round"] += 1

    address, _, _ = net.donor(provider, bandwidth_bps=32e6)
    ticker = threading.Thread(target=rounds, daemon=True)
    ticker.start()
    try:
        got = fetch_state(net.client(), address, RUN, config=CFG)
    finally:
        stop.set()
        ticker.join()
    assert current["round"] > got.round_id  # the run moved on while the joiner fetched
    assert_same(got, make_state(got.round_id, 4 << 20))
    assert len(calls) == 1  # every stripe came from the one pinned snapshot


def test_a_recent_rounds_result_is_fetched_in_one_stream(net):
    t = Transport(TransportConfig())
    result = StateSnapshot(round_id=3, tensors={"result": torch.arange(1000, dtype=torch.float32)}, meta={"tag": "g"})
    server = StateServer(t, RUN, lambda: None, CFG, results=lambda r: result if r == 3 else None)
    try:
        address = t.start(server.handlers())
        client = net.client()
        got = client.submit(fetch_state_async(client, address, RUN, "late", CFG, result_of_round=3)).result()
        assert_same(got, result)
        with pytest.raises(StateSyncError, match="NOT_FOUND.*does not keep the result of round 4"):
            client.submit(fetch_state_async(client, address, RUN, "late", CFG, result_of_round=4)).result()
    finally:
        t.close()


def test_a_result_asked_before_this_member_commits_its_round_is_served_once_it_does(net):
    store = ResultStore(keep=2)
    store.keep(3, "g", torch.zeros(1000))
    address, server, _ = net.donor(lambda: None, results=store.snapshot)
    client = net.client()
    pending = client.submit(fetch_state_async(client, address, RUN, "late", CFG, result_of_round=4))
    wait_until(lambda: server._active == 1)  # the request is in and waits for round 4's commit
    value = torch.arange(1000, dtype=torch.float32)
    store.keep(4, "g", value)
    server.result_kept()
    got = pending.result(timeout=30)
    assert got.round_id == 4 and torch.equal(got.tensors["result"], value)


def test_a_request_waiting_for_a_commit_looks_again_when_a_result_is_kept_and_not_before(net):
    store = ResultStore(keep=2)
    store.keep(3, "g", torch.zeros(1000))
    looks: list[int] = []

    def results(round_id: int) -> StateSnapshot | None:
        looks.append(round_id)
        return store.snapshot(round_id)

    config = dataclasses.replace(CFG, result_wait_s=60)  # no look in between would come from the deadline
    address, server, _ = net.donor(lambda: None, config, results=results)
    client = net.client()
    pending = client.submit(fetch_state_async(client, address, RUN, "late", config, result_of_round=4))
    wait_until(lambda: looks == [4])
    store.keep(4, "g", torch.ones(1000))
    server.result_kept()
    assert pending.result(timeout=30).round_id == 4
    assert looks == [4, 4]


def test_a_result_not_committed_within_result_wait_s_is_not_found(net):
    store = ResultStore(keep=2)
    store.keep(3, "g", torch.zeros(1000))
    config = dataclasses.replace(CFG, result_wait_s=0.1)
    address, _, _ = net.donor(lambda: None, config, results=store.snapshot)
    client = net.client()
    with pytest.raises(StateSyncError, match="NOT_FOUND.*does not keep the result of round 4"):
        client.submit(fetch_state_async(client, address, RUN, "late", config, result_of_round=4)).result(timeout=30)


# -- bounded serving ---------------------------------------------------------------------------------


def test_an_unread_fetch_is_cancelled_after_the_stall_timeout_and_frees_its_slot(net):
    config = StateSyncConfig(block_bytes=BLOCK, serve_stall_timeout_s=0.5, max_concurrent_fetches=1, timeout_s=30)
    snapshot = make_state(2, 32 << 20)  # far more than the connection's flow-control windows hold
    address, server, _ = net.donor(lambda: snapshot, config)
    idle = net.client()
    call = open_unread(idle, address)
    wait_until(lambda: server.stalled_out == 1)
    assert server._active == 0
    assert_same(fetch_state(net.client(), address, RUN, config=config), snapshot)
    with pytest.raises(grpc.aio.AioRpcError) as info:  # the idle client, reading at last, learns why

        async def drain() -> None:
            async for _ in call:
                pass

        idle.submit(drain()).result(timeout=30)
    assert info.value.code() == grpc.StatusCode.ABORTED and "serve_stall_timeout_s" in info.value.details()


def test_a_connection_beyond_its_fetch_cap_is_refused_while_others_are_served(net):
    entered, release = threading.Event(), threading.Event()

    def provider() -> StateSnapshot:
        entered.set()
        release.wait(30)
        return make_state(1)

    address, server, _ = net.donor(provider, StateSyncConfig(block_bytes=BLOCK, max_fetches_per_client=1))
    client = net.client()
    first = client.submit(fetch_state_async(client, address, RUN, "j1", CFG))
    other = None
    try:
        assert entered.wait(30)
        # The same connection is the same client, whatever peer id it claims.
        with pytest.raises(StateSyncError, match="RESOURCE_EXHAUSTED: .* already has 1 state fetches"):
            fetch_state(client, address, RUN, "j2", CFG)
        second = net.client()
        other = second.submit(fetch_state_async(second, address, RUN, "j1", CFG))
    finally:
        release.set()
    assert_same(first.result(timeout=60), make_state(1))
    assert_same(other.result(timeout=60), make_state(1))
    assert server.refused == 1


# -- manifest checks (pure) -----------------------------------------------------------------------------


def encoded_manifest(nbytes: int = 5 * BLOCK + 7, block_bytes: int = BLOCK) -> pb.StateManifest:
    snapshot = StateSnapshot(1, {"x": torch.arange(nbytes, dtype=torch.uint8)}, {})
    config = StateSyncConfig(block_bytes=block_bytes)
    return pb.StateManifest.FromString(stateformat._encode_snapshot(snapshot, RUN, config).manifest)


def _blocks(m: pb.StateManifest, hashes: list[bytes]) -> None:
    del m.block_sha256[:]
    m.block_sha256.extend(hashes)


@pytest.mark.parametrize(
    ("change", "problem"),
    [
        (lambda m: setattr(m, "block_bytes", MIN_BLOCK_BYTES - 1), "outside"),
        (lambda m: setattr(m, "block_bytes", MAX_BLOCK_BYTES + 1), "outside"),
        (lambda m: setattr(m, "block_bytes", 2 * BLOCK), "6 block hashes .* expected 3"),
        (lambda m: _blocks(m, list(m.block_sha256)[:-1]), "5 block hashes .* expected 6"),
        (lambda m: _blocks(m, [*m.block_sha256, bytes(32)]), "7 block hashes .* expected 6"),
        (lambda m: _blocks(m, [*list(m.block_sha256)[:-1], bytes(31)]), "not 32 bytes"),
        (lambda m: _blocks(m, [bytes(32)] * 6) or setattr(m, "block_bytes", 0), "outside"),
    ],
)
def test_a_manifest_with_inconsistent_blocks_is_rejected(change, problem):
    m = encoded_manifest()
    change(m)
    with pytest.raises(ValueError, match=problem):
        stateformat._check_manifest(m, RUN, StateSyncConfig())


@pytest.mark.parametrize(
    ("manifest", "problem"),
    [
        # One block covers the whole state, so its hash must be the state's digest.
        (lambda: _with(encoded_manifest(100), block_sha256=[bytes(32)]), "only block's hash differs"),
        (lambda: _with(encoded_manifest(0), sha256=bytes(32)), "no bytes"),
    ],
)
def test_a_manifest_whose_block_hashes_contradict_its_digest_is_rejected(manifest, problem):
    with pytest.raises(ValueError, match=problem):
        stateformat._check_manifest(manifest(), RUN, StateSyncConfig())


def _with(m: pb.StateManifest, **fields) -> pb.StateManifest:
    for name, value in fields.items():
        if name == "block_sha256":
            _blocks(m, value)
        else:
            setattr(m, name, value)
    return m


@pytest.mark.parametrize(
    ("nbytes", "block_bytes", "blocks"),
    [
        (0, BLOCK, 0),
        (1, BLOCK, 1),
        (BLOCK, BLOCK, 1),
        (BLOCK + 1, BLOCK, 2),
        (10 * MIN_BLOCK_BYTES, MIN_BLOCK_BYTES, 10),
    ],
)
def test_a_consistent_manifest_announces_one_hash_per_block(nbytes, block_bytes, blocks):
    layout = stateformat._check_manifest(encoded_manifest(nbytes, block_bytes), RUN, StateSyncConfig())
    assert (layout.block_bytes, layout.blocks, layout.total_bytes) == (block_bytes, blocks, nbytes)


def test_a_manifest_without_block_hashes_is_one_block_verified_by_its_digest():
    m = encoded_manifest(3 * BLOCK)
    m.block_bytes = 0
    del m.block_sha256[:]
    layout = stateformat._check_manifest(m, RUN, StateSyncConfig())
    assert layout.blocks == 1 and layout.block_sha256 == [m.sha256] and layout.block_bytes == 3 * BLOCK


@pytest.mark.parametrize("value", [{"round_id": -1}, {"sha256_hex": "abc"}, {"sha256_hex": "G" * 64}])
def test_an_expected_state_must_be_a_round_and_a_hex_digest(value):
    with pytest.raises(ValueError):
        ExpectedState(**value)
