"""The coordinator's settings: defaults, help for every option, and what is refused with which message."""

from __future__ import annotations

import dataclasses
from fractions import Fraction

import pytest

from collectives.errors import ConfigError
from collectives.membership.sampling import SampleSize
from peer.coordinator.config import CoordinatorConfig, parse_dashboard_port
from peer.coordinator.policies import AllPeers, FirstK, Sample


def test_every_setting_has_a_one_line_help():
    for f in dataclasses.fields(CoordinatorConfig):
        text = f.metadata.get("help", "")
        assert text and "\n" not in text and len(text) < 250, f.name


def test_the_options_keep_their_command_line_names():
    options = pytest.importorskip("peer.options")
    flags = {o.flag for o in options.options_of(CoordinatorConfig)}
    legacy = {"run", "port", "join-timeout", "lease", "startup-grace", "probe"}
    assert legacy | {"quorum", "quorum-seed", "catchup-rounds"} <= flags


def test_the_default_quorum_is_all_with_four_rounds_of_catch_up():
    config = CoordinatorConfig()
    assert (config.policy, config.seed, config.catchup_rounds) == (AllPeers(), 0, 4)


@pytest.mark.parametrize(
    "spec,policy",
    [
        ("first-k:3", FirstK(3)),
        ("sample:2", Sample(SampleSize(count=2))),
        ("sample:0.5", Sample(SampleSize(fraction=Fraction(1, 2), minimum=1))),
    ],
)
def test_the_quorum_setting_names_a_policy(spec, policy):
    assert CoordinatorConfig(quorum=spec).policy == policy


@pytest.mark.parametrize(
    "quorum,min_peers,spec",
    [
        ("sample:0.5", 1, "sample:0.5"),
        ("sample:0.5", 3, "sample:0.5,min=3"),
        ("sample:0.5,min=4", 2, "sample:0.5,min=4"),
    ],
)
def test_a_sample_fraction_never_draws_fewer_than_min_peers(quorum, min_peers, spec):
    # Drawn from fewer candidates, a round could never start: min_peers is the fraction's minimum unless min= is more.
    assert CoordinatorConfig(quorum=quorum, min_peers=min_peers).policy.spec == spec


FORMS = (
    "all, first-k:K, sample:K, sample:F[,min=M], coded:S[,code=frc|cyclic], allbut:S, backup, grace:L[,f=F], "
    "buffer:K[,t=T]"
)

# settings -> the refusal's message
REFUSED = [
    ({"quorum": "fastest"}, f"unknown quorum policy 'fastest': use one of {FORMS}"),
    (
        {"quorum": "sample:0"},
        f"quorum policy sample:0 needs a whole number of peers K >= 1 or a fraction F in (0, 1]: use one of {FORMS}",
    ),
    (
        {"quorum": "sample:0.5,min=2", "min_peers": 3},
        (
            "quorum sample:0.5,min=2: min=2 is below min_peers 3, so a round of 2 could never start: use min >= 3, "
            "leave min out (it is then min_peers) or lower --min-peers"
        ),
    ),
    (
        {"quorum": "sample:2", "min_peers": 3},
        "quorum sample:2 can never reach min_peers 3: use K >= 3 or lower --min-peers",
    ),
    (
        {"quorum": "first-k:2", "min_peers": 3},
        "quorum first-k:2 can never reach min_peers 3: use K >= 3 or lower --min-peers",
    ),
    ({"seed": -1}, "seed must be between 0 and 2**64 - 1, got -1"),
    ({"catchup_rounds": -1}, "catchup_rounds must be between 0 and 1000, got -1"),
    ({"min_peers": 0}, "min_peers must be at least 1, got 0"),
    ({"history": 0}, "history must be at least 1 round, got 0"),
    # A port beyond 65535 was bound modulo 65536 (70001 served on 4465), where no peer could be told to dial.
    ({"port": 70001}, "port must be in 0..65535 (0: any free port), got 70001"),
    ({"dashboard_port": 70000}, "dashboard port must be in 0..65535, or None for no dashboard; got 70000"),
    ({"dashboard_port": -1}, "dashboard port must be in 0..65535, or None for no dashboard; got -1"),
]


@pytest.mark.parametrize("settings,message", REFUSED, ids=[m for _, m in REFUSED])
def test_bad_settings_are_refused_with_what_to_do(settings, message):
    with pytest.raises(ConfigError) as info:
        CoordinatorConfig(**settings)
    assert str(info.value) == message


@pytest.mark.parametrize("text,port", [("8080", 8080), ("0", 0), ("-1", None), ("none", None), ("off", None)])
def test_a_dashboard_port_of_minus_one_or_none_means_no_dashboard(text, port):
    assert parse_dashboard_port(text) == port


@pytest.mark.parametrize("text", ["-2", "65536", "eighty"])
def test_a_dashboard_port_out_of_range_is_refused(text):
    with pytest.raises(ConfigError, match="dashboard port must be"):
        parse_dashboard_port(text)
