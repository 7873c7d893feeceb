"""A round of some of the peers outlives its members: other peers keep its result (peer/coordinator/resultholders.py,
collectives/reduce/catchup.py).

The rules are pure functions with table-like tests; then the coordinator's side against a real coordinator with
made-up peers; then real peers: a round of two of three, its result kept by the third, both members gone, and the
third catches up from its own copy.
"""

from __future__ import annotations

import asyncio
import contextlib
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import torch

from collectives.codecs import CodecConfig
from collectives.elastic import ElasticCollective, ElasticConfig
from collectives.membership.roundplan import MissedRound, RoundPlan
from collectives.membership.session import CoordinatorSession
from collectives.net.rpc import COORDINATOR_SETTINGS, make_channel
from collectives.reduce import catchup
from collectives.reduce.catchup import LateRounds
from collectives.reduce.results import CommittedResult, ResultStore
from collectives.reduce.results import result_digest as digest_of_result
from collectives.statesync import StateSyncConfig
from collectives.syncphases import CaughtUp
from peer.coordinator.config import CoordinatorConfig
from peer.coordinator.resultholders import ResultHolders, holders_to_push, result_digest, rounds_to_hold
from peer.coordinator.rules import CommittedRound, result_holders, rounds_to_catch_up
from protos import membership_pb2 as pb

sys.path.insert(0, str(Path(__file__).parent))
from support.coordinator import RUN, CoordinatorThread, Live, digest, live_coordinators  # noqa: E402

pytestmark = pytest.mark.timeout(120)

R1 = CommittedRound(1, 0, "t", ("a", "b"))
R2 = CommittedRound(2, 0, "t", ("c", "d"))
R3 = CommittedRound(3, 0, "t", ("a", "b", "c", "d", "e"))


def hold(c: CommittedRound, *sources: str) -> CommittedRound:
    return CommittedRound(c.round_id, c.epoch, c.tag, sources)


# name, remembered rounds, held, asked, live peers, the peer, its last round, target -> rounds it is asked to keep
# (now is 10.0 and an ask counts for 5 s in every row)
HOLD_CASES = [
    ("a round of two of five: a third peer keeps it", [R1], {}, {}, "abcde", "e", 0, 3, (hold(R1, "a", "b"),)),
    ("a round of every peer asks nobody", [R3], {}, {}, "abcde", "e", 2, 3, ()),
    ("a member is not asked", [R1], {}, {}, "abcde", "a", 0, 3, ()),
    ("a peer whose state has the round is not asked", [R1], {}, {}, "abcde", "e", 1, 3, ()),
    ("a peer that keeps it already is not asked", [R1], {1: {"e"}}, {}, "abcde", "e", 0, 4, ()),
    ("held by enough peers", [R1], {1: {"c"}}, {}, "abcde", "e", 0, 3, ()),
    ("a peer asked within the last 5 s counts", [R1], {}, {1: {"c": 9.0}}, "abcde", "e", 0, 3, ()),
    ("an ask older than 5 s does not", [R1], {}, {1: {"c": 1.0}}, "abcde", "e", 0, 3, (hold(R1, "a", "b"),)),
    ("a dead peer's ask does not", [R1], {}, {1: {"c": 9.0}}, "abde", "e", 0, 3, (hold(R1, "a", "b"),)),
    ("the peer asked already is not asked again", [R1], {}, {1: {"e": 9.0}}, "abcde", "e", 0, 3, ()),
    ("a dead member: the live holders are the sources", [R1], {1: {"c"}}, {}, "bcde", "e", 0, 3,
     (hold(R1, "b", "c"),)),
    ("no live holder: nothing to fetch", [R1], {}, {}, "cde", "e", 0, 3, ()),
    ("newest first", [R1, R2], {}, {}, "abcde", "e", 0, 3, (hold(R2, "c", "d"), hold(R1, "a", "b"))),
    ("at most two rounds an answer", [R1, R2, CommittedRound(3, 0, "t", ("a",))], {}, {}, "abcde", "e", 0, 3,
     (hold(CommittedRound(3, 0, "t", ("a",)), "a"), hold(R2, "c", "d"))),
    ("only the rounds after the peer's state", [R1, R2], {}, {}, "abcde", "e", 1, 3, (hold(R2, "c", "d"),)),
]


@pytest.mark.parametrize(
    "name,committed,held,asked,alive,peer,last_round,target,rounds", HOLD_CASES, ids=[c[0] for c in HOLD_CASES]
)
def test_rounds_to_hold(name, committed, held, asked, alive, peer, last_round, target, rounds):
    assert rounds_to_hold(committed, held, asked, set(alive), peer, last_round, target, now=10.0, ask_s=5.0) == rounds


# name, held, asked, live peers, candidates, hosts, target -> the peers asked at once as R1 (members a, b) commits
# (now is 10.0 and an ask counts for 5 s in every row)
PUSH_CASES = [
    ("one more holder for 3: the first candidate", {}, {}, "abcde", "cde", {}, 3, ("c",)),
    ("two more for 4", {}, {}, "abcde", "edc", {}, 4, ("c", "d")),
    ("a peer on another host than the members first", {}, {}, "abcde", "cde",
     {"a": "h1", "b": "h1", "c": "h1", "d": "h1", "e": "h2"}, 3, ("e",)),
    ("peers of no named host count as another host", {}, {}, "abcde", "cd", {"a": "h1", "c": "h1"}, 3, ("d",)),
    ("a round of target members asks nobody", {}, {}, "abcde", "cde", {}, 2, ()),
    ("a peer that keeps it counts", {1: {"e"}}, {}, "abcde", "cd", {}, 3, ()),
    ("a peer asked within 5 s counts", {}, {1: {"e": 9.0}}, "abcde", "cd", {}, 3, ()),
    ("an older ask does not", {}, {1: {"e": 1.0}}, "abcde", "cd", {}, 3, ("c",)),
    ("a member is never a candidate", {}, {}, "abcde", "ab", {}, 3, ()),
    ("no candidate: nobody", {}, {}, "abcde", "", {}, 3, ()),
    ("no live member left to fetch from: nobody", {}, {}, "cde", "cde", {}, 3, ()),
]


@pytest.mark.parametrize("name,held,asked,alive,candidates,hosts,target,pushed", PUSH_CASES,
                         ids=[c[0] for c in PUSH_CASES])
def test_the_peers_asked_at_once_as_a_round_commits(name, held, asked, alive, candidates, hosts, target, pushed):
    assert holders_to_push(R1, list(candidates), hosts, held, asked, set(alive), target, now=10.0, ask_s=5.0) == pushed


# name, held, live peers, asker -> the holders a late peer is sent to for R1, then R2 (() : the whole state)
CATCH_UP_CASES = [
    ("the members, then the peers that keep it", {1: {"e", "c"}}, "abcde", "d", (hold(R1, "a", "b", "c", "e"),)),
    ("members gone: the peers that keep it", {1: {"e"}}, "cde", "d", (hold(R1, "e"),)),
    ("the asker keeps it: from its own copy", {1: {"d"}}, "cd", "d", (hold(R1, "d"),)),
    ("a member that also says it keeps it is named once", {1: {"a"}}, "abd", "d", (hold(R1, "a", "b"),)),
    ("a dead peer that kept it is not named", {1: {"e"}}, "cd", "d", ()),
]


@pytest.mark.parametrize("name,held,alive,asker,rounds", CATCH_UP_CASES, ids=[c[0] for c in CATCH_UP_CASES])
def test_a_late_peer_is_sent_to_every_live_holder_of_the_rounds_it_missed(name, held, alive, asker, rounds):
    assert rounds_to_catch_up([R1], 0, 1, set(alive), asker, held=held) == rounds


def test_the_holders_of_a_round_are_its_live_members_then_the_others_sorted():
    assert result_holders(R1, {1: {"z", "c", "a"}}, set("abcz")) == ("a", "b", "c", "z")


def test_a_heartbeat_replaces_what_its_peer_said_it_keeps():
    book = ResultHolders()
    book.note_held("e", [(1, 0, ""), (2, 0, "")], remembered={1: 0, 2: 0})
    book.note_held("e", [(2, 0, "")], remembered={1: 0, 2: 0})
    assert book.held == {1: set(), 2: {"e"}}


def test_a_round_no_longer_remembered_is_not_recorded_and_is_forgotten():
    book = ResultHolders()
    book.note_held("e", [(1, 0, ""), (7, 0, "")], remembered={1: 0, 2: 0})
    book.note_asked("c", [2], now=1.0)
    book.forget(remembered={2})
    assert (book.held, book.asked) == ({}, {2: {"c": 1.0}})


def test_a_peer_that_says_it_keeps_a_round_is_no_longer_counted_as_asked():
    book = ResultHolders()
    book.note_asked("e", [1], now=1.0)
    book.note_held("e", [(1, 3, "")], remembered={1: 3})
    assert (book.held, book.asked) == ({1: {"e"}}, {1: {}})


def test_a_result_of_another_attempt_of_the_round_is_not_recorded():
    # Round 5 rolled back and committed again at epoch 4: a result of epoch 2 is another round's.
    book = ResultHolders()
    book.note_held("e", [(5, 2, "")], remembered={5: 4})
    assert book.held == {}


D1, D2 = "1" * 64, "2" * 64
# name, digests reported (peer -> digest), the round's members -> the round's result digest
DIGEST_CASES = [
    ("the members agree", {"a": D1, "b": D1}, "ab", D1),
    ("most members", {"a": D1, "b": D1, "c": D2}, "abc", D1),
    ("a tie names none", {"a": D1, "b": D2}, "ab", ""),
    ("a peer that only fetched it does not vote", {"a": D1, "e": D2, "f": D2}, "ab", D1),
    ("no member reported yet", {"e": D1}, "ab", ""),
    ("a member not computed yet does not vote", {"a": "", "b": D2}, "ab", D2),
]


@pytest.mark.parametrize("name,reported,members,digest", DIGEST_CASES, ids=[c[0] for c in DIGEST_CASES])
def test_a_rounds_result_digest_is_the_one_most_of_its_members_reported(name, reported, members, digest):
    assert result_digest(reported, tuple(members)) == digest


def test_the_coordinator_refuses_a_negative_or_absurd_number_of_holders():
    for bad in (-1, 65):
        with pytest.raises(ValueError, match="result_holders must be between 0 and 64"):
            CoordinatorConfig(result_holders=bad)


# -- the coordinator, with made-up peers ----------------------------------------------------------------

DEFAULTS = {
    "run_id": RUN, "port": 0, "dashboard_port": None, "probe_peers": False, "startup_grace_s": 0.0, "lease_s": 30.0,
    "join_timeout_s": 0.5, "quorum": "first-k:2",
}


@pytest.fixture
def coordinator() -> Iterator[Callable[..., Live]]:
    """Factory of fresh coordinators (DEFAULTS overridden by keywords), all stopped after the test."""
    with live_coordinators(DEFAULTS) as start:
        yield start


# The epoch of round 1 in these runs.
EPOCH = 0


def beat(c: Live, peer_id: str, last_round: int = 0, offers: bool = True, held=()) -> pb.HeartbeatResponse:
    """A heartbeat; held: the (round id, epoch[, digest]) of the results the peer says it keeps."""
    kept = [pb.HeldResult(round_id=h[0], epoch=h[1], digest=h[2] if len(h) > 2 else "") for h in held]
    request = pb.HeartbeatRequest(run_id=RUN, peer_id=peer_id, last_round=last_round, holds_results=offers,
                                  held_results=kept)
    return c.stub.Heartbeat(request, timeout=5)


def two_of_four(c: Live) -> list[str]:
    """Peers a, b, c, d at 127.0.0.1:1..4; a and b commit round 1 (first-k:2) at epoch EPOCH. Their ids."""
    ids = [c.join(f"127.0.0.1:{port}", has_state=True).peer_id for port in (1, 2, 3, 4)]
    assert c.play(ids[:2], 0).epoch == EPOCH
    return ids


def test_a_late_peer_is_told_the_digest_the_members_reported_of_the_result(coordinator):
    c = coordinator()
    a, b, p3, p4 = two_of_four(c)
    assert [r.result_digest for r in beat(c, p3).hold] == [""]  # no member has reported it yet
    beat(c, a, last_round=1, held=[(1, EPOCH, D1)])
    beat(c, b, last_round=1, held=[(1, EPOCH, D1)])
    assert [r.result_digest for r in c.ask(p4, 0).result().missed] == [D1]


def test_a_heartbeat_with_a_malformed_result_digest_is_refused(coordinator):
    c = coordinator()
    a, _, _, _ = two_of_four(c)
    with pytest.raises(Exception, match="64 lowercase hex"):
        beat(c, a, last_round=1, held=[(1, EPOCH, "not a digest")])


def test_a_peer_that_keeps_another_attempts_result_is_not_named(coordinator):
    c = coordinator()
    a, b, p3, p4 = two_of_four(c)
    beat(c, p3, held=[(1, EPOCH + 1)])
    waits_once_both_members_left(c, a, b, p4)


def test_a_peer_back_with_an_older_checkpoint_keeps_it_and_catches_up_from_the_peer_that_kept_the_result(coordinator):
    c = coordinator()
    a, b, p3 = (c.join(f"127.0.0.1:{port}", has_state=True).peer_id for port in (1, 2, 3))
    c.play([a, b], 0)
    assert c.ask(p3, 0).result().action == pb.QuorumResponse.RESYNC  # it catches up round 1 (by results)
    second = c.play([a, b], 1)
    beat(c, p3, last_round=1, held=[(2, second.epoch)])
    c.leave(a)
    c.leave(b)
    # A member of round 1, restarted from its checkpoint of round 1: nobody holds round 2's state.
    back = c.join("127.0.0.1:9", has_state=True, last_round=1, state_digest=digest(1))
    assert (back.wait, back.sync_from, named(back.missed)) == (False, "", [(2, ["127.0.0.1:3"])])


def test_without_a_peer_that_kept_it_a_peer_back_with_an_older_checkpoint_waits(coordinator):
    c = coordinator(result_holders=0)
    a, b = (c.join(f"127.0.0.1:{port}", has_state=True).peer_id for port in (1, 2))
    c.play([a, b], 0)
    c.play([a, b], 1)
    c.leave(a)
    c.leave(b)
    assert c.join("127.0.0.1:9", has_state=True, last_round=1, state_digest=digest(1)).wait


def waits_once_both_members_left(c: Live, a: str, b: str, late: str) -> None:
    """Members a and b leave; late, behind round 1, is told to wait for the run's state (nobody holds round 1)."""
    c.leave(a)
    c.leave(b)
    with pytest.raises(Exception, match="waits for the run's state"):
        c.ask(late, 0).result()


def named(rounds) -> list[tuple[int, list[str]]]:
    return [(r.round_id, [m.address for m in r.members]) for r in rounds]


def test_a_peer_that_offers_is_asked_to_keep_a_round_of_two_members_and_the_next_is_not(coordinator):
    c = coordinator()
    a, b, p3, p4 = two_of_four(c)
    assert named(beat(c, p3).hold) == [(1, ["127.0.0.1:1", "127.0.0.1:2"])]
    # Three hold it now, counting the peer asked: nobody else is asked, nor the same peer again.
    assert (list(beat(c, p4).hold), list(beat(c, p3).hold)) == ([], [])


async def pushes_as_a_round_of_two_commits(
    c: Live, a: str, b: str, offers: dict[str, bool], quiet: tuple[str, ...] = ()
) -> tuple[dict[str, list], dict[str, list]]:
    """Peers (offers: peer id -> whether it offers) heartbeat once on their own Session streams; those not ``quiet``
    heartbeat again after 0.3 s; then a and b commit round 1 (first-k:2). What each was pushed (within 5 s), and the
    hold of each one's next heartbeat."""
    pushes: dict[str, list] = {p: [] for p in offers}
    channels = {p: make_channel(c.address, COORDINATOR_SETTINGS, own_connection=True) for p in offers}
    sessions = {p: CoordinatorSession(lambda ch=ch: ch) for p, ch in channels.items()}

    async def beat(peer_id: str) -> pb.HeartbeatResponse:
        request = pb.HeartbeatRequest(run_id=RUN, peer_id=peer_id, holds_results=offers[peer_id])
        return await sessions[peer_id].call("Heartbeat", request, 5)

    try:
        for peer_id, session in sessions.items():
            session.pushed = pushes[peer_id].append
            assert (await beat(peer_id)).known
        await asyncio.sleep(0.3)
        for peer_id in offers:
            if peer_id not in quiet:
                await beat(peer_id)
        await asyncio.to_thread(c.play, [a, b], 0)  # on their own calls; the others send nothing meanwhile
        for _ in range(100):
            if any(pushes.values()):
                break
            await asyncio.sleep(0.05)
        return pushes, {p: list((await beat(p)).hold) for p in offers}
    finally:
        for peer_id in sessions:
            await sessions[peer_id].close()
            await channels[peer_id].close()


def test_as_a_round_of_two_commits_a_peer_that_offers_is_asked_at_once_on_its_session_stream(coordinator):
    c = coordinator()
    a, b, p3, p4 = [c.join(f"127.0.0.1:{port}", has_state=True).peer_id for port in (1, 2, 3, 4)]
    pushed, asked_again = asyncio.run(
        asyncio.wait_for(pushes_as_a_round_of_two_commits(c, a, b, {p3: True, p4: False}), 30)
    )
    # Three hold it now, counting p3: one push, to the peer that offers; its next heartbeat does not ask again.
    assert [named(push.hold) for push in pushed[p3]] == [[(1, ["127.0.0.1:1", "127.0.0.1:2"])]]
    assert (pushed[p4], asked_again) == ([], {p3: [], p4: []})


def test_a_peer_silent_for_two_heartbeat_intervals_is_not_asked_at_once(coordinator):
    # Heartbeats every 0.1 s: p3, silent for 0.3 s (paused, say), would fetch nothing soon; p4 is asked instead.
    c = coordinator(heartbeat_s=0.1)
    a, b, p3, p4 = [c.join(f"127.0.0.1:{port}", has_state=True).peer_id for port in (1, 2, 3, 4)]
    pushed, _ = asyncio.run(asyncio.wait_for(
        pushes_as_a_round_of_two_commits(c, a, b, {p3: True, p4: True}, quiet=(p3,)), 30
    ))
    assert (pushed[p3], [named(push.hold) for push in pushed[p4]]) == ([], [[(1, ["127.0.0.1:1", "127.0.0.1:2"])]])


def test_a_peer_that_does_not_offer_is_never_asked(coordinator):
    c = coordinator()
    _, _, p3, _ = two_of_four(c)
    assert list(beat(c, p3, offers=False).hold) == []


def test_with_result_holders_0_nobody_is_asked(coordinator):
    c = coordinator(result_holders=0)
    _, _, p3, _ = two_of_four(c)
    assert list(beat(c, p3).hold) == []


def test_when_both_members_are_gone_a_late_peer_catches_up_from_the_peer_that_kept_the_result(coordinator):
    c = coordinator()
    a, b, p3, p4 = two_of_four(c)
    beat(c, p3)
    beat(c, p3, held=[(1, EPOCH)])
    c.leave(a)
    c.leave(b)
    answer = c.ask(p4, 0).result()
    assert answer.action == pb.QuorumResponse.RESYNC
    # Nobody holds round 1's state, yet the round is not lost: its result is named where it is kept.
    assert (answer.sync_from, named(answer.missed)) == ("", [(1, ["127.0.0.1:3"])])


def test_without_a_peer_that_kept_it_a_late_peer_waits_for_the_run_state(coordinator):
    c = coordinator(result_holders=0)
    a, b, _, p4 = two_of_four(c)
    waits_once_both_members_left(c, a, b, p4)


def test_a_peer_that_stops_keeping_a_round_is_no_longer_named(coordinator):
    c = coordinator()
    a, b, p3, p4 = two_of_four(c)
    beat(c, p3, held=[(1, EPOCH)])
    beat(c, p3, held=[])
    waits_once_both_members_left(c, a, b, p4)


# -- real peers --------------------------------------------------------------------------------------

NUMEL = 1000
INT8 = CodecConfig.parse("int8")


def test_a_peer_whose_results_are_not_the_runs_does_not_offer():
    late = ElasticCollective(ElasticConfig(coordinator="127.0.0.1:1", run_id="r")).late
    late.round_numel = lambda tag: NUMEL
    assert late.held() is None
    late.results_are_the_runs = True
    assert late.held() == []


def test_a_peer_with_keep_results_0_does_not_offer():
    peer = ElasticCollective(ElasticConfig(coordinator="127.0.0.1:1", run_id="r", keep_results=0))
    peer.provide_state(lambda: None, round_numel=lambda tag: NUMEL, results_are_the_runs=True)
    assert peer.late.held() is None and isinstance(peer.results, ResultStore)


def test_a_peer_asked_to_hold_fetches_nothing_for_a_round_its_state_has_or_one_it_keeps():
    peer = ElasticCollective(ElasticConfig(coordinator="127.0.0.1:1", run_id="r"))
    peer.provide_state(lambda: None, round_numel=lambda tag: NUMEL, results_are_the_runs=True)
    peer.results.keep(2, "", torch.ones(NUMEL), epoch=0)
    peer.late.hold([MissedRound(1, 0, "", (("a", "127.0.0.1:1"),)), MissedRound(2, 0, "", (("a", "127.0.0.1:1"),))],
                     "p", last_round=1)
    assert peer.late._task is None  # no fetch started (none could run: no loop here)


def test_a_round_asked_for_while_another_is_fetched_is_fetched_after_it(monkeypatch):
    store = ResultStore(keep=4)

    async def keep(r: CommittedResult) -> None:
        store.keep(r.round_id, r.tag, r.value, epoch=r.epoch)

    late = LateRounds(None, "r", StateSyncConfig(), store, keep)
    late.round_numel, late.results_are_the_runs = (lambda tag: NUMEL), True
    fetching: list[int] = []

    async def fetch(transport, run_id, peer_id, config, missed, numel, patient=None):
        fetching.append(missed.round_id)
        await release.wait()
        return CommittedResult(missed.round_id, missed.tag, torch.zeros(numel), epoch=missed.epoch, wire_bytes=numel)

    monkeypatch.setattr(catchup, "fetch_result", fetch)
    holders = (("a", "127.0.0.1:1"),)

    async def scenario() -> None:
        nonlocal release
        release = asyncio.Event()
        late.hold([MissedRound(1, 0, "", holders)], "p", last_round=0)
        await asyncio.sleep(0)  # round 1's fetch is under way
        late.hold([MissedRound(2, 0, "", holders), MissedRound(1, 0, "", holders)], "p", last_round=0)
        release.set()
        await asyncio.wait_for(late._task, 10)

    release: asyncio.Event
    asyncio.run(scenario())
    # Round 1 once, then round 2: asked while round 1 was fetched, it waited its turn instead of being dropped.
    assert (
        fetching == list(late.fetched) == [1, 2]
        and late.fetched_count == 2
        and [r for r, _, _ in store.attempts()] == [1, 2]
    )


@pytest.mark.parametrize("why", ["catching up", "keeping for the run"])
def test_a_result_is_fetched_within_the_short_stall_window_with_the_state_syncs_own_as_the_patient_one(
    monkeypatch, why
):
    # Both would fall back to worse when every holder stalls on a slow link: the whole state, or no copy kept.
    given = StateSyncConfig(stall_timeout_s=30.0)
    store = ResultStore(keep=4)

    async def keep(r: CommittedResult) -> None:
        store.keep(r.round_id, r.tag, r.value, epoch=r.epoch)

    late = LateRounds(None, "r", given, store, keep)
    late.round_numel, late.results_are_the_runs = (lambda tag: NUMEL), True
    windows: list[tuple[float, StateSyncConfig | None]] = []

    async def fetch(transport, run_id, peer_id, config, missed, numel, patient=None):
        windows.append((config.stall_timeout_s, patient))
        return CommittedResult(missed.round_id, missed.tag, torch.zeros(numel), epoch=missed.epoch, wire_bytes=numel)

    monkeypatch.setattr(catchup, "fetch_result", fetch)
    missed = MissedRound(1, 0, "", (("a", "127.0.0.1:1"),))
    if why == "catching up":
        got = asyncio.run(late.results_of(RoundPlan("resync", missed=(missed,)), None, 0, "p"))
        assert [r.round_id for r in got] == [1]
    else:
        asyncio.run(late._fetch_one(missed, "p"))
        assert list(late.fetched) == [1]
    assert windows == [(catchup.RESULT_STALL_S, given)]


@pytest.mark.timeout(90)
def test_the_third_peer_keeps_a_round_of_two_before_its_next_heartbeat():
    # Heartbeats a minute apart: only the coordinator's push at the commit can ask the third peer in time.
    with three_offering_peers(heartbeat_s=60.0, lease_s=600.0) as (_, a, b, third):
        beats = []
        send = third.membership._send

        async def counted(method, request, timeout_s):
            beats.append(method == "Heartbeat")
            return await send(method, request, timeout_s)

        third.membership._send = counted
        results = round_of_two(a, b)
        beats_at_commit = sum(beats)
        assert wait_for(lambda: list(third.late.fetched) == [1]) and sum(beats) == beats_at_commit
        assert third.results.digest(1) == digest_of_result(results[0].value.flatten())


def offering_peer(coordinator: str) -> ElasticCollective:
    """A started peer of run "h" that offers to keep results (its state is not fetched here: catching up by results
    compares with its size only)."""
    peer = ElasticCollective(ElasticConfig(coordinator=coordinator, run_id="h"))
    peer.provide_state(lambda: None, round_numel=lambda tag: NUMEL, state_nbytes=lambda: 4 * NUMEL,
                       results_are_the_runs=True)
    peer.start(has_state=True)
    return peer


@contextlib.contextmanager
def three_offering_peers(heartbeat_s: float, lease_s: float) -> Iterator[tuple]:
    """A coordinator of run "h" (first-k:2) and three offering peers of it, closed on leaving:
    (coordinator, a, b, c)."""
    config = CoordinatorConfig(run_id="h", port=0, dashboard_port=None, startup_grace_s=0, quorum="first-k:2",
                               heartbeat_s=heartbeat_s, lease_s=lease_s)
    with CoordinatorThread(config) as coord:
        peers = []
        try:
            for _ in range(3):
                peers.append(offering_peer(coord.address))
            yield (coord, *peers)
        finally:
            for peer in peers:
                peer.close()


def round_of_two(a: ElasticCollective, b: ElasticCollective) -> list:
    """a and b sync (first-k:2): their results of round 1."""
    xs = [torch.randn(NUMEL, generator=torch.Generator().manual_seed(s)) for s in (1, 2)]
    return [f.result(30) for f in [a.sync_async(xs[0], codec=INT8), b.sync_async(xs[1], codec=INT8)]]


def wait_for(done: Callable[[], bool], seconds: float = 30.0) -> bool:
    """Whether done() came true within seconds (checked every 50 ms)."""
    deadline = time.monotonic() + seconds
    while not done() and time.monotonic() < deadline:
        time.sleep(0.05)
    return done()


@pytest.mark.timeout(90)
def test_a_round_of_two_of_three_outlives_both_members_on_the_third_peer():
    with three_offering_peers(heartbeat_s=0.2, lease_s=2.0) as (coord, a, b, third):
        results = round_of_two(a, b)
        assert [r.round_id for r in results] == [1, 1]
        assert wait_for(lambda: list(third.late.fetched) == [1]) and third.late.fetched_bytes > 0
        # The copy it keeps is the members' result, bit for bit.
        assert third.results.digest(1) == digest_of_result(results[0].value.flatten()) == a.results.digest(1)
        wait_for(lambda: any(p["kept_results"] for p in coord.status()["peers"]))  # its next heartbeat says so
        assert [p["kept_results"] for p in coord.status()["peers"] if p["kept_results"]] == [[1]]
        a.close(leave=True)
        b.close(leave=True)
        received = third.transport.counters.bytes_received
        with pytest.raises(CaughtUp) as caught:
            third.sync_async(torch.zeros(NUMEL), codec=INT8).result(30)
        [result] = caught.value.rounds
        assert result.round_id == 1 and torch.equal(result.value, results[0].value.flatten())
        # Caught up from its own copy: nothing more came over the wire but the coordinator's answers.
        assert third.transport.counters.bytes_received - received < NUMEL
