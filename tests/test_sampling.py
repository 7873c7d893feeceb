"""The members of a sample round: how many (a count, or a fraction of the candidates with a minimum), derived from
(seed, round id, candidates) alike on every machine, and checkable."""

from __future__ import annotations

import itertools
from fractions import Fraction

import pytest

from collectives.errors import ConfigError, ProtocolError
from collectives.membership.roundplan import RoundPlan
from collectives.membership.sampling import (
    SampleMismatch,
    SampleSize,
    check_sample,
    parse_sample_arg,
    sample_count,
    sample_members,
    sample_size,
)

PEERS = ("a", "b", "c", "d")


def test_the_sample_is_the_same_on_every_machine():
    # Pinned values: peers and coordinators of one run must derive the same sample, whatever their version.
    assert sample_members(0, 1, PEERS, 2) == ("b", "c")
    assert sample_members(0, 2, PEERS, 2) == ("c", "d")


def test_the_sample_does_not_depend_on_the_order_of_the_candidates():
    assert {sample_members(0, 1, order, 2) for order in itertools.permutations(PEERS)} == {("b", "c")}


@pytest.mark.parametrize("k,size", [(1, 1), (2, 2), (4, 4), (9, 4)])
def test_the_sample_has_k_members_or_every_candidate_sorted_by_peer_id(k, size):
    got = sample_members(3, 5, PEERS, k)
    assert len(got) == size and list(got) == sorted(got) and set(got) <= set(PEERS)


def test_duplicate_candidates_count_once():
    assert sample_members(0, 1, ("a", "a", "b", "c", "d", "d"), 2) == ("b", "c")


def test_a_candidate_leaving_only_changes_the_sample_if_it_was_drawn():
    assert sample_members(0, 1, ("a", "b", "c"), 2) == ("b", "c")  # d was not drawn: nothing changes
    assert sample_members(0, 1, ("a", "b", "d"), 2) == ("b", "d")  # c was: the next in rank takes its place


def test_a_sample_of_fewer_than_one_peer_is_a_config_error():
    with pytest.raises(ConfigError, match="k >= 1"):
        sample_members(0, 1, PEERS, 0)


@pytest.mark.parametrize("members", [("b", "c"), ("b",), ()], ids=["all drawn", "drawn ones that asked", "none"])
def test_check_sample_accepts_members_drawn_by_the_sample(members):
    check_sample(0, 1, PEERS, 2, members)


def test_check_sample_names_a_member_that_was_not_drawn():
    with pytest.raises(SampleMismatch, match="round 1: a not in the sample of 2 drawn with seed 0") as info:
        check_sample(0, 1, PEERS, 2, ("a", "b"))
    assert isinstance(info.value, ProtocolError)


# -- how many: sample:K, sample:F, sample:F,min=M -------------------------------------------

# spec argument -> what it reads as
PARSED = [
    ("3", SampleSize(count=3)),
    ("1", SampleSize(count=1)),
    ("0.5", SampleSize(fraction=Fraction(1, 2))),
    (".5", SampleSize(fraction=Fraction(1, 2))),
    ("0.50", SampleSize(fraction=Fraction(1, 2))),
    ("1.0", SampleSize(fraction=Fraction(1))),
    ("0.1", SampleSize(fraction=Fraction(1, 10))),
    ("0.5,min=3", SampleSize(fraction=Fraction(1, 2), minimum=3)),
    (" 0.25 , min=2 ", SampleSize(fraction=Fraction(1, 4), minimum=2)),
    ("0.5,min=1", SampleSize(fraction=Fraction(1, 2), minimum=1)),
]


@pytest.mark.parametrize("arg,size", PARSED, ids=[a for a, _ in PARSED])
def test_a_sample_argument_is_a_count_or_a_fraction_with_an_optional_minimum(arg, size):
    assert parse_sample_arg(arg) == size


# spec argument -> k for 0, 1, 2, ..., 10 candidates
COUNTS = [
    ("1", [0, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1]),
    ("3", [0, 1, 2, 3, 3, 3, 3, 3, 3, 3, 3]),
    ("0.5", [0, 1, 1, 2, 2, 3, 3, 4, 4, 5, 5]),
    ("0.25", [0, 1, 1, 1, 1, 2, 2, 2, 2, 3, 3]),
    ("0.1", [0, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1]),
    ("0.75", [0, 1, 2, 3, 3, 4, 5, 6, 6, 7, 8]),
    ("1.0", [0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10]),
    ("0.5,min=3", [0, 1, 2, 3, 3, 3, 3, 4, 4, 5, 5]),
    ("0.1,min=2", [0, 1, 2, 2, 2, 2, 2, 2, 2, 2, 2]),
    ("0.5,min=20", [0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10]),
]


@pytest.mark.parametrize("arg,ks", COUNTS, ids=[a for a, _ in COUNTS])
def test_k_is_the_count_or_the_fraction_rounded_up_at_least_min_and_at_most_the_candidates(arg, ks):
    assert [sample_count(arg, n) for n in range(11)] == ks


@pytest.mark.parametrize("n,k", [(10, 1), (30, 3), (70, 7), (100, 10), (1000, 100)])
def test_a_fraction_is_exact_where_floats_are_not(n, k):
    # In floats 0.1 * 30 is 3.0000000000000004, whose ceiling would draw 4.
    assert sample_count("0.1", n) == k


# spec argument -> why it is refused
REFUSED = [
    ("0", "quorum policy sample:0 needs a whole number of peers K >= 1 or a fraction F in (0, 1]"),
    ("0.0", "quorum policy sample:0.0: the fraction must be in (0, 1], got 0.0; for a number of peers write K"),
    ("1.5", "quorum policy sample:1.5: the fraction must be in (0, 1], got 1.5; for a number of peers write K"),
    ("0.5,min=0", "quorum policy sample:0.5,min=0: min must be at least 1, got 0"),
    (
        "0.5,min=x",
        "quorum policy sample:0.5,min=x: after the comma comes min=M with a whole number M >= 1, got 'min=x'",
    ),
    (
        "0.5,max=3",
        "quorum policy sample:0.5,max=3: after the comma comes min=M with a whole number M >= 1, got 'max=3'",
    ),
    ("0.5,", "quorum policy sample:0.5,: after the comma comes min=M with a whole number M >= 1, got ''"),
    (
        "0.5,min=3,min=4",
        "quorum policy sample:0.5,min=3,min=4: after the comma comes min=M with a whole number M >= 1, "
        "got 'min=3,min=4'",
    ),
    (
        "3,min=2",
        "quorum policy sample:3,min=2: min=M goes with a fraction (sample:F,min=M); "
        "a count K is the round's size already",
    ),
]


@pytest.mark.parametrize("arg,message", REFUSED, ids=[a for a, _ in REFUSED])
def test_a_bad_sample_argument_is_a_config_error_saying_what_is_wrong(arg, message):
    with pytest.raises(ConfigError) as info:
        parse_sample_arg(arg)
    assert str(info.value) == message


@pytest.mark.parametrize("arg", ["", "x", "half", "-1", "-0.5", "1e-1", "nan", "inf", "1/2", "50%", "1."])
def test_anything_else_is_a_config_error_naming_the_forms(arg):
    with pytest.raises(ConfigError) as info:
        sample_count(arg, 4)
    assert str(info.value) == (
        f"quorum policy sample:{arg} needs K (a whole number of peers >= 1) or F (a fraction in (0, 1] of the "
        "candidates, like 0.5), F optionally with ,min=M"
    )


@pytest.mark.parametrize(
    "size,arg",
    [
        (SampleSize(count=3), "3"),
        (SampleSize(fraction=Fraction(1, 2)), "0.5"),
        (SampleSize(fraction=Fraction(1)), "1.0"),
        (SampleSize(fraction=Fraction(1, 8), minimum=2), "0.125,min=2"),
        (SampleSize(fraction=Fraction(1, 2), minimum=1), "0.5"),
    ],
)
def test_a_size_writes_back_into_an_argument_that_reads_as_the_same_k(size, arg):
    assert size.arg == arg
    assert [parse_sample_arg(arg).of(n) for n in range(12)] == [size.of(n) for n in range(12)]


@pytest.mark.parametrize(
    "policy,size",
    [
        ("sample:3", SampleSize(count=3)),
        ("sample:0.5,min=2", SampleSize(fraction=Fraction(1, 2), minimum=2)),
        ("all", None),
        ("first-k:2", None),
        ("", None),
    ],
)
def test_sample_size_reads_the_size_of_a_sample_policy_only(policy, size):
    assert sample_size(policy) == size


@pytest.mark.parametrize("policy", ["sample:x", "sample:0", "sample:", "sample:1.5", "sample:0.5,min=0"])
def test_a_malformed_sample_policy_from_the_coordinator_is_a_protocol_error(policy):
    with pytest.raises(ProtocolError, match=r"is not sample:K or sample:F\[,min=M\]"):
        sample_size(policy)


def plan(policy: str, members: tuple[str, ...], candidates: tuple[str, ...] = PEERS) -> RoundPlan:
    addresses = tuple((m, f"h:{m}") for m in members)
    return RoundPlan("round", round_id=1, members=addresses, policy=policy, candidates=candidates)


def test_a_round_plan_checks_its_sample():
    plan("sample:2", ("b", "c")).check_sample()
    with pytest.raises(SampleMismatch):
        plan("sample:2", ("a", "b")).check_sample()


def test_a_round_plan_of_another_policy_has_no_sample_to_check():
    plan("first-k:2", ("a", "b")).check_sample()


def test_a_round_plan_recomputes_k_of_a_fraction_from_its_candidates():
    # Half of abcd is 2 (b, c); half of abcdef is 3 (b, c, e): e is drawn only from the six.
    plan("sample:0.5", ("b", "c")).check_sample()
    plan("sample:0.5", ("b", "c", "e"), ("a", "b", "c", "d", "e", "f")).check_sample()
    with pytest.raises(SampleMismatch, match="round 1: e not in the sample of 2 drawn with seed 0 from 4 candidate"):
        plan("sample:0.5", ("b", "c", "e")).check_sample()


@pytest.mark.parametrize(
    ("arg", "n", "least", "k"),
    [
        ("1", 4, 2, 2),  # a round of the run needs 2 (a private round's minimum): one drawn would never form
        ("1", 1, 2, 1),  # never more than the candidates
        ("0.25", 4, 3, 3),
        ("0.5,min=3", 10, 2, 5),  # the share wins when larger
        ("3", 4, 1, 3),
    ],
)
def test_k_is_at_least_what_the_runs_rounds_need(arg, n, least, k):
    assert parse_sample_arg(arg).of(n, least) == k


def test_a_round_plan_checks_its_sample_with_the_members_its_rounds_need():
    # sample:1 from abcd draws b; with rounds of at least 2, b and c.
    plan("sample:1", ("b", "c")).check_sample(least=2)
    with pytest.raises(SampleMismatch, match="c not in the sample of 1"):
        plan("sample:1", ("b", "c")).check_sample()


def test_a_round_plan_checks_the_minimum_of_a_fraction():
    plan("sample:0.25,min=2", ("b", "c")).check_sample()
    with pytest.raises(SampleMismatch, match="c not in the sample of 1"):
        plan("sample:0.25", ("b", "c")).check_sample()


def test_a_round_plan_with_members_and_no_candidates_is_refused():
    with pytest.raises(SampleMismatch, match="round 1: b not in the sample of 0 drawn with seed 0 from 0 candidate"):
        plan("sample:0.5", ("b",), ()).check_sample()
