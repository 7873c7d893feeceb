"""Run credentials on every RPC, and peer ids bound to them (issue 13, items 1 and 3).

Every call of a run with a secret proves it (an HMAC over run id, peer id, method and time); a call with no
credential, a wrong secret, or another run's credential is refused UNAUTHENTICATED before its handler runs, and
nothing is registered, kept or applied. A joined peer's calls also carry the credential the coordinator issued it
(its peer id bound to its key) and are signed with that key: another peer of the run cannot speak as it.
The servers are real (gRPC on 127.0.0.1, OS-chosen ports); the callers are made-up peers with their own keys.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
import torch

from collectives.allreduce import Collective
from collectives.errors import ConfigError, Unauthenticated
from collectives.net.credentials import (
    AUTH_KEY,
    MAX_CLOCK_SKEW_S,
    CallAuth,
    ForeignCredential,
    Issuer,
    call_mac,
    check_run_auth,
    load_secret,
    verify_caller,
)
from collectives.net.rpc import RpcSecurity, blocking_channel, health_check, identity
from collectives.net.transport import Transport
from collectives.net.transportconfig import TransportConfig
from collectives.reduce.round import ABORT_METHOD, PUSH_METHOD, STAT_METHOD
from collectives.statesync.format import FETCH_METHOD, StateSnapshot
from collectives.statesync.server import StateServer
from peer.coordinator.config import CoordinatorConfig
from peer.coordinator.thread import CoordinatorThread
from protos import collective_pb2 as cpb
from protos import membership_pb2 as pb
from protos import membership_pb2_grpc as pb_grpc
from protos import state_pb2 as spb

pytestmark = pytest.mark.timeout(120)

RUN = "secured"
SECRET = b"correct horse battery staple 42"
COORDINATOR_METHODS = ("Join", "Heartbeat", "Leave", "Quorum", "Commit", "Status")


def coordinator_method(name: str) -> str:
    return f"/{pb.DESCRIPTOR.services_by_name['Coordinator'].full_name}/{name}"


# -- the run-secret proof (pure) -----------------------------------------------------------------


def proof(secret: bytes, run_id: str, peer_id: str, method: str, ts_ms: int) -> list[tuple[str, str]]:
    return [(AUTH_KEY, f"v1 {ts_ms} {peer_id} {call_mac(secret, run_id, peer_id, method, ts_ms)}")]


NOW_MS = 1_800_000_000_000


@pytest.mark.parametrize(
    "metadata, why",
    [
        ([], "needs a credential"),
        ([(AUTH_KEY, "v1 1 p1")], "malformed"),
        ([(AUTH_KEY, f"v2 {NOW_MS} p1 {'0' * 64}")], "malformed"),
        ([(AUTH_KEY, f"v1 soon p1 {'0' * 64}")], "malformed"),
        (proof(b"another secret of the same run!", RUN, "p1", "/m", NOW_MS), "wrong credential"),
        (proof(SECRET, "another-run", "p1", "/m", NOW_MS), "wrong credential"),
        (proof(SECRET, RUN, "p1", "/another-method", NOW_MS), "wrong credential"),
        (proof(SECRET, RUN, "p1", "/m", NOW_MS - int(MAX_CLOCK_SKEW_S * 1000) - 1), "clock"),
        (proof(SECRET, RUN, "p1", "/m", NOW_MS + int(MAX_CLOCK_SKEW_S * 1000) + 1), "clock"),
        # Signed with the secret, but a time no clock has (it overflowed the clock check: OverflowError).
        (proof(SECRET, RUN, "p1", "/m", 10**400), "malformed"),
        ([(AUTH_KEY, f"v1 -5 p1 {'0' * 64}")], "malformed"),
        ([(AUTH_KEY, f"v1 ١٢٣ p1 {'0' * 64}")], "malformed"),
    ],
)
def test_a_call_without_the_runs_proof_is_refused_saying_why(metadata, why):
    with pytest.raises(Unauthenticated, match=why):
        check_run_auth(SECRET, RUN, "/m", metadata, NOW_MS / 1000)


def test_a_call_with_the_runs_proof_names_the_peer_it_claims():
    claim = check_run_auth(SECRET, RUN, "/m", proof(SECRET, RUN, "p7", "/m", NOW_MS), NOW_MS / 1000)
    assert (claim.peer_id, claim.ts_ms) == ("p7", NOW_MS)


def test_the_secret_comes_from_its_file_else_the_environment_and_must_be_long(tmp_path: Path):
    token = tmp_path / "run.token"
    token.write_text("  a-secret-from-the-file-1234  \n")
    token.chmod(0o600)
    assert load_secret(str(token), {"LOCONET_TOKEN": "a-secret-from-the-environment"}) == b"a-secret-from-the-file-1234"
    assert load_secret(None, {"LOCONET_TOKEN": "a-secret-from-the-environment"}) == b"a-secret-from-the-environment"
    assert load_secret(None, {}) is None
    with pytest.raises(ConfigError, match="at least 16"):
        load_secret(None, {"LOCONET_TOKEN": "short"})
    with pytest.raises(ConfigError, match="cannot read the run token file"):
        load_secret(str(tmp_path / "missing"), {})


# -- peer credentials (pure) ----------------------------------------------------------------------


def joined(issuer: Issuer, peer_id: str, address: str = "127.0.0.1:1") -> CallAuth:
    auth = CallAuth(SECRET, RUN)
    auth.adopt(issuer.issue(RUN, peer_id, address, auth.public_key))
    return auth


def verify(metadata, method: str, issuers, target=None):
    claim = check_run_auth(SECRET, RUN, method, metadata, time.time())
    return verify_caller(metadata, method, RUN, issuers, claim, target)


def test_a_credential_issued_by_the_coordinator_and_a_call_signed_with_its_key_name_the_peer():
    issuer = Issuer()
    a = joined(issuer, "p1", "10.0.0.1:7000")
    cred = verify(a.metadata("/m", "10.0.0.2:7000"), "/m", (issuer.public_key,), "10.0.0.2:7000")
    assert (cred.peer_id, cred.address) == ("p1", "10.0.0.1:7000")


def claiming(metadata: list, peer_id: str, method: str = "/m") -> list:
    """metadata with its run-secret proof re-made to claim peer_id (anyone with the secret can)."""
    ts_ms = int(time.time() * 1000)
    return [proof(SECRET, RUN, peer_id, method, ts_ms)[0] if k == AUTH_KEY else (k, v) for k, v in metadata]


def test_another_peer_cannot_speak_as_a_peer_even_with_the_runs_secret():
    issuer = Issuer()
    a, b = joined(issuer, "p1"), joined(issuer, "p2")
    # b claims p1 and sends its own credential: the credential names p2.
    with pytest.raises(Unauthenticated, match="another run or peer"):
        verify(claiming(b.metadata("/m", "t"), "p1"), "/m", (issuer.public_key,))
    # b presents p1's credential (as a member sees it on the wire) but signs with its own key.
    theirs = dict(a.metadata("/m", "t"))
    forged = [(k, theirs[k]) if k == "loconet-credential-bin" else (k, v) for k, v in b.metadata("/m", "t")]
    with pytest.raises(Unauthenticated, match="not signed"):
        verify(claiming(forged, "p1"), "/m", (issuer.public_key,))


def test_a_call_signed_for_one_peer_is_refused_by_another():
    issuer = Issuer()
    a = joined(issuer, "p1")
    with pytest.raises(Unauthenticated, match="signed for"):
        verify(a.metadata("/m", "10.0.0.2:7000"), "/m", (issuer.public_key,), "10.0.0.3:7000")


def test_a_credential_of_another_coordinator_says_join_again():
    a = joined(Issuer(), "p1")
    with pytest.raises(ForeignCredential, match="join again"):
        verify(a.metadata("/m", "t"), "/m", (Issuer().public_key,))


# -- every RPC refuses a call without the run's credential, and nothing happens -------------------


@pytest.fixture
def token_file(tmp_path: Path) -> str:
    path = tmp_path / "run.token"
    path.write_bytes(SECRET)
    path.chmod(0o600)
    return str(path)


@pytest.fixture
def coordinator(token_file: str) -> Iterator[CoordinatorThread]:
    config = CoordinatorConfig(
        run_id=RUN, port=0, dashboard_port=None, probe_peers=False, startup_grace_s=0.0, lease_s=30.0,
        join_timeout_s=0.5, security=RpcSecurity(token_file=token_file),
    )
    with CoordinatorThread(config) as c:
        yield c


WRONG = {
    "none": None,
    "wrong secret": CallAuth(b"not the run's secret, but long", RUN),
    "another run's": CallAuth(SECRET, "another-run"),
}


def coordinator_request(name: str):
    return {
        "Join": pb.JoinRequest(run_id=RUN, address="127.0.0.1:9", has_state=True, public_key=b"k" * 32),
        "Heartbeat": pb.HeartbeatRequest(run_id=RUN, peer_id="p1"),
        "Leave": pb.LeaveRequest(run_id=RUN, peer_id="p1"),
        "Quorum": pb.QuorumRequest(run_id=RUN, peer_id="p1"),
        "Commit": pb.CommitRequest(run_id=RUN, peer_id="p1", round_id=1, ok=True),
        "Status": pb.StatusRequest(run_id=RUN),
    }[name]


@pytest.mark.parametrize("name", COORDINATOR_METHODS)
@pytest.mark.parametrize("who", list(WRONG))
def test_every_coordinator_rpc_refuses_a_caller_without_the_runs_credential(coordinator, name, who):
    before = coordinator.status()
    with blocking_channel(coordinator.address, auth=WRONG[who]) as channel, pytest.raises(grpc.RpcError) as refused:
        getattr(pb_grpc.CoordinatorStub(channel), name)(coordinator_request(name), timeout=10)
    assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED
    after = coordinator.status()
    assert after["refusals"] == {"unauthenticated": 1}
    assert after["peers"] == before["peers"] == []
    assert [e["kind"] for e in after["events"]] == [e["kind"] for e in before["events"]]


def test_the_standard_health_check_answers_without_a_credential(coordinator):
    import asyncio

    assert asyncio.run(health_check(coordinator.address, 10))


@pytest.fixture
def peer_server() -> Iterator[tuple[Transport, Collective, StateServer]]:
    transport = Transport(TransportConfig(), auth=CallAuth(SECRET, RUN))
    collective = Collective(transport, RUN)
    state = StateServer(transport, RUN, lambda: StateSnapshot(0, {"w": torch.ones(4)}))
    transport.start([*collective.handlers(), *state.handlers()])
    try:
        yield transport, collective, state
    finally:
        transport.close()


def peer_calls() -> dict[str, tuple[str, bytes, bool]]:
    tag = cpb.RoundTag(run_id=RUN, epoch=0, round_id=1 << 20, sender_rank=0, group_size=2)
    return {
        "PushPart": (PUSH_METHOD, cpb.PartChunk(tag=tag).SerializeToString(), "stream_unary"),
        "PushStat": (STAT_METHOD, cpb.StatShare(tag=tag).SerializeToString(), "unary_unary"),
        "Abort": (ABORT_METHOD, cpb.AbortNotice(tag=tag, failed_ranks=[1]).SerializeToString(), "unary_unary"),
        "FetchState": (FETCH_METHOD, spb.StateRequest(run_id=RUN).SerializeToString(), "unary_stream"),
    }


@pytest.mark.parametrize("name", list(peer_calls()))
@pytest.mark.parametrize("who", list(WRONG))
def test_every_peer_rpc_refuses_a_caller_without_the_runs_credential(peer_server, name, who):
    transport, collective, state = peer_server
    method, message, kind = peer_calls()[name]
    with blocking_channel(transport.address, auth=WRONG[who]) as channel:
        call = getattr(channel, kind)(method, request_serializer=identity, response_deserializer=identity)
        with pytest.raises(grpc.RpcError) as refused:
            if kind == "stream_unary":
                call(iter([message]), timeout=10)
            elif kind == "unary_stream":
                list(call(message, timeout=10))
            else:
                call(message, timeout=10)
    assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED
    # Refused before any handler ran: no call admitted, no abort notice kept, no state served.
    assert transport.counters.bytes_received == 0
    assert not collective.registry._early_aborts
    assert (state.bytes_served, state.refused, transport.admission.active()) == (0, 0, 0)


# -- a forged peer id is refused ---------------------------------------------------------------------


def join_as(coordinator: CoordinatorThread, address: str) -> CallAuth:
    """A made-up peer joining with its own key; its auth carries the credential the coordinator answered with."""
    auth = CallAuth(SECRET, RUN)
    with blocking_channel(coordinator.address, auth=auth) as channel:
        reply = pb_grpc.CoordinatorStub(channel).Join(
            pb.JoinRequest(run_id=RUN, address=address, has_state=True, public_key=auth.public_key), timeout=10
        )
    auth.adopt(reply.credential)
    assert auth.peer_id == reply.peer_id
    return auth


FORGEABLE = {
    "Heartbeat": lambda victim: pb.HeartbeatRequest(run_id=RUN, peer_id=victim),
    "Quorum": lambda victim: pb.QuorumRequest(run_id=RUN, peer_id=victim),
    "Commit": lambda victim: pb.CommitRequest(run_id=RUN, peer_id=victim, round_id=1, ok=True),
    "Leave": lambda victim: pb.LeaveRequest(run_id=RUN, peer_id=victim),
}


@pytest.mark.parametrize("name", list(FORGEABLE))
def test_a_peer_of_the_run_cannot_call_the_coordinator_as_another(coordinator, name):
    a, b = join_as(coordinator, "127.0.0.1:11"), join_as(coordinator, "127.0.0.1:12")
    with blocking_channel(coordinator.address, auth=b) as channel, pytest.raises(grpc.RpcError) as refused:
        getattr(pb_grpc.CoordinatorStub(channel), name)(FORGEABLE[name](a.peer_id), timeout=10)
    assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED
    assert "not" in refused.value.details()
    # a is untouched: still live, and its own heartbeat is answered.
    assert {p["peer_id"]: p["state"] for p in coordinator.status()["peers"]}[a.peer_id] != "left"
    with blocking_channel(coordinator.address, auth=a) as channel:
        assert pb_grpc.CoordinatorStub(channel).Heartbeat(FORGEABLE["Heartbeat"](a.peer_id), timeout=10).known
    assert coordinator.status()["refusals"]["forged-identity"] == 1


def test_the_secret_alone_cannot_call_as_a_joined_peer(coordinator):
    a = join_as(coordinator, "127.0.0.1:11")
    outsider = CallAuth(SECRET, RUN, peer_id=a.peer_id)  # knows the secret and a's id, not a's key
    with blocking_channel(coordinator.address, auth=outsider) as channel, pytest.raises(grpc.RpcError) as refused:
        pb_grpc.CoordinatorStub(channel).Leave(FORGEABLE["Leave"](a.peer_id), timeout=10)
    assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED


def test_a_state_fetch_naming_another_peer_is_refused_and_ones_own_is_served(coordinator):
    a, b = join_as(coordinator, "127.0.0.1:11"), join_as(coordinator, "127.0.0.1:12")
    donor_auth = CallAuth(SECRET, RUN, issuers=(coordinator.server.coordinator.callers.issuer.public_key,))
    donor = Transport(TransportConfig(), auth=donor_auth)
    state = StateServer(donor, RUN, lambda: StateSnapshot(0, {"w": torch.ones(4)}))
    donor.start(state.handlers())
    try:
        with blocking_channel(donor.address, auth=b) as channel:
            fetch = channel.unary_stream(FETCH_METHOD, request_serializer=identity, response_deserializer=identity)
            with pytest.raises(grpc.RpcError) as refused:
                list(fetch(spb.StateRequest(run_id=RUN, peer_id=a.peer_id).SerializeToString(), timeout=10))
            assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED
            served = list(fetch(spb.StateRequest(run_id=RUN, peer_id=b.peer_id).SerializeToString(), timeout=10))
        assert served and state.bytes_served > 0
    finally:
        donor.close()


# -- a member cannot speak for another member on the data plane --------------------------------------


def three_member_inbox():
    from collectives.codecs import CodecConfig, make_codec
    from collectives.reduce.inbox import Group, RoundInbox

    group = Group(RUN, 0, 5, ("127.0.0.1:11", "127.0.0.1:12", "127.0.0.1:13"), 2)
    rows = torch.empty(RoundInbox.rows_numel(group, 9))
    return RoundInbox(group, 9, make_codec(CodecConfig("none")), rows, torch.empty(9))


def abort_from_rank_0(failed_rank: int) -> cpb.AbortNotice:
    tag = cpb.RoundTag(run_id=RUN, epoch=0, round_id=5, sender_rank=0, group_size=3)
    return cpb.AbortNotice(tag=tag, failed_ranks=[failed_rank], reason=f"rank {failed_rank} sent bad data")


@pytest.mark.parametrize("early", [False, True], ids=["round open", "before the round opens"])
def test_an_abort_notice_claiming_another_members_rank_names_nobody_failed(early):
    import asyncio

    from collectives.errors import ProtocolError
    from collectives.reduce.inbox import RoundRegistry

    async def scenario():
        registry = RoundRegistry(RUN)
        inbox = three_member_inbox()
        if not early:
            await registry.open(inbox)
        # Member 127.0.0.1:12 (rank 1) speaks as rank 0 to get rank 2 dropped.
        forged = abort_from_rank_0(failed_rank=2)
        if early:
            registry.abort_notice(forged, sender="127.0.0.1:12")
            await registry.open(inbox)
        else:
            with pytest.raises(ProtocolError, match="not its sender"):
                registry.abort_notice(forged, sender="127.0.0.1:12")
        assert inbox.failed == {}
        registry.abort_notice(abort_from_rank_0(failed_rank=1), sender="127.0.0.1:11")  # rank 0's own notice
        assert list(inbox.failed) == [1]

    asyncio.run(scenario())


def test_refusals_are_counted_in_the_metrics(coordinator):
    from peer.coordinator.metrics import StatusCollector

    a, b = join_as(coordinator, "127.0.0.1:11"), join_as(coordinator, "127.0.0.1:12")
    with blocking_channel(coordinator.address, auth=b) as channel:
        with pytest.raises(grpc.RpcError):
            pb_grpc.CoordinatorStub(channel).Leave(FORGEABLE["Leave"](a.peer_id), timeout=10)
    families = {f.name: f for f in StatusCollector(coordinator.status).collect()}
    (sample,) = families["loconet_coordinator_refusals"].samples
    assert (sample.labels, sample.value) == ({"reason": "forged-identity"}, 1)


def test_what_a_peer_refused_reaches_the_coordinators_metrics(coordinator):
    from peer.coordinator.metrics import StatusCollector

    a = join_as(coordinator, "127.0.0.1:11")
    metrics = pb.PeerMetrics(refusals={"unauthenticated": 3, "fetch_refused": 1})
    with blocking_channel(coordinator.address, auth=a) as channel:
        pb_grpc.CoordinatorStub(channel).Heartbeat(
            pb.HeartbeatRequest(run_id=RUN, peer_id=a.peer_id, metrics=metrics), timeout=10
        )
    families = {f.name: f for f in StatusCollector(coordinator.status).collect()}
    got = {(s.labels["peer"], s.labels["kind"]): s.value for s in families["loconet_peer_refusals"].samples}
    assert got == {(a.peer_id, "fetch_refused"): 1, (a.peer_id, "unauthenticated"): 3}
