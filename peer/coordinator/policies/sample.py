"""The ``sample`` quorum policy: a seeded draw of the live peers, which the members can check."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from collectives.errors import ConfigError
from collectives.membership.sampling import SAMPLE_POLICY, SampleSize, parse_sample_arg, sample_members
from peer.coordinator.policies.base import FormRound, Outcome, QuorumInputs, QuorumPolicy, Refuse, register
from peer.coordinator.rules import QuorumRules, quorum_hopeless


@register
@dataclass(frozen=True)
class Sample(QuorumPolicy):
    """The k peers drawn by ``sample_members`` from the run's seed and the round id among the live peers; k is a
    count, or a fraction of those candidates (``collectives.membership.sampling.SampleSize``)."""

    name: ClassVar[str] = SAMPLE_POLICY
    usage: ClassVar[str] = f"{SAMPLE_POLICY}:K, {SAMPLE_POLICY}:F[,min=M]"

    size: SampleSize

    @classmethod
    def from_arg(cls, arg: str) -> Sample:
        """``sample:K``, ``sample:F`` or ``sample:F,min=M``, as
        ``collectives.membership.sampling.parse_sample_arg`` reads them."""
        return cls(parse_sample_arg(arg))

    @property
    def spec(self) -> str:
        """``sample:`` and the size's argument; the members recompute k from it and the candidates."""
        return f"{self.name}:{self.size.arg}"

    def max_members(self) -> int | None:
        """K for a count (more only when the asking peers' rounds need more); a fraction has no fixed bound."""
        return self.size.count

    def fitted(self, min_peers: int) -> Sample:
        """A fraction without min= gets min_peers as its minimum; with a min below min_peers it is a ConfigError
        (a count below min_peers is CoordinatorConfig's, through max_members)."""
        minimum = self.size.minimum
        if minimum is not None and minimum < min_peers:
            raise ConfigError(
                f"quorum {self.spec}: min={minimum} is below min_peers {min_peers}, so a round of {minimum} could "
                f"never start: use min >= {min_peers}, leave min out (it is then min_peers) or lower --min-peers"
            )
        return Sample(self.size.with_minimum(min_peers))

    @staticmethod
    def candidates(q: QuorumInputs) -> tuple[str, ...]:
        """The peers the sample is drawn from: every live peer (and every peer that asked), by peer id.

        Not only the up-to-date ones: the peers a round went on without are catching up on it when the
        next quorum gathers, and the members of the last round, up to date first, would be drawn again
        and again. A drawn joiner still fetching the state holds the round up to the join timeout.
        """
        return tuple(sorted(q.eligible | set(q.requesting)))

    def drawn(self, q: QuorumInputs) -> tuple[tuple[str, ...], tuple[str, ...]]:
        """(the sample, the candidates it is drawn from): k is computed from the very candidates the members get."""
        candidates = self.candidates(q)
        # At least what the asking peers' rounds need (their aggregator's, a private round's): each member checks
        # the sample with its own need, which the run's peers share (their round formats and settings are equal).
        k = self.size.of(len(candidates), q.rules.min_members)
        return (sample_members(q.seed, q.round_id, candidates, k) if k else ()), candidates

    def decide(self, q: QuorumInputs) -> Outcome:
        """Form once every sampled peer asked, or at the join timeout with the sampled peers that asked."""
        if q.coordinator_age_s < q.rules.startup_grace_s:
            return None
        sample, candidates = self.drawn(q)
        requesting = set(q.requesting)
        asked = tuple(p for p in sample if p in requesting)
        if len(asked) >= q.rules.least and (len(asked) == len(sample) or q.waited_s >= q.rules.join_timeout_s):
            return FormRound(asked, candidates)
        eligible = len(q.eligible | requesting)
        if quorum_hopeless(eligible, q.waited_s, q.coordinator_age_s, q.run_started, q.rules, q.refused_before):
            return Refuse(eligible)
        return None

    def awaited(self, q: QuorumInputs) -> frozenset[str]:
        """The sampled peers that have not asked yet."""
        return frozenset(self.drawn(q)[0]) - set(q.requesting)

    def waits_for(self, q: QuorumInputs, peer_id: str) -> bool:
        """A drawn peer."""
        return peer_id in self.drawn(q)[0]

    def may_form(self, requesting: int, eligible: int, waited_s: float, rules: QuorumRules) -> bool:
        """As many asked as a sample of the live peers holds, or the join timeout passed."""
        if requesting < rules.least:
            return False
        return requesting >= self.size.of(eligible, rules.min_members) or waited_s >= rules.join_timeout_s
