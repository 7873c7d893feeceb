"""The ``coded:S`` quorum policy: gradient coding's rounds, formed once the askers can decode the code."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from collectives.errors import ConfigError
from collectives.membership.sampling import whole_count
from peer.coordinator.policies.base import FormRound, Outcome, QuorumInputs, QuorumPolicy, Refuse, register, roster_of
from peer.coordinator.rules import QuorumRules, order_members, quorum_hopeless


@register
@dataclass(frozen=True)
class Coded(QuorumPolicy):
    """Gradient coding: whoever asked, once they can decode the code over the roster with s stragglers."""

    name: ClassVar[str] = "coded"
    usage: ClassVar[str] = "coded:S[,code=frc|cyclic]"

    stragglers: int
    code: str = "auto"

    @classmethod
    def from_arg(cls, arg: str) -> Coded:
        """``coded:S`` or ``coded:S,code=C``."""
        # Imported here: gradcodes pulls in torch, which a coordinator without a coded policy never needs (its import
        # takes seconds and its objects make every full garbage collection of the coordinator ~100 ms long).
        from collectives.gradcoding.gradcodes import CODE_KINDS

        count, _, rest = arg.partition(",")
        s = whole_count(count) if count != "0" else 0
        key, _, code = rest.partition("=")
        if s is None or (rest and (key != "code" or code not in CODE_KINDS)):
            raise ConfigError(f"quorum policy coded:{arg} needs S >= 0 stragglers and optionally code=frc|cyclic")
        return cls(s, code or "auto")

    @property
    def spec(self) -> str:
        """``coded:S`` (and the code when it is not auto)."""
        return f"{self.name}:{self.stragglers}" + (f",code={self.code}" if self.code != "auto" else "")

    def decide(self, q: QuorumInputs) -> Outcome:
        """Form with every asker once their rows of the code span the all-ones vector (well conditioned)."""
        if q.coordinator_age_s < q.rules.startup_grace_s:
            return None
        from collectives.gradcoding.gradcodes import code_for, decodable  # torch, only for this policy (see from_arg)

        roster = self.roster(q)
        asked = [p for p in q.requesting if p in roster]
        try:
            code = code_for(len(roster), self.stragglers, self.code)
        except ConfigError:  # a code that cannot be built over this roster (self.roster avoids it for frc)
            return None
        if len(asked) >= q.rules.least and decodable(code, [roster.index(p) for p in asked]):
            return FormRound(tuple(order_members(set(asked))), roster)
        if quorum_hopeless(len(roster), q.waited_s, q.coordinator_age_s, q.run_started, q.rules, q.refused_before):
            return Refuse(len(roster))
        return None

    def roster(self, q: QuorumInputs) -> tuple[str, ...]:
        """The workers the code is built over: every live peer; with code=frc, the most of them that s+1 divides.

        Fractional repetition's groups of s+1 need a roster that s+1 divides. When a worker leaves a run of six
        with s = 1, the last of the five by peer id sits out (it follows the run by the rounds' results) instead
        of no round forming at all, as before 2026-12-06."""
        roster = roster_of(q)
        size = self.stragglers + 1
        if self.code != "frc" or len(roster) < size:  # below s+1 workers, s is capped at n-1 (code_for)
            return roster
        return roster[: len(roster) - len(roster) % size]

    def may_form(self, requesting: int, eligible: int, waited_s: float, rules: QuorumRules) -> bool:
        """Enough askers for the sparsest decodable set (one worker per group of s+1)."""
        return requesting >= rules.least and requesting * (self.stragglers + 1) >= eligible
