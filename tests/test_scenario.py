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
