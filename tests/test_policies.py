"""Quorum policies case by case (pure functions, no I/O): who starts a round, and when."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import pytest

from collectives.errors import ConfigError
from peer.coordinator.policies import (
    POLICIES,
    AllPeers,
    FirstK,
    FormRound,
    QuorumInputs,
    QuorumPolicy,
    Refuse,
    Sample,
    parse_policy,
    policy_forms,
    register,
)
from peer.coordinator.rules import QuorumRules

RULES = QuorumRules(min_peers=1, join_timeout_s=5.0, startup_grace_s=10.0)


def q(
    requesting: str,
    eligible: str = "abcd",
    waited: float = 0.0,
    age: float = 100.0,
    up_to_date: str | None = None,
    rules: QuorumRules = RULES,
    started: bool = True,
    round_id: int = 1,
    seed: int = 0,
) -> QuorumInputs:
    """Inputs with one-letter peer ids: requesting in order of arrival; up_to_date defaults to eligible."""
    return QuorumInputs(
        requesting=tuple(requesting),
        eligible=frozenset(eligible),
        up_to_date=frozenset(eligible if up_to_date is None else up_to_date),
        waited_s=waited,
        coordinator_age_s=age,
        round_id=round_id,
        seed=seed,
        rules=rules,
        run_started=started,
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
    # sample: seed 0, round 1 draws b and c from abcd (see tests/test_sampling.py).
    ("sample: every drawn peer asked", Sample(2), q("cb"), form("bc", "abcd")),
    ("sample: askers not drawn wait", Sample(2), q("adb"), None),
    ("sample: drawn ones that asked, at the timeout", Sample(2), q("adb", waited=5.0), form("b", "abcd")),
    ("sample: nobody drawn asked, at the timeout", Sample(2), q("ad", waited=5.0), None),
    ("sample: another round draws others", Sample(2), q("cd", round_id=2), form("cd", "abcd")),
    ("sample: drawn from up-to-date peers only", Sample(2), q("bd", up_to_date="abd"), form("bd", "abd")),
    ("sample: an asker is a candidate", Sample(2), q("bd", up_to_date="ab"), form("bd", "abd")),
    ("sample: fewer candidates than k", Sample(9), q("ab", "ab"), form("ab", "ab")),
    ("sample: startup grace", Sample(2), q("bc", age=9.0), None),
    ("sample: a lone survivor below min_peers", Sample(2), q("a", "a", waited=5.0, rules=TWO), Refuse(1)),
]


@pytest.mark.parametrize("name,policy,inputs,outcome", CASES, ids=[c[0] for c in CASES])
def test_decide(name, policy, inputs, outcome):
    assert policy.decide(inputs) == outcome


# name, policy, inputs, the peers a quorum still waits for (probed to find dead ones)
AWAITED_CASES = [
    ("all: every live peer that has not asked", AllPeers(), q("ab"), frozenset("cd")),
    ("first-k: every live peer that has not asked", FirstK(2), q("a"), frozenset("bcd")),
    ("sample: only drawn peers", Sample(2), q("a"), frozenset("bc")),
    ("sample: a drawn peer that asked is not awaited", Sample(2), q("b"), frozenset("c")),
]


@pytest.mark.parametrize("name,policy,inputs,awaited", AWAITED_CASES, ids=[c[0] for c in AWAITED_CASES])
def test_awaited(name, policy, inputs, awaited):
    assert policy.awaited(inputs) == awaited


# name, policy, (requesting, eligible, waited), whether a full decision is worth making
MAY_FORM_CASES = [
    ("all: some live peers have not asked", AllPeers(), (3, 4, 1.0), False),
    ("all: everyone asked", AllPeers(), (4, 4, 1.0), True),
    ("all: timeout", AllPeers(), (1, 4, 5.0), True),
    ("first-k: k asked", FirstK(2), (2, 4, 0.0), True),
    ("first-k: fewer than k asked", FirstK(2), (1, 4, 0.0), False),
    ("sample: as many asked as the sample holds", Sample(2), (2, 4, 0.0), True),
    ("sample: fewer", Sample(2), (1, 4, 0.0), False),
    ("sample: timeout", Sample(2), (1, 4, 5.0), True),
]


@pytest.mark.parametrize("name,policy,counts,may", MAY_FORM_CASES, ids=[c[0] for c in MAY_FORM_CASES])
def test_may_form(name, policy, counts, may):
    assert policy.may_form(*counts, RULES) is may


@pytest.mark.parametrize(
    "spec,policy", [("all", AllPeers()), ("first-k:3", FirstK(3)), ("sample:2", Sample(2)), (" sample:2 ", Sample(2))]
)
def test_a_spec_reads_into_its_policy_and_back(spec, policy):
    assert parse_policy(spec) == policy
    assert parse_policy(policy.spec) == policy


@pytest.mark.parametrize("spec", ["", "some", "first-k", "first-k:0", "first-k:x", "all:3", "sample:-1", "sample"])
def test_a_bad_spec_is_a_config_error_that_lists_the_forms(spec):
    with pytest.raises(ConfigError, match=r": use one of all, first-k:K, sample:K$"):
        parse_policy(spec)


@pytest.mark.parametrize(
    "spec,message",
    [
        ("quick", "unknown quorum policy 'quick'"),
        ("first-k:x", "quorum policy first-k:x needs a whole number of peers K >= 1"),
        ("all:3", "quorum policy all takes no argument, got all:3"),
    ],
)
def test_a_bad_spec_says_what_is_wrong(spec, message):
    with pytest.raises(ConfigError) as info:
        parse_policy(spec)
    assert str(info.value) == f"{message}: use one of all, first-k:K, sample:K"


def test_a_new_policy_is_one_class_and_one_registration():
    @register
    @dataclass(frozen=True)
    class Alone(QuorumPolicy):
        name: ClassVar[str] = "alone"
        usage: ClassVar[str] = "alone"

        @classmethod
        def from_arg(cls, arg: str) -> "Alone":
            return cls()

        @property
        def spec(self) -> str:
            return self.name

        def decide(self, q: QuorumInputs) -> FormRound | None:
            return FormRound(q.requesting[:1])

    try:
        assert parse_policy("alone").decide(q("ba")) == form("b")
        assert policy_forms().endswith(", alone")
    finally:
        del POLICIES["alone"]
