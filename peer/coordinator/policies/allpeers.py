"""The ``all`` quorum policy: every live peer, or whoever asked by the join timeout."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from peer.coordinator.policies.base import FormRound, NoArgPolicy, Outcome, QuorumInputs, Refuse, register
from peer.coordinator.rules import order_members, quorum_hopeless, quorum_ready


@register
@dataclass(frozen=True)
class AllPeers(NoArgPolicy):
    """Every live peer; or, after the join timeout, every peer that asked."""

    name: ClassVar[str] = "all"
    usage: ClassVar[str] = "all"

    def decide(self, q: QuorumInputs) -> Outcome:
        """The rule of ``rules.quorum_ready`` / ``rules.quorum_hopeless`` over every peer that asked."""
        requesting = set(q.requesting)
        eligible = q.eligible | requesting
        if quorum_hopeless(len(eligible), q.waited_s, q.coordinator_age_s, q.run_started, q.rules, q.refused_before):
            return Refuse(len(eligible))
        if quorum_ready(requesting, eligible, q.waited_s, q.coordinator_age_s, q.rules):
            return FormRound(tuple(order_members(requesting)))
        return None

    def waits_for(self, q: QuorumInputs, peer_id: str) -> bool:
        """Every live peer."""
        return peer_id in q.eligible
