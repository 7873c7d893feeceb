"""The ``first-k:K`` quorum policy: the first K peers to ask, as soon as K have asked."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from peer.coordinator.policies.allpeers import AllPeers
from peer.coordinator.policies.base import FormRound, Outcome, QuorumInputs, SizedPolicy, register
from peer.coordinator.rules import QuorumRules, order_members


@register
@dataclass(frozen=True)
class FirstK(SizedPolicy):
    """The first k peers to ask; with fewer than k live peers, the ``all`` rule over whoever asked."""

    name: ClassVar[str] = "first-k"
    usage: ClassVar[str] = "first-k:K"

    def decide(self, q: QuorumInputs) -> Outcome:
        """Form with the first k askers once k asked; fall back to ``all`` while fewer than k peers are live."""
        if q.coordinator_age_s < q.rules.startup_grace_s:
            return None
        if len(q.requesting) >= self.k and self.k >= q.rules.least:
            return FormRound(tuple(order_members(set(q.requesting[: self.k]))))
        if len(q.eligible | set(q.requesting)) < self.k:
            return AllPeers().decide(q)
        return None

    def may_form(self, requesting: int, eligible: int, waited_s: float, rules: QuorumRules) -> bool:
        """k asked, or the ``all`` test."""
        if requesting < rules.least:
            return False
        return requesting >= self.k or super().may_form(requesting, eligible, waited_s, rules)
