"""The ``allbut:S`` quorum policy: the first n-S of the n live peers to ask."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from collectives.errors import ConfigError
from collectives.membership.sampling import whole_count
from peer.coordinator.policies.base import Outcome, QuorumInputs, QuorumPolicy, first_of_roster, register, roster_of
from peer.coordinator.rules import QuorumRules


@register
@dataclass(frozen=True)
class AllBut(QuorumPolicy):
    """The first n-s of the n live peers to ask: s stragglers ignored each round (0: wait for all)."""

    name: ClassVar[str] = "allbut"
    usage: ClassVar[str] = "allbut:S"

    stragglers: int

    @classmethod
    def from_arg(cls, arg: str) -> AllBut:
        """``allbut:S`` with S >= 0."""
        s = 0 if arg == "0" else whole_count(arg)
        if s is None:
            raise ConfigError(f"quorum policy allbut:{arg} needs a whole number S >= 0 of stragglers to ignore")
        return cls(s)

    @property
    def spec(self) -> str:
        """``allbut:S``."""
        return f"{self.name}:{self.stragglers}"

    def decide(self, q: QuorumInputs) -> Outcome:
        """Form with the first n-s askers."""
        return first_of_roster(q, len(roster_of(q)) - self.stragglers)

    def may_form(self, requesting: int, eligible: int, waited_s: float, rules: QuorumRules) -> bool:
        """n-s asked."""
        return requesting >= rules.least and requesting >= eligible - self.stragglers
