"""The ``grace:L[,f=F]`` quorum policy: sequential gradient coding's rounds, a grace period after n-L asked."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from collectives.errors import ConfigError
from collectives.membership.sampling import whole_count
from peer.coordinator.policies.base import FormRound, Outcome, QuorumInputs, QuorumPolicy, Refuse, register, roster_of
from peer.coordinator.rules import QuorumRules, order_members, quorum_hopeless


@register
@dataclass(frozen=True)
class Grace(QuorumPolicy):
    """Everyone who asked by a grace period after n-L asked: the rest are this round's stragglers."""

    name: ClassVar[str] = "grace"
    usage: ClassVar[str] = "grace:L[,f=F]"

    stragglers: int
    grace: float = 0.5

    @classmethod
    def from_arg(cls, arg: str) -> Grace:
        """``grace:L`` or ``grace:L,f=F`` (F >= 0)."""
        count, _, rest = arg.partition(",")
        s = 0 if count == "0" else whole_count(count)
        key, _, value = rest.partition("=")
        try:
            f = float(value) if rest else 0.5
        except ValueError:
            f = -1.0
        if s is None or (rest and key != "f") or not f >= 0:
            raise ConfigError(f"quorum policy grace:{arg} needs L >= 0 stragglers and optionally f=F >= 0")
        return cls(s, f)

    @property
    def spec(self) -> str:
        """``grace:L,f=F``."""
        return f"{self.name}:{self.stragglers},f={self.grace:g}"

    def decide(self, q: QuorumInputs) -> Outcome:
        """Form with every asker when all asked, or once (1+F) times the (n-L)-th asker's wait has passed."""
        if q.coordinator_age_s < q.rules.startup_grace_s:
            return None
        roster = roster_of(q)
        need = max(len(roster) - self.stragglers, q.rules.least, 1)
        everyone = FormRound(tuple(order_members(set(q.requesting))), roster)
        if len(q.requesting) >= len(roster):
            return everyone
        if len(q.requesting) >= need:
            if len(q.arrivals_s) != len(q.requesting):
                return everyone  # arrival times unknown: no grace to give
            if q.since_s >= (1.0 + self.grace) * sorted(q.arrivals_s)[need - 1]:
                return everyone
        if quorum_hopeless(len(roster), q.waited_s, q.coordinator_age_s, q.run_started, q.rules, q.refused_before):
            return Refuse(len(roster))
        return None

    def may_form(self, requesting: int, eligible: int, waited_s: float, rules: QuorumRules) -> bool:
        """n-L asked."""
        return requesting >= rules.least and requesting >= eligible - self.stragglers
