"""The run's state never silently restarts: a run that committed a round is never founded again.

Against a real coordinator served in this process (``CoordinatorThread``) over gRPC on 127.0.0.1; the
peers are made-up addresses that only talk to it (probing is off). Peers report the SHA-256 of their
state as of their last round with each join and quorum request; ``digest(r)`` stands for the state of
round r.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import grpc
import pytest

from collectives.membership.client import MembershipClient, MembershipConfig
from collectives.net.transport import Transport
from peer.coordinator.config import CoordinatorConfig
from peer.coordinator.runstate import RunState
from peer.options import add_options, read_options
from protos import membership_pb2 as pb

sys.path.insert(0, str(Path(__file__).parent))
from support.browser import NO_CHROMIUM, DomIndex, chromium_path, run_chromium
from support.coordinator import RUN, Live, digest, live_coordinators

pytestmark = pytest.mark.timeout(120)

DEFAULTS = {
    "run_id": RUN, "port": 0, "dashboard_port": None, "probe_peers": False, "startup_grace_s": 0.0, "lease_s": 30.0,
    "join_timeout_s": 0.5,
}


@pytest.fixture
def coordinator() -> Iterator[Callable[..., Live]]:
    """Factory of fresh coordinators (DEFAULTS overridden by keywords), all stopped after the test."""
    with live_coordinators(DEFAULTS) as start:
        yield start


def wait_until(condition: Callable[[], bool], what: str, timeout_s: float = 10.0) -> None:
    give_up = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < give_up, f"timed out waiting for {what}"
        time.sleep(0.02)


def run_to_round_3_then_everyone_leaves(c: Live) -> None:
    """Two peers commit rounds 1-3, report round 3's digest with their next request, and leave."""
    a = c.join("127.0.0.1:1", has_state=False).peer_id
    b = c.join("127.0.0.1:2", has_state=False).peer_id
    for last_round in range(3):
        c.play([a, b], last_round)
    # min_peers 2: a's request for round 4 waits for b, and reports the state of round 3 meanwhile.
    pending = c.ask(a, 3)
    wait_until(lambda: c.status()["state_digest"] == digest(3), "round 3's digest")
    for peer in (a, b):
        c.leave(peer)
    with pytest.raises(grpc.RpcError):
        pending.result()


def test_a_peer_leaving_right_after_the_last_commit_reports_that_rounds_digest_for_the_state_file(
    coordinator, tmp_path
):
    c = coordinator(state_file=str(tmp_path / "run.json"))
    a = c.join("127.0.0.1:1", has_state=False).peer_id
    for last_round in range(2):
        c.play([a], last_round)  # round 2 committed; a never asks again, so never reports round 2's digest
    assert c.status()["state_digest"] == ""
    c.leave(a, last_round=2)
    assert c.status()["state_digest"] == digest(2)
    assert json.loads((tmp_path / "run.json").read_text())["digest"] == digest(2)


# -- never re-founded --------------------------------------------------------------------------------


def test_a_stateless_peer_joining_after_every_peer_left_waits_with_the_reason_instead_of_founding(coordinator):
    c = coordinator(min_peers=2)
    run_to_round_3_then_everyone_leaves(c)
    for _ in range(2):  # it asks again every heartbeat interval: still waiting, never founding
        told = c.join("127.0.0.1:3", has_state=False, name="late")
        assert told.wait and not told.sync_from and not told.sync_sources
        assert (told.last_committed_round, told.state_digest) == (3, digest(3))
        reason = told.wait_reason
        assert "committed round 3" in reason and digest(3)[:12] in reason and "no live peer holds it" in reason
        assert "--resume-from" in reason and "--new-run" in reason
    status = c.status()
    assert status["last_committed_round"] == 3
    assert status["waiting"]["reason"] == reason
    assert [(p["address"], p["name"]) for p in status["waiting"]["peers"]] == [("127.0.0.1:3", "late")]
    assert status["summary"]["peers_alive"] == 0, "a waiting peer is not a member"
    assert len(c.events("wait")) == 1


def test_a_peer_returning_with_the_matching_checkpoint_is_accepted_and_the_waiter_then_syncs_from_it(coordinator):
    c = coordinator(min_peers=2)
    run_to_round_3_then_everyone_leaves(c)
    assert c.join("127.0.0.1:3", has_state=False).wait
    back = c.join("127.0.0.1:4", has_state=True, last_round=3, state_digest=digest(3))
    assert not back.wait and back.sync_from == "" and back.last_committed_round == 3
    assert c.events("resume")
    told = c.join("127.0.0.1:3", has_state=False)
    assert not told.wait
    assert (told.sync_from, list(told.sync_sources), told.state_digest) == ("127.0.0.1:4", ["127.0.0.1:4"], digest(3))
    assert c.status()["waiting"] is None


def test_a_checkpoint_of_the_same_round_with_another_digest_is_refused_with_a_clear_message(coordinator):
    c = coordinator(min_peers=2)
    run_to_round_3_then_everyone_leaves(c)
    with pytest.raises(grpc.RpcError) as info:
        c.join("127.0.0.1:4", has_state=True, last_round=3, state_digest=digest(99))
    assert info.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "not this run's state" in info.value.details() and digest(3)[:16] in info.value.details()
    assert c.status()["summary"]["peers_alive"] == 0


def test_a_joiner_whose_source_died_mid_fetch_never_rolls_the_run_back_to_round_0(coordinator):
    c = coordinator()
    a = c.join("127.0.0.1:1", has_state=False).peer_id
    for last_round in range(3):
        c.play([a], last_round)
    joiner = c.join("127.0.0.1:2", has_state=False)
    assert joiner.sync_from == "127.0.0.1:1"
    c.leave(a)  # the only holder dies while the joiner fetches
    # A joiner that (wrongly) went on with its own initial state is sent away to wait, not made the run's head.
    with pytest.raises(grpc.RpcError) as info:
        c.ask(joiner.peer_id, 0).result()
    assert info.value.code() == grpc.StatusCode.NOT_FOUND and "no live peer holds it" in info.value.details()
    assert c.status()["last_committed_round"] == 3 and not c.events("rollback")
    # Asking to join again without state: it waits (and is no member meanwhile).
    again = c.join("127.0.0.1:2", has_state=False, peer_id=joiner.peer_id)
    assert again.wait and c.status()["summary"]["peers_alive"] == 0


def test_an_older_checkpoint_waits_for_the_last_round_and_names_the_rollback_option(coordinator):
    c = coordinator()
    a = c.join("127.0.0.1:1", has_state=False).peer_id
    for last_round in range(3):
        c.play([a], last_round)  # asking for round 3, a reported round 2's digest
    c.leave(a)
    old = c.join("127.0.0.1:2", has_state=True, last_round=2, state_digest=digest(2))
    assert old.wait and old.last_committed_round == 3
    assert "no live peer holds it" in old.wait_reason
    assert "a peer holds round 2: `loconet coordinator --allow-rollback` goes on from it (round 3 is lost)" in (
        old.wait_reason
    )
    assert c.status()["last_committed_round"] == 3 and not c.events("rollback")
    assert c.status()["summary"]["peers_alive"] == 0


def test_with_allow_rollback_an_older_checkpoint_rolls_the_run_back_to_its_round(coordinator):
    c = coordinator(allow_rollback=True)
    a = c.join("127.0.0.1:1", has_state=False).peer_id
    for last_round in range(3):
        c.play([a], last_round)
    c.leave(a)
    old = c.join("127.0.0.1:2", has_state=True, last_round=2, state_digest=digest(2))
    assert not old.wait and old.sync_from == ""
    plan = c.play([old.peer_id], 2)
    assert plan.round_id == 3, "the run goes on from round 2"
    (rollback,) = c.events("rollback")
    assert "round 3 are gone; continuing from round 2" in rollback["detail"] and digest(2)[:12] in rollback["detail"]


def test_a_member_behind_the_run_whose_holders_left_waits_outside_the_run(coordinator):
    c = coordinator()
    a = c.join("127.0.0.1:1", has_state=False).peer_id
    b = c.join("127.0.0.1:2", has_state=True, last_round=0).peer_id
    c.play([a, b], 0)
    c.play([a], 1)  # b sat this one out: it holds round 1, the run round 2
    c.leave(a)
    with pytest.raises(grpc.RpcError) as info:
        c.ask(b, 1).result()
    assert info.value.code() == grpc.StatusCode.NOT_FOUND, "it joins again, and is told to wait there"
    assert "waits for the run's state" in info.value.details() and "holds round 1" in info.value.details()
    assert c.status()["summary"]["peers_alive"] == 0 and c.status()["last_committed_round"] == 2
    assert c.join("127.0.0.1:2", has_state=True, last_round=1, peer_id=b).wait
    assert not c.events("rollback")


def test_a_replica_whose_state_is_its_own_goes_on_from_an_older_checkpoint_and_skips_the_rounds_it_missed(
    coordinator,
):
    # NoLoCo's replicas differ: one back with an older state has nothing to wait for (the others' states are theirs).
    c = coordinator()
    a = c.join("127.0.0.1:1", has_state=False, own_state=True).peer_id
    for last_round in range(3):
        c.play([a], last_round)
    c.leave(a)
    old = c.join("127.0.0.1:2", has_state=True, last_round=2, own_state=True)
    assert not old.wait and old.sync_from == "" and old.last_committed_round == 3
    skip = c.ask(old.peer_id, 2).result()
    assert skip.action == pb.QuorumResponse.RESYNC and skip.sync_from == "" and not skip.missed
    assert skip.last_committed_round == 3
    assert c.play([old.peer_id], 3).round_id == 4, "the run goes on, its round count too"
    assert not c.events("rollback")


def test_a_replica_whose_state_is_its_own_behind_the_run_whose_holders_left_skips_instead_of_waiting(coordinator):
    c = coordinator()
    a = c.join("127.0.0.1:1", has_state=False, own_state=True).peer_id
    b = c.join("127.0.0.1:2", has_state=True, last_round=0, own_state=True).peer_id
    c.play([a, b], 0)
    c.play([a], 1)  # b sat this one out: it holds round 1, the run round 2
    c.leave(a)
    skip = c.ask(b, 1).result()
    assert skip.action == pb.QuorumResponse.RESYNC and skip.sync_from == "" and skip.last_committed_round == 2
    assert c.status()["summary"]["peers_alive"] == 1
    assert c.play([b], 2).round_id == 3


def test_before_the_first_commit_a_stateless_peer_founds_the_run_as_before(coordinator):
    c = coordinator()
    founder = c.join("127.0.0.1:1", has_state=False)
    assert not founder.wait and founder.sync_from == ""
    assert c.join("127.0.0.1:2", has_state=False).sync_from == "127.0.0.1:1"


def test_the_run_state_refuses_a_rollback_to_round_0_once_a_round_committed():
    state = RunState(RUN, min_peers=1)
    state.last_committed_round = 3
    with pytest.raises(ValueError, match="never rolls back to 0"):
        state.roll_back(0)
    state.roll_back(2)
    assert state.last_committed_round == 2


# -- the digest ----------------------------------------------------------------------------------------


def test_a_peer_reporting_another_digest_for_a_round_is_a_divergence_and_fetches_the_run_s_state(
    coordinator, caplog
):
    c = coordinator(min_peers=2)
    a = c.join("127.0.0.1:1", has_state=False).peer_id
    b = c.join("127.0.0.1:2", has_state=False).peer_id
    c.play([a, b], 0)
    with caplog.at_level(logging.ERROR):
        waiting = c.ask(a, 1)
        wait_until(lambda: c.status()["state_digest"] == digest(1), "a's digest recorded")
        answer = c.ask(b, 1, state=digest(77)).result()
    waiting.cancel()
    (diverged,) = c.events("diverged")
    assert diverged["peer_id"] == b and f"{a} reported {digest(1)[:12]}" in diverged["detail"]
    assert c.status()["state_digest"] == digest(1)
    assert any(r.levelno == logging.ERROR and "diverged" in r.getMessage() for r in caplog.records)
    assert answer.action == pb.QuorumResponse.RESYNC
    assert (answer.sync_from, answer.state_digest, list(answer.missed)) == ("127.0.0.1:1", digest(1), [])


def test_a_peer_whose_state_keeps_differing_is_told_to_fetch_it_three_times_then_trains_on(coordinator):
    c = coordinator(min_peers=2)
    a = c.join("127.0.0.1:1", has_state=False).peer_id
    b = c.join("127.0.0.1:2", has_state=False).peer_id
    c.play([a, b], 0)
    waiting = c.ask(a, 1)
    wait_until(lambda: c.status()["state_digest"] == digest(1), "a's digest recorded")
    actions = [c.ask(b, 1, state=digest(77)).result().action for _ in range(4)]
    assert actions == [pb.QuorumResponse.RESYNC] * 3 + [pb.QuorumResponse.ROUND]
    assert waiting.result().action == pb.QuorumResponse.ROUND
    assert any("not told to again" in e["detail"] for e in c.events("diverged"))


@pytest.mark.parametrize("bad", ["xyz", "A" * 64, "a" * 63])
def test_a_malformed_digest_is_an_invalid_argument(coordinator, bad):
    c = coordinator()
    with pytest.raises(grpc.RpcError) as info:
        c.join("127.0.0.1:1", has_state=True, last_round=1, state_digest=bad)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "64 lowercase hex" in info.value.details()
    a = c.join("127.0.0.1:1", has_state=False).peer_id
    with pytest.raises(grpc.RpcError) as info:
        c.ask(a, 0, state=bad).result()
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT


# -- across coordinator restarts ---------------------------------------------------------------------


def test_the_state_file_keeps_the_round_and_its_digest_across_a_restart(coordinator, tmp_path):
    state_file = str(tmp_path / "run.json")
    before = coordinator(min_peers=2, state_file=state_file)
    run_to_round_3_then_everyone_leaves(before)
    before.close()
    saved = json.loads(Path(state_file).read_text())
    assert (saved["last_committed_round"], saved["digest"]) == (3, digest(3))
    after = coordinator(min_peers=2, state_file=state_file)
    assert (after.status()["last_committed_round"], after.status()["state_digest"]) == (3, digest(3))
    told = after.join("127.0.0.1:3", has_state=False)
    assert told.wait and digest(3)[:12] in told.wait_reason
    with pytest.raises(grpc.RpcError) as info:
        after.join("127.0.0.1:4", has_state=True, last_round=3, state_digest=digest(99))
    assert info.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert not after.join("127.0.0.1:4", has_state=True, last_round=3, state_digest=digest(3)).wait
    assert after.join("127.0.0.1:3", has_state=False).sync_from == "127.0.0.1:4"


def commit_three_rounds_then_restart(coordinator, tmp_path) -> tuple[Live, str, int]:
    """Two peers commit rounds 1-3 with a coordinator that keeps a state file, which is then started again from
    it: the new coordinator, the first peer's id, and the epoch of the attempt that committed round 3."""
    state_file = str(tmp_path / "run.json")
    before = coordinator(min_peers=2, state_file=state_file)
    a = before.join("127.0.0.1:1", has_state=False).peer_id
    b = before.join("127.0.0.1:2", has_state=False).peer_id
    epoch = [before.play([a, b], last_round) for last_round in range(3)][-1].epoch
    before.close()
    assert json.loads(Path(state_file).read_text())["committed_epoch"] == epoch
    return coordinator(min_peers=2, state_file=state_file), a, epoch


def test_a_restarted_coordinator_tells_a_member_asking_again_that_its_predecessor_committed_the_round(
    coordinator, tmp_path
):
    # The coordinator before the restart saved round 3 as committed; had it stopped before answering the
    # members' Commit calls, they would ask the new one again. Told it is unknown, they would all stay at
    # round 2, and the run would wait for a holder of round 3 that does not exist.
    after, a, epoch = commit_three_rounds_then_restart(coordinator, tmp_path)
    asked_again = pb.CommitRequest(run_id=RUN, peer_id=a, round_id=3, epoch=epoch, ok=True)
    assert after.stub.Commit(asked_again, timeout=5).commit


@pytest.mark.parametrize(("round_id", "epoch_offset"), [(3, 1), (2, 0)], ids=["another epoch", "an older round"])
def test_a_restarted_coordinator_still_knows_no_other_attempt(coordinator, tmp_path, round_id, epoch_offset):
    after, a, epoch = commit_three_rounds_then_restart(coordinator, tmp_path)
    request = pb.CommitRequest(run_id=RUN, peer_id=a, round_id=round_id, epoch=epoch + epoch_offset, ok=True)
    with pytest.raises(grpc.RpcError) as info:
        after.stub.Commit(request, timeout=5)
    assert info.value.code() == grpc.StatusCode.NOT_FOUND  # the member learns nothing committed: it resyncs


def test_a_fresh_peer_whose_initial_state_is_the_founder_s_keeps_it_and_takes_part_from_round_1(coordinator):
    c = coordinator(min_peers=3)
    founder = c.join("127.0.0.1:1", has_state=False, state_digest=digest(0))
    assert (founder.sync_from, founder.state_digest) == ("", "")
    same = c.join("127.0.0.1:2", has_state=False, state_digest=digest(0))
    assert (same.wait, same.sync_from, list(same.sync_sources), same.state_digest) == (False, "", [], digest(0))
    other = c.join("127.0.0.1:3", has_state=False, state_digest=digest(99))  # another seed: it fetches
    assert other.sync_from == "127.0.0.1:1" and other.state_digest == ""
    peers = {p["peer_id"]: p for p in c.status()["peers"]}
    assert (peers[same.peer_id]["state"], peers[other.peer_id]["state"]) == ("active", "syncing")


def test_the_state_file_keeps_the_founder_s_initial_digest_until_the_first_commit(coordinator, tmp_path):
    state_file = str(tmp_path / "run.json")
    before = coordinator(min_peers=2, state_file=state_file)
    before.join("127.0.0.1:1", has_state=False, state_digest=digest(0))
    before.close()
    assert json.loads(Path(state_file).read_text())["digest"] == digest(0)
    after = coordinator(min_peers=2, state_file=state_file)
    kept = after.join("127.0.0.1:2", has_state=False, state_digest=digest(0))  # restarted: the founder is not back
    assert (kept.wait, kept.sync_from, kept.state_digest) == (False, "", digest(0))


def test_once_a_round_committed_a_fresh_peer_fetches_whatever_its_initial_state(coordinator):
    c = coordinator(min_peers=2)
    a = c.join("127.0.0.1:1", has_state=False, state_digest=digest(0)).peer_id
    b = c.join("127.0.0.1:2", has_state=False, state_digest=digest(0)).peer_id
    c.play([a, b], 0)
    late = c.join("127.0.0.1:3", has_state=False, state_digest=digest(0))
    assert late.sync_from in ("127.0.0.1:1", "127.0.0.1:2") and late.last_committed_round == 1


def test_new_run_discards_the_saved_round_and_digest_and_the_first_peer_founds_again(coordinator, tmp_path, caplog):
    state_file = str(tmp_path / "run.json")
    before = coordinator(min_peers=2, state_file=state_file)
    run_to_round_3_then_everyone_leaves(before)
    before.close()
    with caplog.at_level(logging.WARNING):
        fresh = coordinator(state_file=state_file, new_run=True)
    assert any("--new-run" in r.getMessage() and digest(3) in r.getMessage() for r in caplog.records)
    saved = json.loads(Path(state_file).read_text())
    assert (saved["last_committed_round"], saved["digest"]) == (0, "")
    founder = fresh.join("127.0.0.1:5", has_state=False)
    assert not founder.wait and founder.sync_from == "" and founder.last_committed_round == 0
    assert fresh.events("new-run")


def test_new_run_is_a_coordinator_option():
    parser = argparse.ArgumentParser()
    add_options(parser, CoordinatorConfig)
    assert read_options(CoordinatorConfig, parser.parse_args(["--new-run"])).new_run is True
    assert read_options(CoordinatorConfig, parser.parse_args([])).new_run is False


def test_a_state_file_without_a_digest_still_loads(coordinator, tmp_path):
    state_file = tmp_path / "run.json"
    state_file.write_text(json.dumps({"run_id": RUN, "last_committed_round": 5, "epoch": 2}))
    c = coordinator(state_file=str(state_file))
    assert (c.status()["last_committed_round"], c.status()["state_digest"]) == (5, "")
    told = c.join("127.0.0.1:1", has_state=False)
    assert told.wait and "state digest unknown" in told.wait_reason


# -- several sources -------------------------------------------------------------------------------


def test_a_joiner_gets_up_to_four_holders_least_busy_first_and_counts_against_the_first(coordinator):
    c = coordinator()
    holders = [c.join(f"127.0.0.1:{port}", has_state=False).peer_id for port in range(1, 6)]
    c.play(holders, 0)
    first = c.join("127.0.0.1:11", has_state=False)
    second = c.join("127.0.0.1:12", has_state=False)
    assert list(first.sync_sources) == [f"127.0.0.1:{port}" for port in (1, 2, 3, 4)]
    assert first.sync_from == "127.0.0.1:1"
    assert list(second.sync_sources) == [f"127.0.0.1:{port}" for port in (2, 3, 4, 5)]
    assert second.state_digest == "", "nobody reported round 1's digest yet"


def test_a_resync_answer_names_the_holders_and_the_digest(coordinator):
    c = coordinator(catchup_rounds=0, min_peers=2)
    a = c.join("127.0.0.1:1", has_state=False).peer_id
    b = c.join("127.0.0.1:2", has_state=False).peer_id
    c.play([a, b], 0)
    late = c.join("127.0.0.1:3", has_state=True, last_round=1, state_digest=digest(1)).peer_id
    c.play([a, b, late], 1)
    c.leave(late)
    c.play([a, b], 2)
    pending = c.ask(a, 3)  # reports round 3's digest
    wait_until(lambda: c.status()["state_digest"] == digest(3), "round 3's digest")
    back = c.join("127.0.0.1:3", has_state=True, last_round=2, state_digest=digest(2), peer_id=late)
    resync = c.ask(back.peer_id, 2).result()
    assert resync.action == pb.QuorumResponse.RESYNC
    assert (resync.state_digest, set(resync.sync_sources)) == (digest(3), {"127.0.0.1:1", "127.0.0.1:2"})
    assert resync.sync_from == resync.sync_sources[0]
    other = c.ask(b, 3)  # kept: a dropped future would cancel its call
    assert pending.result().action == other.result().action == pb.QuorumResponse.ROUND


# -- the peer's client ------------------------------------------------------------------------------


def test_the_peers_client_reads_wait_digest_and_sources(coordinator):
    c = coordinator(min_peers=2)
    run_to_round_3_then_everyone_leaves(c)
    with Transport() as transport:
        transport.start()
        waiter = MembershipClient(transport, MembershipConfig(c.address, RUN, rpc_timeout_s=5))
        told = transport.submit(waiter.join("127.0.0.1:3", 0, 0, has_state=False)).result(10)
        assert told.wait and "committed round 3" in told.wait_reason and told.state_digest == digest(3)
        assert waiter.peer_id == ""
        holder = MembershipClient(transport, MembershipConfig(c.address, RUN, rpc_timeout_s=5))
        kept = transport.submit(holder.join("127.0.0.1:4", 3, 0, has_state=True, digest=digest(3))).result(10)
        assert not kept.wait and kept.sync_from == ""
        told = transport.submit(waiter.join("127.0.0.1:3", 0, 0, has_state=False)).result(10)
        assert (told.wait, told.sync_from, told.sync_sources) == (False, "127.0.0.1:4", ("127.0.0.1:4",))
        assert told.state_digest == digest(3)


@pytest.mark.skipif(chromium_path() is None, reason=NO_CHROMIUM)
def test_the_dashboard_says_who_waits_and_why(coordinator, tmp_path):
    c = coordinator(min_peers=2, dashboard_port=0)
    run_to_round_3_then_everyone_leaves(c)
    reason = c.join("127.0.0.1:3", has_state=False, name="late").wait_reason
    dom = DomIndex(run_chromium(c.thread.server.dashboard_url + "/", tmp_path, "--dump-dom"))
    card = dom.by_id("waiting-card")
    assert "hidden" not in card.attrs
    assert dom.by_id("waiting-reason").text == reason
    assert "late" in dom.by_id("waiting-peers").text and "127.0.0.1:3" in dom.by_id("waiting-peers").text
    assert dom.by_id("s-round").attrs["title"] == f"state sha256 {digest(3)}"
    assert any("wait" in n.text for n in dom.find("li", cls="event-row"))
