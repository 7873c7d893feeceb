"""A stop that comes once a member voted to commit waits for the round's decision: a round the run commits is
applied, not lost with the member (it may be the only one left holding it). Real coordinator, real gRPC."""

from __future__ import annotations

import asyncio
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
from collectives.elastic import ElasticCollective, ElasticConfig, Stopped
from collectives.syncphases import Phase
from peer.coordinator.config import CoordinatorConfig
from support.coordinator import CoordinatorThread

pytestmark = pytest.mark.timeout(60)


def hold_commit(member: ElasticCollective, release: threading.Event, ok: bool = True) -> None:
    """Make member send its Commit (with ok) only once release is set."""
    original = member.membership.commit

    async def held(plan, _ok, *args, **kwargs):
        while not release.is_set():
            await asyncio.sleep(0.01)
        return await original(plan, ok, *args, **kwargs)

    member.membership.commit = held


def wait_for_phase(member: ElasticCollective, phase: Phase) -> None:
    deadline = time.monotonic() + 30
    while member.phase is not phase:
        assert time.monotonic() < deadline, f"the member never reached {phase.value} (at {member.phase.value})"
        time.sleep(0.01)


@pytest.fixture
def pair():
    """Two members of a run of two, both at round 0; the second one's Commit waits for the test's release."""
    coordinator = CoordinatorThread(
        CoordinatorConfig(run_id="s", port=0, dashboard_port=None, startup_grace_s=0, min_peers=2)
    )
    release = threading.Event()
    members = [ElasticCollective(ElasticConfig(coordinator=coordinator.address, run_id="s")) for _ in range(2)]
    try:
        for m in members:
            m.start(has_state=True)
        yield members, release
    finally:
        release.set()
        for m in members:
            m.close()
        coordinator.close()


def stop_while_deciding(pair, late_ok: bool):
    """Member 0 votes to commit and is stopped; then member 1 votes late_ok. Member 0's sync future."""
    (stopped, late), release = pair
    hold_commit(late, release, ok=late_ok)
    pending = stopped.sync_async(torch.ones(8))
    late.sync_async(torch.ones(8))
    wait_for_phase(stopped, Phase.COMMIT)
    stopped.interrupt("stopped by the test")
    time.sleep(0.2)  # the stop reaches the round before the decision does
    release.set()
    return pending


def test_a_round_committed_after_a_stop_its_member_voted_for_is_applied_and_returned(pair):
    result = stop_while_deciding(pair, late_ok=True).result(timeout=30)
    assert result.round_id == 1
    assert torch.equal(result.value, torch.ones(8))
    assert pair[0][0].last_round == 1


def test_the_sync_after_a_stop_that_waited_for_a_commit_raises_stopped(pair):
    stop_while_deciding(pair, late_ok=True).result(timeout=30)
    with pytest.raises(Stopped):
        pair[0][0].sync(torch.ones(8))


def test_a_round_aborted_after_a_stop_raises_stopped_and_is_not_retried(pair):
    with pytest.raises(Stopped):
        stop_while_deciding(pair, late_ok=False).result(timeout=30)
    assert pair[0][0].last_round == 0


def test_a_stop_waits_for_a_decision_at_most_stop_decision_wait_s():
    coordinator = CoordinatorThread(
        CoordinatorConfig(run_id="w", port=0, dashboard_port=None, startup_grace_s=0, min_peers=2)
    )
    release = threading.Event()
    stopped = ElasticCollective(ElasticConfig(coordinator=coordinator.address, run_id="w", stop_decision_wait_s=0.5))
    late = ElasticCollective(ElasticConfig(coordinator=coordinator.address, run_id="w"))
    try:
        for m in (stopped, late):
            m.start(has_state=True)
        hold_commit(late, release)  # never released while the stopped member waits
        pending = stopped.sync_async(torch.ones(8))
        late.sync_async(torch.ones(8))
        wait_for_phase(stopped, Phase.COMMIT)
        stopped.interrupt("stopped by the test")
        with pytest.raises(Stopped):
            pending.result(timeout=30)
        assert stopped.last_round == 0
    finally:
        release.set()
        for m in (stopped, late):
            m.close()
        coordinator.close()


def test_a_stop_while_a_committed_rounds_result_is_kept_still_returns_the_round(pair):
    # The stop lands after the decision, while the member keeps the result for late peers (off the loop): the round
    # is the member's and is returned, to be applied; the next sync raises Stopped. (It raised Stopped here, and the
    # peer's checkpoint then held the round before the run's last, which no live peer held.)
    (stopped, other), release = pair
    release.set()
    keep = stopped.results.keep

    def keep_after_a_stop(*args, **kwargs):
        stopped.interrupt("stopped by the test")
        time.sleep(0.2)  # the cancellation reaches the sync while this runs
        return keep(*args, **kwargs)

    stopped.results.keep = keep_after_a_stop
    pending = stopped.sync_async(torch.ones(8))
    other.sync_async(torch.ones(8))
    result = pending.result(timeout=30)
    assert result.round_id == 1 and torch.equal(result.value, torch.ones(8))
    with pytest.raises(Stopped):
        stopped.sync(torch.ones(8))
