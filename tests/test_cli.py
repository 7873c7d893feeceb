"""The command line reads back exactly the configs it writes, so the harness and benchmarks pass every option on."""

from __future__ import annotations

import argparse
import dataclasses

from peer.cli import add_task_arguments, add_train_arguments, task_args, task_config, train_args, train_config
from peer.tasks.base import TaskConfig
from peer.runtime.training import TrainConfig


def parse(args: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_task_arguments(parser)
    add_train_arguments(parser)
    return parser.parse_args(args)


def test_train_config_round_trips_through_its_options():
    t = TrainConfig(
        algorithm="streaming", steps=123, duration_s=4.5, inner_lr=0.01, sync_every=20, sync_seconds=2.5,
        outer_lr=0.5, outer_momentum=0.3, nesterov=False, codec="int4+zstd", fragments=2, overlap=3, alpha=0.25,
        split="balanced", eval_every=7, round_timeout_s=9.0,
    )
    assert train_config(parse(train_args(t))) == t


def test_default_train_config_round_trips():
    assert train_config(parse(train_args(TrainConfig()))) == TrainConfig()


def test_task_config_round_trips_through_its_options():
    c = TaskConfig(seed=3, batch_size=8, seq_len=32, split="non-iid", d_model=48, n_layers=3, n_heads=6,
                   vocab_size=40, data="/tmp/some.txt")
    got = task_config(parse(task_args(c)))
    # eval_batches is not a command-line option: it keeps its default on both sides.
    assert got == dataclasses.replace(c, eval_batches=TaskConfig().eval_batches)
