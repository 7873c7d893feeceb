"""What the harness concludes from the peers' events: identity, retries, attacks, replicas, link use.

Pure functions of the peers' JSON events (``loconet peer --events``) and the
coordinator's status, as ``joiners.py``'s are, so each judgement has a
table-like test:

- ``identical``: whether the survivors hold the same global parameters after
  the last round they all hold (the harness's central invariant);
- ``left_behind``: survivors that trained on alone, their syncs finding
  nobody holding the run's state (docs/durability.md);
- ``last_miss``: why the peers' last syncs did not commit, when they did not;
- ``retried``: every aborted round was followed by a committed one;
- ``byzantine``: what each attacking peer says it did;
- ``replicas``: for rounds reduced in groups (NoLoCo), the largest group and
  each survivor's last measured spread;
- ``link_utilization``: the median share of a capped link a round used;
- ``unexpected_exit``: whether a process ended by itself with an error
  (not by a signal the harness sent it).
"""

from __future__ import annotations

import signal
import statistics
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence

Events = Sequence[Mapping]


def left_behind(events_by_peer: Mapping[str, Events], names: Iterable[str]) -> list[str]:
    """The peers among names whose syncs found nobody holding the run's state: they trained on alone."""
    return sorted(n for n in names if any(
        e["event"] == "sync-missed" and e.get("error") == "WaitingForState" for e in events_by_peer[n]))


def last_miss(events_by_peer: Mapping[str, Events]) -> str:
    """The reason most peers give for their last sync not committing ("" when every peer's last sync committed);
    a tie goes to the reason first in sorted order."""
    reasons = []
    for events in events_by_peer.values():
        last = next((e for e in reversed(events) if e["event"] in ("committed", "sync-missed")), None)
        if last is not None and last["event"] == "sync-missed" and last.get("reason"):
            reasons.append(last["reason"])
    if not reasons:
        return ""
    counts = Counter(reasons)
    return min(counts, key=lambda r: (-counts[r], r))


def identical(events_by_peer: Mapping[str, Events], survivors: Sequence[str]) -> tuple[int | None, bool]:
    """The last round all survivors hold and whether they hold the same parameters there.

    A round is held when it was committed in any of a peer's processes, or fetched when the peer joined or
    resynced (a peer started again after the others finished commits nothing more). With no round in common,
    a lone survivor counts as identical and several do not.
    """
    if not survivors:
        return None, False
    per_peer = [{(e["round"], e.get("epoch", 0)): e["digest"] for e in events_by_peer[n] if e["event"] == "committed"}
                for n in survivors]
    # A fetched state's event names the round but not the attempt: it is taken as the committed attempt of that
    # round with the same digest (after a rollback a round id has several), else its latest, so that a fetched
    # state that differs is compared and found different.
    committed = {(r, epoch): d for held in per_peer for (r, epoch), d in held.items()}
    for n, held in zip(survivors, per_peer):
        for e in events_by_peer[n]:
            # Round 0 too: peers that never committed a round hold the run's initial state, the same on each.
            if e["event"] in ("joined", "resynced") and e.get("round") is not None and e.get("digest"):
                attempts = [k for k in committed if k[0] == e["round"]]
                same = [k for k in attempts if committed[k] == e["digest"]]
                held.setdefault((same or sorted(attempts) or [(e["round"], -1)])[-1], e["digest"])
    common = set.intersection(*(set(d) for d in per_peer))
    if not common:
        return None, len(survivors) == 1
    last = max(common)
    return last[0], len({d[last] for d in per_peer}) == 1


def last_rounds(events_by_peer: Mapping[str, Events], survivors: Sequence[str]) -> dict[str, int]:
    """The last round each survivor committed or fetched (0: none): asynchronous rounds end peers at different
    ones, where ``identical`` compares the last they all hold."""
    return {n: max((e["round"] for e in events_by_peer[n]
                    if e["event"] in ("committed", "joined", "resynced") and e.get("round")), default=0)
            for n in survivors}


def data_parallel_bytes(steps: int, numel: int, members: Sequence[int]) -> float:
    """What synchronous data-parallel training sends per peer over the same steps: a ring all-reduce of the fp32
    gradients every step, 2(N-1)/N of them, N the mean member count of the run's committed rounds (probe K: the
    starting count overstated it after a kill)."""
    if not members:
        return 0.0
    n = sum(members) / len(members)
    return steps * 2 * (n - 1) / n * 4 * numel


def committed_members(status: Mapping) -> list[int]:
    """How many members each committed round in the coordinator's status had."""
    return [len(r["members"]) for r in status.get("rounds", []) if r["status"] == "committed"]


def retried(status: Mapping) -> bool:
    """Every aborted round in the coordinator's status was followed by a committed one."""
    rounds = status.get("rounds", [])
    aborted = [r["started_at"] for r in rounds if r["status"] == "aborted"]
    committed = [r["started_at"] for r in rounds if r["status"] == "committed"]
    return all(any(c > a for c in committed) for a in aborted)


def byzantine(events_by_peer: Mapping[str, Events]) -> dict[str, dict]:
    """Per peer that was told to attack: the attacks it started, when, the contributions it corrupted, and the
    attacks it refused."""
    report = {}
    for name, events in events_by_peer.items():
        mine = [e for e in events if e["event"].startswith("byzantine-")]
        if not mine:
            continue
        report[name] = {
            "attacks": [e["attack"] for e in mine if e["event"] == "byzantine-started"],
            "started_at_step": next((e["step"] for e in mine if e["event"] == "byzantine-started"), None),
            # Made: a contribution is corrupted as it is built, before the coordinator forms (or refuses) a round.
            "contributions_corrupted": sum(e["event"] == "byzantine-sent" for e in mine),
            "corrupted_in_committed_rounds": _counted_while_attacking(events),
            "refused": [e["reason"] for e in mine if e["event"] == "byzantine-refused"],
        }
    return report


def _counted_while_attacking(events: Events) -> int:
    """Rounds this peer contributed to, committed, while an attack of its ran: its corruptions the run took."""
    attacking, counted = False, 0
    for e in events:
        if e["event"] == "byzantine-started":
            attacking = True
        elif e["event"] == "byzantine-stopped":
            attacking = False
        elif e["event"] == "committed" and attacking and e.get("contributed", True):
            counted += 1
    return counted


def replicas(events_by_peer: Mapping[str, Events]) -> dict:
    """For rounds reduced in groups: the largest group a peer reduced in, and the replicas' spread as each peer
    last measured it; empty when no round was reduced in groups."""
    groups = [e["group"] for events in events_by_peer.values() for e in events
              if e["event"] == "committed" and e.get("group") is not None]
    if not groups:
        return {}
    spreads = {}
    for name, events in events_by_peer.items():
        measured = [e["spread"] for e in events if e["event"] == "eval" and e.get("spread") is not None]
        if measured:
            spreads[name] = measured[-1]
    return {"largest_group": max(groups), "spread_per_peer": spreads}


def link_utilization(events_by_peer: Mapping[str, Events], bits_per_s: float) -> float | None:
    """Median over the peers' committed rounds of (bytes sent x 8 / link rate) / all-reduce time; None without
    such rounds."""
    ratios = [
        e["bytes"] * 8 / bits_per_s / e["allreduce_s"]
        for events in events_by_peer.values()
        for e in events
        if e["event"] == "committed" and e.get("allreduce_s")
    ]
    return statistics.median(ratios) if ratios else None


def mean_of(values: Iterable[float | None]) -> float | None:
    """The mean of the values that are not None; None when there are none."""
    known = [v for v in values if v is not None]
    return statistics.mean(known) if known else None


def unexpected_exit(returncode: int | None, signalled: Iterable[int]) -> bool:
    """Whether a process's exit is a failure of its own: not running, not 0, and not the end of a kill (SIGKILL,
    whatever its code) or of a stop (SIGTERM) the harness sent it."""
    sent = set(signalled)
    if returncode is None or returncode == 0 or signal.SIGKILL in sent:
        return False
    return not (signal.SIGTERM in sent and returncode == -signal.SIGTERM)
