"""``loconet bench ...`` checks its arguments in the parent: a user's mistake is one ConfigError, before any process.

Each case runs the bench's handler as ``loconet`` does, with process creation forbidden: a check that
came after a child started would fail the test with "a process was started". ``bench coding`` and ``bench
federated`` train in threads of this process: their runs are forbidden too, so a check that came after the first
method or strategy had run fails the test as well.
"""

from __future__ import annotations

import subprocess
import sys

import pytest

from collectives.errors import ConfigError
from optimizers.registry import algorithm_names
from peer.bench import coding, diloco, federated
from peer.cli import build_parser
from tests.support.cli import forbid_processes


def parse(*args: str):
    """The namespace ``loconet bench ARGS`` parses to."""
    return build_parser("bench").parse_args(["bench", *args])


@pytest.fixture
def nothing_runs(monkeypatch):
    """Make starting any child process, or any run of bench coding's methods or bench federated's strategies,
    fail the test."""
    forbid_processes(monkeypatch)

    def forbidden(*_args, **_kwargs):
        raise AssertionError("a benchmark run started before the arguments were checked")

    monkeypatch.setattr(coding, "run_method", forbidden)
    monkeypatch.setattr(federated, "run_once", forbidden)


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
    (["codecs", "--numel", "0"], "--numel and --repeat must be at least 1, got 0 and 5"),
    (["codecs", "--numel", "100000000000"], "--numel 100000000000 needs about"),
    (["statesync", "--mb", "0"], "--mb must be a positive size"),
    (["statesync", "--mb", "inf"], "--mb must be a positive size (at least 4e-6), got inf"),
    (["statesync", "--mb", "nan"], "--mb must be a positive size (at least 4e-6), got nan"),
    (["statesync", "--bandwidth", "1gbitz"], "cannot read bandwidth '1gbitz'"),
    (["transport", "--mb", "0.5"], "--mb 0.5 is smaller than one chunk of 1048576 bytes"),
    (["transport", "--mb", "nan"], "--mb must be a positive number of megabytes, got nan"),
    (["transport", "--mb", "inf"], "--mb must be a positive number of megabytes, got inf"),
    (["transport", "--mb", "-1"], "--mb must be a positive number of megabytes, got -1"),
    (["membership", "--lease", "0.5"], "lease (0.5 s) must be longer than the heartbeat interval (1.0 s)"),
    (["membership", "--peers", "0"], "--peers and --baseline-peers must be at least 1, got 0 and 10"),
    (["membership", "--quorum-timeout", "0"], "--quorum-timeout must be positive (seconds), got 0"),
    (["membership", "--peers", "50", "--client-procs", "100"], "--client-procs (100) must be at most --peers (50)"),
    (["coding", "--eval-every", "0"], "--eval-every must be at least 1 (1: every step), got 0"),
    (["coding", "--eval-every", "-1"], "--eval-every must be at least 1 (1: every step), got -1"),
    (["coding", "--backup-c", "5"], "--backup-c must be in (0, 2) (c = lr x L), got 5"),
    (["coding", "--methods", "wait,backup", "--optimizer", "nope"], "unknown outer optimizer 'nope'"),
    (["coding", "--methods", ""], "--methods is empty; give comma-separated methods such as wait,coded"),
    (["coding", "--methods", "wait,coded,wait"], "method 'wait' is given twice in --methods"),
    (["federated", "--clip", "-1"], "--clip must be a positive number (norm_clip's bound on an update's norm), got -1"),
    (["federated", "--tau", "0"], "--tau must be a positive number (centered_clip's radius), got 0"),
    (["federated", "--strategies", "fedavg,fedadam", "--set", "eta=-1"], "--eta must be a positive finite number"),
    (["federated", "--strategies", ""], "--strategies is empty; give comma-separated strategies such as fedavg,median"),
    (["federated", "--strategies", "fedavg,median,fedavg"], "strategy 'fedavg' is given twice in --strategies"),
    (["gpu", "--device", "auto"], "bench gpu checks a named device: give --device cuda, cuda:N, or cpu"),
    (["gpu", "--device", "mps"], "device 'mps' is not one of auto, cpu, cuda, cuda:N"),
    (["gpu", "--device", "cpu", "--peers", "1"], "--peers must be at least 2 (the peers must agree), got 1"),
    (["hetero", "--slow", "peer3x3"], "cannot read --slow 'peer3x3': write PEER:x=X with X above 1"),
]


@pytest.mark.parametrize(("args", "message"), BAD_ARGUMENTS, ids=[" ".join(a) for a, _ in BAD_ARGUMENTS])
def test_a_bad_argument_is_refused_before_anything_runs(nothing_runs, args, message):
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
