"""The coordinator process: clear errors for bad input (and it keeps serving), health, and the live dashboard."""

from __future__ import annotations

import contextlib
import json
import sys
import threading
import urllib.request
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from protos import membership_pb2 as pb
from protos import membership_pb2_grpc as pb_grpc

sys.path.insert(0, str(Path(__file__).parent))
from support.browser import NO_CHROMIUM, DomIndex, chromium_path, run_chromium  # noqa: E402
from support.procs import CoordinatorProc, stop_all, toy_peer  # noqa: E402

pytestmark = pytest.mark.timeout(120)

RUN = "errors"


@pytest.fixture(scope="module")
def coordinator(tmp_path_factory):
    proc = CoordinatorProc(
        tmp_path_factory.mktemp("coord") / "coordinator.log", RUN, 0, "--join-timeout", "0.5", "--lease", "30", "--startup-grace", "0"
    )
    yield proc
    proc.stop()


@pytest.fixture(scope="module")
def stub(coordinator):
    channel = grpc.insecure_channel(coordinator.address)
    yield pb_grpc.CoordinatorStub(channel)
    channel.close()


def status_code(call) -> tuple[grpc.StatusCode, str]:
    with pytest.raises(grpc.RpcError) as info:
        call()
    return info.value.code(), info.value.details()


def still_serving(stub) -> None:
    reply = stub.Status(pb.StatusRequest(run_id=RUN), timeout=5)
    assert json.loads(reply.json)["run_id"] == RUN


def join(stub, address: str) -> str:
    return stub.Join(pb.JoinRequest(run_id=RUN, address=address, has_state=True), timeout=5).peer_id


def test_wrong_run_id_is_refused_with_a_clear_message(stub):
    code, details = status_code(lambda: stub.Join(pb.JoinRequest(run_id="other", address="127.0.0.1:1"), timeout=5))
    assert code == grpc.StatusCode.FAILED_PRECONDITION and "serves run 'errors'" in details and "--run" in details
    still_serving(stub)


def test_join_without_an_address_is_invalid(stub):
    code, details = status_code(lambda: stub.Join(pb.JoinRequest(run_id=RUN, address=""), timeout=5))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "host:port" in details
    still_serving(stub)


def test_unknown_peer_id_is_not_found(stub):
    code, details = status_code(lambda: stub.Quorum(pb.QuorumRequest(run_id=RUN, peer_id="p999"), timeout=5))
    assert code == grpc.StatusCode.NOT_FOUND and "join the run first" in details
    assert not stub.Heartbeat(pb.HeartbeatRequest(run_id=RUN, peer_id="p999"), timeout=5).known
    still_serving(stub)


def test_malformed_message_is_rejected(coordinator, stub):
    with grpc.insecure_channel(coordinator.address) as channel:
        raw = channel.unary_unary("/loconet.membership.v1.Coordinator/Join", request_serializer=lambda b: b, response_deserializer=lambda b: b)
        code, details = status_code(lambda: raw(b"\xff\xff\xff\xff garbage", timeout=5))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "malformed JoinRequest" in details
    still_serving(stub)


def test_oversized_message_is_rejected(stub):
    huge = pb.JoinRequest(run_id=RUN, address="127.0.0.1:1", name="x" * (2 << 20))
    code, _ = status_code(lambda: stub.Join(huge, timeout=5))
    assert code == grpc.StatusCode.RESOURCE_EXHAUSTED
    still_serving(stub)


def test_commit_from_a_peer_outside_the_round_is_refused(stub):
    members = [join(stub, f"127.0.0.1:{port}") for port in (50001, 50002)]
    plans: dict[str, pb.QuorumResponse] = {}

    def ask(peer_id: str) -> None:
        plans[peer_id] = stub.Quorum(pb.QuorumRequest(run_id=RUN, peer_id=peer_id), timeout=30)

    threads = [threading.Thread(target=ask, args=(m,)) for m in members]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    plan = plans[members[0]]
    assert {m.peer_id for m in plan.members} >= set(members)
    outsider = join(stub, "127.0.0.1:50003")
    request = pb.CommitRequest(run_id=RUN, peer_id=outsider, round_id=plan.round_id, epoch=plan.epoch, ok=True)
    code, details = status_code(lambda: stub.Commit(request, timeout=5))
    assert code == grpc.StatusCode.FAILED_PRECONDITION and "not a member" in details
    unknown = pb.CommitRequest(run_id=RUN, peer_id=outsider, round_id=12345, epoch=0, ok=True)
    code, details = status_code(lambda: stub.Commit(unknown, timeout=5))
    assert code == grpc.StatusCode.NOT_FOUND and "unknown" in details
    still_serving(stub)


def test_health_service_reports_serving(coordinator):
    with grpc.insecure_channel(coordinator.address) as channel:
        reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5)
    assert reply.status == health_pb2.HealthCheckResponse.SERVING


@pytest.mark.skipif(chromium_path() is None, reason=NO_CHROMIUM)
def test_dashboard_in_chromium_shows_the_live_peers_a_round_and_the_chart(tmp_path):
    coordinator = CoordinatorProc(tmp_path / "coordinator.log", "live", 0, "--join-timeout", "1", "--heartbeat", "0.2", "--lease", "2")
    peers = [toy_peer(tmp_path, coordinator.address, "live", name, "--interval", "0.3") for name in ("a", "b")]
    try:
        ids = [p.wait_event(lambda e: e["event"] == "joined", 60)["peer_id"] for p in peers]
        for p in peers:
            p.wait_event(lambda e: e["event"] == "committed" and len(e["members"]) == 2, 60)
        status = json.loads(urllib.request.urlopen(coordinator.dashboard + "/api/status", timeout=5).read())
        assert {p["peer_id"] for p in status["peers"] if p["state"] == "active"} == set(ids)
        dom = DomIndex(run_chromium(coordinator.dashboard + "/", tmp_path, "--dump-dom"))
        assert dom.by_id("status-line").text == "live"
        rows = {n.attrs["data-peer-id"]: n.text for n in dom.find("tr", cls="peer-row")}
        assert set(ids) <= set(rows) and all("active" in rows[i] for i in ids)
        assert any("committed" in n.text for n in dom.find("tr", cls="round-row"))
        lines = dom.find("polyline", cls="loss-line")
        assert lines and all(line.attrs.get("points") for line in lines)
    finally:
        stop_all(peers)
        coordinator.stop()


def test_a_second_coordinator_on_a_port_in_use_refuses_to_start(coordinator, tmp_path):
    # gRPC would otherwise share the port (SO_REUSEPORT) and split the peers between two coordinators.
    import subprocess

    done = subprocess.run(
        [sys.executable, "-m", "peer.cli", "coordinator", "--run", RUN, "--port", str(coordinator.port), "--dashboard-port", "-1"],
        capture_output=True, text=True, timeout=60,
    )
    assert done.returncode != 0
    assert f"cannot listen on 127.0.0.1:{coordinator.port}" in done.stderr


@contextlib.contextmanager
def own_coordinator(tmp_path, run: str, *args: str):
    """A coordinator of its own for one test (with --no-probe: the peers' addresses are made up); yields a stub."""
    proc = CoordinatorProc(tmp_path / "coordinator.log", run, 0, "--no-probe", *args)
    channel = grpc.insecure_channel(proc.address)
    try:
        yield pb_grpc.CoordinatorStub(channel)
    finally:
        channel.close()
        proc.stop()


def test_a_lone_survivor_below_min_peers_is_told_at_once_not_after_the_quorum_timeout(tmp_path):
    run = "survivor"
    args = ("--min-peers", "2", "--join-timeout", "0.5", "--lease", "30", "--startup-grace", "0", "--quorum-timeout", "60")
    with own_coordinator(tmp_path, run, *args) as stub:
        a, b = (
            stub.Join(pb.JoinRequest(run_id=run, address=f"127.0.0.1:{port}", has_state=True), timeout=5).peer_id
            for port in (1, 2)
        )
        asked = [stub.Quorum.future(pb.QuorumRequest(run_id=run, peer_id=p), timeout=10) for p in (a, b)]
        plans = [f.result() for f in asked]
        reports = [
            stub.Commit.future(
                pb.CommitRequest(run_id=run, peer_id=p, round_id=plan.round_id, epoch=plan.epoch, ok=True), timeout=10
            )
            for p, plan in zip((a, b), plans)
        ]
        assert all(f.result().commit for f in reports)
        stub.Leave(pb.LeaveRequest(run_id=run, peer_id=b, reason="done"), timeout=5)
        # The quorum timeout is 60 s; the refusal must come after the 0.5 s join timeout (10 s allows for a slow machine).
        code, details = status_code(
            lambda: stub.Quorum(pb.QuorumRequest(run_id=run, peer_id=a, last_round=plans[0].round_id), timeout=10)
        )
        assert code == grpc.StatusCode.FAILED_PRECONDITION
        assert "no quorum" in details and "1 live peer" in details and "min_peers is 2" in details


def test_a_fresh_peer_waits_for_the_state_holders_of_a_restarted_coordinator_instead_of_founding(tmp_path):
    run = "restarted"
    with own_coordinator(tmp_path, run, "--lease", "30", "--startup-grace", "20") as stub:
        # A heartbeat under an id this coordinator never gave out: a peer of its predecessor.
        assert not stub.Heartbeat(pb.HeartbeatRequest(run_id=run, peer_id="p1-0a0b0c"), timeout=5).known
        fresh = pb.JoinRequest(run_id=run, address="127.0.0.1:2", has_state=False)
        code, details = status_code(lambda: stub.Join(fresh, timeout=5))
        assert code == grpc.StatusCode.UNAVAILABLE and "re-registered" in details
        stub.Join(pb.JoinRequest(run_id=run, address="127.0.0.1:1", peer_id="p1-0a0b0c", has_state=True, last_round=5), timeout=5)
        assert stub.Join(fresh, timeout=5).sync_from == "127.0.0.1:1"


def test_with_a_state_file_a_restarted_coordinator_makes_a_fresh_peer_wait_before_any_old_peer_calls(tmp_path):
    run = "remembered"
    state_file = str(tmp_path / "run.json")
    args = ("--lease", "30", "--state-file", state_file)
    with own_coordinator(tmp_path, run, *args, "--startup-grace", "0") as stub:
        founder = stub.Join(pb.JoinRequest(run_id=run, address="127.0.0.1:1", has_state=False), timeout=5)
        plan = stub.Quorum(pb.QuorumRequest(run_id=run, peer_id=founder.peer_id), timeout=10)
        report = pb.CommitRequest(
            run_id=run, peer_id=founder.peer_id, round_id=plan.round_id, epoch=plan.epoch, ok=True
        )
        assert stub.Commit(report, timeout=10).commit
    assert json.loads(open(state_file).read())["last_committed_round"] == plan.round_id
    with own_coordinator(tmp_path, run, *args, "--startup-grace", "20") as stub:
        # No heartbeat from the old peer yet: only the state file tells the run exists.
        fresh = pb.JoinRequest(run_id=run, address="127.0.0.1:2", has_state=False)
        code, details = status_code(lambda: stub.Join(fresh, timeout=5))
        assert code == grpc.StatusCode.UNAVAILABLE and "re-registered" in details
        holder = pb.JoinRequest(
            run_id=run, address="127.0.0.1:1", peer_id=founder.peer_id, has_state=True, last_round=plan.round_id
        )
        stub.Join(holder, timeout=5)
        assert stub.Join(fresh, timeout=5).sync_from == "127.0.0.1:1"


def test_the_first_peer_of_a_new_run_founds_it_without_waiting_out_the_grace(tmp_path):
    run = "new"
    with own_coordinator(tmp_path, run, "--lease", "30", "--startup-grace", "20") as stub:
        reply = stub.Join(pb.JoinRequest(run_id=run, address="127.0.0.1:1", has_state=False), timeout=5)
        assert reply.sync_from == ""  # the founder: its initial state is the run's
        second = stub.Join(pb.JoinRequest(run_id=run, address="127.0.0.1:2", has_state=False), timeout=5)
        assert second.sync_from == "127.0.0.1:1"
