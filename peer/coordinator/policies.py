"""Quorum policies: who takes part in a round, and when it starts.

A policy is a pure decision, table-tested in ``tests/test_policies.py``: from
the peers waiting for the round (in order of arrival), the live peers, how
long the quorum has waited and the round's id and seed, it answers ``None``
(keep waiting), ``Refuse`` (too few peers are left: today's "no quorum") or
``FormRound`` (the members, in rank order = peer id order). The coordinator's
quorums (``peer/coordinator/quorum.py``, ``Quorums.inputs``) gather the inputs
on every request and tick and carry the outcome out; a requesting peer a round forms without is
held until that attempt is decided (see docs/membership.md).

Policies, chosen with the coordinator's ``quorum`` setting:

- ``all``: every live peer, or whoever asked by the join timeout
  (``rules.quorum_ready`` / ``rules.quorum_hopeless``);
- ``first-k:K``: the first K peers to ask, as soon as K have asked; with fewer
  than K live peers, the ``all`` rule over whoever asked;
- ``coded:S[,code=C]``: gradient coding's rounds (``optimizers/coded.py``): the
  peers that asked, as soon as they can decode the code over every live peer
  (the roster, sent as the round's candidates) tolerating S stragglers; an
  undecodable or badly conditioned set waits for more, never forms;
- ``allbut:S``: the first n-S of the n live peers to ask (the rest are
  ignored as stragglers; ``allbut:0`` waits for all), roster as candidates;
- ``backup``: the first k to ask, k named by the members in the round's tag
  (``sync-sgd:k=K``: dynamic backup workers choose it each step), roster as
  candidates; a tag without k waits for all;
- ``grace:L[,f=F]``: sequential gradient coding's rounds: every peer that
  asked, once n-L of the n live peers asked and (1+F) times the (n-L)-th's
  time since the last commit has passed (F default 0.5): workers a little
  late are kept, workers slower by more are the round's stragglers (roster
  as candidates);
- ``buffer:K[,t=T]``: asynchronous rounds (FedBuff): every peer that asked,
  once K have (every live peer, if fewer are live), or T seconds after the
  first one asked; the peers still training are not waited for (roster as
  candidates);
- ``sample:K, ``sample:F``, ``sample:F,min=M``: the k peers
  ``collectives.sampling.sample_members`` draws from the run's seed and the
  round id among the live peers (members can check the draw); k is K, or
  ceil(F x candidates) and at least M (min_peers when M is not given, see
  ``fitted``), never more than the candidates. The round starts when all of
  them asked, or at the join timeout with those of them that did.

Adding a policy: subclass ``QuorumPolicy`` (a name, a usage string, how to
read its argument, ``decide``) and decorate it with ``@register``.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import ClassVar

from collectives.errors import ConfigError
from collectives.roundplan import BACKUP_TAG_KEY
from collectives.sampling import SAMPLE_POLICY, SampleSize, parse_sample_arg, sample_members, whole_count
from peer.coordinator.rules import QuorumRules, order_members, quorum_hopeless, quorum_ready


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


def _count(cls: type[QuorumPolicy], arg: str) -> int:
    k = whole_count(arg)
    if k is None:
        raise ConfigError(f"quorum policy {cls.name}:{arg} needs a whole number of peers K >= 1")
    return k


@dataclass(frozen=True)
class _Bare(QuorumPolicy):
    """A policy without an argument: its spec is its name."""

    @classmethod
    def from_arg(cls, arg: str) -> _Bare:
        """The name alone; an argument is a ConfigError."""
        if arg:
            raise ConfigError(f"quorum policy {cls.name} takes no argument, got {cls.name}:{arg}")
        return cls()

    @property
    def spec(self) -> str:
        """The policy's name."""
        return self.name


@register
@dataclass(frozen=True)
class AllPeers(_Bare):
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


@dataclass(frozen=True)
class _OfK(QuorumPolicy):
    """A policy with a round size K (``NAME:K``)."""

    k: int

    @classmethod
    def from_arg(cls, arg: str) -> _OfK:
        """``NAME:K`` with K >= 1."""
        return cls(_count(cls, arg))

    @property
    def spec(self) -> str:
        """``NAME:K``."""
        return f"{self.name}:{self.k}"

    def max_members(self) -> int | None:
        """K."""
        return self.k


@register
@dataclass(frozen=True)
class FirstK(_OfK):
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


@register
@dataclass(frozen=True)
class Sample(QuorumPolicy):
    """The k peers drawn by ``sample_members`` from the run's seed and the round id among the live peers; k is a
    count, or a fraction of those candidates (``collectives.sampling.SampleSize``)."""

    name: ClassVar[str] = SAMPLE_POLICY
    usage: ClassVar[str] = f"{SAMPLE_POLICY}:K, {SAMPLE_POLICY}:F[,min=M]"

    size: SampleSize

    @classmethod
    def from_arg(cls, arg: str) -> Sample:
        """``sample:K``, ``sample:F`` or ``sample:F,min=M`` (see ``collectives.sampling.parse_sample_arg``)."""
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
                f"quorum {self.spec}: min={minimum} is below min_peers {min_peers}, so a round of {minimum} could never "
                f"start: use min >= {min_peers}, leave min out (it is then min_peers) or lower --min-peers"
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


def roster_of(q: QuorumInputs) -> tuple[str, ...]:
    """Every live peer (and every peer that asked), by peer id: the workers a straggler-tolerant round is planned over."""
    return tuple(sorted(q.eligible | set(q.requesting)))


def _first_of_roster(q: QuorumInputs, k: int) -> Outcome:
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
        from collectives.gradcodes import CODE_KINDS

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
        from collectives.gradcodes import code_for, decodable  # torch, only for this policy (see from_arg)

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
        return _first_of_roster(q, len(roster_of(q)) - self.stragglers)

    def may_form(self, requesting: int, eligible: int, waited_s: float, rules: QuorumRules) -> bool:
        """n-s asked."""
        return requesting >= rules.least and requesting >= eligible - self.stragglers



@register
@dataclass(frozen=True)
class Backup(_Bare):
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
        return _first_of_roster(q, self.k_of(q.tag, n))

    def joins(self, pending_tag: str, tag: str) -> bool:
        """The same algorithm's rounds whatever k they name: the pending round's k (its first asker's) stands. A
        worker that missed the round that changed the roster (the first k of n went on without it) chooses k for
        the old roster until it is a member again, which would otherwise never happen."""
        base = tag.rpartition(BACKUP_TAG_KEY)[0]
        return tag == pending_tag or (base != "" and base == pending_tag.rpartition(BACKUP_TAG_KEY)[0])

    def may_form(self, requesting: int, eligible: int, waited_s: float, rules: QuorumRules) -> bool:
        """At least min_peers asked (k is in the tag, read by decide)."""
        return requesting >= rules.least


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
        k = _count(cls, count)
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
