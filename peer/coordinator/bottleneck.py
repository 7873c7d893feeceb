"""Which member a round waited for: a peer on a slow link sets the pace of every round it is in.

Each member reports whose data it received last, and how long after every
other member's (``RoundReport.waited_for``, ``waited_s``). When most of the
other members name one peer, and that wait is a good part of the round, for
``STREAK`` committed rounds in a row, the coordinator says so in its log and
on the dashboard, at most once every ``NOTE_EVERY_ROUNDS`` rounds per peer:
nothing else named it (probe L: one peer at 100 kbit/s stretched every round
from 0.05 s to 4 s, silently). One round's last sender alone says little:
where every link is as slow, it is whoever came last this time.
"""

from __future__ import annotations

import statistics
from collections import Counter
from collections.abc import Collection, Mapping
from dataclasses import dataclass, field

# A wait shorter than this, or than this share of the round, is no one's fault worth a line.
SLOW_MIN_S = 1.0
SLOW_SHARE = 0.25
# A peer is named once it was the bottleneck of this many committed rounds in a row, and again only this many
# rounds later.
STREAK = 3
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
    """The committed rounds' bottlenecks in a row, and the round each peer was last named at."""

    noted_at: dict[str, int] = field(default_factory=dict)
    # The peer the last committed rounds waited for, and how many rounds in a row ("": the last one waited for none).
    streak: tuple[str, int] = ("", 0)

    def due(self, slow: str, round_id: int) -> bool:
        """Note a committed round's bottleneck (slow, "": none); whether naming it is due now: STREAK rounds in a row,
        and never named or named NOTE_EVERY_ROUNDS rounds ago."""
        peer, count = self.streak
        self.streak = (slow, count + 1 if slow and slow == peer else 1)
        if not slow or self.streak[1] < STREAK:
            return False
        last = self.noted_at.get(slow)
        if last is not None and round_id - last < NOTE_EVERY_ROUNDS:
            return False
        self.noted_at[slow] = round_id
        return True

    def forget(self, keep: Collection[str]) -> None:
        """Forget the peers not in keep (gone ones), so this stays as small as the run."""
        for peer_id in [p for p in self.noted_at if p not in keep]:
            del self.noted_at[peer_id]
