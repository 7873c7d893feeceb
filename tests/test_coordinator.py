"""The coordinator: clear errors for bad input (and it keeps serving), round ids and epochs, quorum policies,
answers to the peers a round went on without, restarts, health, and the live dashboard.

Each test gets a fresh coordinator of its own, served in this process on its own event-loop thread (the
``coordinator`` fixture); the peers are made-up addresses that only talk to it, so probing is off.
"""

from __future__ import annotations

import contextlib
import json
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from collectives.membership.client import MembershipClient, MembershipConfig
from collectives.membership.memberlists import entries_of, unpack_list
from collectives.membership.roundplan import KnownMembers, MissedRound
from collectives.membership.sampling import check_sample, sample_members
from collectives.net.transport import Transport
from protos import membership_pb2 as pb
from protos import membership_pb2_grpc as pb_grpc

sys.path.insert(0, str(Path(__file__).parent))
from support.browser import NO_CHROMIUM, DomIndex, chromium_path, run_chromium  # noqa: E402
from support.coordinator import Live, live_coordinators  # noqa: E402
from support.procs import CoordinatorProc, stop_all, toy_peer  # noqa: E402

pytestmark = pytest.mark.timeout(120)

RUN = "errors"
# Settings of every test's coordinator unless the test says otherwise: no grace, long leases, a short join timeout.
DEFAULTS = dict(
    run_id=RUN, port=0, dashboard_port=None, probe_peers=False, startup_grace_s=0.0, lease_s=30.0, join_timeout_s=0.5
)


@pytest.fixture
def coordinator() -> Iterator[Callable[..., Live]]:
    """Factory of fresh in-process coordinators (DEFAULTS overridden by keywords); all are stopped after the test."""
    with live_coordinators(DEFAULTS) as start:
        yield start


@pytest.fixture
def stub(coordinator) -> pb_grpc.CoordinatorStub:
    """A stub to a fresh coordinator with the default settings."""
    return coordinator().stub


def status_code(call) -> tuple[grpc.StatusCode, str]:
    with pytest.raises(grpc.RpcError) as info:
        call()
    return info.value.code(), info.value.details()


def still_serving(stub, run: str = RUN) -> None:
    reply = stub.Status(pb.StatusRequest(run_id=run), timeout=5)
    assert json.loads(reply.json)["run_id"] == run


def join(stub, address: str, run: str = RUN, **fields) -> str:
    return stub.Join(pb.JoinRequest(run_id=run, address=address, has_state=True, **fields), timeout=5).peer_id


def ask(stub, peer_id: str, last_round: int = 0, run: str = RUN, known_members: bytes = b"",
        member_changes: bool = False, tag: str = "", step: int = 0, packed_members: bool = False) -> grpc.Future:
    request = pb.QuorumRequest(run_id=run, peer_id=peer_id, last_round=last_round, known_members=known_members,
                               member_changes=member_changes, tag=tag, step=step, packed_members=packed_members)
    return stub.Quorum.future(request, timeout=20)


def report(stub, peer_id: str, plan: pb.QuorumResponse, ok: bool = True, failed=(), run: str = RUN) -> grpc.Future:
    request = pb.CommitRequest(
        run_id=run, peer_id=peer_id, round_id=plan.round_id, epoch=plan.epoch, ok=ok, failed_peers=list(failed)
    )
    return stub.Commit.future(request, timeout=20)


def play_round(stub, peers: list[str], last_round: int, run: str = RUN) -> pb.QuorumResponse:
    """All peers ask, all report success; the round's plan (as the first peer got it)."""
    plans = [f.result() for f in [ask(stub, p, last_round, run) for p in peers]]
    decisions = [f.result() for f in [report(stub, p, plan, run=run) for p, plan in zip(peers, plans)]]
    assert all(d.commit for d in decisions)
    return plans[0]


def rejoin(peer_id: str, address: str, last_round: int) -> pb.JoinRequest:
    """The join of a peer that comes back with the state of last_round."""
    return pb.JoinRequest(run_id=RUN, address=address, peer_id=peer_id, last_round=last_round, has_state=True)


def members(plan: pb.QuorumResponse) -> list[str]:
    return [m.peer_id for m in plan.members]


def beat(stub, peers: list[str], seconds: float) -> None:
    """Heartbeat for peers every 0.2 s for seconds (each must still be known)."""
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        for p in peers:
            assert stub.Heartbeat(pb.HeartbeatRequest(run_id=RUN, peer_id=p), timeout=5).known
        time.sleep(0.2)


# -- bad input ---------------------------------------------------------------------------


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


def test_malformed_message_is_rejected(coordinator):
    c = coordinator()
    raw = c.channel.unary_unary(
        "/loconet.membership.v1.Coordinator/Join", request_serializer=lambda b: b, response_deserializer=lambda b: b
    )
    code, details = status_code(lambda: raw(b"\xff\xff\xff\xff garbage", timeout=5))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "malformed JoinRequest" in details
    still_serving(c.stub)


def test_oversized_message_is_rejected(stub):
    huge = pb.JoinRequest(run_id=RUN, address="127.0.0.1:1", name="x" * (2 << 20))
    code, _ = status_code(lambda: stub.Join(huge, timeout=5))
    assert code == grpc.StatusCode.RESOURCE_EXHAUSTED
    still_serving(stub)


def test_commit_from_a_peer_outside_the_round_is_refused(stub):
    a, b = (join(stub, f"127.0.0.1:{port}") for port in (50001, 50002))
    plan, _ = [f.result() for f in [ask(stub, a), ask(stub, b)]]
    assert members(plan) == [a, b]
    outsider = join(stub, "127.0.0.1:50003")
    request = pb.CommitRequest(run_id=RUN, peer_id=outsider, round_id=plan.round_id, epoch=plan.epoch, ok=True)
    code, details = status_code(lambda: stub.Commit(request, timeout=5))
    assert code == grpc.StatusCode.FAILED_PRECONDITION and "not a member" in details
    unknown = pb.CommitRequest(run_id=RUN, peer_id=outsider, round_id=12345, epoch=0, ok=True)
    code, details = status_code(lambda: stub.Commit(unknown, timeout=5))
    assert code == grpc.StatusCode.NOT_FOUND and "round 12345 at epoch 0 is unknown" in details
    still_serving(stub)


def test_health_service_reports_serving(coordinator):
    c = coordinator()
    reply = health_pb2_grpc.HealthStub(c.channel).Check(health_pb2.HealthCheckRequest(), timeout=5)
    assert reply.status == health_pb2.HealthCheckResponse.SERVING


def test_a_second_coordinator_on_a_port_in_use_refuses_to_start(coordinator):
    # gRPC would otherwise share the port (SO_REUSEPORT) and split the peers between two coordinators.
    port = coordinator().address.rsplit(":", 1)[1]
    done = subprocess.run(
        [sys.executable, "-m", "peer.cli", "coordinator", "--run", RUN, "--port", port] + ["--dashboard-port", "-1"],
        capture_output=True, text=True, timeout=60,
    )
    assert done.returncode != 0
    assert f"cannot listen on 127.0.0.1:{port}" in done.stderr


# -- round ids and epochs ------------------------------------------------------------------


def test_round_ids_are_1_2_3_over_three_rounds(coordinator):
    c = coordinator()
    peers = [join(c.stub, f"127.0.0.1:{port}") for port in (1, 2)]
    plans = []
    for last_round in (0, 1, 2):
        plans.append(play_round(c.stub, peers, last_round))
    assert [(p.round_id, p.epoch) for p in plans] == [(1, 0), (2, 0), (3, 0)]
    status = c.status()
    assert status["last_committed_round"] == 3
    assert [(r["round_id"], r["epoch"], r["status"]) for r in status["rounds"]] == [
        (3, 0, "committed"), (2, 0, "committed"), (1, 0, "committed")
    ]


def test_an_asker_holding_the_rounds_member_list_gets_the_answer_without_it(coordinator):
    c = coordinator()
    a, b = (join(c.stub, f"127.0.0.1:{port}") for port in (1, 2))
    first = play_round(c.stub, [a, b], 0)
    assert members(first) == sorted([a, b]) and len(first.members_digest) == 32
    holder, fresh = [f.result() for f in [ask(c.stub, a, 1, known_members=first.members_digest), ask(c.stub, b, 1)]]
    assert (holder.round_id, list(holder.members), holder.members_digest) == (2, [], first.members_digest)
    assert (fresh.round_id, list(fresh.members), fresh.members_digest) == (2, list(first.members), first.members_digest)
    assert (holder.rank, fresh.rank) == (members(first).index(a), members(first).index(b))


def test_a_peer_that_registers_again_is_named_with_a_new_registration_and_a_live_rejoin_keeps_its_own(coordinator):
    # The members then open a new connection to the peer that came back (collectives/net/transport.py,
    # note_registrations): the old one may have died in the cut that lost it.
    c = coordinator()
    a, b = (join(c.stub, f"127.0.0.1:{port}") for port in (1, 2))
    first = play_round(c.stub, [a, b], 0)
    assert c.stub.Join(rejoin(a, "127.0.0.1:1", 1), timeout=5).peer_id == a  # live, from its address
    c.stub.Leave(pb.LeaveRequest(run_id=RUN, peer_id=b, reason="cut"), timeout=5)
    assert c.stub.Join(rejoin(b, "127.0.0.1:2", 1), timeout=5).peer_id == b
    second = play_round(c.stub, [a, b], 1)
    assert {m.peer_id: m.registration for m in first.members} == {a: 1, b: 2}
    assert {m.peer_id: m.registration for m in second.members} == {a: 1, b: 3}


def _changed_round(c):
    """Round 1 of a and b, then d joins: (round 1's answer, Quorum futures of a, b, d for round 2 by the options)."""
    a, b = (join(c.stub, f"127.0.0.1:{port}") for port in (1, 2))
    first = play_round(c.stub, [a, b], 0)
    d = join(c.stub, "127.0.0.1:3", last_round=1)
    return first, (a, b, d)


def test_a_changed_member_list_is_sent_as_its_change_to_a_peer_holding_the_previous_one(coordinator):
    c = coordinator()
    first, (a, b, d) = _changed_round(c)
    held, whole, _ = [f.result() for f in [ask(c.stub, a, 1, known_members=first.members_digest, member_changes=True),
                                           ask(c.stub, b, 1, member_changes=True), ask(c.stub, d, 1)]]
    assert (list(held.members), held.members_base) == ([], first.members_digest)
    known = KnownMembers()
    known.of(first)
    assert len(whole.members) == 3
    assert known.of(held)[0] == tuple((m.peer_id, m.address) for m in whole.members)


def test_a_peer_that_applies_no_change_gets_the_whole_changed_list(coordinator):
    c = coordinator()
    first, (a, b, d) = _changed_round(c)
    older, *_ = [f.result() for f in [ask(c.stub, a, 1, known_members=first.members_digest), ask(c.stub, b, 1),
                                      ask(c.stub, d, 1)]]
    assert len(older.members) == 3 and older.members_base == b""


def test_an_asker_that_reads_packed_lists_gets_the_whole_list_packed_and_an_older_one_gets_it_plain(coordinator):
    c = coordinator()
    a, b = (join(c.stub, f"127.0.0.1:{port}") for port in (1, 2))
    new, old = [f.result() for f in [ask(c.stub, a, packed_members=True), ask(c.stub, b)]]
    assert (list(new.members), list(old.members_packed)) == ([], [])
    assert new.members_digest == old.members_digest
    assert unpack_list(new.members_packed, new.members_digest) == entries_of(old.members)


def test_a_retry_after_an_abort_keeps_the_round_id_with_a_new_epoch_and_each_attempt_keeps_its_decision(coordinator):
    c = coordinator()
    a, b, gone = (join(c.stub, f"127.0.0.1:{port}") for port in (1, 2, 3))
    first = [f.result() for f in [ask(c.stub, p) for p in (a, b, gone)]]
    assert {(p.round_id, p.epoch) for p in first} == {(1, 0)}
    # a and b both saw the third member fail; it never reports: the attempt aborts and drops it.
    aborted = [f.result() for f in [report(c.stub, p, first[0], ok=False, failed=[gone]) for p in (a, b)]]
    assert [(d.commit, list(d.dropped)) for d in aborted] == [(False, [gone])] * 2
    retry = [f.result() for f in [ask(c.stub, p) for p in (a, b)]]
    assert [(p.round_id, p.epoch, members(p)) for p in retry] == [(1, 1, [a, b])] * 2
    assert all(f.result().commit for f in [report(c.stub, p, retry[0]) for p in (a, b)])
    # The dropped member of the aborted attempt still reads that attempt's abort, never the retry's commit...
    late = report(c.stub, gone, first[0], ok=True).result()
    assert (late.commit, list(late.dropped)) == (False, [gone])
    # ... and the retry's members read the retry's commit again.
    assert report(c.stub, a, retry[0]).result().commit


def test_a_member_the_others_could_not_reach_sits_out_the_retry_then_takes_part_again(coordinator):
    # One peer whose --advertise the others could not reach rejoined at once after each drop, was a member of every
    # retry, and aborted it: a run of two never committed.
    c = coordinator(min_peers=2)
    a, b, bad = (join(c.stub, f"127.0.0.1:{port}") for port in (1, 2, 3))
    first = [f.result() for f in [ask(c.stub, p) for p in (a, b, bad)]][0]
    decisions = [f.result() for f in [report(c.stub, a, first, ok=False, failed=[bad]),
                                      report(c.stub, b, first, ok=False, failed=[bad]),
                                      report(c.stub, bad, first, ok=False)]]
    assert [(d.commit, list(d.dropped)) for d in decisions] == [(False, [bad])] * 3
    c.stub.Join(rejoin(bad, "127.0.0.1:3", 0), timeout=5)
    held = ask(c.stub, bad)
    retry = [f.result() for f in [ask(c.stub, p) for p in (a, b)]]
    assert [members(p) for p in retry] == [sorted([a, b])] * 2
    assert all(f.result().commit for f in [report(c.stub, p, retry[0]) for p in (a, b)])
    # Held while it sat out; the round went on without it, so it is behind now.
    assert held.result(timeout=10).action == pb.QuorumResponse.RESYNC
    (event,) = c.events("sit-out")
    assert event["peer_id"] == bad and "named it as failed (1 time(s) in a row)" in event["detail"]
    assert "--advertise" in event["detail"]
    # One committed round was its sitting out: it is a member of the next.
    nxt = [f.result() for f in [ask(c.stub, p, 1) for p in (a, b, bad)]]
    assert [members(p) for p in nxt] == [sorted([a, b, bad])] * 3


def test_a_failed_round_aborts_after_the_failure_grace_without_dropping_a_silent_member_that_is_alive(coordinator):
    # The commit deadline is longer than a report call's own timeout (20 s): only the grace can answer it.
    c = coordinator(failure_grace_s=0.5, commit_timeout_s=120.0)
    a, named, silent = (join(c.stub, f"127.0.0.1:{port}") for port in (1, 2, 3))
    plan = [f.result() for f in [ask(c.stub, p) for p in (a, named, silent)]][0]
    decisions = [f.result() for f in [report(c.stub, a, plan, ok=False, failed=[named]), report(c.stub, named, plan)]]
    assert [(d.commit, list(d.dropped)) for d in decisions] == [(False, [named])] * 2
    # The silent member is still in the run; its heartbeat tells it that its attempt is over.
    beat = c.stub.Heartbeat(pb.HeartbeatRequest(run_id=RUN, peer_id=silent, round_id=plan.round_id,
                                                round_epoch=plan.epoch), timeout=5)
    assert beat.known and "no report within the failure grace from " + silent in beat.round_over
    retry = [f.result() for f in [ask(c.stub, p) for p in (a, silent)]]
    assert [(p.round_id, members(p)) for p in retry] == [(1, sorted([a, silent]))] * 2


def test_a_member_that_asks_again_before_reporting_never_got_its_answer_and_the_attempt_is_retried(coordinator):
    # Chaos seed 1336: a round of one formed as its member rejoined, the answer went down a Session stream the
    # rejoin reset, and the attempt waited for a report that never came, with no round formed for 13 minutes.
    c = coordinator()
    a = join(c.stub, "127.0.0.1:1")
    lost = ask(c.stub, a).result()  # as if it never arrived
    again = ask(c.stub, a).result(timeout=10)
    assert (again.round_id, again.epoch, members(again)) == (lost.round_id, lost.epoch + 1, [a])
    assert report(c.stub, a, again).result().commit
    rounds = {(r["round_id"], r["epoch"]): r for r in c.status()["rounds"]}
    assert rounds[(1, 0)]["status"] == "aborted" and "never reached it" in rounds[(1, 0)]["reason"]
    assert rounds[(1, 1)]["status"] == "committed"


def test_a_member_whose_answer_was_lost_fails_its_attempt_without_being_dropped(coordinator):
    c = coordinator(failure_grace_s=0.5, commit_timeout_s=120.0)
    a, b = (join(c.stub, f"127.0.0.1:{port}") for port in (1, 2))
    plan = [f.result() for f in [ask(c.stub, p) for p in (a, b)]][0]
    retry_b = ask(c.stub, b)  # b lost its answer; a waits in the all-reduce for b's data
    # After the failure grace, a's heartbeat tells it that its attempt is over, and why.
    over = ""
    deadline = time.monotonic() + 10
    while not over and time.monotonic() < deadline:
        time.sleep(0.1)
        over = c.stub.Heartbeat(pb.HeartbeatRequest(run_id=RUN, peer_id=a, round_id=plan.round_id,
                                                    round_epoch=plan.epoch), timeout=5).round_over
    assert "never reached it" in over
    decision = report(c.stub, a, plan, ok=False).result()
    assert (decision.commit, list(decision.dropped)) == (False, [])
    retry_a = ask(c.stub, a)
    assert [members(f.result(timeout=10)) for f in (retry_a, retry_b)] == [sorted([a, b])] * 2


def test_a_resync_answer_carries_the_runs_step_so_a_peer_back_from_a_cut_lines_up_at_once(coordinator):
    c = coordinator(quorum="first-k:2")
    a, b, late = (join(c.stub, f"127.0.0.1:{port}") for port in (1, 2, 3))
    plans = [f.result() for f in [ask(c.stub, p) for p in (a, b)]]
    held = ask(c.stub, late)
    for peer, step in ((a, 10), (b, 10)):  # the members at their round's step
        c.stub.Heartbeat(pb.HeartbeatRequest(run_id=RUN, peer_id=peer, metrics=pb.PeerMetrics(step=step)), timeout=5)
    assert all(f.result().commit for f in [report(c.stub, p, plans[0]) for p in (a, b)])
    answer = held.result()
    assert (answer.action, answer.run_step, answer.round_step) == (pb.QuorumResponse.RESYNC, 10, 10)
    # The run trains on: a's heartbeat says step 13. Asked again (a peer back from a cut), the answer says so.
    c.stub.Heartbeat(pb.HeartbeatRequest(run_id=RUN, peer_id=a, last_round=1, metrics=pb.PeerMetrics(step=13)),
                     timeout=5)
    again = ask(c.stub, late).result()
    assert (again.action, again.run_step, again.round_step) == (pb.QuorumResponse.RESYNC, 13, 10)


def test_a_resync_answer_names_the_tag_and_step_of_the_quorum_the_run_waits_in_now(coordinator):
    c = coordinator(quorum="all", min_peers=2)
    a, b, late = (join(c.stub, f"127.0.0.1:{port}") for port in (1, 2, 3))
    # Round 1 forms without late at the join timeout (0.5 s); late was away.
    plans = [f.result() for f in [ask(c.stub, p, tag="fragment-0") for p in (a, b)]]
    assert all(f.result().commit for f in [report(c.stub, p, plans[0]) for p in (a, b)])
    assert (ask(c.stub, late, tag="fragment-0").result().pending_tag) == ""  # nobody waits yet
    waiting = ask(c.stub, a, 1, tag="fragment-1", step=103)  # `all` waits for b and late
    answer = wait_for_step(c.stub, late, 103)
    assert (answer.action, answer.pending_tag) == (pb.QuorumResponse.RESYNC, "fragment-1")
    waiting.cancel()


def test_heartbeat_and_resync_answers_say_how_long_ago_the_last_round_committed(coordinator):
    c = coordinator(quorum="first-k:2")
    a, b, late = (join(c.stub, f"127.0.0.1:{port}") for port in (1, 2, 3))
    beat = c.stub.Heartbeat(pb.HeartbeatRequest(run_id=RUN, peer_id=a), timeout=5)
    assert beat.since_commit_s == 0.0  # no round committed yet: unknown
    plans = [f.result() for f in [ask(c.stub, p) for p in (a, b)]]
    held = ask(c.stub, late)
    before = time.monotonic()
    assert all(f.result().commit for f in [report(c.stub, p, plans[0]) for p in (a, b)])
    resync = held.result()
    beat = c.stub.Heartbeat(pb.HeartbeatRequest(run_id=RUN, peer_id=a), timeout=5)
    after = time.monotonic()
    assert resync.action == pb.QuorumResponse.RESYNC
    assert 0.0 < resync.since_commit_s <= beat.since_commit_s <= after - before


def test_a_resync_answer_names_no_waiting_quorum_that_forms_without_the_asker(coordinator):
    # first-k:2 forms round 2 with the next asker, whoever it is: a late peer joining with one step of work would
    # take the place of b's whole interval, so it is not told to.
    c = coordinator(quorum="first-k:2")
    a, b, late = (join(c.stub, f"127.0.0.1:{port}") for port in (1, 2, 3))
    plans = [f.result() for f in [ask(c.stub, p, tag="fragment-0") for p in (a, b)]]
    held = ask(c.stub, late, tag="fragment-0")
    assert all(f.result().commit for f in [report(c.stub, p, plans[0]) for p in (a, b)])
    assert held.result().action == pb.QuorumResponse.RESYNC
    waiting = ask(c.stub, a, 1, tag="fragment-1", step=103)
    answer = wait_for_step(c.stub, late, 103)
    assert (answer.action, answer.pending_tag) == (pb.QuorumResponse.RESYNC, "")
    waiting.cancel()


def wait_for_step(stub, late: str, step: int) -> pb.QuorumResponse:
    """late's RESYNC answer once a waiting member's request (at step) has reached the coordinator."""
    deadline = time.monotonic() + 10
    answer = ask(stub, late, tag="fragment-0").result()
    while answer.run_step != step and time.monotonic() < deadline:
        answer = ask(stub, late, tag="fragment-0").result()
    assert answer.run_step == step
    return answer


# -- quorum policies -------------------------------------------------------------------------


def test_first_k_holds_the_third_asker_then_tells_it_which_round_it_missed_and_who_holds_it(coordinator):
    c = coordinator(quorum="first-k:2")
    a, b, late = (join(c.stub, f"127.0.0.1:{port}") for port in (1, 2, 3))
    plans = [f.result() for f in [ask(c.stub, p) for p in (a, b)]]
    assert [(p.round_id, p.epoch, members(p), p.policy) for p in plans] == [(1, 0, [a, b], "first-k:2")] * 2
    held = ask(c.stub, late)
    time.sleep(0.5)
    assert not held.done(), "a peer the round formed without waits for that round's decision"
    assert all(f.result().commit for f in [report(c.stub, p, plans[0]) for p in (a, b)])
    answer = held.result()
    assert answer.action == pb.QuorumResponse.RESYNC
    assert (answer.last_committed_round, answer.sync_from) == (1, "127.0.0.1:1")
    assert [(r.round_id, r.epoch, r.tag, [(m.peer_id, m.address) for m in r.members]) for r in answer.missed] == [
        (1, 0, "", [(a, "127.0.0.1:1"), (b, "127.0.0.1:2")])
    ]


def test_a_sample_round_has_the_seeded_members_and_tells_them_how_to_check(coordinator):
    c = coordinator(quorum="sample:2", seed=7)
    peers = [join(c.stub, f"127.0.0.1:{port}") for port in (1, 2, 3, 4)]
    expected = list(sample_members(7, 1, peers, 2))
    asked = {p: ask(c.stub, p) for p in peers}
    plans = {p: asked[p].result() for p in expected}
    for plan in plans.values():
        assert (plan.round_id, members(plan)) == (1, expected)
        assert (plan.policy, plan.seed, list(plan.candidates)) == ("sample:2", 7, sorted(peers))
        check_sample(plan.seed, plan.round_id, plan.candidates, 2, members(plan))
    assert all(f.result().commit for f in [report(c.stub, p, plan) for p, plan in plans.items()])
    others = [p for p in peers if p not in expected]
    assert [asked[p].result().action for p in others] == [pb.QuorumResponse.RESYNC] * 2


def test_a_sample_fraction_draws_half_of_the_peers_and_the_status_marks_them(coordinator):
    c = coordinator(quorum="sample:0.5", seed=0)
    peers = [join(c.stub, f"127.0.0.1:{port}", peer_id=p) for port, p in enumerate("abcd", 1)]
    asked = {p: ask(c.stub, p) for p in peers}
    drawn = ["b", "c"]  # sample_members(0, 1, "abcd", 2): half of the four, pinned in tests/test_sampling.py
    plans = {p: asked[p].result() for p in drawn}
    for plan in plans.values():
        assert (members(plan), plan.policy, plan.seed, list(plan.candidates)) == (drawn, "sample:0.5", 0, peers)
    assert all(f.result().commit for f in [report(c.stub, p, plan) for p, plan in plans.items()])
    assert [asked[p].result().action for p in ("a", "d")] == [pb.QuorumResponse.RESYNC] * 2
    status = c.status()
    assert status["quorum_policy"] == "sample:0.5"
    assert {p["peer_id"]: p["in_last_round"] for p in status["peers"]} == {"a": False, "b": True, "c": True, "d": False}
    assert (status["rounds"][0]["members"], status["rounds"][0]["candidates"]) == (drawn, peers)


def test_the_peers_a_sample_went_on_without_stay_candidates_while_they_catch_up(coordinator):
    # Were the sample drawn from up-to-date peers only, round 2 would be drawn from b and c, the members of
    # round 1 that ask first (and half of two is one): every round would favour the last round's members.
    c = coordinator(quorum="sample:0.5", seed=0, join_timeout_s=5.0)
    for port, p in enumerate("abcd", 1):
        join(c.stub, f"127.0.0.1:{port}", peer_id=p)
    first = {p: ask(c.stub, p) for p in "abcd"}
    assert all(f.result().commit for f in [report(c.stub, p, first[p].result()) for p in "bc"])
    assert first["d"].result().action == pb.QuorumResponse.RESYNC  # d catches up on round 1 meanwhile
    second = {p: ask(c.stub, p, last_round=1) for p in "bc"}
    time.sleep(0.3)
    assert not second["c"].done(), "c, drawn with d for round 2 (sample_members(0, 2, abcd, 2)), waits for d"
    second["d"] = ask(c.stub, "d", last_round=1)
    plans = [second[p].result() for p in "cd"]
    assert [(p.round_id, members(p), list(p.candidates)) for p in plans] == [(2, ["c", "d"], list("abcd"))] * 2
    assert all(f.result().commit for f in [report(c.stub, p, plan) for p, plan in zip("cd", plans)])
    assert second["b"].result().action == pb.QuorumResponse.RESYNC


def test_the_peers_client_reads_the_round_it_missed_and_the_sample_to_check(coordinator):
    c = coordinator(quorum="sample:2", seed=3)
    with Transport() as transport:
        transport.start()
        clients = [MembershipClient(transport, MembershipConfig(c.address, RUN, rpc_timeout_s=5)) for _ in range(3)]
        for port, client in enumerate(clients, 1):
            transport.submit(client.join(f"127.0.0.1:{port}", 0, 0, has_state=True)).result(10)
        asked = {client.peer_id: transport.submit(client.quorum(0, timeout_s=20)) for client in clients}
        candidates = tuple(sorted(asked))
        drawn = sample_members(3, 1, candidates, 2)
        plans = [asked[p].result(20) for p in drawn]
        assert [(p.policy, p.seed, p.candidates) for p in plans] == [("sample:2", 3, candidates)] * 2
        for plan in plans:
            plan.check_sample()
        assert all(f.result().commit for f in [report(c.stub, p, plan) for p, plan in zip(drawn, plans)])
        (left_out,) = set(asked) - set(drawn)
        resync = asked[left_out].result(20)
        address = {client.peer_id: f"127.0.0.1:{port}" for port, client in enumerate(clients, 1)}
        holders = tuple((p, address[p]) for p in drawn)
        assert (resync.action, resync.missed) == ("resync", (MissedRound(1, 0, "", holders),))


def _pooled(transport: Transport, address: str):
    async def get():
        return transport.channel(address)
    return transport.submit(get()).result(10)


@contextlib.contextmanager
def joined_client(c) -> Iterator[tuple[Transport, MembershipClient]]:
    """A peer's coordinator client (and its transport), joined at 127.0.0.1:1."""
    with Transport() as transport:
        transport.start()
        client = MembershipClient(transport, MembershipConfig(c.address, RUN, rpc_timeout_s=5))
        transport.submit(client.join("127.0.0.1:1", 0, 0, has_state=True)).result(10)
        yield transport, client


def test_the_peers_client_connects_anew_to_a_member_that_registered_again(coordinator):
    c = coordinator()
    with joined_client(c) as (transport, client):
        other = join(c.stub, "127.0.0.1:2")
        for last_round in (0, 1):
            mine, theirs = transport.submit(client.quorum(last_round, timeout_s=20)), ask(c.stub, other, last_round)
            plan = theirs.result()
            mine.result(20)
            assert all(f.result().commit for f in [report(c.stub, p, plan) for p in (client.peer_id, other)])
            if last_round == 0:
                before = _pooled(transport, "127.0.0.1:2")
                c.stub.Leave(pb.LeaveRequest(run_id=RUN, peer_id=other, reason="cut"), timeout=5)
                join(c.stub, "127.0.0.1:2", peer_id=other, last_round=1)
        assert _pooled(transport, "127.0.0.1:2") is not before


def test_the_peers_client_registered_again_connects_anew_to_every_peer(coordinator):
    c = coordinator()
    with joined_client(c) as (transport, client):
        before = _pooled(transport, "127.0.0.1:2")
        c.stub.Leave(pb.LeaveRequest(run_id=RUN, peer_id=client.peer_id, reason="cut"), timeout=5)
        transport.submit(client.join("127.0.0.1:1", 0, 0, has_state=True)).result(10)
        assert _pooled(transport, "127.0.0.1:2") is not before


@pytest.mark.parametrize("sent_after, registrations, told_to_register", [
    (1, 1, True),   # the answer is about this registration
    (1, 2, False),  # sent before the peer registered again (a heartbeat in flight across its rejoin): stale
])
def test_an_unknown_peer_answer_to_a_call_from_before_the_last_registration_is_ignored(
        sent_after, registrations, told_to_register):
    # Read as news, it made a peer back from a cut register twice, and fetch the state twice.
    client = MembershipClient(Transport(), MembershipConfig("127.0.0.1:1", RUN))
    client.registrations = registrations
    client._unknown(sent_after)
    assert client.unregistered.is_set() == told_to_register


def test_a_peer_that_rejoins_behind_remembered_rounds_is_told_which_to_fetch_and_from_whom(coordinator):
    c = coordinator()
    a, b = (join(c.stub, f"127.0.0.1:{port}") for port in (1, 2))
    play_round(c.stub, [a, b], 0)
    c.stub.Leave(pb.LeaveRequest(run_id=RUN, peer_id=b, reason="paused"), timeout=5)
    play_round(c.stub, [a], 1)
    play_round(c.stub, [a], 2)
    back = c.stub.Join(rejoin(b, "127.0.0.1:2", last_round=1), timeout=5)
    assert back.sync_from == "127.0.0.1:1"
    assert [(r.round_id, [m.peer_id for m in r.members]) for r in back.missed] == [(2, [a]), (3, [a])]


def test_a_peer_behind_forgotten_rounds_fetches_the_whole_state(coordinator):
    c = coordinator(catchup_rounds=1)
    a, b = (join(c.stub, f"127.0.0.1:{port}") for port in (1, 2))
    play_round(c.stub, [a, b], 0)
    c.stub.Leave(pb.LeaveRequest(run_id=RUN, peer_id=b, reason="paused"), timeout=5)
    play_round(c.stub, [a], 1)
    play_round(c.stub, [a], 2)
    back = c.stub.Join(rejoin(b, "127.0.0.1:2", last_round=1), timeout=5)
    assert (back.sync_from, list(back.missed)) == ("127.0.0.1:1", [])


# -- restarts ----------------------------------------------------------------------------------


def test_a_restarted_coordinator_gives_its_first_round_a_new_epoch_once(coordinator):
    before = coordinator()
    a, b = (join(before.stub, f"127.0.0.1:{port}") for port in (1, 2))
    play_round(before.stub, [a, b], 0)
    play_round(before.stub, [a, b], 1)
    before.close()
    after = coordinator()
    for peer_id, port in ((a, 1), (b, 2)):
        join(after.stub, f"127.0.0.1:{port}", peer_id=peer_id, last_round=2, epoch=0)
    plans = [play_round(after.stub, [a, b], last_round) for last_round in (2, 3)]
    assert [(p.round_id, p.epoch) for p in plans] == [(3, 1), (4, 1)]


def test_a_lone_survivor_below_min_peers_is_told_at_once_not_after_the_quorum_timeout(coordinator):
    c = coordinator(min_peers=2, quorum_timeout_s=60)
    a, b = (join(c.stub, f"127.0.0.1:{port}") for port in (1, 2))
    play_round(c.stub, [a, b], 0)
    c.stub.Leave(pb.LeaveRequest(run_id=RUN, peer_id=b, reason="done"), timeout=5)
    # The quorum timeout is 60 s; the refusal must come after the 0.5 s join timeout (10 s allows for a slow machine).
    request = pb.QuorumRequest(run_id=RUN, peer_id=a, last_round=1)
    code, details = status_code(lambda: c.stub.Quorum(request, timeout=10))
    assert code == grpc.StatusCode.FAILED_PRECONDITION
    assert "no quorum" in details and "1 live peer" in details and "min_peers is 2" in details


def test_a_lone_survivor_refused_again_and_again_makes_a_round_once_a_peer_is_back(coordinator):
    # From its second refusal on, the survivor is refused without waiting out the join timeout again (nobody came
    # back in the first: rules.quorum_hopeless, waited_out); a peer back changes the live peers, and rounds form.
    c = coordinator(min_peers=2)
    a, b = (join(c.stub, f"127.0.0.1:{port}") for port in (1, 2))
    play_round(c.stub, [a, b], 0)
    c.stub.Leave(pb.LeaveRequest(run_id=RUN, peer_id=b, reason="done"), timeout=5)
    request = pb.QuorumRequest(run_id=RUN, peer_id=a, last_round=1)
    for _ in range(3):
        code, details = status_code(lambda: c.stub.Quorum(request, timeout=10))
        assert code == grpc.StatusCode.FAILED_PRECONDITION and "1 live peer(s), min_peers is 2" in details
    refusals = lambda: len([e for e in c.status()["events"] if e["kind"] == "quorum-refused"])  # noqa: E731
    assert refusals() == 1  # the same shortage, told once to the dashboard
    c.stub.Join(rejoin(b, "127.0.0.1:2", 1), timeout=5)
    assert members(play_round(c.stub, [a, b], 1)) == sorted([a, b])
    # A shortage after the run made rounds again is a new one: waited out, and told.
    c.stub.Leave(pb.LeaveRequest(run_id=RUN, peer_id=b, reason="done"), timeout=5)
    code, _ = status_code(lambda: c.stub.Quorum(pb.QuorumRequest(run_id=RUN, peer_id=a, last_round=2), timeout=10))
    assert code == grpc.StatusCode.FAILED_PRECONDITION and refusals() == 2


def test_no_round_forms_below_the_peers_aggregators_minimum(coordinator):
    # Krum with f=1 needs 5 contributions: four live peers are refused at the join timeout, not formed
    # into rounds that every member would abort.
    c = coordinator(quorum_timeout_s=60)
    peers = [join(c.stub, f"127.0.0.1:{port}") for port in range(1, 5)]
    play_round(c.stub, peers, 0)
    requests = [pb.QuorumRequest(run_id=RUN, peer_id=p, last_round=1, min_members=5) for p in peers]
    futures = [c.stub.Quorum.future(r, timeout=10) for r in requests]
    for future in futures:
        with pytest.raises(grpc.RpcError) as info:
            future.result()
        assert info.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert "4 live peer(s)" in info.value.details() and "rounds need 5 members" in info.value.details()
    assert c.status()["summary"]["rounds_aborted"] == 0


def test_before_the_first_commit_a_quorum_short_of_the_aggregators_minimum_is_refused_not_held(coordinator):
    # min_peers would hold it (the operator asked for that many peers); nothing says a fifth peer will come.
    c = coordinator(quorum_timeout_s=60)
    peers = [join(c.stub, f"127.0.0.1:{port}") for port in range(1, 5)]
    requests = [pb.QuorumRequest(run_id=RUN, peer_id=p, last_round=0, min_members=5) for p in peers]
    for future in [c.stub.Quorum.future(r, timeout=10) for r in requests]:
        with pytest.raises(grpc.RpcError) as info:
            future.result()
        assert info.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert "rounds need 5 members" in info.value.details()


def test_a_round_forms_once_the_aggregators_minimum_is_reached(coordinator):
    c = coordinator()
    peers = [join(c.stub, f"127.0.0.1:{port}") for port in range(1, 4)]
    plans = [
        c.stub.Quorum.future(pb.QuorumRequest(run_id=RUN, peer_id=p, last_round=0, min_members=3), timeout=10)
        for p in peers
    ]
    assert sorted(members(plans[0].result())) == sorted(peers)



def test_under_backup_a_worker_naming_another_k_joins_the_pending_round_whose_k_stands(coordinator):
    # A worker that missed the round that changed the roster chooses k for the old one (docs/gradient-coding.md).
    c = coordinator(quorum="backup", min_peers=1)
    a, b, stale = (join(c.stub, f"127.0.0.1:{port}") for port in (1, 2, 3))
    first = ask(c.stub, stale, tag="sync-sgd:k=2")  # pending: k=2
    code, details = status_code(lambda: ask(c.stub, b, tag="coded-sgd:k=2").result())  # another algorithm
    assert code == grpc.StatusCode.FAILED_PRECONDITION and "disagree on the schedule" in details
    second = ask(c.stub, a, tag="sync-sgd:k=3")
    plans = [first.result(), second.result()]
    assert [p.round_id for p in plans] == [1, 1]
    assert {m.peer_id for m in plans[0].members} == {stale, a}  # the first two askers: the pending round's k=2


def test_a_minimum_beyond_any_run_is_refused_at_the_edge(stub):
    peer = join(stub, "127.0.0.1:1")
    request = pb.QuorumRequest(run_id=RUN, peer_id=peer, last_round=0, min_members=1 << 20)
    code, details = status_code(lambda: stub.Quorum(request, timeout=5))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "min_members 1048576" in details
    still_serving(stub)


def test_a_fresh_peer_waits_for_the_state_holders_of_a_restarted_coordinator_instead_of_founding(coordinator):
    stub = coordinator(startup_grace_s=20).stub
    # A heartbeat under an id this coordinator never gave out: a peer of its predecessor.
    assert not stub.Heartbeat(pb.HeartbeatRequest(run_id=RUN, peer_id="p1-0a0b0c"), timeout=5).known
    fresh = pb.JoinRequest(run_id=RUN, address="127.0.0.1:2", has_state=False)
    told = stub.Join(fresh, timeout=5)
    assert told.wait and "re-registered" in told.wait_reason and not told.sync_from
    join(stub, "127.0.0.1:1", peer_id="p1-0a0b0c", last_round=5)
    assert stub.Join(fresh, timeout=5).sync_from == "127.0.0.1:1"


def test_with_a_state_file_a_restarted_coordinator_makes_a_fresh_peer_wait_before_any_old_peer_calls(
    coordinator, tmp_path
):
    state_file = str(tmp_path / "run.json")
    before = coordinator(state_file=state_file)
    founder = before.stub.Join(pb.JoinRequest(run_id=RUN, address="127.0.0.1:1", has_state=False), timeout=5)
    plan = play_round(before.stub, [founder.peer_id], 0)
    before.close()
    assert json.loads(open(state_file).read()) == {
        "run_id": RUN, "last_committed_round": 1, "epoch": 0, "digest": "", "committed_epoch": 0,
    }
    stub = coordinator(state_file=state_file, startup_grace_s=20).stub
    # No heartbeat from the old peer yet: only the state file tells the run exists.
    fresh = pb.JoinRequest(run_id=RUN, address="127.0.0.1:2", has_state=False)
    told = stub.Join(fresh, timeout=5)
    assert told.wait and "committed round 1" in told.wait_reason and not told.sync_from
    join(stub, "127.0.0.1:1", peer_id=founder.peer_id, last_round=plan.round_id)
    assert stub.Join(fresh, timeout=5).sync_from == "127.0.0.1:1"


def test_no_round_waits_for_a_joiner_whose_state_fetch_failed_until_it_asks_for_one(coordinator):
    # Probe L: a joiner that could not reach its sources (a partition, a slow link) joined again and again, and
    # every round waited the join timeout for it for as long as that lasted.
    c = coordinator(join_timeout_s=60.0)
    a, b = join(c.stub, "127.0.0.1:1"), join(c.stub, "127.0.0.1:2")
    fresh = pb.JoinRequest(run_id=RUN, address="127.0.0.1:3", has_state=False)
    joiner = c.stub.Join(fresh, timeout=5).peer_id
    again = c.stub.Join(pb.JoinRequest(run_id=RUN, address="127.0.0.1:3", peer_id=joiner, has_state=False), timeout=5)
    assert again.peer_id == joiner and again.sync_from  # still syncing: its first fetch failed
    plans = [f.result() for f in [ask(c.stub, p) for p in (a, b)]]  # 60 s of join timeout would outlast ask's 20
    assert sorted(members(plans[0])) == sorted([a, b])


def test_a_leave_after_the_lease_lapsed_still_records_the_peer_as_left_and_finished(coordinator):
    # Probe L: a peer whose lease lapsed in its last round on a slow link said "left run (finished)", and the
    # dashboard kept it "lost / in-round" (and a straggler waited for it as a holder that might come back).
    c = coordinator(lease_s=1.0, heartbeat_s=0.2)
    peer = join(c.stub, "127.0.0.1:1")
    deadline = time.monotonic() + 30
    while not [p for p in c.status()["peers"] if p["state"] == "lost"] and time.monotonic() < deadline:
        time.sleep(0.1)
    final = pb.PeerMetrics(step=300, activity="in-round", eval_loss=1.9)
    c.stub.Leave(pb.LeaveRequest(run_id=RUN, peer_id=peer, reason="finished", metrics=final), timeout=5)
    (shown,) = c.status()["peers"]
    assert (shown["state"], shown["activity"], shown["step"], shown["eval_loss"]) == ("left", "", 300, 1.9)


def test_a_round_tells_its_members_the_furthest_step_any_of_them_asked_at(stub):
    a, b = join(stub, "127.0.0.1:1"), join(stub, "127.0.0.1:2")
    plans = [f.result() for f in [ask(stub, a, step=1640), ask(stub, b, step=1680)]]
    assert [p.members_step for p in plans] == [1680, 1680]


def test_a_report_sent_twice_counts_its_bytes_once(stub):
    a, b = join(stub, "127.0.0.1:1"), join(stub, "127.0.0.1:2")
    plans = [f.result() for f in [ask(stub, p) for p in (a, b)]]
    again = pb.CommitRequest(run_id=RUN, peer_id=a, round_id=plans[0].round_id, epoch=plans[0].epoch, ok=True,
                             report=pb.RoundReport(bytes_sent=1000))
    first, second = stub.Commit.future(again, timeout=20), stub.Commit.future(again, timeout=20)
    last = stub.Commit(pb.CommitRequest(run_id=RUN, peer_id=b, round_id=plans[1].round_id, epoch=plans[1].epoch,
                                        ok=True, report=pb.RoundReport(bytes_sent=500)), timeout=20)
    assert first.result().commit and second.result().commit and last.commit
    rounds = json.loads(stub.Status(pb.StatusRequest(run_id=RUN), timeout=5).json)["rounds"]
    assert [r["bytes"] for r in rounds] == [1500]


def test_a_leave_carries_the_peers_final_figures_to_the_status(stub):
    # What a peer did after its last heartbeat (its last round's bytes, a final evaluation) still counts.
    peer = join(stub, "127.0.0.1:1")
    final = pb.PeerMetrics(step=1500, bytes_sent=933_426, bytes_received=900_000, samples=24_000, eval_loss=1.75,
                           steps_per_s=30.0, loss=1.8, activity="training")
    stub.Leave(pb.LeaveRequest(run_id=RUN, peer_id=peer, reason="finished", metrics=final), timeout=5)
    status = json.loads(stub.Status(pb.StatusRequest(run_id=RUN), timeout=5).json)
    (shown,) = [p for p in status["peers"] if p["peer_id"] == peer]
    assert (shown["step"], shown["bytes_sent"], shown["samples"], shown["eval_loss"]) == (1500, 933_426, 24_000, 1.75)
    assert shown["state"] == "left" and shown["activity"] == ""


@pytest.mark.parametrize(
    "reasons, in_vain",
    [
        (("finished", "finished"), True),  # the run ended ahead of the waiter: nobody will serve its last round
        (("finished", "stopped by SIGTERM"), False),  # a stopped holder may start again with its checkpoint
        (("finished", None), False),  # one holder still live: the waiter is given it, not told to wait
    ],
)
def test_a_peer_behind_the_run_is_told_whether_every_holder_of_its_last_round_finished(stub, reasons, in_vain):
    holders = [join(stub, f"127.0.0.1:{port}") for port in (1, 2)]
    play_round(stub, holders, 0)
    for peer_id, reason in zip(holders, reasons):
        if reason is not None:
            stub.Leave(pb.LeaveRequest(run_id=RUN, peer_id=peer_id, reason=reason), timeout=5)
    told = stub.Join(pb.JoinRequest(run_id=RUN, address="127.0.0.1:3", has_state=False), timeout=5)
    assert told.holders_finished is in_vain
    assert ("every peer holding it finished and left" in told.wait_reason) is in_vain
    assert told.wait is (reasons[1] is not None)


def test_the_first_peer_of_a_new_run_founds_it_without_waiting_out_the_grace(coordinator):
    stub = coordinator(startup_grace_s=20).stub
    reply = stub.Join(pb.JoinRequest(run_id=RUN, address="127.0.0.1:1", has_state=False), timeout=5)
    assert reply.sync_from == ""  # the founder: its initial state is the run's
    second = stub.Join(pb.JoinRequest(run_id=RUN, address="127.0.0.1:2", has_state=False), timeout=5)
    assert second.sync_from == "127.0.0.1:1"


# -- the dashboard, with real peers ------------------------------------------------------------


@pytest.mark.skipif(chromium_path() is None, reason=NO_CHROMIUM)
def test_dashboard_in_chromium_shows_the_live_peers_a_round_and_the_chart(tmp_path):
    coordinator = CoordinatorProc(
        tmp_path / "coordinator.log", "live", 0, "--join-timeout", "1", "--heartbeat", "0.2", "--lease", "2"
    )
    peers = [toy_peer(tmp_path, coordinator.address, "live", name, "--interval", "0.3") for name in ("a", "b")]
    try:
        ids = [p.wait_event(lambda e: e["event"] == "joined", 60)["peer_id"] for p in peers]
        for p in peers:
            p.wait_event(lambda e: e["event"] == "committed" and len(e["members"]) == 2, 60)
        status = json.loads(urllib.request.urlopen(coordinator.dashboard + "/api/status", timeout=5).read())
        assert {p["peer_id"] for p in status["peers"] if p["state"] == "active"} == set(ids)
        assert status["rounds"][-1]["round_id"] == 1, "round ids count from 1"
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


def test_after_a_silence_took_every_lease_the_next_round_waits_for_all_its_peers(coordinator):
    # Probe L (F4): a coordinator cut off for 10 s lost all three leases; the first two peers back formed a round
    # 0.5 s before the third re-registered, which then stayed behind for the rest of the run on its slow link.
    c = coordinator(lease_s=1.0, heartbeat_s=0.2, startup_grace_s=3.0, join_timeout_s=5.0)
    peers = [join(c.stub, f"127.0.0.1:{i}") for i in (1, 2, 3)]
    beat(c.stub, peers, 3.2)  # past the coordinator's own startup grace
    play_round(c.stub, peers, 0)
    deadline = time.monotonic() + 30  # nobody heartbeats: every lease lapses
    while len([p for p in c.status()["peers"] if p["state"] == "lost"]) < 3 and time.monotonic() < deadline:
        time.sleep(0.1)
    back = [c.stub.Join(rejoin(p, f"127.0.0.1:{i}", 1), timeout=5).peer_id for i, p in zip((1, 2), peers)]
    waiting = [ask(c.stub, p, last_round=1) for p in back]
    beat(c.stub, back, 1.5)  # the first two would have formed a round by now
    assert not any(f.done() for f in waiting)
    c.stub.Join(rejoin(peers[2], "127.0.0.1:3", 1), timeout=5)
    plans = [f.result() for f in [*waiting, ask(c.stub, peers[2], last_round=1)]]
    assert sorted(members(plans[0])) == sorted(peers)
    assert [e["kind"] for e in c.status()["events"]].count("outage") == 1
