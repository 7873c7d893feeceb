"""The quorum-policy seam: a policy's inputs and outcomes, the ``QuorumPolicy`` base, the registry and its parse.

Also the helpers the policy modules share (roster, counts, the bases of a policy without an argument and of one
with a round size K). The policies are one module each beside this one, imported, so registered, by the package's
``__init__.py``, which also says what each one does. A policy module imports this one, never the package: the
package imports the policy modules, so it is not yet whole while they load.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import ClassVar

from collectives.errors import ConfigError
from collectives.membership.sampling import whole_count
from peer.coordinator.rules import QuorumRules, order_members, quorum_hopeless


@dataclass(frozen=True)
class QuorumInputs:
    """Everything a policy decides from (plain data, no clock reads)."""

    # Peers waiting for this round, in order of arrival.
    requesting: tuple[str, ...]
    # Live peers a quorum may wait for, syncing joiners included: also what a sample is drawn from.
    eligible: frozenset[str]
    # Seconds since the first request of this quorum, and since the coordinator started.
    waited_s: float
    coordinator_age_s: float
    round_id: int
    seed: int
    rules: QuorumRules
    # The run has committed a round (before that, too few peers means: wait).
    run_started: bool = False
    # The tag of the round the requesting peers ask for (the backup policy reads k from it).
    tag: str = ""
    # Seconds from the last commit (or the first request, before any) to each request of ``requesting``
    # (same order), and to now; empty and 0: unknown.
    arrivals_s: tuple[float, ...] = ()
    since_s: float = 0.0
    # The live peers and the least members a round needs are those of the last quorum refused for too few, and no
    # round formed since: its join timeout passed with nobody back, so this one is refused without waiting again.
    refused_before: bool = False


@dataclass(frozen=True)
class FormRound:
    """Start the round with these members (rank order), drawn from these candidates (sample only)."""

    members: tuple[str, ...]
    candidates: tuple[str, ...] = ()


@dataclass(frozen=True)
class Refuse:
    """Refuse the waiting peers: fewer than min_peers live peers are left (``live`` of them)."""

    live: int


Outcome = FormRound | Refuse | None


class QuorumPolicy(ABC):
    """A rule for who takes part in a round; subclasses are registered by name with ``@register``."""

    # The policy's name in a spec ("first-k" in "first-k:3") and the forms it accepts, for error messages.
    name: ClassVar[str]
    usage: ClassVar[str]

    @classmethod
    @abstractmethod
    def from_arg(cls, arg: str) -> QuorumPolicy:
        """The policy a spec's argument (the text after ':', or '') describes; ConfigError if it is invalid."""

    @property
    @abstractmethod
    def spec(self) -> str:
        """The spec that reads back into this policy (sent to the members with every round)."""

    @abstractmethod
    def decide(self, q: QuorumInputs) -> Outcome:
        """None (keep waiting), Refuse, or FormRound with members taken from q.requesting."""

    def awaited(self, q: QuorumInputs) -> frozenset[str]:
        """Live peers the quorum still waits for (the coordinator checks that they still listen)."""
        return q.eligible - set(q.requesting)

    def waits_for(self, q: QuorumInputs, peer_id: str) -> bool:
        """Whether the round cannot form without peer_id (before its join timeout): a late peer caught up is then
        told to join it at its next step. False by default: a round that takes whoever asks first does not need the
        latecomer, whose one step of work would take the place of a peer's whole interval."""
        return False

    def may_form(self, requesting: int, eligible: int, waited_s: float, rules: QuorumRules) -> bool:
        """A count-only test run on every request: False when decide would certainly keep waiting."""
        return requesting >= rules.least and (requesting >= eligible or waited_s >= rules.join_timeout_s)

    def max_members(self) -> int | None:
        """The most members a round of this policy can have (None: no limit), checked against min_peers."""
        return None

    def joins(self, pending_tag: str, tag: str) -> bool:
        """Whether a request tagged ``tag`` joins the pending quorum tagged ``pending_tag`` (else it is refused:
        the peers disagree on the schedule). The same tag by default."""
        return tag == pending_tag

    def fitted(self, min_peers: int) -> QuorumPolicy:
        """This policy for a run whose rounds need min_peers members (ConfigError if it contradicts them)."""
        return self


POLICIES: dict[str, type[QuorumPolicy]] = {}


def register(cls: type[QuorumPolicy]) -> type[QuorumPolicy]:
    """Make a policy class available by its name in quorum specs (the same class again is accepted, as a plugin
    module imported twice registers it again; another class under a taken name is a ConfigError)."""
    existing = POLICIES.get(cls.name)
    if existing is not None and existing is not cls:
        raise ConfigError(f"quorum policy name {cls.name!r} is already registered ({existing.__qualname__}); "
                          "choose another name")
    POLICIES[cls.name] = cls
    return cls


def policy_forms() -> str:
    """The accepted spec forms, for messages and help texts."""
    return ", ".join(cls.usage for cls in POLICIES.values())


def parse_policy(spec: str) -> QuorumPolicy:
    """The policy a spec names ("all", "first-k:K", "sample:K", "sample:0.5,min=2"); ConfigError listing the forms
    otherwise."""
    name, _, arg = spec.strip().partition(":")
    cls = POLICIES.get(name)
    try:
        if cls is None:
            raise ConfigError(f"unknown quorum policy {spec!r}")
        return cls.from_arg(arg)
    except ConfigError as exc:
        raise ConfigError(f"{exc}: use one of {policy_forms()}") from None


# The helpers from here on are the policy modules' (and a plugin's policy may use them too), not the coordinator's.
def whole_arg(cls: type[QuorumPolicy], arg: str) -> int:
    """The policy's argument K as a whole number >= 1, or a ConfigError naming the policy."""
    k = whole_count(arg)
    if k is None:
        raise ConfigError(f"quorum policy {cls.name}:{arg} needs a whole number of peers K >= 1")
    return k


@dataclass(frozen=True)
class NoArgPolicy(QuorumPolicy):
    """A policy without an argument: its spec is its name."""

    @classmethod
    def from_arg(cls, arg: str) -> NoArgPolicy:
        """The name alone; an argument is a ConfigError."""
        if arg:
            raise ConfigError(f"quorum policy {cls.name} takes no argument, got {cls.name}:{arg}")
        return cls()

    @property
    def spec(self) -> str:
        """The policy's name."""
        return self.name


@dataclass(frozen=True)
class SizedPolicy(QuorumPolicy):
    """A policy with a round size K (``NAME:K``)."""

    k: int

    @classmethod
    def from_arg(cls, arg: str) -> SizedPolicy:
        """``NAME:K`` with K >= 1."""
        return cls(whole_arg(cls, arg))

    @property
    def spec(self) -> str:
        """``NAME:K``."""
        return f"{self.name}:{self.k}"

    def max_members(self) -> int | None:
        """K."""
        return self.k


def roster_of(q: QuorumInputs) -> tuple[str, ...]:
    """Every live peer (and every peer that asked), by peer id: the workers a straggler-tolerant round is planned
    over."""
    return tuple(sorted(q.eligible | set(q.requesting)))


def first_of_roster(q: QuorumInputs, k: int) -> Outcome:
    """The first k askers (at least min_peers, at most the roster), with the roster as the round's candidates."""
    if q.coordinator_age_s < q.rules.startup_grace_s:
        return None
    roster = roster_of(q)
    k = min(max(k, q.rules.least, 1), len(roster))
    if len(q.requesting) >= k:
        return FormRound(tuple(order_members(set(q.requesting[:k]))), roster)
    if quorum_hopeless(len(roster), q.waited_s, q.coordinator_age_s, q.run_started, q.rules, q.refused_before):
        return Refuse(len(roster))
    return None
