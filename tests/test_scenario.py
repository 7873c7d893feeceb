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
        ("stop:peer0@round3", "stop", "peer0", 3, None, None, None, None),
        ("stop:peer0@round3,for=5s", "stop", "peer0", 3, None, None, 5.0, None),
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
        ("stop@round3", "needs a target"),
        # Options an action does nothing with are refused, not dropped.
        (
            "kill:peer1@round2,for=5s",
            "kill takes no for=; write kill:PEER@WHEN; to start the peer again later, stop it",
        ),
        ("kill:peer1@round2,x=3", "kill takes no x=; write kill:PEER@WHEN"),
        ("join@round2,for=5s", "join takes no for=; write join@WHEN"),
        ("restart-coordinator@5s,for=2s", "restart-coordinator takes no for="),
        ("diverge:peer1@round2,for=3s", "diverge takes no for=; write diverge:PEER@WHEN"),
        ("stop:peer1@round2,x=2,for=3s", "stop takes no x=; write stop:PEER@WHEN"),
        ("pause:peer1@round2,x=2,for=3s", "pause takes no x="),
        ("byzantine:peer1@round2,attack=zero,x=2", "byzantine takes no x="),
        ("cut:peer1@round2", "cut needs a duration, e.g. cut:peer1@round2,for=8s"),
        # Numbers are finite.
        ("straggle:peer1@0s,x=inf", "x= must be a finite number at most 1000, got inf"),
        ("straggle:peer1@0s,x=nan", "x= must be a finite number at most 1000, got nan"),
        ("straggle:peer1@0s,x=1e9", "x= must be a finite number at most 1000"),
        ("straggle:random@0s,x=1e9", "x= must be at most 1000"),
        ("straggle:random@0s,x=inf", "x= must be finite"),
        ("straggle:bursty@0s,B=1,W=2,lambda=1,x=4,p=nan", "p= must be finite"),
        ("straggle:peer1@0s,x=3,for=inf", "cannot read a duration from 'inf'"),
        ("byzantine:peer1@0s,attack=scale=inf", "k must be a finite number"),
        ("byzantine:peer1@0s,attack=signflip,k=nan", "k must be a finite number"),
        ("byzantine:peer1@0s,attack=noise=nan", "noise needs a finite standard deviation"),
        ("straggle:random@0s,x=4,seed=nan", "seed= needs an integer"),
    ],
)
def test_bad_events_are_config_errors_that_say_what_to_write(text, message):
    with pytest.raises(ConfigError, match=message):
        parse_event(text)


def test_scenario_file_holds_the_same_events(tmp_path):
    path = tmp_path / "s.toml"
    path.write_text(
        '[[event]]\naction = "pause"\ntarget = "peer1"\nat = "round2"\nfor = "8s"\n\n'
        '[[event]]\naction = "join"\nat = "30s"\n'
    )
    assert load_scenario(path) == [parse_event("pause:peer1@round2,for=8s"), parse_event("join@30s")]


@pytest.mark.parametrize(
    "table,text",
    [
        # A number of at or for is seconds, as in --event; numbers may be written as --event's text.
        ('action = "stop"\ntarget = "peer1"\nat = "round2"\nfor = 8', "stop:peer1@round2,for=8s"),
        ('action = "pause"\ntarget = "peer1"\nat = "round2"\nfor = 0.5', "pause:peer1@round2,for=500ms"),
        ('action = "join"\nat = 10', "join@10s"),
        ('action = "straggle"\ntarget = "peer1"\nat = "0s"\nfactor = "3"', "straggle:peer1@0s,x=3"),
        ('action = "straggle"\ntarget = "peer1"\nat = "0s"\nfactor = 2.5', "straggle:peer1@0s,x=2.5"),
        ('action = "byzantine"\ntarget = "peer2"\nat = "0s"\nattack = "signflip"\nk = "5"',
         "byzantine:peer2@0s,attack=signflip,k=5"),
        ('action = "straggle"\ntarget = "bursty"\nat = "0s"\nfactor = "4"\nB = "1"\nW = 2\nlambda = 1\nfor = 3',
         "straggle:bursty@0s,B=1,W=2,lambda=1,x=4,for=3s"),
    ],
)
def test_a_scenario_files_numbers_are_toml_numbers_or_the_event_texts(tmp_path, table, text):
    path = tmp_path / "s.toml"
    path.write_text(f"[[event]]\n{table}\n")
    assert load_scenario(path) == [parse_event(text)]


@pytest.mark.parametrize(
    "table,message",
    [
        ('action = "stop"\ntarget = "peer1"\nat = "round2"\nfor = ["8s"]', "event 1: for must be a duration"),
        ('action = "stop"\ntarget = "peer1"\nat = "round2"\nfor = -3', "event 1: stop duration: -3 is no duration"),
        ('action = "stop"\ntarget = "peer1"\nat = "round2"\nfor = inf', "event 1: stop duration: inf is no duration"),
        ('action = "join"\nat = true', "event 1: at must be a time"),
        ('action = "join"\nat = nan', "event 1: event time: nan is no duration"),
        ('action = 5\nat = "5s"', "event 1: action must be a string"),
        (
            'action = "kill"\ntarget = 1\nat = "round2"',
            'event 1: target must be a string, e.g. target = "peer1"; got 1',
        ),
        ('action = "kill"\ntarget = "peer 1"\nat = "round2"', "event 1: kill: the target must be a peer's name"),
        ('action = "straggle"\ntarget = "peer1"\nat = "0s"\nfactor = "three"', "event 1: factor needs a number"),
        ('action = "straggle"\ntarget = "peer1"\nat = "0s"\nfactor = true', "event 1: factor must be a number"),
        ('action = "straggle"\ntarget = "peer1"\nat = "0s"\nfactor = inf', "event 1: straggle: x= must be a finite"),
        ('action = "straggle"\ntarget = "peer1"\nat = "0s"\nfactor = nan', "event 1: straggle: x= must be a finite"),
        (
            'action = "byzantine"\ntarget = "peer1"\nat = "0s"\nattack = "signflip"\nk = true',
            "event 1: k must be a number",
        ),
        ('action = "byzantine"\ntarget = "peer1"\nat = "0s"\nattack = 5', "event 1: attack must be a string"),
        (
            'action = "straggle"\ntarget = "bursty"\nat = "0s"\nfactor = 4\nB = 1.5\nW = 2\nlambda = 1',
            "event 1: B must be a whole number",
        ),
        (
            'action = "kill"\ntarget = "peer1"\nat = "round2"\nfor = 5',
            "event 1: kill takes no for; write kill:PEER@WHEN; to start",
        ),
        ('action = "join"\nat = "round2"\nfactor = 2', "event 1: join takes no factor; write join@WHEN"),
        ('action = "cut"\ntarget = "peer1"\nat = "round2"', "event 1: cut needs a duration"),
    ],
)
def test_a_scenario_event_key_of_the_wrong_type_or_unused_is_refused(tmp_path, table, message):
    path = tmp_path / "s.toml"
    path.write_text(f"[[event]]\n{table}\n")
    with pytest.raises(ConfigError) as info:
        load_scenario(path)
    assert message in str(info.value)


@pytest.mark.parametrize(
    "content,message",
    [
        ("event = 5\n", "event must be [[event]] tables, not 5"),
        ("event = [1, 2]\n", "event 1 is 1, not a table; write each event as an [[event]] table"),
        (
            '[event]\naction = "join"\nat = "round2"\n',
            "events are [[event]] tables (an array of tables); write [[event]], not [event]",
        ),
        (
            '[[events]]\naction = "join"\nat = "round2"\n',
            "unknown top-level key(s) events; a scenario holds only [[event]] tables",
        ),
        ('title = "x"\n[[event]]\naction = "join"\nat = "round2"\n', "unknown top-level key(s) title"),
        (
            '# caf\xe9\n[[event]]\naction = "join"\nat = "5s"\n'.encode("latin-1"),
            "it is not UTF-8 text (byte 5); save it as UTF-8",
        ),
    ],
)
def test_a_scenario_file_that_is_not_a_list_of_event_tables_is_refused(tmp_path, content, message):
    path = tmp_path / "s.toml"
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    with pytest.raises(ConfigError) as info:
        load_scenario(path)
    assert message in str(info.value)


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


@pytest.mark.parametrize(
    "text,pattern,duration",
    [
        ("straggle:random@0s,x=4", "random,x=4", None),
        ("straggle:random@round2,x=4,seed=3,for=10s", "random,x=4,seed=3", 10.0),
        ("straggle:bursty@0s,B=1,W=2,lambda=1,x=4", "bursty,B=1,W=2,lambda=1,x=4", None),
        ("straggle:bursty@5s,B=2,W=4,lambda=2,x=3,p=0.2,seed=1", "bursty,B=2,W=4,lambda=2,x=3,p=0.2,seed=1", None),
        ("straggle:persistent@0s,worker=2,x=3", "persistent,worker=2,x=3", None),
        ("straggle:none@round9", "none", None),
    ],
)
def test_straggle_events_with_a_pattern_slow_the_whole_network(text, pattern, duration):
    e = parse_event(text)
    assert (e.action, e.target, e.factor, str(e.pattern), e.duration_s) == ("straggle", None, None, pattern, duration)
    assert str(e) == text
    assert parse_event(str(e)) == e


def test_a_pattern_events_options_may_come_in_any_order():
    assert parse_event("straggle:bursty@0s,x=4,seed=2,lambda=1,W=2,B=1,for=3s") == parse_event(
        "straggle:bursty@0s,B=1,W=2,lambda=1,x=4,seed=2,for=3s"
    )


@pytest.mark.parametrize(
    "text,message",
    [
        (
            "straggle:random@0s",
            (
                "event 'straggle:random@0s': straggler pattern 'random': random needs x=; write one of: "
                "none; random,x=X[,seed=N]; persistent,worker=I,x=X; bursty,B=B,W=W,lambda=L,x=X[,p=P][,seed=N]"
            ),
        ),
        ("straggle:random@0s,x=1", "x is how many times slower a straggler is and must be above 1"),
        ("straggle:bursty@0s,B=3,W=2,lambda=1,x=4", "a burst (B=3) must be shorter than its window (W=2)"),
        ("straggle:bursty@0s,B=1,W=2,x=4", "bursty needs lambda="),
        ("straggle:random@0s,x=4,B=2", "random takes x=, seed=, not B="),
        ("straggle:random@0s,x=4,k=3", "a straggler pattern takes no k=; write straggle:PATTERN@WHEN[,for=DURATION]"),
        ("straggle:random@sync2,x=4", "syncN needs a target peer"),
        (
            "straggle:peer1@0s,x=3,B=2",
            "B= belongs to a straggler pattern, e.g. straggle:bursty@0s,B=1,W=2,lambda=1,x=4",
        ),
        ("kill:peer1@round2,lambda=1", "lambda= belongs to a straggler pattern"),
        (
            "straggle:peer1@round1",
            "straggle needs a slowdown factor above 1, e.g. straggle:peer1@10s,x=3 (or a pattern",
        ),
        (
            "kill:peer1@round1,Q=1",
            (
                "unknown option(s) Q; use for=, x= (byzantine: attack=, k=, s=, seed=; straggler "
                "patterns: B=, W=, lambda=, p=, worker=, seed=; stall: streams=, fetches=)"
            ),
        ),
    ],
)
def test_bad_straggler_patterns_are_config_errors_that_say_what_to_write(text, message):
    with pytest.raises(ConfigError) as info:
        parse_event(text)
    assert message in str(info.value)


def test_a_scenario_file_gives_a_pattern_as_its_target_with_its_options_as_keys(tmp_path):
    path = tmp_path / "s.toml"
    path.write_text(
        '[[event]]\naction = "straggle"\ntarget = "bursty"\nat = "0s"\nfactor = 4\nB = 1\nW = 2\nlambda = 1\n\n'
        '[[event]]\naction = "straggle"\ntarget = "random"\nat = "round3"\nfactor = 2.5\nseed = 7\nfor = "8s"\n'
    )
    assert load_scenario(path) == [
        parse_event("straggle:bursty@0s,B=1,W=2,lambda=1,x=4"),
        parse_event("straggle:random@round3,x=2.5,seed=7,for=8s"),
    ]


def test_a_scenario_file_refuses_a_pattern_option_on_a_peers_straggle(tmp_path):
    path = tmp_path / "s.toml"
    path.write_text('[[event]]\naction = "straggle"\ntarget = "peer1"\nat = "0s"\nfactor = 3\nW = 2\n')
    with pytest.raises(ConfigError, match="event 1: W= belongs to a straggler pattern"):
        load_scenario(path)


@pytest.mark.parametrize(
    "text,streams,fetches,rounds,duration,canonical",
    [
        ("stall:peer1@round1", 300, 10, 1, None, "stall:peer1@round1,streams=300,fetches=10"),
        ("stall:peer1@round1,streams=300,fetches=10", 300, 10, 1, None, "stall:peer1@round1,streams=300,fetches=10"),
        ("stall:peer0@round2,fetches=4,for=30s", 300, 4, 2, 30.0, "stall:peer0@round2,streams=300,fetches=4,for=30s"),
        ("stall:peer2@round0,streams=50,fetches=0", 50, 0, 0, None, "stall:peer2@round0,streams=50,fetches=0"),
        ("stall:peer2@round3,streams=0", 0, 10, 3, None, "stall:peer2@round3,streams=0,fetches=10"),
    ],
)
def test_stall_events_hold_streams_and_fetches_against_their_target(
    text, streams, fetches, rounds, duration, canonical
):
    e = parse_event(text)
    assert (e.action, e.target, e.streams, e.fetches, e.at.rounds, e.duration_s) == (
        "stall", text.split(":")[1].split("@")[0], streams, fetches, rounds, duration,
    )
    assert str(e) == canonical
    assert parse_event(str(e)) == e


def test_only_a_stall_event_has_stream_and_fetch_counts():
    assert (parse_event("kill:peer1@round2").streams, parse_event("kill:peer1@round2").fetches) == (None, None)


@pytest.mark.parametrize(
    "text,message",
    [
        ("stall@round1", "stall needs a target peer, e.g. stall:peer1@round2"),
        ("stall:peer1@round1,streams=-1", "stall: streams= needs a whole number, 0 or more, e.g. streams=300"),
        ("stall:peer1@round1,fetches=many", "stall: fetches= needs a whole number, 0 or more, e.g. fetches=10"),
        ("stall:peer1@round1,streams=1.5", "stall: streams= needs a whole number"),
        ("stall:peer1@round1,streams=0,fetches=0", "a stall with streams=0 and fetches=0 holds nothing"),
        ("stall:peer1@round1,x=3", "stall takes no x=; write stall:PEER@WHEN[,streams=N][,fetches=M][,for=DURATION]"),
        ("stall:peer1@round1,attack=zero", "stall takes no attack (only byzantine does)"),
        ("stall:peer1@round1,streams=3,streams=4", "streams= is given twice"),
        ("kill:peer1@round1,streams=3", "kill takes no streams=; only a stall event does, e.g. stall:peer1@round1"),
        ("join@round1,fetches=2", "join takes no fetches=; only a stall event does"),
        ("stall:peer1@round1,conns=3", "unknown option(s) conns"),
    ],
)
def test_bad_stall_events_are_config_errors_that_say_what_to_write(text, message):
    with pytest.raises(ConfigError) as info:
        parse_event(text)
    assert message in str(info.value)


def test_a_scenario_file_gives_a_stalls_counts_as_keys(tmp_path):
    path = tmp_path / "s.toml"
    path.write_text(
        '[[event]]\naction = "stall"\ntarget = "peer1"\nat = "round1"\nstreams = 300\nfetches = 10\n\n'
        '[[event]]\naction = "stall"\ntarget = "peer2"\nat = "5s"\nfetches = 3\nfor = "20s"\n'
    )
    assert load_scenario(path) == [
        parse_event("stall:peer1@round1,streams=300,fetches=10"),
        parse_event("stall:peer2@5s,fetches=3,for=20s"),
    ]


@pytest.mark.parametrize(
    "table,message",
    [
        ('streams = "lots"', "stall: streams= needs a whole number"),
        ("streams = true", "event 1: streams must be a whole number, e.g. streams = 300; got True"),
        ("fetches = 2.5", "event 1: fetches must be a whole number, e.g. fetches = 10; got 2.5"),
    ],
)
def test_a_scenario_file_refuses_a_stall_count_that_is_not_a_whole_number(tmp_path, table, message):
    path = tmp_path / "s.toml"
    path.write_text(f'[[event]]\naction = "stall"\ntarget = "peer1"\nat = "round1"\n{table}\n')
    with pytest.raises(ConfigError, match=message):
        load_scenario(path)
