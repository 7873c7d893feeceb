"""Elastic membership with real processes on 127.0.0.1: a coordinator and toy peers, broken on purpose.

Each toy peer (tests/support/toy_peer.py) holds one vector; every committed
round adds the mean of the members' contributions, which are seeded so the
test can recompute any round's exact result.
"""

from __future__ import annotations

import signal
import sys
import time

import pytest
import torch

sys.path.insert(0, str(__import__("pathlib").Path(__file__).parent))

from collectives.reduce.aggregators import aggregate_rows, make_aggregator  # noqa: E402
from support.procs import CoordinatorProc, stop_all, toy_peer  # noqa: E402
from support.toy_peer import contribution, digest  # noqa: E402

pytestmark = pytest.mark.timeout(240)

NUMEL = 5_000


class Cluster:
    """A coordinator and toy peers, all reaped at the end of the test."""

    def __init__(self, tmp_path, run: str = "test", *coordinator_args: str) -> None:
        self.tmp = tmp_path
        self.run = run
        self.coordinator_args = (
            "--lease", "2", "--heartbeat", "0.3", "--join-timeout", "2", "--commit-timeout", "10", *coordinator_args,
        )
        self.coordinator = CoordinatorProc(tmp_path / "coordinator.log", run, 0, *self.coordinator_args)
        self.peers: dict[str, object] = {}
        self.procs = [self.coordinator]

    def add(self, name: str, *extra: str):
        peer = toy_peer(
            self.tmp, self.coordinator.address, self.run, name, "--numel", str(NUMEL), "--interval", "0.05", *extra
        )
        self.peers[name] = peer
        self.procs.append(peer)
        return peer

    def restart_coordinator(self) -> None:
        self.coordinator.signal(signal.SIGKILL)
        self.coordinator.proc.wait(timeout=10)
        port = self.coordinator.port
        self.coordinator = CoordinatorProc(self.tmp / "coordinator2.log", self.run, port, *self.coordinator_args)
        self.procs.append(self.coordinator)

    def close(self) -> None:
        # Peers first (they leave the run), then the coordinator.
        stop_all([p for p in self.procs if p not in (self.coordinator,)])
        stop_all([self.coordinator])


@pytest.fixture
def cluster(tmp_path):
    made = []

    def make(*args, **kw) -> Cluster:
        c = Cluster(tmp_path, *args, **kw)
        made.append(c)
        return c

    yield make
    for c in made:
        c.close()


def committed(peer, after_round: int = 0, timeout: float = 60.0) -> dict:
    return peer.wait_event(lambda e: e["event"] == "committed" and e["round"] > after_round, timeout)


def names_by_id(cluster: Cluster) -> dict[str, str]:
    ids = {}
    for name, peer in cluster.peers.items():
        joined = peer.wait_event(lambda e: e["event"] == "joined", 60)
        ids[joined["peer_id"]] = name
    return ids


def expected_result(cluster: Cluster, event: dict) -> str:
    """Digest of the exact mean of the round's members' contributions (codec none)."""
    ids = names_by_id(cluster)
    rows = []
    for pid in event["members"]:
        name = ids[pid]
        k = cluster.peers[name].wait_event(lambda e: e["event"] == "committed" and e["round"] == event["round"], 30)[
            "k"
        ]
        rows.append(contribution(name, k, NUMEL))
    return digest(aggregate_rows(make_aggregator("mean"), torch.stack(rows), [1.0] * len(rows)))


def assert_applied_once(peer) -> None:
    """Committed rounds only grow and each applies the next contribution: nothing applied twice."""
    done = [e for e in peer.events if e["event"] == "committed"]
    rounds = [e["round"] for e in done]
    assert rounds == sorted(set(rounds))
    ks = [e["k"] for e in done]
    assert ks == list(range(ks[0], ks[0] + len(ks)))


def test_three_peers_commit_identical_rounds(cluster):
    # min-peers 3: on a busy machine the first peers could otherwise finish their 6 rounds before the third joins.
    c = cluster("test", "--min-peers", "3")
    for name in ("a", "b", "c"):
        c.add(name, "--rounds", "6")
    full = c.peers["a"].wait_event(lambda e: e["event"] == "committed" and len(e["members"]) == 3, 90)
    same = {name: committed(peer, full["round"] - 1) for name, peer in c.peers.items()}
    assert {e["round"] for e in same.values()} == {full["round"]}
    assert len({e["digest"] for e in same.values()}) == 1
    assert len({e["result"] for e in same.values()}) == 1
    assert full["result"] == expected_result(c, full)
    for peer in c.peers.values():
        assert_applied_once(peer)


@pytest.mark.parametrize("phase", ["scatter", "gather"])
def test_member_killed_in_a_phase_costs_one_retried_round_over_the_survivors(cluster, phase):
    c = cluster()
    c.add("a")
    c.add("b")
    # The victim joins last, so it never founds the run nor serves a joiner its state: frozen,
    # it would stall that joiner's fetch (30 s) and the test would measure that instead.
    names_by_id(c)
    victim = c.add("v", "--hold", f"{phase}@2")
    names_by_id(c)
    held = victim.wait_event(lambda e: e["event"] == "held", 90)
    killed_at = time.time()
    victim.signal(signal.SIGKILL)
    # The retry keeps the round's id (a new epoch): the survivors commit the very round the victim held.
    after = {name: committed(c.peers[name], held["round"] - 1) for name in ("a", "b")}
    a, b = after["a"], after["b"]
    assert a["round"] == b["round"] == held["round"] and a["digest"] == b["digest"] and a["result"] == b["result"]
    ids = names_by_id(c)
    assert sorted(ids[m] for m in a["members"]) == ["a", "b"]
    assert a["attempts"] >= 2  # the attempt with the victim aborted, the retry committed
    assert a["result"] == expected_result(c, a)
    for name in ("a", "b"):
        assert_applied_once(c.peers[name])
    print(f"recovery ({phase}): {a['t'] - killed_at:.2f} s from SIGKILL to the next committed round")


def test_late_joiner_is_bit_identical_and_contributes_to_the_next_round(cluster):
    c = cluster()
    c.add("a")
    c.add("b")
    first = committed(c.peers["a"], 0)
    committed(c.peers["a"], first["round"] + 2)
    late = c.add("late")
    joined = late.wait_event(lambda e: e["event"] == "joined", 60)
    mine = committed(late, 0)
    others = {
        name: c.peers[name].wait_event(lambda e: e["event"] == "committed" and e["round"] == mine["round"], 30)
        for name in ("a", "b")
    }
    assert {e["digest"] for e in others.values()} == {mine["digest"]}
    ids = names_by_id(c)
    assert "late" in {ids[m] for m in mine["members"]}
    assert mine["result"] == expected_result(c, mine)
    print(f"joiner state sync: {joined['sync_s']:.3f} s for {NUMEL * 4} bytes")


def test_paused_peer_is_dropped_after_its_lease_and_rejoins_after_sigcont(cluster):
    c = cluster()
    c.add("a")
    c.add("b")
    sleeper = c.add("s")
    sleeper.wait_event(lambda e: e["event"] == "committed" and len(e["members"]) == 3, 90)
    sleeper.signal(signal.SIGSTOP)
    stopped_at = time.time()
    ids = names_by_id(c)
    # The others go on without it once its lease lapses.
    without = c.peers["a"].wait_event(
        lambda e: e["event"] == "committed" and "s" not in {ids[m] for m in e["members"]} and e["_seen"] > stopped_at,
        60,
    )
    # Read before the signal: the peer resyncs within milliseconds, and the reader thread stamps the event before
    # this thread, on a loaded machine, gets to run again.
    resumed_at = time.time()
    sleeper.signal(signal.SIGCONT)
    resynced = sleeper.wait_event(lambda e: e["event"] == "resynced" and e["_seen"] > resumed_at, 60)
    assert resynced["round"] >= without["round"]
    back = sleeper.wait_event(lambda e: e["event"] == "committed" and e["round"] > resynced["round"], 60)
    peer_a = c.peers["a"].wait_event(lambda e: e["event"] == "committed" and e["round"] == back["round"], 30)
    assert back["digest"] == peer_a["digest"]
    assert "s" in {ids[m] for m in back["members"]}


def test_coordinator_restart_mid_run_the_next_round_commits(cluster):
    c = cluster()
    for name in ("a", "b", "c"):
        c.add(name)
    # Restart once all three are in the run: a peer that first joins the restarted coordinator,
    # before the state holders re-register, is another case (tests/test_coordinator.py).
    names_by_id(c)
    before = committed(c.peers["a"], 0)
    committed(c.peers["a"], before["round"] + 1)
    c.restart_coordinator()
    restarted_at = time.time()
    after = {
        name: c.peers[name].wait_event(lambda e: e["event"] == "committed" and e["_seen"] > restarted_at, 90)
        for name in c.peers
    }
    # Every peer goes on, and they agree on the state at the next common round.
    target = max(e["round"] for e in after.values())
    final = {name: committed(c.peers[name], target - 1) for name in c.peers}
    assert len({e["digest"] for e in final.values() if e["round"] == target}) == 1
    for peer in c.peers.values():
        assert_applied_once(peer)


def test_member_frozen_in_a_round_the_others_stop_waiting_once_the_coordinator_aborts_it(cluster):
    c = cluster()
    # Their own all-reduce would wait 600 s for the frozen member's data: far beyond every wait below. Each
    # peer is a host of its own: peers sharing one reduce through its memory, which has its own watch.
    c.add("a", "--timeout", "600", "--host-id", "host-a")
    c.add("b", "--timeout", "600", "--host-id", "host-b")
    names_by_id(c)
    victim = c.add("v", "--hold", "gather@2", "--timeout", "600", "--host-id", "host-v")
    names_by_id(c)
    held = victim.wait_event(lambda e: e["event"] == "held", 90)
    # The coordinator aborts the attempt (the frozen member's lease lapses); the heartbeats tell the others,
    # who report and retry the round without it.
    after = {name: committed(c.peers[name], held["round"] - 1, timeout=90) for name in ("a", "b")}
    a, b = after["a"], after["b"]
    assert a["round"] == b["round"] == held["round"] and a["result"] == b["result"]
    ids = names_by_id(c)
    assert sorted(ids[m] for m in a["members"]) == ["a", "b"]
    assert a["attempts"] >= 2
    assert a["result"] == expected_result(c, a)
    # Frozen for good, it would only sit out the cluster's 10 s wait for a graceful exit.
    victim.signal(signal.SIGKILL)
