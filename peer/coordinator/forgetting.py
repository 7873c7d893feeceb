"""Which records of gone peers the coordinator forgets, so that churn cannot grow it without bound.

A peer that left or was lost stays on the dashboard for a while (who was lost,
and when, is worth seeing), but a run with churn, or an outsider's stream of
joins, would otherwise leave the coordinator a record per peer ever seen: 100,000
joins made it know 100,002 peers, 438 MB of memory and a 47 MB ``/api/status``.
So only the ``keep`` peers that went most recently are remembered, each for at
most ``max_age_s``. Live peers are never forgotten: this rule is only ever
asked about gone ones.

Forgetting a peer loses nothing the protocol needs: a gone peer that calls
again with its id is told it is unknown and joins again, as after a
coordinator restart.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from collectives.errors import ConfigError

# Gone peers kept by default: a dashboard's table of them, and more than any test run loses.
KEEP_GONE_PEERS = 64
# A gone peer is forgotten after this long (seconds) by default.
GONE_PEER_TTL_S = 3600.0


@dataclass(frozen=True)
class ForgetRule:
    """How many gone peers the coordinator remembers (the most recent), and for how long (None: no time limit)."""

    keep: int = KEEP_GONE_PEERS
    max_age_s: float | None = GONE_PEER_TTL_S

    def __post_init__(self) -> None:
        if self.keep < 0:
            raise ConfigError(f"the coordinator keeps 0 or more gone peers, got {self.keep}")
        if self.max_age_s is not None and not self.max_age_s > 0:
            raise ConfigError(f"gone peers are kept for a positive time (or no limit: None), got {self.max_age_s}")


def peers_to_forget(gone: Sequence[tuple[str, float]], now: float, rule: ForgetRule) -> list[str]:
    """The gone peers to forget, oldest first.

    ``gone`` lists (peer id, when it went) in the order the peers went, oldest
    first (times on ``now``'s clock). All but the last ``rule.keep`` are
    forgotten, and any that went more than ``rule.max_age_s`` before ``now``.
    """
    surplus = max(0, len(gone) - rule.keep)
    return [
        peer_id
        for i, (peer_id, went_at) in enumerate(gone)
        if i < surplus or (rule.max_age_s is not None and now - went_at > rule.max_age_s)
    ]
