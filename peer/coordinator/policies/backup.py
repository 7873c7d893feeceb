"""The ``backup`` quorum policy: the first k peers to ask, k named by the members in the round's tag."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from collectives.membership.roundplan import BACKUP_TAG_KEY
from collectives.membership.sampling import whole_count
from peer.coordinator.policies.base import NoArgPolicy, Outcome, QuorumInputs, first_of_roster, register, roster_of
from peer.coordinator.rules import QuorumRules


@register
@dataclass(frozen=True)
class Backup(NoArgPolicy):
    """Dynamic backup workers: the first k to ask, k chosen by the members and named in the round's tag."""

    name: ClassVar[str] = "backup"
    usage: ClassVar[str] = "backup"

    @staticmethod
    def k_of(tag: str, n: int) -> int:
        """The k a tag names (``...:k=K``); n (wait for all) when it names none or not a whole number."""
        _, found, k = tag.rpartition(BACKUP_TAG_KEY)
        count = whole_count(k) if found else None
        return n if count is None else count

    def decide(self, q: QuorumInputs) -> Outcome:
        """Form with the first k askers."""
        n = len(roster_of(q))
        return first_of_roster(q, self.k_of(q.tag, n))

    def joins(self, pending_tag: str, tag: str) -> bool:
        """The same algorithm's rounds whatever k they name: the pending round's k (its first asker's) stands. A
        worker that missed the round that changed the roster (the first k of n went on without it) chooses k for
        the old roster until it is a member again, which would otherwise never happen."""
        base = tag.rpartition(BACKUP_TAG_KEY)[0]
        return tag == pending_tag or (base != "" and base == pending_tag.rpartition(BACKUP_TAG_KEY)[0])

    def may_form(self, requesting: int, eligible: int, waited_s: float, rules: QuorumRules) -> bool:
        """At least min_peers asked (k is in the tag, read by decide)."""
        return requesting >= rules.least
