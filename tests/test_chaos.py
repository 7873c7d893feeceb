"""--chaos N[,seed=S][,with=K]: random fault scenarios that are reproducible and can always end."""

from __future__ import annotations

import pytest

from collectives.errors import ConfigError
from peer.harness.chaos import (
    EXTRA_KINDS,
    MAX_EVENTS,
    MIN_SURVIVORS,
    SLOWDOWNS,
    STALLS_S,
    STOP_RESTARTS_S,
    STRAGGLES_S,
    ChaosSpec,
    chaos_events,
    expected_rounds,
)
from peer.runtime.training import TrainConfig

pytestmark = pytest.mark.timeout(60)

SEEDS = range(300)


@pytest.mark.parametrize(
    "text, spec",
    [
        ("5", ChaosSpec(5, 0)),
        ("5,seed=3", ChaosSpec(5, 3)),
        (" 12,seed=0 ", ChaosSpec(12, 0)),
        ("5,seed=3,with=stall", ChaosSpec(5, 3, ("stall",))),
        ("5,with=straggle", ChaosSpec(5, 0, ("straggle",))),
        ("5,seed=3,with=stall+straggle", ChaosSpec(5, 3, ("straggle", "stall"))),
        ("100", ChaosSpec(100, 0)),
    ],
)
def test_a_spec_reads_a_count_and_an_optional_seed(text, spec):
    assert ChaosSpec.parse(text) == spec


@pytest.mark.parametrize(
    "text", ["0", "x", "-1", "5,seed=", "5,seed=a", "5;seed=1", "seed=1", "5,seed=1,with=", "5,with=stall,seed=1"]
)
def test_a_spec_that_cannot_be_read_is_refused_saying_how_to_write_it(text):
    with pytest.raises(ConfigError, match="N,seed=S|at least one event"):
        ChaosSpec.parse(text)


@pytest.mark.parametrize("text", ["101", "1000000", "101,seed=3", "1000000,seed=1,with=stall"])
def test_a_spec_draws_at_most_max_events_because_each_join_is_a_process(text):
    with pytest.raises(ConfigError, match=f"--chaos draws at most {MAX_EVENTS} events, got {text.split(',')[0]}"):
        ChaosSpec.parse(text)


@pytest.mark.parametrize("text", ["5,seed=1,with=kill", "5,seed=1,with=stall+stall", "5,seed=1,with=stall+cut"])
def test_with_names_only_the_extra_kinds_each_once(text):
    with pytest.raises(ConfigError, match="straggle, stall at most once"):
        ChaosSpec.parse(text)


def test_a_seed_draws_what_it_drew_before_the_extra_kinds_existed():
    # Drawn by the code of 2026-12-05 before with= (d86ebe6): seeds recorded in BENCHMARKS.md must stay reproducible.
    assert [str(e) for e in chaos_events(ChaosSpec(8, 7), peers=4, rounds=12, netns=True)] == [
        "join@round1", "kill:peer0@sync2", "kill:peer2@round2", "pause:peer1@round2,for=3s",
        "pause:peer3@round3,for=1s", "cut:peer1@round6,for=1s", "restart-coordinator@round6",
        "restart-coordinator@round7",
    ]


def test_stragglers_and_stalls_are_drawn_only_when_asked_for_and_within_their_bounds():
    plain = [e for seed in SEEDS for e in chaos_events(ChaosSpec(6, seed), peers=4, rounds=30)]
    extra = [e for seed in SEEDS for e in chaos_events(ChaosSpec(6, seed, EXTRA_KINDS), peers=4, rounds=30)]
    assert not {"straggle", "stall"} & {e.action for e in plain}
    straggles = [e for e in extra if e.action == "straggle"]
    stalls = [e for e in extra if e.action == "stall"]
    assert straggles and stalls
    assert {(e.factor in SLOWDOWNS, e.duration_s in STRAGGLES_S) for e in straggles} == {(True, True)}
    assert {e.duration_s for e in stalls} <= set(STALLS_S)


def test_the_same_spec_draws_the_same_events_and_another_seed_others():
    first = chaos_events(ChaosSpec(6, 7), peers=4, rounds=12)
    assert chaos_events(ChaosSpec(6, 7), peers=4, rounds=12) == first
    assert chaos_events(ChaosSpec(6, 8), peers=4, rounds=12) != first
    assert len(first) == 6


@pytest.mark.parametrize("peers", [1, 2, 3, 5])
def test_kills_leave_at_least_two_starting_peers_and_a_killed_peer_is_left_alone_after(peers):
    for seed in SEEDS:
        killed: set[str] = set()
        for event in chaos_events(ChaosSpec(10, seed), peers=peers, rounds=30):
            assert event.target not in killed, (seed, event)
            if event.action == "kill":
                killed.add(event.target)
        assert len(killed) <= max(0, peers - MIN_SURVIVORS), seed


@pytest.mark.parametrize(("peers", "least"), [(5, 5), (7, 5), (4, 3)])
def test_kills_never_leave_fewer_starting_peers_than_the_rounds_need(peers, least):
    # With krum:f=1 (5 members) a drawn kill of one of 5 peers stopped every round, and the later events never fired.
    for seed in SEEDS:
        kills = [
            e for e in chaos_events(ChaosSpec(10, seed), peers=peers, rounds=30, least=least) if e.action == "kill"
        ]
        assert len(kills) <= peers - least, seed


def test_the_draws_of_a_run_whose_rounds_need_two_or_fewer_are_unchanged_by_its_minimum():
    for seed in SEEDS:
        assert chaos_events(ChaosSpec(10, seed), 5, 30, least=2) == chaos_events(ChaosSpec(10, seed), 5, 30), seed


def test_events_fire_in_the_first_two_thirds_of_the_rounds_in_order():
    for seed in SEEDS:
        events = chaos_events(ChaosSpec(8, seed), peers=4, rounds=9)
        rounds = [e.at.rounds if e.at.rounds is not None else e.at.sync - 1 for e in events]
        assert rounds == sorted(rounds) and 1 <= rounds[0] and rounds[-1] <= 6, seed


def test_a_run_of_one_round_still_gets_its_events_after_round_one():
    events = chaos_events(ChaosSpec(3, 1), peers=4, rounds=1)
    assert {e.at.rounds or e.at.sync - 1 for e in events} == {1}


def test_link_cuts_are_drawn_only_with_network_namespaces():
    without = [e.action for seed in SEEDS for e in chaos_events(ChaosSpec(6, seed), peers=4, rounds=30)]
    with_netns = [e.action for seed in SEEDS for e in chaos_events(ChaosSpec(6, seed), 4, 30, netns=True)]
    assert "cut" not in without and "cut" in with_netns
    assert {"kill", "stop", "pause", "join", "restart-coordinator"} <= set(without)


def test_a_peer_stopped_and_started_again_is_never_killed_at_its_nth_sync():
    for seed in SEEDS:
        restarted: set[str] = set()
        for event in chaos_events(ChaosSpec(10, seed), peers=5, rounds=30):
            if event.action == "stop":
                assert event.duration_s in STOP_RESTARTS_S
                restarted.add(event.target)
            if event.at.sync is not None:
                assert event.target not in restarted, (seed, event)


@pytest.mark.parametrize(
    "train, rounds",
    [
        (TrainConfig.of("diloco", steps=400, sync_every=50), 8),
        (TrainConfig.of("diloco", steps=30, sync_every=50), 1),
        (TrainConfig.of("coded-sgd", steps=40), 40),
    ],
)
def test_the_expected_rounds_are_the_steps_over_the_sync_interval(train, rounds):
    assert expected_rounds(train) == rounds


def test_a_run_given_a_duration_instead_of_steps_is_refused():
    with pytest.raises(ConfigError, match="--steps, not --duration"):
        expected_rounds(TrainConfig.of("diloco", steps=400, duration_s=30.0))
