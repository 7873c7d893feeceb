"""``loconet bench ...`` checks its arguments in the parent: a user's mistake is one ConfigError, before any process.

Each case runs the bench's handler as ``loconet`` does, with process creation forbidden: a check that
came after a child started would fail the test with "a process was started".
"""

from __future__ import annotations

import subprocess
import sys

import pytest

from collectives.errors import ConfigError
from optimizers.registry import algorithm_names
from peer.bench import diloco
from peer.cli import build_parser
from tests.support.cli import forbid_processes


def parse(*args: str):
    """The namespace ``loconet bench ARGS`` parses to."""
    return build_parser("bench").parse_args(["bench", *args])


@pytest.fixture
def no_processes(monkeypatch):
    """Make starting any child process (subprocess or multiprocessing) fail the test."""
    forbid_processes(monkeypatch)


def test_an_unknown_method_names_it_and_the_choices():
    with pytest.raises(ConfigError) as err:
        diloco.bench_config(parse("diloco", "--methods", "diloco,dilco"))
    # Every registered algorithm is offered (a plugin another test imported registers more).
    assert str(err.value) == (
        f"unknown method 'dilco' in --methods; choose from {', '.join(algorithm_names())} (registered algorithms) "
        "and data_parallel, one_peer (baselines), comma-separated"
    )


def test_a_method_given_twice_is_refused():
    with pytest.raises(ConfigError, match="method 'diloco' is given twice in --methods"):
        diloco.bench_config(parse("diloco", "--methods", "diloco,one_peer,diloco"))


def test_an_option_no_chosen_method_has_is_refused():
    with pytest.raises(ConfigError, match="--fragments applies to none of the methods diloco, one_peer"):
        diloco.bench_config(parse("diloco", "--methods", "diloco,one_peer", "--fragments", "2"))


def test_the_baselines_alone_train_the_steps_given():
    config = diloco.bench_config(parse("diloco", "--methods", "one_peer", "--steps", "7", "--inner-lr", "0.01"))
    assert (config.runs, config.baselines) == ((), ("one_peer",))
    assert (config.loop.steps, config.loop.inner_lr) == (7, 0.01)


BAD_ARGUMENTS = [
    (["diloco", "--methods", "dilco"], "unknown method 'dilco' in --methods; choose from diloco, streaming, fedavg"),
    (["diloco", "--task", "nope"], "unknown task 'nope'; choose one of synthetic-lm, text-lm"),
    (["diloco", "--task", "text-lm", "--data", "/no/such/corpus"], "data path '/no/such/corpus' does not exist"),
    (["diloco", "--codec", "int9"], "codec spec 'int9' is invalid"),
    (["diloco", "--peers", "0"], "--peers must be at least 1, got 0"),
    (["diloco", "--duration", "5"], "give --steps, not --duration"),
    (["diloco", "--algorithm", "streaming"], "name 'streaming' there instead of in --algorithm"),
    (["allreduce", "--codec", "int9"], "codec spec 'int9' is invalid"),
    (["allreduce", "--bandwidth", "fast"], "cannot read bandwidth 'fast'"),
    (["allreduce", "--chunk-bytes", "10"], "--chunk-bytes must be at least 1024, got 10"),
    (["codecs", "--codecs", "int8,int9"], "codec spec 'int9' is invalid"),
    (["statesync", "--mb", "0"], "--mb must be a positive size"),
    (["statesync", "--bandwidth", "1gbitz"], "cannot read bandwidth '1gbitz'"),
    (["transport", "--mb", "0.5"], "--mb 0.5 is smaller than one chunk of 1048576 bytes"),
    (["membership", "--lease", "0.5"], "lease (0.5 s) must be longer than the heartbeat interval (1.0 s)"),
    (["membership", "--peers", "0"], "--peers and --baseline-peers must be at least 1, got 0 and 10"),
    (["gpu", "--device", "auto"], "bench gpu checks a named device: give --device cuda, cuda:N, or cpu"),
    (["gpu", "--device", "mps"], "device 'mps' is not one of auto, cpu, cuda, cuda:N"),
    (["gpu", "--device", "cpu", "--peers", "1"], "--peers must be at least 2 (the peers must agree), got 1"),
    (["hetero", "--slow", "peer3x3"], "cannot read --slow 'peer3x3': write PEER:x=X with X above 1"),
]


@pytest.mark.parametrize(("args", "message"), BAD_ARGUMENTS, ids=[" ".join(a) for a, _ in BAD_ARGUMENTS])
def test_a_bad_argument_is_refused_before_any_process_starts(no_processes, args, message):
    ns = parse(*args)
    with pytest.raises(ConfigError) as err:
        ns.handler(ns)
    assert message in str(err.value)


@pytest.mark.timeout(120)
def test_an_unknown_method_on_the_command_line_is_one_line_and_exit_code_2():
    result = subprocess.run(
        [sys.executable, "-m", "peer.cli", "bench", "diloco", "--methods", "dilco"],
        capture_output=True, text=True, timeout=100, check=False,
    )
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert result.stderr.splitlines() == [
        (
            "loconet: error: unknown method 'dilco' in --methods; choose from diloco, streaming, fedavg, fedavgm, "
            "fedadam, fedyogi, fedadagrad, fedprox, client-momentum, coded-sgd, sync-sgd, seq-sgc, async-diloco, "
            "noloco (registered algorithms) "
            "and data_parallel, one_peer (baselines), comma-separated"
        )
    ]
    assert result.stdout == ""
