"""A peer's Session stream to the coordinator: Heartbeat, Quorum and Commit as messages on one stream.

Each message is a call of its own: answered by id in any order, refused with the status its unary call would
get, charged to the client's rate, and (with a run secret) bound to the credential the stream opened with.
The coordinators are real (CoordinatorThread: gRPC on 127.0.0.1, an OS-chosen port); the peers are made-up
ones speaking the protocol from this test's own event loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from collectives.membership.client import MembershipClient, MembershipConfig
from collectives.membership.coordinatorerrors import RETRY_CODES
from collectives.membership.session import (
    RETRY_AFTER_MS,
    SESSION_METHOD,
    CoordinatorSession,
    SessionUnsupported,
    broken_stream,
    rpc_error,
)
from collectives.net.credentials import CallAuth
from collectives.net.rpc import COORDINATOR_SETTINGS, RpcSecurity, call_metadata, make_channel
from collectives.net.transport import Transport
from collectives.net.transportconfig import TransportConfig
from peer.coordinator.config import CoordinatorConfig
from peer.coordinator.limits import CoordinatorLimits
from peer.coordinator.server import CoordinatorServer
from peer.coordinator.thread import CoordinatorThread
from protos import membership_pb2 as pb
from protos import membership_pb2_grpc as pb_grpc

pytestmark = pytest.mark.timeout(60)

RUN = "sessions"
SECRET = b"correct horse battery staple 42"


def config(**settings) -> CoordinatorConfig:
    defaults = {
        "run_id": RUN, "port": 0, "dashboard_port": None, "probe_peers": False, "startup_grace_s": 0.0,
        "lease_s": 30.0, "join_timeout_s": 0.5, "min_peers": 2,
    }
    return CoordinatorConfig(**{**defaults, **settings})


@pytest.fixture
def coordinator() -> Iterator[CoordinatorThread]:
    with CoordinatorThread(config()) as c:
        yield c


def run(coro):
    return asyncio.run(asyncio.wait_for(coro, 30))


async def join(channel: grpc.aio.Channel, address: str, auth: CallAuth | None = None) -> str:
    request = pb.JoinRequest(run_id=RUN, address=address, has_state=True)
    if auth is not None:
        request.public_key = auth.public_key
    reply = await pb_grpc.CoordinatorStub(channel).Join(request, timeout=10)
    if auth is not None:
        auth.adopt(reply.credential)
    return reply.peer_id


def heartbeat(peer_id: str) -> pb.HeartbeatRequest:
    return pb.HeartbeatRequest(run_id=RUN, peer_id=peer_id)


def quorum(peer_id: str, last_round: int = 0) -> pb.QuorumRequest:
    return pb.QuorumRequest(run_id=RUN, peer_id=peer_id, last_round=last_round)


def commit(peer_id: str, answer: pb.QuorumResponse) -> pb.CommitRequest:
    return pb.CommitRequest(run_id=RUN, peer_id=peer_id, round_id=answer.round_id, epoch=answer.epoch, ok=True)


class Peer:
    """A made-up peer: its own channel (TCP connection) and Session."""

    def __init__(self, address: str, auth: CallAuth | None = None) -> None:
        self.channel = make_channel(address, COORDINATOR_SETTINGS, own_connection=True, auth=auth)
        self.session = CoordinatorSession(lambda: self.channel, lambda method: call_metadata(auth, method, address))
        self.auth = auth
        self.peer_id = ""

    async def join(self, address: str) -> Peer:
        self.peer_id = await join(self.channel, address, self.auth)
        return self

    async def close(self) -> None:
        await self.session.close()
        await self.channel.close()


def test_a_round_goes_over_one_session_stream_per_peer(coordinator):
    async def scenario():
        a = await Peer(coordinator.address).join("10.0.0.1:1")
        b = await Peer(coordinator.address).join("10.0.0.2:1")
        try:
            assert (await a.session.call("Heartbeat", heartbeat(a.peer_id), 5)).known
            plans = await asyncio.gather(*(p.session.call("Quorum", quorum(p.peer_id), 10) for p in (a, b)))
            assert [p.action for p in plans] == [pb.QuorumResponse.ROUND] * 2
            assert sorted(p.rank for p in plans) == [0, 1]
            decisions = await asyncio.gather(
                *(p.session.call("Commit", commit(p.peer_id, plan), 10) for p, plan in zip((a, b), plans))
            )
            assert [d.commit for d in decisions] == [True, True]
            return a.session.opened, b.session.opened
        finally:
            await a.close()
            await b.close()

    assert run(scenario()) == (1, 1)
    assert coordinator.status()["summary"]["rounds_committed"] == 1


def test_a_heartbeat_is_answered_while_a_quorum_waits_on_the_same_stream(coordinator):
    async def scenario():
        a = await Peer(coordinator.address).join("10.0.0.1:1")
        b = await Peer(coordinator.address).join("10.0.0.2:1")
        try:
            waiting = asyncio.ensure_future(a.session.call("Quorum", quorum(a.peer_id), 10))
            beat = await a.session.call("Heartbeat", heartbeat(a.peer_id), 5)
            assert beat.known and not waiting.done()  # min_peers is 2: the quorum waits for b
            other = await b.session.call("Quorum", quorum(b.peer_id), 10)
            return (await waiting).round_id, other.round_id
        finally:
            await a.close()
            await b.close()

    assert run(scenario()) == (1, 1)


def test_a_refusal_on_a_session_is_the_error_its_own_call_gets(coordinator):
    async def scenario():
        a = await Peer(coordinator.address).join("10.0.0.1:1")
        unknown_round = pb.CommitRequest(run_id=RUN, peer_id=a.peer_id, round_id=7, epoch=0, ok=True)
        try:
            with pytest.raises(grpc.aio.AioRpcError) as unary:
                await pb_grpc.CoordinatorStub(a.channel).Commit(unknown_round, timeout=5)
            with pytest.raises(grpc.aio.AioRpcError) as streamed:
                await a.session.call("Commit", unknown_round, 5)
            return unary.value, streamed.value
        finally:
            await a.close()

    unary, streamed = run(scenario())
    assert streamed.code() == unary.code() == grpc.StatusCode.NOT_FOUND
    assert streamed.details() == unary.details() == "round 7 at epoch 0 is unknown to this coordinator"


def test_each_message_is_charged_to_the_clients_rate_and_a_refusal_says_when_to_retry():
    limits = CoordinatorLimits(call_rate_per_s=0.5, call_burst=2)

    async def scenario(address: str):
        a = await Peer(address).join("10.0.0.1:1")
        try:
            # Opening the stream spends one token and the first heartbeat the other: the second is refused.
            assert (await a.session.call("Heartbeat", heartbeat(a.peer_id), 5)).known
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                await a.session.call("Heartbeat", heartbeat(a.peer_id), 5)
            return refused.value
        finally:
            await a.close()

    with CoordinatorThread(config(limits=limits)) as coordinator:
        refused = run(scenario(coordinator.address))
        assert coordinator.status()["rate_limited"] == {"Heartbeat": 1}
    assert refused.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert refused.details().startswith("rate limited: this coordinator allows 0.5 coordinator calls other than Join")
    # A token comes back every 2 s at 0.5/s.
    wait_ms = int(dict(refused.trailing_metadata())[RETRY_AFTER_MS])
    assert 1900 <= wait_ms <= 2000


def test_a_quorum_past_its_deadline_is_dropped_and_can_be_asked_again_on_the_same_stream(coordinator):
    async def scenario():
        a = await Peer(coordinator.address).join("10.0.0.1:1")
        b = await Peer(coordinator.address).join("10.0.0.2:1")
        try:
            with pytest.raises(grpc.aio.AioRpcError) as late:
                await a.session.call("Quorum", quorum(a.peer_id), 0.3)
            again = asyncio.ensure_future(a.session.call("Quorum", quorum(a.peer_id), 10))
            other = await b.session.call("Quorum", quorum(b.peer_id), 10)
            return late.value.code(), (await again).round_id, other.round_id, a.session.opened
        finally:
            await a.close()
            await b.close()

    assert run(scenario()) == (grpc.StatusCode.DEADLINE_EXCEEDED, 1, 1, 1)


def test_a_quorum_call_that_gave_up_is_not_counted_in_the_round_formed_after_it(coordinator):
    async def waiters() -> list[str]:
        pending = coordinator.server.coordinator.quorums.pending
        return sorted(pending.waiting) if pending is not None else []

    async def scenario():
        a = await Peer(coordinator.address).join("10.0.0.1:1")
        b = await Peer(coordinator.address).join("10.0.0.2:1")
        try:
            with pytest.raises(grpc.aio.AioRpcError):
                await a.session.call("Quorum", quorum(a.peer_id), 0.3)
            # The client's cancel reaches the coordinator on its own: wait for it rather than guess how long.
            while await asyncio.to_thread(coordinator.call, waiters()):
                await asyncio.sleep(0.01)
            with pytest.raises(grpc.aio.AioRpcError) as alone:
                await b.session.call("Quorum", quorum(b.peer_id), 1.0)
            return alone.value.code()
        finally:
            await a.close()
            await b.close()

    # Two members are needed and only b is asking: no round forms (before, a's stale waiter made it a member).
    assert run(scenario()) == grpc.StatusCode.DEADLINE_EXCEEDED
    assert coordinator.status()["summary"]["rounds_committed"] == 0


async def raw_session(address: str, messages: list[bytes]) -> grpc.aio.AioRpcError:
    """Open a Session stream, send messages as they are, and return the status it ends with."""
    async with grpc.aio.insecure_channel(address) as channel:
        stream = channel.stream_stream(SESSION_METHOD, request_serializer=bytes, response_deserializer=bytes)()
        for message in messages:
            await stream.write(message)
        with pytest.raises(grpc.aio.AioRpcError) as ended:
            while await stream.read() is not grpc.aio.EOF:
                pass
            await stream  # ended without an error: fails the raises
        return ended.value


@pytest.mark.parametrize(
    "messages, why",
    [
        ([b"\xff\xff\xff"], "malformed SessionCall"),
        ([pb.SessionCall(call_id=1).SerializeToString()], "SessionCall 1 carries no call"),
        (
            [pb.SessionCall(call_id=1, quorum=pb.QuorumRequest(run_id=RUN, peer_id="p")).SerializeToString()] * 2,
            "call id 1 is already in flight",
        ),
    ],
    ids=["not a SessionCall", "no call", "call id twice"],
)
def test_a_message_that_breaks_the_protocol_ends_the_stream(coordinator, messages, why):
    async def scenario():
        if len(messages) == 2:  # a quorum that waits: a known peer, and nobody else yet
            async with grpc.aio.insecure_channel(coordinator.address) as channel:
                peer_id = await join(channel, "10.0.0.1:1")
            raw = pb.SessionCall(call_id=1, quorum=quorum(peer_id)).SerializeToString()
            return await raw_session(coordinator.address, [raw, raw])
        return await raw_session(coordinator.address, messages)

    ended = run(scenario())
    assert ended.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert why in ended.details()


async def waiting_quorum(peer: Peer) -> asyncio.Future:
    """peer's Quorum call, waiting on the coordinator (min_peers is 2 and nobody else asks)."""
    waiting = asyncio.ensure_future(peer.session.call("Quorum", quorum(peer.peer_id), 10))
    await asyncio.sleep(0.2)
    assert not waiting.done()
    return waiting


def test_a_reset_stream_cancels_its_calls_and_the_next_call_opens_another(coordinator):
    async def scenario():
        a = await Peer(coordinator.address).join("10.0.0.1:1")
        try:
            waiting = await waiting_quorum(a)
            await a.session.reset()
            with pytest.raises(grpc.aio.AioRpcError) as cut:
                await waiting
            beat = await a.session.call("Heartbeat", heartbeat(a.peer_id), 5)
            return cut.value.code(), beat.known, a.session.opened
        finally:
            await a.close()

    assert run(scenario()) == (grpc.StatusCode.CANCELLED, True, 2)


def test_a_coordinator_that_stops_fails_the_calls_on_its_streams_with_a_code_the_client_retries():
    async def scenario(coordinator: CoordinatorThread):
        a = await Peer(coordinator.address).join("10.0.0.1:1")
        try:
            waiting = await waiting_quorum(a)
            await asyncio.get_running_loop().run_in_executor(None, coordinator.close)
            with pytest.raises(grpc.aio.AioRpcError) as gone:
                await waiting
            return gone.value.code()
        finally:
            await a.close()

    assert run(scenario(CoordinatorThread(config()))) in RETRY_CODES


def test_a_coordinator_that_stops_ends_its_open_streams_itself_so_grpc_logs_no_error(caplog):
    async def scenario(coordinator: CoordinatorThread):
        a = await Peer(coordinator.address).join("10.0.0.1:1")
        try:
            assert (await a.session.call("Heartbeat", heartbeat(a.peer_id), 5)).known
            with caplog.at_level(logging.ERROR):
                await asyncio.get_running_loop().run_in_executor(None, coordinator.close)
        finally:
            await a.close()

    run(scenario(CoordinatorThread(config())))
    # gRPC cancelled a stream still open at its grace's end, and logged "Exception not handled by
    # _handle_exceptions in servicer method [.../Session]" with a CancelledError traceback for each.
    assert [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR] == []


class BrokenStream:
    """An open Session stream whose writes fail as gRPC core fails a write that a killed coordinator interrupts."""

    def __init__(self) -> None:
        self.cancelled = False

    async def write(self, raw: bytes) -> None:
        raise rpc_error(grpc.StatusCode.INTERNAL, "Internal error from Core")

    def done(self) -> bool:
        return True

    def cancel(self) -> None:
        self.cancelled = True


def test_a_write_that_a_killed_coordinator_interrupts_fails_the_call_with_a_code_the_client_retries():
    async def scenario():
        session = CoordinatorSession(lambda: None)
        session._stream = BrokenStream()
        with pytest.raises(grpc.aio.AioRpcError) as broke:
            await session.call("Heartbeat", heartbeat("p"), 5)
        return broke.value.code(), broke.value.details()

    assert run(scenario()) == (grpc.StatusCode.UNAVAILABLE, "the Session stream broke (Internal error from Core)")


@pytest.mark.parametrize(
    ("code", "retried_as"),
    [
        (grpc.StatusCode.INTERNAL, grpc.StatusCode.UNAVAILABLE),
        (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.UNAVAILABLE),
        (grpc.StatusCode.CANCELLED, grpc.StatusCode.CANCELLED),
        (grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.RESOURCE_EXHAUSTED),
        (grpc.StatusCode.PERMISSION_DENIED, grpc.StatusCode.PERMISSION_DENIED),
    ],
)
def test_only_grpc_cores_internal_on_an_open_stream_is_read_as_a_broken_stream(code, retried_as):
    assert broken_stream(rpc_error(code, "x")).code() == retried_as


@contextlib.asynccontextmanager
async def older_coordinator(quorum_answer: pb.QuorumResponse):
    """A coordinator without Session streams that answers every Quorum call with quorum_answer; a membership client
    (peer id p1) of it."""

    async def quorum_rpc(raw: bytes, context) -> bytes:
        return quorum_answer.SerializeToString()

    server = grpc.aio.server()
    service = pb.DESCRIPTOR.services_by_name["Coordinator"].full_name
    handler = grpc.unary_unary_rpc_method_handler(quorum_rpc, request_deserializer=bytes, response_serializer=bytes)
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(service, {"Quorum": handler}),))
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    address = f"127.0.0.1:{port}"
    client = MembershipClient(Transport(TransportConfig()), MembershipConfig(address, RUN))
    client.peer_id = "p1"
    try:
        yield client
    finally:
        await client.close()
        await client.transport.channel(address).close()
        await server.stop(0)


@pytest.mark.parametrize(("run_step", "round_step", "known"), [(57, 50, (57, 50)), (0, 0, (3, 1))])
def test_a_resync_answer_gives_the_client_the_runs_step_unless_the_coordinator_is_older(run_step, round_step, known):
    answer = pb.QuorumResponse(action=pb.QuorumResponse.RESYNC, last_committed_round=5, sync_from="10.0.0.1:1",
                               run_step=run_step, round_step=round_step)

    async def scenario():
        async with older_coordinator(answer) as client:
            client.run_step, client.round_step = 3, 1  # what its last heartbeat said
            plan = await client.quorum(0, timeout_s=5)
            return plan.action, (client.run_step, client.round_step)

    assert run(scenario()) == ("resync", known)


def test_a_peer_talking_to_a_coordinator_without_sessions_sends_calls_of_their_own():
    """An older coordinator: no Session method (UNIMPLEMENTED); the membership client asks with a unary call."""
    answer = pb.QuorumResponse(action=pb.QuorumResponse.ROUND, round_id=3, members=[
        pb.Member(peer_id="p1", address="10.0.0.1:1")
    ])

    async def scenario():
        async with older_coordinator(answer) as client:
            plan = await client.quorum(0, timeout_s=5)
            with pytest.raises(SessionUnsupported):
                await client.session.call("Quorum", quorum("p1"), 5)
            return plan.round_id, client.session.supported

    assert run(scenario()) == (3, False)


# -- how many streams one client address may hold ------------------------------------------------------------


@pytest.fixture
def two_sessions_per_client() -> Iterator[CoordinatorThread]:
    with CoordinatorThread(config(limits=CoordinatorLimits(sessions_per_client=2))) as c:
        yield c


def test_one_client_address_holds_at_most_its_cap_of_streams_and_a_closed_one_frees_its_place(
    two_sessions_per_client,
):
    address = two_sessions_per_client.address
    limits = two_sessions_per_client.server.rate_limits

    async def scenario():
        a, b, c = [await Peer(address).join(f"10.0.0.{i}:1") for i in (1, 2, 3)]
        try:
            for p in (a, b):
                assert (await p.session.call("Heartbeat", heartbeat(p.peer_id), 5)).known
            with pytest.raises(SessionUnsupported) as refused:
                await c.session.call("Heartbeat", heartbeat(c.peer_id), 5)
            await a.close()
            while limits.open_sessions() > 1:  # the coordinator sees the stream end a moment later
                await asyncio.sleep(0.01)
            again = await Peer(address).join("10.0.0.4:1")
            try:
                known = (await again.session.call("Heartbeat", heartbeat(again.peer_id), 5)).known
            finally:
                await again.close()
            return str(refused.value), known
        finally:
            for p in (b, c):
                await p.close()

    refused, known = run(scenario())
    assert "too many Session streams" in refused and "2 open Session streams per client address" in refused
    assert "--sessions-per-client" in refused
    assert known, "once a stream closed, the address had room for another"
    assert limits.counts() == {"Session": 1}


def test_a_peer_refused_a_stream_for_its_address_sends_its_calls_on_their_own(two_sessions_per_client):
    address = two_sessions_per_client.address

    async def scenario():
        held = [await Peer(address).join(f"10.0.0.{i}:1") for i in (1, 2)]
        client = MembershipClient(Transport(TransportConfig()), MembershipConfig(address, RUN))
        try:
            for p in held:
                await p.session.call("Heartbeat", heartbeat(p.peer_id), 5)
            client.peer_id = await join(client.transport.channel(address), "10.0.0.3:1")
            beat = await client._send("Heartbeat", heartbeat(client.peer_id), 5)
            return beat.known, client.session.supported
        finally:
            await client.close()
            await client.transport.channel(address).close()
            for p in held:
                await p.close()

    assert run(scenario()) == (True, False)


# -- with a run secret: the stream is bound to the credential it opened with ----------------------------


@pytest.fixture
def secured(tmp_path: Path) -> Iterator[CoordinatorThread]:
    token = tmp_path / "run.token"
    token.write_bytes(SECRET)
    token.chmod(0o600)
    with CoordinatorThread(config(security=RpcSecurity(token_file=str(token)))) as c:
        yield c


def test_a_session_cannot_speak_for_another_peer_than_its_credentials(secured):
    async def scenario():
        a = await Peer(secured.address, CallAuth(SECRET, RUN)).join("10.0.0.1:1")
        b = await Peer(secured.address, CallAuth(SECRET, RUN)).join("10.0.0.2:1")
        try:
            with pytest.raises(grpc.aio.AioRpcError) as forged:
                await b.session.call("Heartbeat", heartbeat(a.peer_id), 5)
            own = await a.session.call("Heartbeat", heartbeat(a.peer_id), 5)
            return forged.value, own.known
        finally:
            await a.close()
            await b.close()

    forged, known = run(scenario())
    assert forged.code() == grpc.StatusCode.UNAUTHENTICATED
    assert "not" in forged.details()
    assert known
    assert secured.status()["refusals"]["forged-identity"] == 1


def test_a_session_the_coordinator_ends_leaves_no_task_behind_with_a_run_secret(secured):
    # grpc.aio feeds an intercepted request stream through a task of its own, which stayed pending when the other
    # side ended the call (asyncio then logged "Task was destroyed but it is pending!" at collection): the stream
    # carries its credential as call metadata instead, and has no such task.
    async def scenario():
        a = await Peer(secured.address, CallAuth(SECRET, RUN)).join("10.0.0.1:1")
        b = await Peer(secured.address, CallAuth(SECRET, RUN)).join("10.0.0.2:1")
        try:
            with pytest.raises(grpc.aio.AioRpcError):
                await b.session.call("Heartbeat", heartbeat(a.peer_id), 5)  # forged: the coordinator ends the stream
            await asyncio.sleep(0.1)
            return [t for t in asyncio.all_tasks() if "request_iterator" in repr(t.get_coro())]
        finally:
            await a.close()
            await b.close()

    assert run(scenario()) == []


def test_a_session_without_the_runs_secret_is_refused_as_it_opens(secured):
    async def scenario():
        outsider = Peer(secured.address)
        try:
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                await outsider.session.call("Heartbeat", heartbeat("p1"), 5)
            return refused.value.code()
        finally:
            await outsider.close()

    assert run(scenario()) == grpc.StatusCode.UNAUTHENTICATED
    assert secured.status()["refusals"] == {"unauthenticated": 1}


def test_the_coordinator_has_room_for_a_session_per_peer_besides_its_calls():
    """Each live peer holds its Session stream (one RPC) while it is in the run."""
    server = CoordinatorServer(config(max_peers=2500))
    assert server.settings.max_concurrent_rpcs == COORDINATOR_SETTINGS.max_concurrent_rpcs + 2500


class _OpenStream:
    """A Session stream that takes every write and is never answered."""

    async def write(self, raw: bytes) -> None:
        pass

    def done(self) -> bool:
        return True


def test_a_call_cancelled_as_its_session_stream_opens_ends_cancelled():
    # Python 3.11's asyncio.wait_for returned the open stream here and dropped the cancellation: a heartbeat task
    # cancelled at that moment beat on, and its peer's close waited 30 s for it.
    async def main() -> None:
        session = CoordinatorSession(channel=lambda: None)
        caller: asyncio.Task | None = None

        async def connect() -> None:
            caller.cancel()  # the cancellation arrives as the stream opens
            session._stream = _OpenStream()

        session._connect = connect
        caller = asyncio.get_running_loop().create_task(session.call("Heartbeat", pb.HeartbeatRequest(), 5.0))
        with pytest.raises(asyncio.CancelledError):
            await caller

    asyncio.run(main())
