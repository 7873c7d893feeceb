"""A silence that took every lease: the coordinator heard from no peer while all their leases lapsed.

When every live peer's lease lapses with no call heard in between, the
coordinator's own link (or host) failed far more likely than every peer at
once: they come back within a heartbeat or two of each other. A quorum formed
by the first ones back leaves the others behind (a round they never joined,
then a fetch of the state, which on a slow link may never finish). So, as
after a restart (``rules.py``, ``startup_grace_s``), quorums hold until every
peer the silence took is live again, or for ``startup_grace_s`` after the
first call that ended it, whichever comes first.
"""

from __future__ import annotations

import math
from collections.abc import Collection
from dataclasses import dataclass, field

# A silence must take at least this many peers to count: one quiet peer of a one-peer run is just that peer.
MIN_TAKEN = 2


@dataclass
class Silence:
    """Which peers lapsed since the last call heard, and the last outage: the peers it took, when it ended."""

    lapsed: set[str] = field(default_factory=set)
    taken: frozenset[str] = frozenset()
    ended_at: float | None = None

    def heard(self, now: float) -> None:
        """A peer's call arrived: the first one after an outage ends it; any other ends a silence under way."""
        if self.taken and self.ended_at is None:
            self.ended_at = now
        elif self.lapsed:
            self.lapsed.clear()

    def lapse(self, peer_id: str, live_left: int) -> frozenset[str]:
        """peer_id's lease lapsed, leaving live_left live peers: the peers an outage took if this one completes it
        (every live peer lapsed, at least MIN_TAKEN, nothing heard in between), else the empty set."""
        self.lapsed.add(peer_id)
        if live_left or len(self.lapsed) < MIN_TAKEN:
            return frozenset()
        self.taken, self.ended_at, self.lapsed = frozenset(self.lapsed), None, set()
        return self.taken

    def settle_age(self, now: float, live: Collection[str], grace_s: float) -> float:
        """Seconds since the last outage ended while quorums still hold for it (0.0 while it lasts); infinity once
        every peer it took is live again or grace_s has passed, or with no outage."""
        if not self.taken:
            return math.inf
        if self.ended_at is None:
            return 0.0
        age = now - self.ended_at
        if age >= grace_s or all(p in live for p in self.taken):
            return math.inf
        return age
