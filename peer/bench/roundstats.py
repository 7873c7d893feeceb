"""The figures of ``loconet bench membership``, as pure functions of what its processes measured.

Latency distributions and the membership checks of each round from the simulated peers' records (``round_stats``), what
the coordinator's status says went wrong (``coordinator_checks``), the floor the machine's cores set on a round
(``cpu_floor``), and failed checks grouped by shape (``group_messages``).
"""

from __future__ import annotations

import math
import re
from collections import Counter
from collections.abc import Iterable

from peer.bench.kit import summary
from peer.bench.simpeers import RoundRecord


def cpu_floor(coordinator_cpu_s: float, client_cpu_s: float, wall_s: float, rounds: int, cores: int) -> dict:
    """Per-round wall and CPU of the rounds phase, and the floor the machine's cores set on a round's length."""
    return {
        "wall_per_round_s": wall_s / rounds,
        "client_cpu_per_round_s": client_cpu_s / rounds,
        "cores": cores,
        "cpu_floor_per_round_s": (coordinator_cpu_s + client_cpu_s) / rounds / cores,
    }


def coordinator_checks(status: dict, peers: int, rounds: int, rounds_full: int) -> list[str]:
    """What the coordinator's status says went wrong in a measurement of ``rounds`` rounds with every one of ``peers``
    peers (rounds_full: the rounds every simulated peer saw committed with all of them); empty when nothing did."""
    summary_ = status.get("summary", {})
    problems = []
    if summary_.get("rounds_committed") != rounds:
        problems.append(f"coordinator committed {summary_.get('rounds_committed')} rounds, expected {rounds}")
    if summary_.get("rounds_aborted"):
        problems.append(f"coordinator aborted {summary_['rounds_aborted']} rounds")
    if summary_.get("peers_alive") != peers:
        problems.append(f"coordinator sees {summary_.get('peers_alive')} live peers, expected {peers}")
    committed = [r for r in status.get("rounds", []) if r.get("status") == "committed"]
    if any(len(r.get("members", [])) != peers for r in committed):
        problems.append("a committed round in the coordinator's history has fewer members than peers")
    if rounds and rounds_full != rounds:
        problems.append(f"{rounds_full} of {rounds} rounds committed by all {peers} peers")
    return problems


def group_messages(messages: list[str], limit: int = 20) -> list[dict]:
    """Messages grouped by their shape (numbers elided): count and one example (shortened) each."""
    groups: dict[str, list] = {}
    for m in messages:
        key = re.sub(r"\d+", "#", m)[:120]
        if key not in groups:
            groups[key] = [0, m if len(m) <= 300 else m[:300] + "..."]
        groups[key][0] += 1
    ordered = sorted(groups.values(), key=lambda g: -g[0])
    return [{"count": n, "example": ex} for n, ex in ordered[:limit]]


def finite(values: Iterable[float]) -> list[float]:
    """The finite values (an attempt the coordinator's status no longer remembers has no formation time)."""
    return [v for v in values if math.isfinite(v)]


def formed_at(status: dict) -> dict[tuple[int, int], float]:
    """When the coordinator formed each attempt it remembers, (round id, epoch) -> unix time (its status)."""
    return {(r["round_id"], r["epoch"]): r["started_at"] for r in status.get("rounds", []) if "started_at" in r}


def round_stats(
    records: list[RoundRecord], peers: int, formed: dict[tuple[int, int], float] | None = None
) -> tuple[dict, list[str]]:
    """Latency distributions and per-round figures from the simulated peers' round records; and the failed checks
    (peers of one round given different round ids or epochs).

    ``formed``: when the coordinator formed each attempt (``formed_at``), which splits the quorum's close
    into the coordinator taking in the requests and deciding, and the answers reaching the peers.
    """
    formed = formed or {}
    problems: list[str] = []
    by_k: dict[int, list[RoundRecord]] = {}
    for rec in records:
        by_k.setdefault(rec.k, []).append(rec)
    quorum, quorum_close, commit, commit_close = [], [], [], []
    per_round = []
    full_rounds = 0
    for k in sorted(by_k):
        recs = by_k[k]
        ids = {r.round_id for r in recs}
        epochs = {r.epoch for r in recs}
        if len(ids) != 1 or len(epochs) != 1:
            problems.append(f"round {k}: peers got different round ids {sorted(ids)[:5]} / epochs {sorted(epochs)[:5]}")
        # The send time of the attempt that was answered: a retried call counts from its retry.
        last_q_sent = max(r.quorum_sent for r in recs)
        last_c_sent = max(r.commit_sent for r in recs)
        quorum += [r.quorum_answered - r.quorum_first_sent for r in recs]
        quorum_close += [r.quorum_answered - last_q_sent for r in recs]
        commit += [r.commit_answered - r.commit_first_sent for r in recs]
        commit_close += [r.commit_answered - last_c_sent for r in recs]
        committed_all = len(recs) == peers and all(r.committed for r in recs) and all(r.members == peers for r in recs)
        full_rounds += committed_all
        formed_time = formed.get((min(ids), min(epochs)), math.nan)
        per_round.append(
            {
                "round_id": min(ids),
                "epoch": min(epochs),
                "members": max(r.members for r in recs),
                "peers_answered": len(recs),
                "committed_by_all": committed_all,
                "quorum_spread_s": last_q_sent - min(r.quorum_first_sent for r in recs),
                "quorum_close_first_s": min(r.quorum_answered for r in recs) - last_q_sent,
                "quorum_close_last_s": max(r.quorum_answered for r in recs) - last_q_sent,
                "formed_after_last_request_s": formed_time - last_q_sent,
                "answers_after_formed_first_s": min(r.quorum_answered for r in recs) - formed_time,
                "answers_after_formed_last_s": max(r.quorum_answered for r in recs) - formed_time,
                "commit_close_last_s": max(r.commit_answered for r in recs) - last_c_sent,
                "round_wall_s": max(r.commit_answered for r in recs) - min(r.quorum_first_sent for r in recs),
                "quorum_answer_bytes": sum(r.answer_bytes for r in recs),
                "quorum_answer_lists": dict(sorted(Counter(r.list_form for r in recs).items())),
            }
        )
    return {
        "quorum_latency_s": summary(quorum),
        "quorum_close_latency_s": summary(quorum_close),
        "commit_latency_s": summary(commit),
        "commit_close_latency_s": summary(commit_close),
        "quorum_close_first_answer_s": summary([r["quorum_close_first_s"] for r in per_round]),
        "quorum_close_last_answer_s": summary([r["quorum_close_last_s"] for r in per_round]),
        "round_wall_s": summary([r["round_wall_s"] for r in per_round]),
        "quorum_formed_after_last_request_s": summary(finite(r["formed_after_last_request_s"] for r in per_round)),
        "quorum_answers_after_formed_last_s": summary(finite(r["answers_after_formed_last_s"] for r in per_round)),
        "quorum_answer_bytes_per_round": summary([r["quorum_answer_bytes"] for r in per_round]),
        "rounds_full": full_rounds,
        "per_round": per_round,
    }, problems
