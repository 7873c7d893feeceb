"""Which member a round waited for: a peer on a slow link sets the pace of every round it is in.

Each member reports whose data it received last, and how long after every
other member's (``RoundReport.waited_for``, ``waited_s``). When most of the
other members name one peer, and that wait is a good part of the round, the
coordinator says so in its log and on the dashboard, at most once every
``NOTE_EVERY_ROUNDS`` rounds per peer: nothing else named it (probe L: one
peer at 100 kbit/s stretched every round from 0.05 s to 4 s, silently).
"""

from __future__ import annotations

import statistics
from collections import Counter
from collections.abc import Collection, Mapping
from dataclasses import dataclass, field

# A wait shorter than this, or than this share of the round, is no one's fault worth a line.
SLOW_MIN_S = 1.0
SLOW_SHARE = 0.25
# A peer named once is named again only this many rounds later.
NOTE_EVERY_ROUNDS = 20


def bottleneck(
    waits: Mapping[str, tuple[str, float]], members: Collection[str], duration_s: float
) -> tuple[str, float] | None:
    """(peer, median wait) when more than half of the round's other members waited for that one member's data
    last, for at least SLOW_MIN_S and SLOW_SHARE of the round; None otherwise. ``waits``: reporter -> (named
    member, seconds), as the members reported."""
    named = Counter(who for reporter, (who, _) in waits.items() if who in members and who != reporter)
    if not named:
        return None
    peer, count = named.most_common(1)[0]
    if count * 2 <= len(members) - 1:
        return None
    wait = statistics.median(s for reporter, (who, s) in waits.items() if who == peer and reporter != peer)
    return (peer, wait) if wait >= max(SLOW_MIN_S, SLOW_SHARE * duration_s) else None


@dataclass
class Bottlenecks:
    """The peers named as a round's bottleneck, and the round each was last named at (to say it now and then)."""

    noted_at: dict[str, int] = field(default_factory=dict)

    def due(self, peer_id: str, round_id: int) -> bool:
        """Whether naming peer_id at round_id is due (never named, or NOTE_EVERY_ROUNDS rounds ago); notes it."""
        last = self.noted_at.get(peer_id)
        if last is not None and round_id - last < NOTE_EVERY_ROUNDS:
            return False
        self.noted_at[peer_id] = round_id
        return True

    def forget(self, keep: Collection[str]) -> None:
        """Forget the peers not in keep (gone ones), so this stays as small as the run."""
        for peer_id in [p for p in self.noted_at if p not in keep]:
            del self.noted_at[peer_id]
