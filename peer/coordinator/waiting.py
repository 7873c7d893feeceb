"""Peers waiting for the run's state: who, since when, and why (for the status document and the dashboard).

A joiner without state that finds no live holder of the run's committed
state is told to wait (``rules.join_action``), as is a peer behind the run
that nobody can resync. Waiters are not members of the run (they hold no
lease); they ask again every heartbeat interval, and one that stops asking
for a lease is forgotten. The coordinator keeps them here so that the
dashboard can say, in one line, that the run is stalled and what would
unblock it.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field


@dataclass
class Waiter:
    """One peer waiting for a holder of the run's state."""

    address: str
    name: str = ""
    peer_id: str = ""
    # The committed round whose state it holds (0: none): one a rollback could go on from.
    held_round: int = 0
    # When it started waiting (unix seconds) and last asked (monotonic seconds).
    since: float = field(default_factory=time.time)
    last_asked: float = field(default_factory=time.monotonic)


# Waiters remembered at most (each asks again every heartbeat; one forgotten is noted again when it does).
MAX_WAITERS = 1000


@dataclass
class WaitingRoom:
    """The peers waiting for the run's state, by address, and the latest reason given to them."""

    waiters: dict[str, Waiter] = field(default_factory=dict)
    reason: str = ""

    def note(self, address: str, reason: str, name: str = "", peer_id: str = "", held_round: int = 0) -> bool:
        """Record that the peer at address waits (again), holding the state of held_round (0: none); True when
        it was not waiting before."""
        self.reason = reason
        waiter = self.waiters.get(address)
        if waiter is not None:
            waiter.last_asked = time.monotonic()
            waiter.name, waiter.peer_id = name or waiter.name, peer_id or waiter.peer_id
            waiter.held_round = held_round
            return False
        self.waiters[address] = Waiter(address, name, peer_id, held_round=held_round)
        while len(self.waiters) > MAX_WAITERS:  # the oldest first: a flood of waiters cannot grow this
            self.waiters.pop(next(iter(self.waiters)))
        return True

    def newest_held(self) -> int:
        """The newest round whose state a waiter holds (0: none holds any)."""
        return max((w.held_round for w in self.waiters.values()), default=0)

    def done(self, address: str) -> bool:
        """The peer at address no longer waits (it was given a source, or left); True if it was waiting."""
        gone = self.waiters.pop(address, None) is not None
        if not self.waiters:
            self.reason = ""
        return gone

    def expire(self, now: float, after_s: float) -> list[Waiter]:
        """Forget the waiters that have not asked for after_s seconds (they gave up); return them."""
        gone = [w for w in self.waiters.values() if now - w.last_asked > after_s]
        for w in gone:
            self.done(w.address)
        return gone

    def as_dict(self) -> dict | None:
        """The ``waiting`` entry of the status document: None when nobody waits."""
        if not self.waiters:
            return None
        waiters = sorted(self.waiters.values(), key=lambda w: (w.since, w.address))
        return {
            "since": waiters[0].since,
            "reason": self.reason,
            "peers": [{"address": w.address, "name": w.name, "peer_id": w.peer_id, "since": w.since} for w in waiters],
        }
