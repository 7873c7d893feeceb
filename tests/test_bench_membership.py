"""``loconet bench membership`` end to end at a small scale: a real coordinator process, simulated peers.

Checks the report's structure and that every round committed with every
peer; timings are reported, never asserted (shared, noisy machines).
"""

from __future__ import annotations

import argparse
import json
import math

import pytest

from peer.bench import membership as bench_membership
from peer.bench.fields import undocumented

pytestmark = pytest.mark.timeout(120)

PEERS = 20
ROUNDS = 2


def _is_summary(value) -> bool:
    return isinstance(value, dict) and {"p50", "p99", "max"} <= set(value) and all(
        isinstance(value[k], float) and math.isfinite(value[k]) for k in ("p50", "p99", "max")
    )


def test_small_run_commits_every_round_with_every_peer(tmp_path):
    report = bench_membership.run(bench_membership.MembershipBenchConfig(
        peers=PEERS, rounds=ROUNDS, client_procs=1, window_s=2.0, log_dir=tmp_path))

    assert report["peers"] == PEERS and report["rounds"] == ROUNDS and report["client_procs"] == 1
    for key in ("join_latency_s", "quorum_latency_s", "quorum_close_latency_s", "commit_latency_s"):
        assert _is_summary(report[key]), key
    assert report["join_latency_s"]["n"] == PEERS
    assert report["quorum_latency_s"]["n"] == PEERS * ROUNDS
    assert report["commit_latency_s"]["n"] == PEERS * ROUNDS
    json.dumps(report, allow_nan=False)  # strict JSON: no NaN
    for key in ("heartbeats_per_s", "coordinator_cpu_per_heartbeat_us", "coordinator_cpu_utilization",
                "coordinator_rss_mb", "wall_s"):
        assert isinstance(report[key], float) and report[key] >= 0, key
    assert "cpu_per_heartbeat_over_baseline" in report
    assert undocumented(report, bench_membership.FIELDS) == []
    assert report["heartbeats_in_window"] > 0
    assert report["baseline"]["peers"] == 10
    assert report["baseline"]["coordinator_cpu_per_heartbeat_us"] >= 0

    # Every round committed by the coordinator and by every peer, with all of them as members.
    assert report["problems"] == [], report["problems"]
    assert report["rounds_committed"] == ROUNDS
    assert report["rounds_aborted"] == 0
    assert report["peers_alive_at_end"] == PEERS
    assert report["committed_rounds_member_counts"] == [PEERS]
    assert report["rounds_full"] == ROUNDS
    assert len(report["per_round"]) == ROUNDS
    assert len({r["round_id"] for r in report["per_round"]}) == ROUNDS
    for r in report["per_round"]:
        assert r["members"] == PEERS and r["peers_answered"] == PEERS and r["committed_by_all"]
    # Every peer gets the list once, packed; the next round's answers leave out the list they hold.
    assert [r["quorum_answer_lists"] for r in report["per_round"]] == [{"packed": PEERS}, {"left_out": PEERS}]
    assert report["all_rounds_committed_with_all_peers"] is True


def test_with_churn_every_round_commits_with_every_peer_and_carries_the_member_list_as_its_change(tmp_path):
    report = bench_membership.run(bench_membership.MembershipBenchConfig(
        peers=PEERS, rounds=3, client_procs=1, window_s=1.0, churn=2, log_dir=tmp_path))
    assert report["problems"] == [] and report["all_rounds_committed_with_all_peers"] is True
    assert report["peers_alive_at_end"] == PEERS and report["churn"] == 2
    # Round 1 sends every peer the whole list, packed; each later round, after 2 peers left and joined again
    # (keeping the list they held), the change from it, which is the smaller.
    forms = [r["quorum_answer_lists"] for r in report["per_round"]]
    assert forms == [{"packed": PEERS}, {"change": PEERS}, {"change": PEERS}]
    first, *later = [r["quorum_answer_bytes"] for r in report["per_round"]]
    assert all(b < first for b in later), (first, later)


def test_arguments_parse():
    parser = argparse.ArgumentParser()
    bench_membership.add_arguments(parser)
    ns = parser.parse_args(["--peers", "5", "--rounds", "1", "--client-procs", "1", "--json"])
    assert (ns.peers, ns.rounds, ns.client_procs, ns.json) == (5, 1, 1, True)
    assert ns.heartbeat == 1.0 and ns.window == 10.0



@pytest.mark.parametrize(("peers", "client_procs"), [(1, 1), (2, 2), (1000, 2)])
def test_without_client_procs_two_processes_run_the_peers_or_one_for_a_single_peer(peers, client_procs):
    assert bench_membership.default_client_procs(peers) == client_procs
