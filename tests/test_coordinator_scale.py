"""What keeps the coordinator's cost per round small at 1,000 peers (docs/scale.md).

A ROUND answer is serialised once for all members plus each one's rank field; the
dashboard's series books stop searching for a free place while none can have
appeared; the membership benchmark's rate limits scale with the simulated peers
behind its one address instead of exempting it; heartbeats slow down as the run
grows, for the peers that joined it small too.
"""

from __future__ import annotations

import pytest

from collectives.membership.memberlists import Entry, entries_of, list_bytes, list_digest, unpack_list
from collectives.membership.roundplan import commit_time, heartbeat_interval
from peer.bench.simsession import bench_rate_limits
from peer.coordinator.config import CoordinatorConfig
from peer.coordinator.history import SeriesBook
from peer.coordinator.quorum import RoundAnswer, RoundLists, rank_field
from peer.coordinator.service import Coordinator
from protos import membership_pb2 as pb


def _template() -> pb.QuorumResponse:
    return pb.QuorumResponse(
        action=pb.QuorumResponse.ROUND, round_id=7, epoch=2, last_committed_round=6, policy="all", seed=3,
        members=[pb.Member(peer_id=f"p{i}-abc", address=f"10.0.0.{i}:2000{i}") for i in range(3)],
    )


@pytest.mark.parametrize("rank", [0, 1, 2, 127, 128, 300, 16_383, 16_384, 2**32 - 1])
def test_the_shared_answer_plus_a_rank_field_reads_as_the_answer_with_that_rank(rank):
    expected = _template()
    expected.rank = rank
    assert pb.QuorumResponse.FromString(_template().SerializeToString() + rank_field(rank)) == expected


@pytest.mark.parametrize("known, with_list", [(b"", True), (b"\x01" * 32, True), (b"\x02" * 32, False)])
def test_a_round_answer_leaves_the_list_out_only_for_the_asker_naming_its_digest(known, with_list):
    digest = b"\x02" * 32
    whole = _template()
    rest = pb.QuorumResponse(action=whole.action, round_id=whole.round_id, epoch=whole.epoch,
                             last_committed_round=whole.last_committed_round, policy=whole.policy, seed=whole.seed,
                             members_digest=digest)
    listed = pb.QuorumResponse(members=whole.members).SerializeToString()
    answer = RoundAnswer(RoundLists(rest.SerializeToString(), entries_of(whole.members), listed, digest, {}), rank=2)
    expected = pb.QuorumResponse()
    expected.CopyFrom(rest)
    expected.rank = 2
    if with_list:
        expected.members.extend(whole.members)
    assert pb.QuorumResponse.FromString(answer.wire(known)) == expected


def _lists(new, recent) -> RoundLists:
    """The answer bodies of a round with member list new, recent: the lists askers may hold, by digest."""
    rest = pb.QuorumResponse(action=pb.QuorumResponse.ROUND, round_id=9, members_digest=list_digest(new))
    return RoundLists(rest.SerializeToString(), new, list_bytes(new), list_digest(new), recent)


BIG = tuple(Entry(f"p{i:04d}", f"10.0.{i // 256}.{i % 256}:2000", "", i + 1) for i in range(100))


def test_an_asker_holding_a_recent_list_gets_the_change_from_it_and_no_members():
    new = (*BIG[1:], Entry("p9999", "10.9.9.9:1", "", 101))
    reply = pb.QuorumResponse.FromString(_lists(new, {list_digest(BIG): BIG}).body(list_digest(BIG)))
    assert (list(reply.members), reply.members_base, list(reply.members_removed)) == ([], list_digest(BIG), [0])
    assert [(m.index, m.member.peer_id) for m in reply.members_added] == [(99, "p9999")]


def test_an_asker_holding_a_list_the_coordinator_does_not_have_gets_the_whole_list():
    lists = _lists(BIG, {})
    assert len(pb.QuorumResponse.FromString(lists.body(b"\x07" * 32)).members) == 100


def test_a_change_larger_than_the_whole_list_is_not_sent():
    other = tuple(Entry(f"q{i:04d}", e.address, e.host_id, 200 + i) for i, e in enumerate(BIG))  # every member replaced
    reply = pb.QuorumResponse.FromString(_lists(other, {list_digest(BIG): BIG}).body(list_digest(BIG)))
    assert len(reply.members) == 100 and reply.members_base == b""


def test_only_the_bodies_of_recent_lists_are_kept():
    lists = _lists(BIG[1:], {list_digest(BIG): BIG})
    for i in range(100):
        lists.body(bytes([i]) * 32)
    lists.body(list_digest(BIG))
    assert list(lists._bodies) == [(list_digest(BIG), False)]


def test_an_asker_that_does_not_apply_changes_gets_the_whole_changed_list():
    new = (*BIG[1:], Entry("p9999", "10.9.9.9:1", "", 101))
    body = _lists(new, {list_digest(BIG): BIG}).body(list_digest(BIG), changes=False)
    reply = pb.QuorumResponse.FromString(body)
    assert len(reply.members) == 100 and reply.members_base == b""


def test_an_asker_that_reads_packed_lists_gets_the_change_when_it_is_the_smaller():
    new = (*BIG[1:], Entry("p9999", "10.9.9.9:1", "", 101))
    reply = pb.QuorumResponse.FromString(_lists(new, {list_digest(BIG): BIG}).body(list_digest(BIG), packed=True))
    assert (reply.members_base, reply.members_packed, list(reply.members)) == (list_digest(BIG), b"", [])


@pytest.mark.parametrize("recent", [{}, {list_digest(BIG): BIG}], ids=["unknown list", "change larger"])
def test_an_asker_that_reads_packed_lists_gets_the_whole_list_packed_when_it_gets_the_whole_list(recent):
    other = tuple(Entry(f"q{i:04d}", e.address, e.host_id, 200 + i) for i, e in enumerate(BIG))  # every member replaced
    reply = pb.QuorumResponse.FromString(_lists(other, recent).body(list_digest(BIG), packed=True))
    assert (list(reply.members), reply.members_base) == ([], b"")
    assert unpack_list(reply.members_packed, reply.members_digest) == other


@pytest.mark.parametrize("rank, encoded", [(0, b""), (1, b"\x28\x01"), (127, b"\x28\x7f"), (128, b"\x28\x80\x01")])
def test_a_rank_field_is_the_varint_of_field_5(rank, encoded):
    assert rank_field(rank) == encoded


def test_a_full_book_searches_for_a_place_again_only_after_the_generation_changes():
    asked: list[str] = []
    generation = [0]

    def evictable(peer_id: str) -> bool:
        asked.append(peer_id)
        return peer_id in gone

    gone: set[str] = set()
    book = SeriesBook(points=4, peers=2, evictable=evictable, generation=lambda: generation[0])
    book.append("a", (1,))
    book.append("b", (1,))
    assert not book.append("c", (1,))
    assert asked == ["a", "b"]
    assert not book.append("c", (2,))
    assert asked == ["a", "b"], "nothing can have become evictable: no second search"
    gone.add("a")
    generation[0] += 1  # a peer left
    assert book.append("c", (3,))
    assert book.as_dict() == {"b": [[1]], "c": [[3]]}


def test_a_book_without_a_generation_searches_every_time():
    asked: list[str] = []
    book = SeriesBook(points=4, peers=1, evictable=lambda p: asked.append(p) or False)
    book.append("a", (1,))
    assert not book.append("b", (1,)) and not book.append("b", (2,))
    assert asked == ["a", "a"]


def test_the_membership_bench_scales_the_default_limits_by_its_simulated_peers():
    assert bench_rate_limits(1000) == [
        "--join-rate", "5000", "--join-burst", "20000", "--call-rate", "100000", "--call-burst", "500000",
        "--sessions-per-client", "256000",
    ]


@pytest.mark.parametrize(
    "told, obeyed",
    [(2.0, 2.0), (0.05, 0.05), (600.0, 600.0), (0.0, 1.0), (0.01, 1.0), (601.0, 1.0), (float("nan"), 1.0),
     (float("inf"), 1.0), (-3.0, 1.0)],
)
def test_a_peer_heartbeats_at_the_interval_an_answer_says_when_it_is_in_range(told, obeyed):
    assert heartbeat_interval(1.0, told) == obeyed


@pytest.mark.parametrize(
    "since, at",
    [(2.5, 97.5), (86400.0, 100.0 - 86400.0), (0.0, None), (-1.0, None), (86401.0, None), (float("nan"), None),
     (float("inf"), None)],
)
def test_a_peer_takes_the_time_of_the_runs_last_commit_from_an_answer_only_when_it_is_sane(since, at):
    assert commit_time(since, now=100.0) == at


def _joined(coordinator: Coordinator, n: int) -> list[str]:
    return [
        coordinator._join(pb.JoinRequest(run_id="r", address=f"10.0.{i >> 8}.{i & 255}:2000")).peer_id
        for i in range(n)
    ]


def test_a_peer_that_joined_a_small_run_is_told_to_slow_down_as_it_grows_and_its_lease_grows():
    coordinator = Coordinator(CoordinatorConfig(run_id="r", dashboard_port=None, probe_peers=False, lease_s=5.0))
    first, *_ = _joined(coordinator, 2000)
    assert coordinator.state.peers[first].lease_s == 5.0  # the run had no peer yet when it joined
    answer = coordinator._heartbeat(pb.HeartbeatRequest(run_id="r", peer_id=first))
    assert answer.heartbeat_s == 4.0  # 2,000 live peers / 500 heartbeats a second
    assert coordinator.state.peers[first].lease_s == 12.0  # three intervals


def test_a_lease_never_shrinks_when_the_run_does():
    coordinator = Coordinator(CoordinatorConfig(run_id="r", dashboard_port=None, probe_peers=False, lease_s=5.0))
    first, *others = _joined(coordinator, 2000)
    coordinator._heartbeat(pb.HeartbeatRequest(run_id="r", peer_id=first))
    for peer_id in others:
        coordinator._leave(pb.LeaveRequest(run_id="r", peer_id=peer_id))
    answer = coordinator._heartbeat(pb.HeartbeatRequest(run_id="r", peer_id=first))
    assert answer.heartbeat_s == 1.0  # the configured interval again
    assert coordinator.state.peers[first].lease_s == 12.0  # an older peer may still heartbeat every 4 s
