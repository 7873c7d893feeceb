"""``--device``: which specs are accepted, what each resolves to with and without CUDA, and where batches go.

The CUDA-present branches are tested here on the CPU by standing in for
``torch.cuda.is_available`` and ``torch.cuda.device_count``; the one test that
trains on a real GPU carries the ``cuda`` marker.
"""

from __future__ import annotations

import argparse
import math
import subprocess
import sys
from collections import OrderedDict, namedtuple
from collections.abc import Iterator

import pytest
import torch

from collectives.errors import ConfigError
from optimizers.peers import LocalPeer
from peer.device import (
    DeviceUnavailable,
    check_device_spec,
    model_device,
    move_batch,
    place_model,
    resolve_device,
)
from peer.harness.harness import Harness, HarnessConfig
from peer.runtime.training import TaskPartitions, TrainConfig, TrainLoop, local_run, make_optimizer
from peer.tasks.base import Task, TaskConfig
from peer.tasks.registry import make_task
from peer.trainoptions import add_train_arguments, read_train_config, train_args
from tests.support.cli import in_process, one_line_error

META = torch.device("meta")


@pytest.fixture
def no_cuda(monkeypatch):
    """A machine without CUDA, whatever this one has."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)


def with_gpus(monkeypatch, count: int) -> None:
    """A machine with ``count`` CUDA devices (nothing is allocated on them: resolving only asks)."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: count)


# -- resolving a spec --------------------------------------------------------------------------


@pytest.mark.parametrize("spec, device", [("auto", torch.device("cpu")), ("cpu", torch.device("cpu"))])
def test_without_cuda_auto_and_cpu_are_the_cpu(no_cuda, spec, device):
    assert resolve_device(spec) == device


@pytest.mark.parametrize("spec", ["cuda", "cuda:0", "cuda:1"])
def test_without_cuda_a_cuda_device_is_refused_with_what_to_use_instead(no_cuda, spec):
    with pytest.raises(DeviceUnavailable) as caught:
        resolve_device(spec)
    message = str(caught.value)
    assert message.startswith(f"--device {spec}: CUDA is not available on this machine")
    assert "(torch.cuda.is_available() is False" in message
    assert message.endswith("use --device cpu or --device auto")


def test_an_unavailable_device_is_a_configuration_error():
    assert issubclass(DeviceUnavailable, ConfigError)  # the CLI's exit code 2, one line


@pytest.mark.parametrize(
    "spec, device",
    [
        ("auto", torch.device("cuda")),
        ("cuda", torch.device("cuda")),
        ("cuda:0", torch.device("cuda", 0)),
        ("cuda:1", torch.device("cuda", 1)),
        ("cpu", torch.device("cpu")),
    ],
)
def test_with_two_gpus_each_spec_names_its_device(monkeypatch, spec, device):
    with_gpus(monkeypatch, 2)
    assert resolve_device(spec) == device


@pytest.mark.parametrize(
    "count, spec, says",
    [
        (2, "cuda:2", "this machine has 2 CUDA devices (cuda:0 to cuda:1)"),
        (2, "cuda:7", "this machine has 2 CUDA devices (cuda:0 to cuda:1)"),
        (1, "cuda:1", "this machine has 1 CUDA device (cuda:0)"),
    ],
)
def test_a_cuda_index_beyond_the_device_count_is_refused_naming_the_count(monkeypatch, count, spec, says):
    with_gpus(monkeypatch, count)
    with pytest.raises(DeviceUnavailable) as caught:
        resolve_device(spec)
    assert str(caught.value) == f"--device {spec}: {says}: choose one of them, or --device cuda or --device auto"


@pytest.mark.parametrize("spec", ["mps", "gpu", "cuda:x", "cuda:", "cuda:-1", "cuda:01", "cpu:0", "CPU", " cpu", "", 0])
def test_anything_else_is_refused_with_the_accepted_forms(spec):
    with pytest.raises(ConfigError) as caught:
        check_device_spec(spec)
    assert not isinstance(caught.value, DeviceUnavailable)
    assert f"device {spec!r} is not one of auto, cpu, cuda, cuda:N" in str(caught.value)
    with pytest.raises(ConfigError):
        resolve_device(spec)


@pytest.mark.parametrize("spec", ["auto", "cpu", "cuda", "cuda:0", "cuda:12"])
def test_checking_a_spec_asks_nothing_of_cuda(monkeypatch, spec):
    def asked() -> bool:
        raise AssertionError("check_device_spec asked torch.cuda")

    monkeypatch.setattr(torch.cuda, "is_available", asked)
    monkeypatch.setattr(torch.cuda, "device_count", asked)
    assert check_device_spec(spec) == spec


# -- moving batches and models -----------------------------------------------------------------

Pair = namedtuple("Pair", "inputs targets")


def test_move_batch_moves_every_tensor_of_a_nested_batch_and_keeps_its_shape_and_other_values():
    marker = object()
    batch = (
        torch.zeros(2, 3),
        [torch.ones(4, dtype=torch.int64), {"mask": torch.ones(2, dtype=torch.bool), "name": "x", "n": 3}],
        Pair(torch.zeros(1), None),
        OrderedDict(first=torch.zeros(5), other=marker),
    )
    moved = move_batch(batch, META)
    assert type(moved) is tuple and len(moved) == 4
    assert moved[0].device == META and moved[0].shape == (2, 3)
    assert type(moved[1]) is list and moved[1][0].device == META and moved[1][0].dtype == torch.int64
    assert moved[1][1]["mask"].device == META and (moved[1][1]["name"], moved[1][1]["n"]) == ("x", 3)
    assert type(moved[2]) is Pair and moved[2].inputs.device == META and moved[2].targets is None
    assert type(moved[3]) is OrderedDict and list(moved[3]) == ["first", "other"]
    assert moved[3]["first"].device == META and moved[3]["other"] is marker
    assert batch[0].device == torch.device("cpu"), "the original batch is left as it was"


def test_a_tensor_already_on_the_device_is_passed_through_as_is():
    batch = (torch.zeros(2), torch.ones(2))
    moved = move_batch(batch, torch.device("cpu"))
    assert moved[0] is batch[0] and moved[1] is batch[1]


@pytest.mark.parametrize(
    "pinned, target, non_blocking",
    [(True, "cuda", True), (False, "cuda", False), (True, "cuda:1", True), (False, "meta", False)],
)
def test_only_a_copy_from_pinned_memory_to_cuda_is_non_blocking(monkeypatch, pinned, target, non_blocking):
    copies: list[tuple[torch.device, bool]] = []

    def to(self, device, non_blocking=False):
        copies.append((device, non_blocking))
        return self

    monkeypatch.setattr(torch.Tensor, "is_pinned", lambda self: pinned)
    monkeypatch.setattr(torch.Tensor, "to", to)
    move_batch([torch.zeros(3)], torch.device(target))
    assert copies == [(torch.device(target), non_blocking)]


def test_place_model_moves_parameters_and_buffers_and_returns_the_model():
    model = torch.nn.Sequential(torch.nn.Linear(3, 2), torch.nn.BatchNorm1d(2))
    placed = place_model(model, META)
    assert placed is model
    assert {t.device for t in [*model.parameters(), *model.buffers()]} == {META}
    assert model_device(model) == META


def test_the_device_of_a_model_without_parameters_is_its_buffers_or_else_the_cpu():
    holder = torch.nn.Module()
    assert model_device(holder) == torch.device("cpu")
    holder.register_buffer("table", torch.zeros(2, device=META))
    assert model_device(holder) == META


# -- the training config and its options -------------------------------------------------------


def test_train_config_defaults_to_auto_and_refuses_a_bad_device():
    assert TrainConfig().device == "auto"
    with pytest.raises(ConfigError, match="device 'gpu' is not one of"):
        TrainConfig(device="gpu")


def test_train_config_takes_a_cuda_device_this_machine_may_lack(no_cuda):
    # Written for a GPU peer elsewhere: only building its model here would ask for the device.
    assert TrainConfig.of("diloco", device="cuda:3").device == "cuda:3"


def test_the_device_round_trips_through_the_training_options():
    parser = argparse.ArgumentParser()
    add_train_arguments(parser)
    config = TrainConfig.of("diloco", steps=7, device="cuda:1")
    assert ["--device", "cuda:1"] == train_args(config)[train_args(config).index("--device"):][:2]
    assert read_train_config(parser.parse_args(train_args(config))) == config


def test_the_harness_passes_its_device_to_every_peer(tmp_path):
    train = TrainConfig.of("diloco", steps=400, sync_every=50, device="cpu")
    harness = Harness(HarnessConfig(train=train, workdir=str(tmp_path)))
    args = harness._peer_args("peer0")
    assert args[args.index("--device") + 1] == "cpu"
    assert local_run().device == "auto", "harness runs keep the default: the CPU on a machine without CUDA"


# -- the command line ----------------------------------------------------------------------------


@pytest.mark.timeout(120)
@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA: --device cuda is accepted")
def test_a_peer_asked_for_cuda_on_a_machine_without_it_says_so_in_one_line():
    # Nothing listens at the coordinator's address: the device is refused before the peer tries to reach it.
    result = subprocess.run(
        [sys.executable, "-m", "peer.cli", "peer", "--device", "cuda", "--coordinator", "127.0.0.1:9",
         "--connect-timeout", "30"],
        capture_output=True, text=True, timeout=90, check=False,
    )
    line = one_line_error(result)
    assert result.returncode == 2
    assert line.startswith("loconet: error: --device cuda: CUDA is not available on this machine")
    assert line.endswith("use --device cpu or --device auto")


@pytest.mark.parametrize("command", [("harness",), ("bench", "diloco")])
def test_the_harness_and_bench_diloco_refuse_a_missing_gpu_before_starting_any_process(
    no_cuda, tmp_path, capsys, command
):
    workdir = ("--workdir", str(tmp_path / "run")) if command == ("harness",) else ()
    result = in_process(capsys, *command, *workdir, "--device", "cuda:0")
    assert result.returncode == 2
    assert "--device cuda:0: CUDA is not available on this machine" in one_line_error(result)
    assert not list(tmp_path.glob("run/*.log"))  # no coordinator or peer was started


def test_a_malformed_device_is_a_usage_error_listing_the_accepted_forms(capsys):
    result = in_process(capsys, "peer", "--device", "mps")
    assert result.returncode == 2
    assert "device 'mps' is not one of auto, cpu, cuda, cuda:N" in one_line_error(result)


# -- training on the chosen device ---------------------------------------------------------------


class Recording(Task):
    """A task whose loss records where its batches are (and computes nothing on them)."""

    name = "recording"

    def __init__(self) -> None:
        super().__init__(TaskConfig())
        self.seen: list[set[torch.device]] = []

    def build_model(self) -> torch.nn.Module:
        return torch.nn.Linear(2, 1)

    def batches(self, rank: int, world: int, start: int = 0) -> Iterator:
        while True:
            yield torch.zeros(3, 2), {"labels": torch.zeros(3), "source": "cpu"}

    def batch_samples(self, batch) -> int:
        return int(batch[0].shape[0])

    def loss(self, model: torch.nn.Module, batch) -> torch.Tensor:
        self.seen.append({batch[0].device, batch[1]["labels"].device})
        return torch.zeros((), requires_grad=True) * 1.0

    def evaluate(self, model: torch.nn.Module) -> float:
        return 0.0


class Idle:
    """An optimizer that counts steps and syncs nothing."""

    committed_rounds = 0

    def __init__(self) -> None:
        self.steps = 0

    def step(self, samples: int, loss: float) -> None:
        self.steps += 1

    def zero_grad(self) -> None:
        pass

    def flush(self) -> None:
        pass


def test_the_train_loop_hands_the_task_each_batch_on_the_models_device():
    task = Recording()
    model = place_model(task.build_model(), META)
    progress = TrainLoop(task, model, Idle(), TrainConfig.of("diloco", steps=3)).run()
    assert task.seen == [{META}] * 3
    assert (progress.step, progress.samples) == (3, 9)


def test_task_partitions_hand_the_task_its_batch_on_the_models_device():
    task = Recording()
    model = place_model(task.build_model(), META)
    _, samples = TaskPartitions(task).loss(model, 1, 2, 5)
    assert task.seen == [{META}] and samples == 3


@pytest.mark.timeout(300)
@pytest.mark.parametrize("spec", ["cpu", pytest.param("cuda", marks=pytest.mark.cuda)])
def test_diloco_trains_the_synthetic_task_and_evaluates_on_the_chosen_device(spec):
    task = make_task("synthetic-lm", TaskConfig(d_model=32, n_layers=1, batch_size=4, seq_len=16))
    config = TrainConfig.of("diloco", steps=6, sync_every=3, device=spec)
    model = place_model(task.build_model(), resolve_device(config.device))
    progress = TrainLoop(task, model, make_optimizer(model, LocalPeer(), config), config).run()
    assert (progress.step, progress.rounds) == (6, 2)
    assert {p.device.type for p in model.parameters()} == {spec}
    assert math.isfinite(progress.eval_loss)
