"""Fault-event strings and scenario files."""

import pytest

from collectives.errors import ConfigError
from peer.harness.scenario import load_scenario, parse_event


@pytest.mark.parametrize(
    "text,action,target,rounds,seconds,sync,duration,factor",
    [
        ("kill:peer2@round3", "kill", "peer2", 3, None, None, None, None),
        ("pause:peer1@10s,for=8s", "pause", "peer1", None, 10.0, None, 8.0, None),
        ("join@round5", "join", None, 5, None, None, None, None),
        ("restart-coordinator@2.5s", "restart-coordinator", None, None, 2.5, None, None, None),
        ("straggle:peer3@round2,x=3", "straggle", "peer3", 2, None, None, None, 3.0),
        ("cut:peer0@round4,for=500ms", "cut", "peer0", 4, None, None, 0.5, None),
        ("kill:peer1@sync3", "kill", "peer1", None, None, 3, None, None),
    ],
)
def test_event_strings_parse(text, action, target, rounds, seconds, sync, duration, factor):
    e = parse_event(text)
    assert (e.action, e.target, e.at.rounds, e.at.seconds, e.at.sync, e.duration_s, e.factor) == (
        action, target, rounds, seconds, sync, duration, factor,
    )
    assert parse_event(str(e)) == e


@pytest.mark.parametrize(
    "text,message",
    [
        ("explode:peer1@round1", "unknown event action"),
        ("kill@round1", "needs a target"),
        ("join:peer1@round1", "takes no target"),
        ("pause:peer1@round1", "needs a duration"),
        ("straggle:peer1@round1", "slowdown factor"),
        ("kill:peer1@roundx", "roundN"),
        ("kill:peer1@soon", "duration"),
        ("kill:peer1@round1,when=now", "unknown option"),
        ("join@sync2", "needs a target"),
    ],
)
def test_bad_events_are_config_errors_that_say_what_to_write(text, message):
    with pytest.raises(ConfigError, match=message):
        parse_event(text)


def test_scenario_file_holds_the_same_events(tmp_path):
    path = tmp_path / "s.toml"
    path.write_text('[[event]]\naction = "pause"\ntarget = "peer1"\nat = "round2"\nfor = "8s"\n\n[[event]]\naction = "join"\nat = "30s"\n')
    assert load_scenario(path) == [parse_event("pause:peer1@round2,for=8s"), parse_event("join@30s")]


def test_scenario_event_without_a_time_is_refused(tmp_path):
    path = tmp_path / "s.toml"
    path.write_text('[[event]]\naction = "join"\n')
    with pytest.raises(ConfigError, match="needs 'action' and 'at'"):
        load_scenario(path)


@pytest.mark.parametrize(
    "text,attack,duration,canonical",
    [
        ("byzantine:peer2@round3,attack=signflip", "signflip", None, "byzantine:peer2@round3,attack=signflip"),
        ("byzantine:peer2@0s,attack=signflip,k=5", "signflip,k=5", None, "byzantine:peer2@0s,attack=signflip,k=5"),
        ("byzantine:peer1@round2,attack=scale=3", "scale=3", None, "byzantine:peer1@round2,attack=scale=3"),
        ("byzantine:peer1@round2,attack=scale,k=3", "scale=3", None, "byzantine:peer1@round2,attack=scale=3"),
        ("byzantine:peer0@sync2,attack=noise,s=0.5,seed=4", "noise=0.5,seed=4", None,
         "byzantine:peer0@sync2,attack=noise=0.5,seed=4"),
        ("byzantine:peer0@5s,attack=zero,for=10s", "zero", 10.0, "byzantine:peer0@5s,attack=zero,for=10s"),
        ("byzantine:peer3@round1,attack=labelflip", "labelflip", None, "byzantine:peer3@round1,attack=labelflip"),
    ],
)
def test_byzantine_events_parse_with_their_attack(text, attack, duration, canonical):
    e = parse_event(text)
    assert (e.action, str(e.attack), e.duration_s) == ("byzantine", attack, duration)
    assert str(e) == canonical
    assert parse_event(str(e)) == e


@pytest.mark.parametrize(
    "text,message",
    [
        ("byzantine:peer1@round2", "byzantine needs an attack, e.g. byzantine:peer1@round2,attack=signflip"),
        ("byzantine@round2,attack=zero", "byzantine needs a target peer, e.g. byzantine:peer1@round2"),
        ("byzantine:peer1@round2,attack=flip", "unknown attack 'flip'; write one of signflip"),
        ("byzantine:peer1@round2,attack=scale", "scale needs its factor, e.g. scale=3"),
        ("byzantine:peer1@round2,attack=zero,k=3", "zero takes no options, not k="),
        ("byzantine:peer1@round2,attack=signflip,k=2,k=3", "k= is given twice"),
        ("kill:peer1@round2,attack=zero", "kill takes no attack (only byzantine does)"),
        ("kill:peer1@round2,k=3", "k belong to a byzantine event's attack; add attack=..."),
        ("byzantine:peer1@round2,attack=signflip,when=now", "unknown option(s) when; use for=, x= (byzantine: attack="),
    ],
)
def test_bad_byzantine_events_are_config_errors_that_say_what_to_write(text, message):
    with pytest.raises(ConfigError) as info:
        parse_event(text)
    assert message in str(info.value)


def test_a_scenario_file_gives_a_byzantine_attack_with_its_options_as_keys_or_inline(tmp_path):
    path = tmp_path / "s.toml"
    path.write_text(
        '[[event]]\naction = "byzantine"\ntarget = "peer2"\nat = "0s"\nattack = "signflip"\nk = 5\n\n'
        '[[event]]\naction = "byzantine"\ntarget = "peer1"\nat = "round2"\nattack = "noise=0.5,seed=2"\nfor = "8s"\n'
    )
    assert load_scenario(path) == [
        parse_event("byzantine:peer2@0s,attack=signflip,k=5"),
        parse_event("byzantine:peer1@round2,attack=noise=0.5,seed=2,for=8s"),
    ]


def test_a_scenario_event_with_an_unknown_key_is_refused(tmp_path):
    path = tmp_path / "s.toml"
    path.write_text('[[event]]\naction = "byzantine"\ntarget = "peer2"\nat = "0s"\natack = "signflip"\n')
    with pytest.raises(ConfigError, match="event 1 has unknown key.s. atack; an event's keys are action, target"):
        load_scenario(path)
