"""Peers of a run agree on what a round carries (codec, aggregator, length): a peer started with another
``--codec`` is refused at its quorum request, for good once the run committed a round of that tag, and stops
with one line instead of breaking every round it joins (docs/membership.md).

The rule is a pure function with a table; the live cases run a real coordinator in this process
(``support.coordinator.Live``) with made-up peers, and the last test real ``loconet peer`` processes.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import grpc
import pytest

from collectives.membership import FORMAT_DIFFERS, round_format
from peer.coordinator.rules import format_refusal
from protos import membership_pb2 as pb

sys.path.insert(0, str(Path(__file__).parent))
from support.coordinator import RUN, Live, live_coordinators
from support.procs import DaemonRun

pytestmark = pytest.mark.timeout(120)

INT8 = round_format("int8", "mean", 1000)
INT4 = round_format("int4", "mean", 1000)


def test_a_round_format_names_the_codec_the_aggregator_and_the_length():
    assert round_format("int8", "trimmed_mean:trim=0.1", 1234) == "codec int8, aggregator trimmed_mean:trim=0.1, 1234 values"


@pytest.mark.parametrize(
    ("asked", "pending", "run", "refused", "for_good"),
    [
        (INT8, "", "", False, False),  # the first to say
        (INT8, INT8, INT8, False, False),
        ("", INT8, INT8, False, False),  # a peer that does not say is not checked
        (INT4, INT8, "", True, False),  # the pending round's is another: for now (nothing committed yet)
        (INT4, "", INT8, True, True),  # the run's committed rounds of the tag carry another: for good
        (INT4, INT4, INT8, True, True),
        (INT8, INT4, INT8, True, False),
    ],
)
def test_a_request_whose_round_format_is_not_the_runs_or_the_pending_rounds_is_refused(
    asked, pending, run, refused, for_good
):
    why, final = format_refusal(asked, pending, run)
    assert (bool(why), final) == (refused, for_good)
    assert (FORMAT_DIFFERS in why) == for_good  # what the peer reads as "stop"


@pytest.fixture
def coordinator() -> Iterator[Callable[..., Live]]:
    with live_coordinators(
        {"run_id": RUN, "port": 0, "dashboard_port": None, "startup_grace_s": 0.0, "min_peers": 1,
         "join_timeout_s": 0.5, "heartbeat_s": 0.5, "lease_s": 30.0}
    ) as start:
        yield start


def ask(c: Live, peer_id: str, last_round: int, fmt: str) -> grpc.Future:
    request = pb.QuorumRequest(run_id=RUN, peer_id=peer_id, last_round=last_round, round_format=fmt)
    return c.stub.Quorum.future(request, timeout=10)


def commit(c: Live, peers: list[str], fmt: str, last_round: int) -> int:
    """Every peer asks with fmt and reports success: the round commits. Its id."""
    plans = [f.result() for f in [ask(c, p, last_round, fmt) for p in peers]]
    reports = [
        c.stub.Commit.future(pb.CommitRequest(run_id=RUN, peer_id=p, round_id=plan.round_id, epoch=plan.epoch, ok=True),
                             timeout=10)
        for p, plan in zip(peers, plans)
    ]
    assert all(f.result().commit for f in reports)
    return plans[0].round_id


def refusal(call: grpc.Future) -> str:
    with pytest.raises(grpc.RpcError) as info:
        call.result()
    assert info.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    return info.value.details()


def test_once_a_round_committed_another_format_is_refused_for_good_naming_both(coordinator):
    c = coordinator()
    a, b = (c.join(f"127.0.0.1:{port}", has_state=True).peer_id for port in (1, 2))
    assert commit(c, [a, b], INT8, 0) == 1
    odd = c.join("127.0.0.1:3", has_state=True, last_round=1).peer_id
    details = refusal(ask(c, odd, 1, INT4))
    assert FORMAT_DIFFERS in details and INT4 in details and INT8 in details
    assert [e["detail"] for e in c.events("format-refused") if e["peer_id"] == odd] == [details]
    assert commit(c, [a, b], INT8, 1) == 2  # the run goes on as it was


def test_while_a_round_is_pending_another_format_is_refused_for_now(coordinator):
    c = coordinator(min_peers=2)
    a, b = (c.join(f"127.0.0.1:{port}", has_state=True).peer_id for port in (1, 2))
    first = ask(c, a, 0, INT8)  # pending: int8 (the round waits for a second peer)
    details = refusal(ask(c, b, 0, INT4))
    assert "peers disagree" in details and FORMAT_DIFFERS not in details
    plan = ask(c, b, 0, INT8).result()
    assert plan.round_id == first.result().round_id == 1


def test_a_run_whose_every_member_left_takes_the_next_format(coordinator):
    c = coordinator()
    a, b = (c.join(f"127.0.0.1:{port}", has_state=True).peer_id for port in (1, 2))
    commit(c, [a, b], INT8, 0)
    new = c.join("127.0.0.1:3", has_state=True, last_round=1).peer_id
    refusal(ask(c, new, 1, INT4))
    c.leave(a, last_round=1)
    refusal(ask(c, new, 1, INT4))  # b, a member of the int8 round, is still in the run
    c.leave(b, last_round=1)
    assert commit(c, [new], INT4, 1) == 2  # everyone restarted with int4: the run goes on with it


def test_a_round_format_beyond_its_limit_is_refused_at_the_edge(coordinator):
    c = coordinator()
    a = c.join("127.0.0.1:1", has_state=True).peer_id
    with pytest.raises(grpc.RpcError) as info:
        ask(c, a, 0, "x" * 201).result()
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT


@pytest.mark.timeout(300)
def test_a_peer_started_with_another_codec_stops_in_one_line_and_the_run_goes_on(tmp_path):
    run = DaemonRun(tmp_path, "fmt")
    try:
        # Each its own host, so their rounds cross the data plane with their codec (one host shares memory).
        a, b = (run.add(n, "--steps", "400", "--host-id", n) for n in ("a", "b"))
        a.wait_event(lambda e: e["event"] == "committed", 120)
        odd = run.add("odd", "--codec", "int4", "--host-id", "odd", "--steps", "400")
        assert odd.proc.wait(timeout=120) != 0
        errors = [line for line in (tmp_path / "odd.log").read_text().splitlines() if line.startswith("loconet:")]
        assert len(errors) == 1 and FORMAT_DIFFERS in errors[0] and "codec int4" in errors[0], errors
        for peer in (a, b):
            peer.wait_event(lambda e: e["event"] == "finished", 240)
        coordinator_log = (tmp_path / "coordinator.log").read_text()
        assert "aborted" not in coordinator_log  # the odd peer broke no round
        assert "left: failed: " in coordinator_log
    finally:
        run.close()
