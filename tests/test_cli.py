"""The command line is generated from the config dataclasses and reads back exactly the configs it writes."""

from __future__ import annotations

import argparse
import dataclasses

import pytest
import torch

from collectives.errors import ConfigError
from collectives.net.transportconfig import TransportConfig
from optimizers.diloco import DiLoCoConfig
from optimizers.outer_optim import OuterConfig
from optimizers.peers import LocalPeer
from optimizers.streaming import StreamingConfig
from peer.cli import build_parser, harness_config
from peer.coordinator.config import CoordinatorConfig
from peer.options import add_options, option_args, read_options
from peer.runtime.training import TrainConfig, make_optimizer
from peer.tasks.base import TaskConfig
from peer.trainoptions import (
    add_task_arguments,
    add_train_arguments,
    read_task_config,
    read_train_config,
    task_args,
    train_args,
)


def parse(args: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_task_arguments(parser)
    add_train_arguments(parser)
    return parser.parse_args(args)


def test_a_streaming_train_config_round_trips_through_its_options():
    t = TrainConfig(
        algorithm="streaming", steps=123, duration_s=4.5, inner_lr=0.01, eval_every=7, round_timeout_s=9.0,
        options=StreamingConfig(
            sync_every=20, codec="int4+zstd", aggregator="trimmed_mean:trim=0.2", fragments=2, overlap=3, alpha=0.25,
            split="balanced", outer=OuterConfig(name="adam", lr=0.01, betas=(0.8, 0.95), eps=1e-6),
        ),
    )
    assert read_train_config(parse(train_args(t))) == t


def test_a_diloco_train_config_round_trips_through_its_options():
    t = TrainConfig(algorithm="diloco", options=DiLoCoConfig(sync_seconds=2.5, outer=OuterConfig(nesterov=False)))
    assert read_train_config(parse(train_args(t))) == t


def test_default_train_config_round_trips():
    assert read_train_config(parse(train_args(TrainConfig()))) == TrainConfig()


def test_each_algorithm_takes_its_own_defaults_when_an_option_is_left_out():
    assert read_train_config(parse(["--algorithm", "diloco"])).options.codec == "int8"
    assert read_train_config(parse(["--algorithm", "streaming"])).options.codec == "int4"


def test_an_option_of_another_algorithm_is_refused_with_the_algorithms_options():
    with pytest.raises(ConfigError, match=r"--fragments does not apply to algorithm 'diloco'.*--sync-every"):
        read_train_config(parse(["--algorithm", "diloco", "--fragments", "2"]))


def test_task_config_round_trips_through_its_options():
    c = TaskConfig(seed=3, batch_size=8, seq_len=32, split="non-iid", d_model=48, n_layers=3, n_heads=6,
                   vocab_size=40, data="/tmp/some.txt", eval_batches=3)
    assert read_task_config(parse(task_args(c))) == c


@pytest.mark.parametrize(
    "config",
    [
        CoordinatorConfig(),
        CoordinatorConfig(run_id="r", dashboard_port=None, quorum="first-k:3", seed=7, probe_peers=False,
                          startup_grace_s=1.5, state_file="/tmp/s.json"),
    ],
)
def test_coordinator_config_round_trips_through_its_options(config):
    parser = argparse.ArgumentParser()
    add_options(parser, CoordinatorConfig)
    assert read_options(CoordinatorConfig, parser.parse_args(option_args(config))) == config


def test_transport_options_round_trip_with_a_bandwidth_in_bits_per_second():
    config = TransportConfig(host="0.0.0.0", port=5000, advertise="10.0.0.7", bandwidth_bps=100e6, codec_threads=0)
    parser = argparse.ArgumentParser()
    add_options(parser, TransportConfig)
    assert read_options(TransportConfig, parser.parse_args(option_args(config))) == config


@dataclasses.dataclass(frozen=True)
class _Listed:
    names: tuple[str, ...] = dataclasses.field(
        default=("a", "b"), metadata={"parse": lambda t: tuple(t.split(",")), "format": ",".join}
    )
    python: str | None = dataclasses.field(default=None, metadata={"const": "/usr/bin/python3", "metavar": "PYTHON"})


def test_a_tuple_with_a_parse_is_one_option_and_const_is_its_value_given_alone():
    parser = argparse.ArgumentParser()
    add_options(parser, _Listed)
    assert "--python [PYTHON]" in parser.format_help()
    assert read_options(_Listed, parser.parse_args([])) == _Listed()
    assert read_options(_Listed, parser.parse_args(["--names", "x,y,z", "--python"])) == _Listed(
        names=("x", "y", "z"), python="/usr/bin/python3"
    )
    config = _Listed(names=("c",), python="/opt/py")
    assert read_options(_Listed, parser.parse_args(option_args(config))) == config


def test_a_tuple_of_any_length_without_a_parse_has_no_command_line_form():
    @dataclasses.dataclass(frozen=True)
    class Bare:
        names: tuple[str, ...] = ()

    with pytest.raises(TypeError, match="needs metadata parse"):
        add_options(argparse.ArgumentParser(), Bare)


def test_the_python_api_and_the_cli_agree_on_every_default():
    ns = build_parser(with_benchmarks=False).parse_args(["peer"])
    train = read_train_config(ns)
    assert train == TrainConfig()
    assert train.options == DiLoCoConfig()
    assert read_options(TransportConfig, ns) == TransportConfig()
    assert read_task_config(ns) == TaskConfig()


def test_harness_options_reach_its_coordinator_and_its_peers():
    ns = build_parser(with_benchmarks=False).parse_args(
        ["harness", "--peers", "5", "--quorum", "first-k:4", "--lease", "2", "--sync-every", "10", "--codec", "fp16"]
    )
    config = harness_config(ns)
    assert config.peers == 5
    assert (config.coordinator.quorum, config.coordinator.lease_s) == ("first-k:4", 2.0)
    assert config.coordinator.heartbeat_s == 0.5, "the harness's own default"
    assert (config.train.options.sync_every, config.train.options.codec) == (10, "fp16")
    assert config.train.steps == 400, "the harness's own default"


def test_harness_chaos_events_come_after_the_given_ones_drawn_for_the_runs_peers_and_rounds():
    from peer.harness.chaos import ChaosSpec, chaos_events

    ns = build_parser(with_benchmarks=False).parse_args(
        ["harness", "--peers", "3", "--steps", "200", "--sync-every", "20", "--event", "join@round2",
         "--chaos", "4,seed=9"]
    )
    config = harness_config(ns)
    assert [str(e) for e in config.events] == ["join@round2"] + [
        str(e) for e in chaos_events(ChaosSpec(4, 9), peers=3, rounds=10)
    ]


@pytest.mark.parametrize(("inner", "given", "lr"), [
    ("adamw", None, 3e-3),
    ("sgd", None, 0.1),
    ("sgd", 0.3, 0.3),
    ("adamw", 0.01, 0.01),
])
def test_the_inner_learning_rate_is_the_given_one_or_the_inner_optimizers_own(inner, given, lr):
    config = TrainConfig(inner=inner, inner_lr=given)
    assert config.resolved_inner_lr == lr
    model = torch.nn.Linear(2, 1)
    assert make_optimizer(model, LocalPeer(), config).inner.param_groups[0]["lr"] == lr


def test_the_command_line_leaves_the_inner_learning_rate_to_the_inner_optimizer():
    config = read_train_config(parse(["--inner", "sgd"]))
    assert (config.inner_lr, config.resolved_inner_lr) == (None, 0.1)
