"""Quorum policies case by case (pure functions, no I/O): who starts a round, and when."""

from __future__ import annotations

import re
from dataclasses import dataclass
from fractions import Fraction
from typing import ClassVar

import pytest

from collectives.errors import ConfigError
from collectives.membership.sampling import SampleSize
from peer.coordinator.policies import (
    POLICIES,
    AllBut,
    AllPeers,
    Backup,
    Buffered,
    Coded,
    FirstK,
    FormRound,
    Grace,
    QuorumInputs,
    QuorumPolicy,
    Refuse,
    Sample,
    parse_policy,
    policy_forms,
    register,
)
from peer.coordinator.rules import QuorumRules


def sample(arg: str) -> Sample:
    """The sample policy of ``sample:<arg>``."""
    return Sample.from_arg(arg)


RULES = QuorumRules(min_peers=1, join_timeout_s=5.0, startup_grace_s=10.0)


def q(
    requesting: str,
    eligible: str = "abcd",
    waited: float = 0.0,
    age: float = 100.0,
    rules: QuorumRules = RULES,
    started: bool = True,
    round_id: int = 1,
    seed: int = 0,
    tag: str = "",
    arrivals: tuple[float, ...] = (),
    since: float = 0.0,
    refused: bool = False,
) -> QuorumInputs:
    """Inputs with one-letter peer ids, requesting in order of arrival."""
    return QuorumInputs(
        requesting=tuple(requesting),
        eligible=frozenset(eligible),
        waited_s=waited,
        coordinator_age_s=age,
        round_id=round_id,
        seed=seed,
        rules=rules,
        run_started=started,
        tag=tag,
        arrivals_s=arrivals,
        since_s=since,
        refused_before=refused,
    )


def form(members: str, candidates: str = "") -> FormRound:
    return FormRound(tuple(members), tuple(candidates))


TWO = QuorumRules(min_peers=2, join_timeout_s=5.0, startup_grace_s=10.0)

# name, policy, inputs, outcome (None: keep waiting)
CASES = [
    # all: every live peer, or whoever asked by the join timeout (rules.quorum_ready / quorum_hopeless).
    ("all: everyone asked, members by peer id", AllPeers(), q("dbca"), form("abcd")),
    ("all: one missing before the timeout", AllPeers(), q("abc", waited=4.9), None),
    ("all: one missing at the timeout", AllPeers(), q("cab", waited=5.0), form("abc")),
    ("all: startup grace", AllPeers(), q("abcd", age=9.0), None),
    ("all: a lone survivor below min_peers", AllPeers(), q("a", "a", waited=5.0, rules=TWO), Refuse(1)),
    ("all: ... asking again, nobody back since its last refusal", AllPeers(), q("a", "a", rules=TWO, refused=True),
     Refuse(1)),
    ("all: before the first commit, wait", AllPeers(), q("a", "a", waited=50.0, rules=TWO, started=False), None),
    # first-k: the first k to ask, as soon as k asked.
    ("first-k: the first k askers, by peer id", FirstK(2), q("ca"), form("ac")),
    ("first-k: later askers are not members", FirstK(2), q("dcab"), form("cd")),
    ("first-k: fewer than k asked, k live", FirstK(2), q("a"), None),
    ("first-k: k live, the timeout does not shrink the round", FirstK(2), q("a", waited=50.0), None),
    ("first-k: startup grace", FirstK(2), q("ab", age=9.0), None),
    ("first-k: fewer than k live, all of them asked", FirstK(3), q("ba", "ab"), form("ab")),
    ("first-k: fewer than k live, before the timeout", FirstK(3), q("a", "ab", waited=4.9), None),
    ("first-k: fewer than k live, at the timeout", FirstK(3), q("a", "ab", waited=5.0), form("a")),
    ("first-k: fewer than k live, below min_peers", FirstK(3), q("a", "a", waited=5.0, rules=TWO), Refuse(1)),
    ("first-k: ... asking again, nobody back since", FirstK(3), q("a", "a", rules=TWO, refused=True), Refuse(1)),
    # sample: seed 0, round 1 draws b and c from abcd (see tests/test_sampling.py).
    ("sample: every drawn peer asked", sample("2"), q("cb"), form("bc", "abcd")),
    ("sample: askers not drawn wait", sample("2"), q("adb"), None),
    ("sample: drawn ones that asked, at the timeout", sample("2"), q("adb", waited=5.0), form("b", "abcd")),
    ("sample: nobody drawn asked, at the timeout", sample("2"), q("ad", waited=5.0), None),
    ("sample: another round draws others", sample("2"), q("cd", round_id=2), form("cd", "abcd")),
    ("sample: drawn from the live peers", sample("2"), q("bd", "abd"), form("bd", "abd")),
    ("sample: an asker is a candidate", sample("2"), q("bd", "ab"), form("bd", "abd")),
    ("sample: fewer candidates than k", sample("9"), q("ab", "ab"), form("ab", "ab")),
    ("sample: startup grace", sample("2"), q("bc", age=9.0), None),
    ("sample: a lone survivor below min_peers", sample("2"), q("a", "a", waited=5.0, rules=TWO), Refuse(1)),
    ("sample: ... asking again, nobody back since", sample("2"), q("a", "a", rules=TWO, refused=True), Refuse(1)),
    # sample:F: k = ceil(F x candidates), at least min, at most the candidates
    # (collectives.membership.sampling.SampleSize).
    # Seed 0, round 1 draws b, c from abcd and from abc; b, c, e from abcdef; b first of all.
    ("sample 0.5: half of the candidates", sample("0.5"), q("cb"), form("bc", "abcd")),
    ("sample 0.5: half of three, rounded up", sample("0.5"), q("cb", "abc"), form("bc", "abc")),
    ("sample 0.5: three of six", sample("0.5"), q("ecb", "abcdef"), form("bce", "abcdef")),
    ("sample 0.5: two of the three drawn asked", sample("0.5"), q("cb", "abcdef"), None),
    ("sample 0.5: half of the live peers and the askers", sample("0.5"), q("cb", "abd"), form("bc", "abcd")),
    ("sample 0.25: one of four", sample("0.25"), q("b"), form("b", "abcd")),
    ("sample 0.25,min=2: the minimum", sample("0.25,min=2"), q("cb"), form("bc", "abcd")),
    ("sample 0.25,min=9: never more than the candidates", sample("0.25,min=9"), q("dcba"), form("abcd", "abcd")),
    ("sample 0.5, min_peers 2, no min: one of two never starts", sample("0.5"), q("ab", "ab", rules=TWO), None),
    ("sample 0.5 fitted to min_peers 2: two of two", sample("0.5").fitted(2), q("ab", "ab", rules=TWO),
     form("ab", "ab")),
    # coded:S: whoever asked, once their rows of the code over the roster (every live peer) decode.
    # Four workers, s=1: fractional repetition, groups {a,b} and {c,d}.
    ("coded: one of each group decodes", Coded(1), q("ca"), form("ac", "abcd")),
    ("coded: one group missing waits", Coded(1), q("ab", waited=50.0), None),
    ("coded: everyone asked", Coded(1), q("dcba"), form("abcd", "abcd")),
    ("coded: s=0 waits for all", Coded(0), q("abc", waited=50.0), None),
    ("coded: s=0, all asked", Coded(0), q("bcda"), form("abcd", "abcd")),
    # Five workers, s=1: a cyclic code, any four decode, three never do.
    ("coded cyclic: four of five", Coded(1), q("abce", "abcde"), form("abce", "abcde")),
    ("coded cyclic: three of five wait", Coded(1), q("ace", "abcde", waited=50.0), None),
    ("coded: the roster includes askers", Coded(1), q("ce", "abcd"), None),
    ("coded: startup grace", Coded(1), q("abcd", age=9.0), None),
    ("coded: s above n-1 is n-1: one worker decodes", Coded(5), q("b", "ab"), form("b", "ab")),
    ("coded: a lone survivor below min_peers", Coded(1), q("a", "a", waited=5.0, rules=TWO), Refuse(1)),
    ("coded: ... asking again, nobody back since", Coded(1), q("a", "a", rules=TWO, refused=True), Refuse(1)),
    # code=frc: the roster is the most live peers s+1 divides; the rest (last by peer id) sit out.
    ("coded frc: five live, the last sits out", Coded(1, "frc"), q("ca", "abcde"), form("ac", "abcd")),
    ("coded frc: the one sitting out is no member", Coded(1, "frc"), q("cae", "abcde"), form("ac", "abcd")),
    ("coded frc: it alone asked, no round", Coded(1, "frc"), q("e", "abcde", waited=50.0), None),
    ("coded frc: seven live with s=2, six in the roster", Coded(2, "frc"), q("ad", "abcdefg"), form("ad", "abcdef")),
    ("coded frc: fewer live than s+1, s capped", Coded(2, "frc"), q("b", "ab"), form("b", "ab")),
    # allbut:S: the first n-S askers, the roster as candidates.
    ("allbut: the first n-s askers", AllBut(1), q("dca"), form("acd", "abcd")),
    ("allbut: fewer wait", AllBut(1), q("dc", waited=50.0), None),
    ("allbut 0: waits for all", AllBut(0), q("dca", waited=50.0), None),
    ("allbut 0: all asked", AllBut(0), q("dcab"), form("abcd", "abcd")),
    ("allbut: later askers are not members", AllBut(2), q("dcab"), form("cd", "abcd")),
    ("allbut: never fewer than one", AllBut(9), q("c"), form("c", "abcd")),
    # backup: the first k askers, k from the tag the members agreed on.
    ("backup: k from the tag", Backup(), q("bda", tag="sync-sgd:k=2"), form("bd", "abcd")),
    ("backup: fewer than k wait", Backup(), q("b", tag="sync-sgd:k=2", waited=50.0), None),
    ("backup: no k waits for all", Backup(), q("bda", tag="sync-sgd", waited=50.0), None),
    ("backup: no k, all asked", Backup(), q("bdac", tag="sync-sgd"), form("abcd", "abcd")),
    ("backup: k above n is n", Backup(), q("bdac", tag="sync-sgd:k=9"), form("abcd", "abcd")),
    # grace:L,f=F: once n-L asked, everyone who asked by (1+F) x the (n-L)-th's time since the last commit.
    ("grace: within the grace period", Grace(1), q("abc", arrivals=(1.0, 1.1, 1.2), since=1.5), None),
    ("grace: after it, the asker are members", Grace(1), q("abc", arrivals=(1.0, 1.1, 1.2), since=1.8),
     form("abc", "abcd")),
    ("grace: fewer than n-L wait", Grace(1), q("ab", arrivals=(1.0, 1.1), since=9.0), None),
    ("grace: everyone asked", Grace(1), q("abcd", arrivals=(1.0, 1.1, 1.2, 1.3), since=1.3), form("abcd", "abcd")),
    ("grace: f=0 forms at the (n-L)-th", Grace(2, 0.0), q("ab", arrivals=(1.0, 1.1), since=1.1), form("ab", "abcd")),
    ("grace: unknown arrivals form at once", Grace(1), q("abc"), form("abc", "abcd")),
    # buffer:K,t=T: every peer that asked, once K asked or T seconds after the first; nobody else is waited for.
    ("buffer: k ready, the roster as candidates", Buffered(2), q("ca"), form("ac", "abcd")),
    ("buffer: every ready peer is a member", Buffered(2), q("dca"), form("acd", "abcd")),
    ("buffer: fewer than k wait", Buffered(2), q("a", waited=50.0), None),
    ("buffer: t after the first, the ready ones", Buffered(3, 2.0), q("ba", waited=2.0), form("ab", "abcd")),
    ("buffer: before t, wait", Buffered(3, 2.0), q("ba", waited=1.9), None),
    ("buffer: fewer than k live, all of them ready", Buffered(4), q("ba", "ab"), form("ab", "ab")),
    ("buffer: k = n waits for everyone", Buffered(4), q("abc", waited=50.0), None),
    ("buffer: startup grace", Buffered(1), q("a", age=9.0), None),
    ("buffer: t never goes below min_peers", Buffered(3, 1.0), q("a", waited=5.0, rules=TWO), None),
    ("buffer: a lone survivor below min_peers", Buffered(2), q("a", "a", waited=5.0, rules=TWO), Refuse(1)),
    ("buffer: ... asking again, nobody back since", Buffered(2), q("a", "a", rules=TWO, refused=True), Refuse(1)),
]


@pytest.mark.parametrize("name,policy,inputs,outcome", CASES, ids=[c[0] for c in CASES])
def test_decide(name, policy, inputs, outcome):
    assert policy.decide(inputs) == outcome


# name, policy, inputs, the peers a quorum still waits for (probed to find dead ones)
AWAITED_CASES = [
    ("all: every live peer that has not asked", AllPeers(), q("ab"), frozenset("cd")),
    ("first-k: every live peer that has not asked", FirstK(2), q("a"), frozenset("bcd")),
    ("sample: only drawn peers", sample("2"), q("a"), frozenset("bc")),
    ("sample: a drawn peer that asked is not awaited", sample("2"), q("b"), frozenset("c")),
    ("sample 0.5: only drawn peers", sample("0.5"), q("a", "abcdef"), frozenset("bce")),
]


@pytest.mark.parametrize("name,policy,inputs,awaited", AWAITED_CASES, ids=[c[0] for c in AWAITED_CASES])
def test_awaited(name, policy, inputs, awaited):
    assert policy.awaited(inputs) == awaited


WAITS_FOR_CASES = [
    ("all: a live peer that has not asked", AllPeers(), q("ab"), "c", True),
    ("all: a peer that is not live", AllPeers(), q("ab"), "e", False),
    ("first-k: forms with whoever asks", FirstK(2), q("a"), "c", False),
    ("sample: a drawn peer", sample("2"), q("a"), "b", True),
    ("sample: a peer not drawn", sample("2"), q("a"), "d", False),
    ("allbut: forms without the last ones", AllBut(1), q("ab"), "c", False),
]


@pytest.mark.parametrize("name,policy,inputs,peer,waits", WAITS_FOR_CASES, ids=[c[0] for c in WAITS_FOR_CASES])
def test_waits_for(name, policy, inputs, peer, waits):
    assert policy.waits_for(inputs, peer) is waits


# name, policy, (requesting, eligible, waited), whether a full decision is worth making
MAY_FORM_CASES = [
    ("all: some live peers have not asked", AllPeers(), (3, 4, 1.0), False),
    ("all: everyone asked", AllPeers(), (4, 4, 1.0), True),
    ("all: timeout", AllPeers(), (1, 4, 5.0), True),
    ("first-k: k asked", FirstK(2), (2, 4, 0.0), True),
    ("first-k: fewer than k asked", FirstK(2), (1, 4, 0.0), False),
    ("sample: as many asked as the sample holds", sample("2"), (2, 4, 0.0), True),
    ("sample: fewer", sample("2"), (1, 4, 0.0), False),
    ("sample: timeout", sample("2"), (1, 4, 5.0), True),
    ("sample 0.5: half of the live peers asked", sample("0.5"), (2, 4, 0.0), True),
    ("sample 0.5: fewer", sample("0.5"), (1, 4, 0.0), False),
    ("sample 0.5,min=3: fewer than the minimum", sample("0.5,min=3"), (2, 4, 0.0), False),
    ("buffer: k asked", Buffered(2), (2, 4, 0.0), True),
    ("buffer: fewer than k", Buffered(2), (1, 4, 0.0), False),
    ("buffer: t passed", Buffered(3, 2.0), (1, 4, 2.0), True),
    ("buffer: no t, the join timeout does not form", Buffered(3), (1, 4, 50.0), False),
]


@pytest.mark.parametrize("name,policy,counts,may", MAY_FORM_CASES, ids=[c[0] for c in MAY_FORM_CASES])
def test_may_form(name, policy, counts, may):
    assert policy.may_form(*counts, RULES) is may


JOINS_CASES = [
    ("the same tag joins", AllPeers(), "diloco", "diloco", True),
    ("another tag is refused", AllPeers(), "diloco", "streaming:0", False),
    ("outside backup, another k is another schedule", AllPeers(), "sync-sgd:k=3", "sync-sgd:k=2", False),
    ("backup: the same tag joins", Backup(), "sync-sgd:k=3", "sync-sgd:k=3", True),
    # A worker that missed the round changing the roster chooses k for the old one: the pending round's k stands.
    ("backup: another k joins", Backup(), "sync-sgd:k=3", "sync-sgd:k=2", True),
    ("backup: no k where the pending names one", Backup(), "sync-sgd:k=3", "sync-sgd", False),
    ("backup: another algorithm is refused", Backup(), "sync-sgd:k=3", "coded-sgd:k=3", False),
    ("backup: untagged rounds are the same tag", Backup(), "sync-sgd", "sync-sgd", True),
    ("backup: an empty algorithm name is no match", Backup(), ":k=3", ":k=2", False),
]


@pytest.mark.parametrize("name,policy,pending,tag,joins", JOINS_CASES, ids=[c[0] for c in JOINS_CASES])
def test_joins(name, policy, pending, tag, joins):
    assert policy.joins(pending, tag) is joins


@pytest.mark.parametrize(
    "spec,policy",
    [
        ("all", AllPeers()),
        ("first-k:3", FirstK(3)),
        ("sample:2", Sample(SampleSize(count=2))),
        (" sample:2 ", Sample(SampleSize(count=2))),
        ("sample:0.5", Sample(SampleSize(fraction=Fraction(1, 2)))),
        ("sample:1.0", Sample(SampleSize(fraction=Fraction(1)))),
        ("sample:0.25,min=3", Sample(SampleSize(fraction=Fraction(1, 4), minimum=3))),
        ("buffer:3", Buffered(3)),
        ("buffer:3,t=2.5", Buffered(3, 2.5)),
    ],
)
def test_a_spec_reads_into_its_policy_and_back(spec, policy):
    assert parse_policy(spec) == policy
    assert parse_policy(policy.spec) == policy


@pytest.mark.parametrize(
    "spec,canonical",
    [("sample:.50", "sample:0.5"), ("sample: 0.5 , min=3", "sample:0.5,min=3"), ("sample:1.000", "sample:1.0")],
)
def test_a_sample_spec_is_sent_to_the_members_in_one_spelling(spec, canonical):
    assert parse_policy(spec).spec == canonical


# policy, min_peers -> the spec of the fitted policy (what the members get and the dashboard shows)
FITTED = [
    ("sample:0.5", 1, "sample:0.5"),
    ("sample:0.5", 3, "sample:0.5,min=3"),
    ("sample:0.5,min=4", 2, "sample:0.5,min=4"),
    ("sample:0.5,min=3", 3, "sample:0.5,min=3"),
    ("sample:2", 1, "sample:2"),
    ("all", 3, "all"),
    ("first-k:2", 2, "first-k:2"),
]


@pytest.mark.parametrize("spec,min_peers,fitted", FITTED, ids=[f"{s} min_peers {m}" for s, m, _ in FITTED])
def test_a_fraction_without_min_is_fitted_to_min_peers(spec, min_peers, fitted):
    assert parse_policy(spec).fitted(min_peers).spec == fitted


def test_a_sample_draws_at_least_the_members_the_asking_peers_rounds_need():
    # sample:1 with peers whose rounds need 2 (--dp-min-members 2): b and c, the first two of abcd by seed 0's rank.
    rules = QuorumRules(join_timeout_s=5.0, min_members=2)
    assert sample("1").decide(q("abcd", rules=rules)) == form("bc", "abcd")


def test_a_fraction_whose_min_is_below_min_peers_is_refused():
    with pytest.raises(ConfigError) as info:
        parse_policy("sample:0.5,min=2").fitted(3)
    assert str(info.value) == (
        "quorum sample:0.5,min=2: min=2 is below min_peers 3, so a round of 2 could never start: "
        "use min >= 3, leave min out (it is then min_peers) or lower --min-peers"
    )


FORMS = (
    "all, first-k:K, sample:K, sample:F[,min=M], coded:S[,code=frc|cyclic], allbut:S, backup, grace:L[,f=F], "
    "buffer:K[,t=T]"
)

BAD_SPECS = [
    "", "some", "first-k", "first-k:0", "first-k:x", "all:3", "sample:-1", "sample", "sample:0", "sample:1.5",
    "sample:0.0", "sample:0.5,min=0", "sample:3,min=2", "sample:half", "sample:0.5,max=3",
    "coded", "coded:-1", "coded:1,code=rs", "coded:1,kind=frc", "allbut", "allbut:x", "backup:3", "grace",
    "grace:1,f=-1", "grace:1,g=2", "buffer", "buffer:0", "buffer:2,t=0", "buffer:2,t=x", "buffer:2,s=1",
]


@pytest.mark.parametrize("spec", BAD_SPECS)
def test_a_bad_spec_is_a_config_error_that_lists_the_forms(spec):
    with pytest.raises(ConfigError, match=rf": use one of {re.escape(FORMS)}$"):
        parse_policy(spec)


@pytest.mark.parametrize(
    "spec,message",
    [
        ("quick", "unknown quorum policy 'quick'"),
        ("first-k:x", "quorum policy first-k:x needs a whole number of peers K >= 1"),
        ("all:3", "quorum policy all takes no argument, got all:3"),
        ("sample:0", "quorum policy sample:0 needs a whole number of peers K >= 1 or a fraction F in (0, 1]"),
        (
            "sample:1.5",
            "quorum policy sample:1.5: the fraction must be in (0, 1], got 1.5; for a number of peers write K",
        ),
        ("sample:0.5,min=0", "quorum policy sample:0.5,min=0: min must be at least 1, got 0"),
        (
            "sample:3,min=2",
            (
                "quorum policy sample:3,min=2: min=M goes with a fraction (sample:F,min=M); a count K is the round's "
                "size already"
            ),
        ),
        (
            "sample:half",
            (
                "quorum policy sample:half needs K (a whole number of peers >= 1) or F (a fraction in (0, 1] of the "
                "candidates, like 0.5), F optionally with ,min=M"
            ),
        ),
    ],
)
def test_a_bad_spec_says_what_is_wrong(spec, message):
    with pytest.raises(ConfigError) as info:
        parse_policy(spec)
    assert str(info.value) == f"{message}: use one of {FORMS}"


def test_a_new_policy_is_one_class_and_one_registration():
    @register
    @dataclass(frozen=True)
    class Alone(QuorumPolicy):
        name: ClassVar[str] = "alone"
        usage: ClassVar[str] = "alone"

        @classmethod
        def from_arg(cls, arg: str) -> Alone:
            return cls()

        @property
        def spec(self) -> str:
            return self.name

        def decide(self, q: QuorumInputs) -> FormRound | None:
            return FormRound(q.requesting[:1])

    try:
        assert parse_policy("alone").decide(q("ba")) == form("b")
        assert policy_forms().endswith(", alone")
        assert register(Alone) is Alone  # a plugin module imported again registers the same class again
        with pytest.raises(ConfigError, match="quorum policy name 'all' is already registered"):
            register(dataclass(frozen=True)(type("All2", (Alone,), {"name": "all"})))
    finally:
        del POLICIES["alone"]
