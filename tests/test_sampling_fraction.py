"""Client sampling with real processes: a coordinator with ``--quorum sample:0.5`` and four toy peers on 127.0.0.1.

Each committed round has half of the peers, exactly the ones ``sample_members`` draws from the run's seed,
the round id and the candidates the round names; the peers a round went on without resync, so every peer
holding a round holds the same parameters.
"""

from __future__ import annotations

import json
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from collectives.membership.sampling import sample_count, sample_members

sys.path.insert(0, str(Path(__file__).parent))
from support.procs import CoordinatorProc, stop_all, toy_peer

pytestmark = pytest.mark.timeout(120)

RUN = "sampled"
SEED = 5
ROUNDS = 6
PEERS = ("a", "b", "c", "d")


def status(coordinator: CoordinatorProc) -> dict:
    with urllib.request.urlopen(coordinator.dashboard.rstrip("/") + "/api/status", timeout=10) as reply:
        return json.loads(reply.read())


def wait_for_round(coordinator: CoordinatorProc, round_id: int, timeout_s: float) -> dict:
    """The status once the run has committed round_id."""
    deadline = time.monotonic() + timeout_s
    while True:
        doc = status(coordinator)
        if doc["last_committed_round"] >= round_id:
            return doc
        if time.monotonic() > deadline:
            raise AssertionError(f"round {round_id} not committed in {timeout_s:g} s; rounds {doc['rounds'][:5]}")
        time.sleep(0.2)


def states(peer) -> dict[int, str]:
    """Round -> digest of the parameters the peer held after it: from its committed rounds and its resyncs."""
    return {e["round"]: e["digest"] for e in peer.events if e["event"] in ("committed", "resynced") and e["round"] > 0}


def test_half_of_the_peers_per_round_drawn_as_anyone_can_check_and_identical_everywhere(tmp_path):
    # --min-peers 2 is also the fraction's minimum: round 1 never starts with the first peer alone.
    coordinator = CoordinatorProc(
        tmp_path / "coordinator.log", RUN, 0, "--quorum", "sample:0.5", "--quorum-seed", str(SEED),
        "--min-peers", "2", "--lease", "2", "--heartbeat", "0.3", "--join-timeout", "3", "--commit-timeout", "10",
    )
    peers = {}
    try:
        for name in PEERS:
            peers[name] = toy_peer(tmp_path, coordinator.address, RUN, name, "--numel", "1000", "--interval", "0.05")
        ids = {peers[n].wait_event(lambda e: e["event"] == "joined", 60)["peer_id"]: n for n in PEERS}
        # Rounds may have gone on while the last peers started; from the second round formed after this
        # moment on (one may be in flight now), all four are candidates.
        all_joined = status(coordinator)["last_committed_round"]
        last = wait_for_round(coordinator, all_joined + ROUNDS, 60)["last_committed_round"]
        # Every peer gets to the run's last round: as a member, or by a resync once it is committed.
        for peer in peers.values():
            peer.wait_event(lambda e: e["event"] in ("committed", "resynced") and e["round"] >= last, 30)
    finally:
        stop_all(list(peers.values()))
        try:
            final = status(coordinator)
        finally:
            coordinator.stop()

    assert final["quorum_policy"] == "sample:0.5,min=2"
    committed = [r for r in reversed(final["rounds"]) if r["status"] == "committed"]
    assert [r["round_id"] for r in committed] == list(range(1, len(committed) + 1))
    for r in committed:
        assert set(r["candidates"]) <= set(ids) and sample_count("0.5,min=2", len(r["candidates"])) == 2
        assert r["members"] == list(sample_members(SEED, r["round_id"], r["candidates"], 2)), r
    for r in committed[all_joined + 1 : last]:
        assert sorted(r["candidates"]) == sorted(ids), f"round {r['round_id']}: all four live peers are candidates"
    # What the members themselves report agrees with the coordinator's record.
    for name, peer in peers.items():
        for e in peer.events:
            if e["event"] == "committed":
                assert e["members"] == committed[e["round"] - 1]["members"], (name, e)
    # Identical parameters: every peer that holds a round holds the same digest for it.
    # Rounds go on while the test waits, so a peer left out of one round may resync straight past `last`:
    # each holds `last` or a later round, and no round is held with two digests.
    held = [states(peer) for peer in peers.values()]
    for round_id in sorted(set().union(*held)):
        digests = {s[round_id] for s in held if round_id in s}
        assert len(digests) == 1, f"round {round_id}: {len(digests)} different parameter digests"
    assert all(max(s) >= last for s in held)
    # The dashboard marks the members of the last committed round (the peers have left by now).
    marked = {p["peer_id"] for p in final["peers"] if p["in_last_round"]}
    assert marked == set(committed[-1]["members"])
