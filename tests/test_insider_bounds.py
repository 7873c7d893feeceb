"""An insider's word is bounded (issue 13, item 3): a peer with the run's credential still cannot push the run's
round or epoch where it likes, and one peer's digest does not decide what the run's state is.

The rules are pure functions with tables; the live cases run a real coordinator in this process
(``support.coordinator.Live``) with made-up peers that only talk to it.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import grpc
import pytest

from collectives.errors import Incompatible, NotThisRun
from collectives.membership.client import MembershipClient, MembershipConfig
from collectives.net.transport import Transport
from peer.coordinator.rules import MAX_CLAIM, claim_verdict, majority_round
from peer.coordinator.runstate import PeerRecord, RoundRecord, RunState

sys.path.insert(0, str(Path(__file__).parent))
from support.coordinator import RUN, Live, digest, live_coordinators

pytestmark = pytest.mark.timeout(120)

U64_MAX = (1 << 64) - 1


@pytest.mark.parametrize(
    "round_claim, epoch_claim, committed, epoch, history_known, verdict",
    [
        (3, 2, 3, 2, True, "ok"),
        (2, 1, 3, 2, True, "ok"),  # behind: it resyncs
        (4, 2, 3, 2, True, "ahead"),  # a round this coordinator never committed
        (3, 3, 3, 2, True, "ahead"),  # an epoch it never gave out
        (4, 3, 3, 2, False, "ok"),  # a coordinator that lost the history hears the returning peers out
        (U64_MAX, 0, 3, 2, False, "absurd"),
        (0, U64_MAX, 0, 0, False, "absurd"),
        (MAX_CLAIM, MAX_CLAIM, MAX_CLAIM, MAX_CLAIM, True, "ok"),
        (MAX_CLAIM + 1, 0, MAX_CLAIM + 5, 0, True, "absurd"),
    ],
)
def test_a_joiners_claim_is_taken_only_within_what_the_run_can_have(
    round_claim, epoch_claim, committed, epoch, history_known, verdict
):
    assert claim_verdict(round_claim, epoch_claim, committed, epoch, history_known) == verdict


@pytest.mark.parametrize(
    "claims, adopted",
    [
        ([], 0),
        ([7], 7),
        ([7, 7], 7),
        ([U64_MAX, 7], 7),  # one liar of two cannot raise it
        ([7, 9, 12], 9),  # the furthest round two of three reach
        ([5, 5, 9, 1 << 40], 5),  # more than half (3 of 4) must reach it
    ],
)
def test_a_coordinator_that_lost_the_history_adopts_the_round_a_majority_of_returning_holders_reach(claims, adopted):
    assert majority_round(claims) == adopted


def committed(state: RunState, round_id: int, members: tuple[str, ...]) -> None:
    state.record_commit(RoundRecord(round_id, 0, list(members), started_at=0.0))


def test_the_digest_the_rounds_members_agree_on_overturns_a_minoritys_first_report():
    state = RunState(RUN, 1)
    committed(state, 1, ("a", "b", "c"))
    assert state.note_digest(1, digest(666), "c") is None  # the liar reports first
    assert state.note_digest(1, digest(1), "a") == ("c", digest(666))  # a tie: the first stays
    assert state.digest_of(1) == digest(666)
    assert state.note_digest(1, digest(1), "b") == ("c", digest(666))  # two members of three agree
    assert state.digest_of(1) == digest(1)


def test_a_peer_outside_the_round_does_not_vote_on_its_digest():
    state = RunState(RUN, 1)
    committed(state, 1, ("a", "b"))
    state.note_digest(1, digest(1), "a")
    for sybil in ("x", "y", "z"):
        state.note_digest(1, digest(666), sybil)
    assert state.digest_of(1) == digest(1)


# -- against a live coordinator ----------------------------------------------------------------------

DEFAULTS = {
    "run_id": RUN, "port": 0, "dashboard_port": None, "probe_peers": False, "startup_grace_s": 0.0, "lease_s": 30.0,
    "join_timeout_s": 0.5, "min_peers": 2,
}


@pytest.fixture
def coordinator() -> Iterator[Callable[..., Live]]:
    """Factory of fresh coordinators (DEFAULTS overridden by keywords), all stopped after the test."""
    with live_coordinators(DEFAULTS) as start:
        yield start


def two_peers_at_round_2(c: Live) -> tuple[str, str]:
    a = c.join("127.0.0.1:1", has_state=False).peer_id
    b = c.join("127.0.0.1:2", has_state=False).peer_id
    c.play([a, b], 0)
    c.play([a, b], 1)
    return a, b


@pytest.mark.parametrize(
    "claim",
    [{"last_round": U64_MAX}, {"last_round": 2, "epoch": U64_MAX}, {"last_round": 3}, {"last_round": 2, "epoch": 9}],
    ids=["round 2^64-1", "epoch 2^64-1", "a round not committed yet", "an epoch never given out"],
)
def test_a_join_claiming_more_than_the_run_has_is_refused_and_the_run_goes_on(coordinator, claim):
    c = coordinator()
    a, b = two_peers_at_round_2(c)
    before = c.status()
    with pytest.raises(grpc.RpcError) as refused:
        c.join("127.0.0.1:3", has_state=True, state_digest=digest(claim["last_round"] % 1000), **claim)
    assert refused.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "claims round" in refused.value.details()
    after = c.status()
    assert (
        (after["last_committed_round"], after["epoch"]) == (before["last_committed_round"], before["epoch"]) == (2, 0)
    )
    assert len(after["peers"]) == 2 and after["refusals"] == {"claim": 1}
    assert c.play([a, b], 2).round_id == 3


def test_a_peer_whose_state_the_run_never_gave_out_is_told_so_as_incompatible(coordinator):
    # After `loconet coordinator --new-run`, the old run's peers were refused at every rejoin and trained on alone to
    # their end, exit 0: the client now raises NotThisRun (an Incompatible: the optimizer stops the peer).
    c = coordinator()
    two_peers_at_round_2(c)
    with Transport() as transport:
        transport.start()
        client = MembershipClient(transport, MembershipConfig(c.address, RUN, rpc_timeout_s=5))
        with pytest.raises(NotThisRun, match="a state this run never gave out .*--new-run.*remove its checkpoint"):
            transport.submit(client.join("127.0.0.1:3", 17, 0, has_state=True, digest=digest(17))).result(10)
    assert issubclass(NotThisRun, Incompatible)


def test_a_coordinator_that_lost_the_history_does_not_follow_one_returning_peers_higher_claim(coordinator):
    c = coordinator()
    # Peers of an earlier coordinator (ids this one never gave out) come back at round 5; one claims round 50.
    honest = [c.join(f"127.0.0.1:{i}", peer_id=f"p{i}-old", has_state=True, last_round=5, epoch=1,
                     state_digest=digest(5)) for i in (1, 2)]
    liar = c.join("127.0.0.1:3", peer_id="p3-old", has_state=True, last_round=50, epoch=1, state_digest=digest(50))
    assert c.status()["last_committed_round"] == 5
    assert all(not r.sync_from for r in honest)
    assert liar.sync_from in ("127.0.0.1:1", "127.0.0.1:2")  # it must fetch the run's state like a fresh peer
    assert any(e["peer_id"] == "p3-old" for e in c.events("claim"))


def test_a_join_of_a_run_that_is_full_is_refused_saying_so(coordinator):
    c = coordinator(max_peers=2)
    c.join("127.0.0.1:1", has_state=False)
    c.join("127.0.0.1:2", has_state=False)
    with pytest.raises(grpc.RpcError) as refused:
        c.join("127.0.0.1:3", has_state=False)
    assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and "--max-peers" in refused.value.details()
    assert c.status()["refusals"] == {"full": 1}



def test_a_coordinator_without_a_state_file_adopts_the_round_of_peers_restarted_from_their_checkpoints(coordinator):
    # Everything stopped, then started again, the coordinator without --state-file: the peers are new processes (no
    # ids of an earlier coordinator), and their checkpoints are the run. They were refused as "a state this run never
    # gave out", and the run could not be brought back.
    c = coordinator()
    a = c.join("127.0.0.1:1", has_state=True, last_round=30, state_digest=digest(30))
    b = c.join("127.0.0.1:2", has_state=True, last_round=30, state_digest=digest(30))
    assert c.status()["last_committed_round"] == 30 and not a.sync_from and not b.sync_from
    fresh = c.join("127.0.0.1:3", has_state=False)
    assert fresh.sync_from in ("127.0.0.1:1", "127.0.0.1:2")
    assert c.play([a.peer_id, b.peer_id, fresh.peer_id], 30).round_id == 31


@pytest.mark.parametrize(
    "peer_id, last_round, counted",
    [
        ("a", 1, True),  # a member of the last round, up to date
        ("x", 1, False),  # up to date, but in no round: its word would set the run's step for good
        ("a", 0, False),  # a member that is behind
    ],
)
def test_only_an_up_to_date_member_of_the_last_round_says_where_the_run_trains(peer_id, last_round, counted):
    state = RunState(RUN, 1)
    state.note_step("x", 0, 7)  # before this coordinator's first commit, any up-to-date peer's word counts
    committed(state, 1, ("a", "b"))
    state.note_step(peer_id, last_round, 2**63)
    assert state.run_step == (2**63 if counted else 7)


def test_a_peer_whose_digest_lost_and_then_left_no_longer_needs_realigning():
    # A new process under its id (peers keep their ids across restarts) reports its own state again.
    state = RunState(RUN, 1)
    for peer_id in ("a", "b"):
        state.peers[peer_id] = PeerRecord(peer_id, f"127.0.0.1:{ord(peer_id)}", lease_s=5.0, state="active")
    committed(state, 1, ("a", "b"))
    state.note_digest(1, digest(1), "a")
    state.note_digest(1, digest(666), "b")
    assert state.digest_book.must_realign("b")
    state.drop_peer(state.peers["b"], "left")
    assert not state.digest_book.must_realign("b")
