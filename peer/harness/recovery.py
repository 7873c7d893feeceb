"""What a fault cost the survivors of a harness run: pure functions of the peers' committed syncs.

``recovery_s`` (event to the next committed round) includes the training until
the next scheduled sync, so it says little about the fault itself. ``lost_s``
is the extra wall time the event cost: the duration of the sync it affected
minus a normal sync's duration. Per survivor, the affected sync is its first
sync that committed after the event, and a normal one is the median of its
syncs; the event's ``lost_s`` is the median over the survivors, so one peer's
unrelated hiccup does not decide it.

Neither says whether the peer an event took out ever came back: a cut that
cost its peer the rest of the run cost the survivors 0.16 s (probe L, F10).
``back_s`` is, for an event that takes one peer out for a while (a pause, a
cut, a stop with a restart), the time from the event to the first committed
round that peer contributed to once the event was over, or None when it
never did.
"""

from __future__ import annotations

import statistics
from collections.abc import Mapping, Sequence

from peer.harness.scenario import Event

# Events that take their target out for a while, after which it is meant to take part again.
COMES_BACK = ("pause", "cut", "stop")

Sync = tuple[float, float]
"""One committed sync of a peer: (when it committed, on the wall clock; how long the whole sync took, seconds)."""


def peer_lost_s(at: float, syncs: Sequence[Sync]) -> float | None:
    """The extra seconds of this peer's first sync committed after ``at``, over its median sync; None if none."""
    after = [s for s in syncs if s[0] > at]
    if not after:
        return None
    affected = min(after)
    return affected[1] - statistics.median(duration for _, duration in syncs)


def lost_s(at: float, syncs: Mapping[str, Sequence[Sync]]) -> float | None:
    """The median over peers of ``peer_lost_s`` for an event at wall time ``at``; None when no peer committed after."""
    per_peer = [lost for lost in (peer_lost_s(at, s) for s in syncs.values()) if lost is not None]
    return statistics.median(per_peer) if per_peer else None


def comes_back(event: Event) -> bool:
    """Whether the event takes one peer out for a while, after which it should take part again (a stop only when
    it is started again: ``for=``)."""
    return (event.action in COMES_BACK and event.target is not None
            and (event.action != "stop" or event.duration_s is not None))


def back_s(at: float, out_s: float, contributed: Sequence[float]) -> float | None:
    """Seconds from an event at ``at`` that took its target out for ``out_s`` to the first committed round (wall
    times ``contributed``) the target contributed to after that; None when it never did. (A stopped peer may still
    finish the round it was in: that is no return.)"""
    after = [t for t in contributed if t > at + out_s]
    return min(after) - at if after else None
