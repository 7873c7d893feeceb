"""The members of a sample:K round: derived from (seed, round id, candidates) alike on every machine, and checkable."""

from __future__ import annotations

import itertools

import pytest

from collectives.errors import ConfigError, ProtocolError
from collectives.membership import RoundPlan
from collectives.sampling import SampleMismatch, check_sample, sample_members, sample_size

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


@pytest.mark.parametrize("policy,k", [("sample:3", 3), ("all", None), ("first-k:2", None), ("", None)])
def test_sample_size_reads_k_of_a_sample_policy_only(policy, k):
    assert sample_size(policy) == k


@pytest.mark.parametrize("policy", ["sample:x", "sample:0", "sample:"])
def test_a_malformed_sample_policy_from_the_coordinator_is_a_protocol_error(policy):
    with pytest.raises(ProtocolError, match="sample:K"):
        sample_size(policy)


def plan(policy: str, members: tuple[str, ...]) -> RoundPlan:
    addresses = tuple((m, f"h:{m}") for m in members)
    return RoundPlan("round", round_id=1, members=addresses, policy=policy, candidates=PEERS)


def test_a_round_plan_checks_its_sample():
    plan("sample:2", ("b", "c")).check_sample()
    with pytest.raises(SampleMismatch):
        plan("sample:2", ("a", "b")).check_sample()


def test_a_round_plan_of_another_policy_has_no_sample_to_check():
    plan("first-k:2", ("a", "b")).check_sample()
