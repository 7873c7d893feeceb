"""The elastic all-reduce: what it refuses before asking for a quorum, and what a round's plan decides."""

from __future__ import annotations

import asyncio
import dataclasses
import time

import pytest
import torch

from collectives.codecs import CodecConfig
from collectives.elastic import ElasticCollective, ElasticConfig
from collectives.errors import NonFiniteError, UsageError
from collectives.membership.coordinatorerrors import GroupTooSmall, Unregistered
from collectives.membership.roundplan import Joined
from collectives.net.transportconfig import TransportConfig
from collectives.reduce.aggregators import AggregatorConfig
from collectives.syncphases import WaitingForState
from optimizers.diloco import DiLoCo
from peer.coordinator.config import CoordinatorConfig
from tests.support.coordinator import CoordinatorThread


def test_sync_refuses_a_nan_input_before_asking_for_a_quorum():
    # Never started: a sync that got as far as the coordinator would fail with TransportClosed.
    peer = ElasticCollective(ElasticConfig(coordinator="127.0.0.1:1", run_id="r"))
    x = torch.ones(10)
    x[4] = float("inf")
    with pytest.raises(NonFiniteError, match=r"hold 1 NaN or Inf value\(s\) out of 10"):
        peer.sync_async(x)
    assert peer.transport.counters.bytes_sent == 0


# -- against a real coordinator ---------------------------------------------------------------


@pytest.fixture
def run():
    """A coordinator for run "w" and a factory of started members; everything is closed after the test."""
    coordinator = CoordinatorThread(
        CoordinatorConfig(run_id="w", port=0, dashboard_port=None, startup_grace_s=0, min_peers=3, join_timeout_s=5)
    )
    members: list[ElasticCollective] = []

    def member() -> ElasticCollective:
        peer = ElasticCollective(ElasticConfig(coordinator=coordinator.server.address, run_id="w"))
        members.append(peer)
        peer.start(has_state=True)
        return peer

    yield member
    for peer in members:
        peer.close()
    coordinator.close()


@pytest.mark.timeout(60)
def test_a_weight_function_is_evaluated_with_the_round_plan_after_the_quorum(run):
    peers = [run() for _ in range(3)]
    seen: dict[str, tuple] = {}

    def by_rank(peer_id: str):
        # Gradient coding's decoding coefficients work this way: they depend on who made the round.
        def weight(plan) -> float:
            seen[peer_id] = (plan.round_id, tuple(pid for pid, _ in plan.members))
            return float([pid for pid, _ in plan.members].index(peer_id) + 1)

        return weight

    xs = [torch.full((10,), float(10 ** i)) for i in range(3)]
    futures = [
        p.sync_async(x, weight=by_rank(p.peer_id), codec=CodecConfig("none"), aggregator=AggregatorConfig("sum"))
        for p, x in zip(peers, xs)
    ]
    results = [f.result(30) for f in futures]
    members = results[0].members
    assert all(seen[p.peer_id] == (results[0].round_id, members) for p in peers)
    rank = {pid: i + 1 for i, pid in enumerate(members)}
    want = sum(rank[p.peer_id] * x for p, x in zip(peers, xs))
    for r in results:
        assert torch.equal(r.value, want)


@pytest.mark.timeout(60)
def test_a_member_that_leaves_tells_the_coordinator_its_final_figures():
    with CoordinatorThread(CoordinatorConfig(run_id="w", port=0, dashboard_port=None, startup_grace_s=0)) as c:
        peer = ElasticCollective(ElasticConfig(coordinator=c.address, run_id="w"))
        peer.start(has_state=True)
        # A final evaluation after the last heartbeat, as `loconet peer` runs one once its steps are done.
        peer.status.eval_loss, peer.status.step = 1.75, 1500
        peer_id = peer.peer_id
        peer.close(leave=True, reason="finished")
        (shown,) = [p for p in c.status()["peers"] if p["peer_id"] == peer_id]
        assert (shown["state"], shown["eval_loss"], shown["step"]) == ("left", 1.75, 1500)


@pytest.mark.timeout(60)
def test_a_member_waiting_for_a_round_to_form_says_so_rather_than_training(run):
    # The dashboard showed "training" at the last steps/s while a run stalled on a paused member.
    peer = run()
    peer.status.activity = "training"
    seen = []

    async def waits(*args, **kwargs):
        seen.append(peer.status.activity)
        raise GroupTooSmall("no quorum: 1 of 3 peers")

    peer.membership.quorum = waits
    with pytest.raises(GroupTooSmall):
        peer.sync(torch.ones(4))
    assert seen == ["awaiting-round"]


@pytest.mark.timeout(120)
def test_the_coordinator_names_the_member_whose_slow_link_a_round_waited_for():
    # Probe L: a peer at 100 kbit/s stretched every round from 0.05 s to 4 s, and no line named it.
    config = CoordinatorConfig(run_id="w", port=0, dashboard_port=None, startup_grace_s=0, min_peers=3)
    with CoordinatorThread(config) as c:
        links = [None, None, 1.6e6]  # the third sends its 400 kB share in about 2 s, the others at once
        # Hosts of their own: peers of one host would reduce through shared memory, not their links.
        peers = [ElasticCollective(ElasticConfig(coordinator=c.address, run_id="w", transport=TransportConfig(
            bandwidth_bps=bps, host_id=f"host{i}"))) for i, bps in enumerate(links)]
        try:
            for p in peers:
                p.start(has_state=True)
            # Named once it slowed three rounds in a row: at the third, or later when the machine's load made
            # another member come last in a round (seen once with the suite beside it).
            for _ in range(8):
                futures = [p.sync_async(torch.ones(150_000), codec=CodecConfig("none")) for p in peers]
                assert len({f.result(60).round_id for f in futures}) == 1
                named = [e for e in c.status()["events"] if e["kind"] == "slow"]
                if named:
                    break
        finally:
            for p in peers:
                p.close()
        assert [e["peer_id"] for e in named] == [peers[2].peer_id]


@pytest.mark.timeout(60)
def test_a_failed_attempt_reports_the_bytes_its_member_sent_in_it():
    # A round's own stats die with a failed attempt; the coordinator's record of it showed 0 bytes.
    config = CoordinatorConfig(run_id="w", port=0, dashboard_port=None, startup_grace_s=0, min_peers=1)
    with CoordinatorThread(config) as c:
        peer = ElasticCollective(ElasticConfig(coordinator=c.address, run_id="w"))
        peer.start(has_state=True)
        real = peer.rounds._allreduce
        calls = []

        async def fails_once(*args, **kwargs):
            calls.append(args)
            if len(calls) > 1:
                return await real(*args, **kwargs)
            peer.transport.counters.count_sent("127.0.0.1:1", 40_000)  # sent, then the attempt failed
            peer.transport.counters.count_received("127.0.0.1:1", 30_000)
            return None, (), "a member went away"

        peer.rounds._allreduce = fails_once
        try:
            assert peer.sync(torch.ones(4)).attempts == 2
        finally:
            peer.close(leave=True, reason="finished")
        aborted = [r for r in c.status()["rounds"] if r["status"] == "aborted"]
        assert [r["bytes"] for r in aborted] == [40_000]


@pytest.mark.timeout(60)
def test_a_peer_found_out_of_the_run_by_its_heartbeats_and_a_sync_at_once_registers_again_once(run):
    peer = run()
    joins = []
    join = peer.membership.join

    async def counted(*args, **kwargs):
        joins.append(args)
        return await join(*args, **kwargs)

    peer.membership.join = counted

    async def both_find_it_out():
        # As a dropped member does: the decision and a heartbeat say so; the heartbeat loop reacts as well.
        peer.membership.unregistered.set()
        return await asyncio.gather(peer._rejoin(), peer._rejoin())

    assert peer.transport.submit(both_find_it_out()).result(timeout=30) == ["", ""]
    assert len(joins) == 1
    assert not peer.membership.unregistered.is_set()


@pytest.mark.timeout(60)
def test_after_waiting_out_a_holder_once_a_sync_ends_at_once_without_asking_the_coordinator(run):
    peer = run()
    reason = "run w has committed round 7 but no live peer holds it"
    joins, quorums = [], []

    async def told_to_wait(*args, **kwargs):
        # What the coordinator answers a peer behind the run while nobody live holds its last round.
        joins.append(args)
        return Joined(peer.peer_id, 5.0, 0.2, 0, 7, "", wait=True, wait_reason=reason)

    async def quorum(*args, **kwargs):
        quorums.append(args)
        raise AssertionError("a sync asked for a quorum")

    peer.membership.join, peer.membership.quorum = told_to_wait, quorum
    # As a peer left behind is once its first sync waited holder_wait_s in vain: out of the run, its heartbeats
    # asking the coordinator every interval whether a holder is back.
    peer._waiting.note(reason, "waiting for the run's state: %s", reason)
    peer.rounds.waited_out = True
    peer.membership.unregistered.set()
    for _ in range(3):
        with pytest.raises(WaitingForState, match=f"no sync: {reason}"):
            peer.sync(torch.ones(4))
    assert quorums == []
    until = time.monotonic() + 20
    while not joins and time.monotonic() < until:
        time.sleep(0.05)
    assert joins, "the heartbeats ask whether a holder is back"


@pytest.mark.timeout(60)
def test_a_sync_behind_a_run_whose_holders_finished_and_left_does_not_wait_for_them(run):
    peer = run()
    peer.config = dataclasses.replace(peer.config, holder_wait_s=3600.0)  # a wait the test's timeout would end
    reason = "run w has committed round 7 but every peer holding it finished and left"
    joins = []

    async def told_to_wait(*args, **kwargs):
        # The straggler of a run's last round: the others committed it, finished and left.
        joins.append(args)
        return Joined(peer.peer_id, 5.0, 0.2, 0, 7, "", wait=True, wait_reason=reason, holders_finished=True)

    async def out_of_the_run(*args, **kwargs):
        peer.membership.unregistered.set()
        raise Unregistered("dropped")

    peer.membership.join, peer.membership.quorum = told_to_wait, out_of_the_run
    # Waiting holder_wait_s would outlast the test's timeout: the sync ends after the join that says so.
    with pytest.raises(WaitingForState, match=reason):
        peer.sync(torch.ones(4))
    assert joins


@pytest.mark.timeout(90)
def test_while_the_coordinator_is_away_a_sync_gives_up_after_its_patience_then_syncs_end_at_once_until_it_is_back():
    # Each sync retried the coordinator for 300 s: a peer trained one sync interval per 5 minutes while it was away.
    from collectives.membership.coordinatorerrors import CoordinatorUnavailable

    settings = {"run_id": "w", "dashboard_port": None, "startup_grace_s": 0, "min_peers": 1, "heartbeat_s": 0.2}
    first = CoordinatorThread(CoordinatorConfig(port=0, **settings))
    port = int(first.server.address.rsplit(":", 1)[1])
    peer = ElasticCollective(ElasticConfig(coordinator=first.server.address, run_id="w", quorum_patience_s=1.0))
    try:
        peer.start(has_state=True)
        first.close()
        with pytest.raises(CoordinatorUnavailable, match="no loconet coordinator answered .* for 1 s"):
            peer.sync(torch.ones(4))
        sent = []
        send = peer.membership._send

        async def counted(method, *args, **kwargs):
            sent.append(method)
            return await send(method, *args, **kwargs)

        peer.membership._send = counted
        with pytest.raises(CoordinatorUnavailable, match="no sync: no loconet coordinator answered"):
            peer.sync(torch.ones(4))
        assert "Quorum" not in sent  # ended at once: the heartbeats look for the coordinator meanwhile
        with CoordinatorThread(CoordinatorConfig(port=port, **settings)):
            until = time.monotonic() + 30
            while peer.membership.coordinator_lost and time.monotonic() < until:
                time.sleep(0.05)
            assert peer.membership.coordinator_lost == ""
            assert torch.equal(peer.sync(torch.ones(4)).value, torch.ones(4))
    finally:
        peer.close()


@pytest.mark.timeout(90)
def test_a_joiner_whose_source_has_no_state_provider_stops_at_once_saying_so():
    # The joiner asked again every 2 s for 300 s, told to "retry after its first round": that peer never serves one.
    from collectives.errors import ConfigError

    with CoordinatorThread(CoordinatorConfig(run_id="w", port=0, dashboard_port=None, startup_grace_s=0,
                                             min_peers=1)) as coordinator:
        founder = ElasticCollective(ElasticConfig(coordinator=coordinator.server.address, run_id="w"))
        joiner = ElasticCollective(ElasticConfig(coordinator=coordinator.server.address, run_id="w"))
        try:
            assert founder.start() is None
            assert founder.sync(torch.ones(4)).round_id == 1
            with pytest.raises(ConfigError, match="cannot join run w: .*this peer serves no state: its "
                                                  "ElasticCollective has no state provider"):
                joiner.start()
        finally:
            founder.close()
            joiner.close()


def test_diloco_on_a_peer_never_started_stops_at_its_first_sync_instead_of_training_on_alone():
    # UsageError is a LoconetError, which a sync that fails otherwise turns into "did not commit; training on".
    model = torch.nn.Linear(2, 1)
    peer = ElasticCollective(ElasticConfig(coordinator="127.0.0.1:1", run_id="r"))
    opt = DiLoCo(model, torch.optim.SGD(model.parameters(), lr=0.1), peer, sync_every=1)
    model(torch.ones(1, 2)).sum().backward()
    with pytest.raises(UsageError, match="call start"):
        opt.step()


def test_a_sync_before_start_and_a_second_start_name_the_mistake():
    # They failed with "transport not started or already closed" (and a never-awaited coroutine), and "transport
    # already started".
    peer = ElasticCollective(ElasticConfig(coordinator="127.0.0.1:1", run_id="r"))
    with pytest.raises(UsageError, match=r"this peer has not joined the run: call start\(\) before the first step"):
        peer.sync(torch.ones(4))
    peer.address = "127.0.0.1:5"  # as start() leaves it
    with pytest.raises(UsageError, match=r"start\(\) was called already: this peer joined run r at 127.0.0.1:5"):
        peer.start()
