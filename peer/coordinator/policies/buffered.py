"""The ``buffer:K[,t=T]`` quorum policy: asynchronous (FedBuff) rounds of the peers ready now."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

from collectives.errors import ConfigError
from peer.coordinator.policies.base import (
    FormRound,
    Outcome,
    QuorumInputs,
    QuorumPolicy,
    Refuse,
    register,
    roster_of,
    whole_arg,
)
from peer.coordinator.rules import QuorumRules, order_members, quorum_hopeless


@register
@dataclass(frozen=True)
class Buffered(QuorumPolicy):
    """Asynchronous rounds (FedBuff): the peers ready now, once K of them are, or T seconds after the first one.

    Peers still training are not waited for: they contribute to a later round, their contribution that many
    rounds stale (``optimizers/asyncdiloco.py`` weighs it). With fewer than K live peers, K is all of them.
    """

    name: ClassVar[str] = "buffer"
    usage: ClassVar[str] = "buffer:K[,t=T]"

    k: int
    timeout_s: float | None = None

    @classmethod
    def from_arg(cls, arg: str) -> Buffered:
        """``buffer:K`` or ``buffer:K,t=T`` (K >= 1, T > 0 seconds)."""
        count, _, rest = arg.partition(",")
        k = whole_arg(cls, count)
        if not rest:
            return cls(k)
        key, _, value = rest.partition("=")
        try:
            t = float(value)
        except ValueError:
            t = -1.0
        if key != "t" or not (t > 0 and math.isfinite(t)):
            raise ConfigError(f"quorum policy buffer:{arg} takes t=T, the seconds (> 0) a ready peer waits for "
                              f"{k} to be ready")
        return cls(k, t)

    @property
    def spec(self) -> str:
        """``buffer:K`` or ``buffer:K,t=T``."""
        return f"{self.name}:{self.k}" + ("" if self.timeout_s is None else f",t={self.timeout_s:g}")

    def _needed(self, live: int, rules: QuorumRules) -> int:
        return max(min(self.k, live), rules.least, 1)

    def decide(self, q: QuorumInputs) -> Outcome:
        """Every peer that asked, once K asked (all live peers if fewer) or T seconds after the first asked."""
        if q.coordinator_age_s < q.rules.startup_grace_s:
            return None
        roster = roster_of(q)
        live = len(roster)
        # The roster goes along as the candidates: members / candidates is each round's share of the live peers,
        # by which asynchronous DiLoCo scales its outer step (optimizers/asyncdiloco.py).
        ready = FormRound(tuple(order_members(set(q.requesting))), roster)
        if q.requesting and len(q.requesting) >= self._needed(live, q.rules):
            return ready
        if (self.timeout_s is not None and q.waited_s >= self.timeout_s
                and len(q.requesting) >= max(q.rules.least, 1)):
            return ready
        if quorum_hopeless(live, q.waited_s, q.coordinator_age_s, q.run_started, q.rules, q.refused_before):
            return Refuse(live)
        return None

    def may_form(self, requesting: int, eligible: int, waited_s: float, rules: QuorumRules) -> bool:
        """K (or every live peer) asked, or T passed since the first."""
        if requesting < max(rules.least, 1):
            return False
        timed_out = self.timeout_s is not None and waited_s >= self.timeout_s
        return timed_out or requesting >= self._needed(eligible, rules)
