"""A run's peers run one algorithm with one set of settings: a joiner whose ``--algorithm``, codec, aggregator,
outer optimizer, privacy or model settings are not the live peers' is refused at its join, and stops with one
line (docs/membership.md).

Once the run committed a round, a joiner fetches its state and refuses one of another algorithm itself, and a
quorum request of another round format is refused for good; before that, nothing told two founders apart: their
quorum requests refused each other for now ("peers disagree"), and one trained alone to its last step. A model
that differs only in its attention heads was never told apart (no parameter's shape changes). The rules are pure
functions with tables; the live cases run a real coordinator in this process (``support.coordinator.Live``) with
made-up peers, and the last tests real ``loconet peer`` processes.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import grpc
import pytest
import torch

from collectives.membership.roundformat import MAX_FORMAT_CHARS
from optimizers.diloco import DiLoCo
from optimizers.outer_optim import OuterConfig
from optimizers.peers import LocalPeer
from peer.coordinator.rules import algorithm_refusal, settings_refusal
from peer.coordinator.service import MAX_ALGORITHM_CHARS
from peer.tasks.base import TaskConfig
from peer.tasks.registry import make_task

sys.path.insert(0, str(Path(__file__).parent))
from support.coordinator import BY_HAND, Live, live_coordinators
from support.procs import DaemonRun

pytestmark = pytest.mark.timeout(120)

REFUSED = "the run's live peers run"
DIFFERS = "this peer's settings are not the run's"
INT8 = "codec int8, aggregator mean, outer sgd, outer lr 0.7"


@pytest.mark.parametrize(
    ("asked", "live", "refused"),
    [
        ("diloco", [], False),  # the first to join
        ("diloco", ["diloco", "diloco"], False),
        ("streaming", ["diloco"], True),
        ("", ["diloco"], False),  # a peer that does not say is not checked
        ("diloco", ["", "diloco"], False),  # nor checked against
        ("streaming", [""], False),
        ("fedavg", ["diloco", "streaming"], True),  # live peers that already differ (older versions among them)
    ],
)
def test_a_joiner_is_refused_when_the_live_peers_run_another_algorithm(asked, live, refused):
    assert bool(algorithm_refusal(asked, live)) == refused


def test_the_refusal_says_which_algorithm_to_start_the_peer_with():
    assert algorithm_refusal("streaming", ["diloco"]) == (
        "this peer runs 'streaming' and the run's live peers run 'diloco': start it with --algorithm diloco, or "
        "give it a run of its own (--run)"
    )


@pytest.mark.parametrize(
    ("asked", "live", "difference"),
    [
        (INT8, [], ""),  # the first to join
        (INT8, [INT8, INT8], ""),
        ("", [INT8], ""),  # a peer that does not say is not checked
        (INT8, ["", ""], ""),  # nor checked against
        ("codec int4, aggregator mean, outer sgd, outer lr 0.7", [INT8], "codec int4, the run's: codec int8"),
        ("codec int8, aggregator mean, outer sgd, outer lr 0.3", [INT8], "outer lr 0.3, the run's: outer lr 0.7"),
        # Live peers that differ among themselves (older versions): the most common is the run's; any one agrees.
        ("codec fp16, aggregator mean, outer sgd, outer lr 0.7", [INT8, INT8, "x"],
         "codec fp16, the run's: codec int8"),
        ("x", [INT8, INT8, "x"], ""),
    ],
)
def test_a_joiner_is_refused_when_its_settings_are_not_the_live_peers(asked, live, difference):
    why = settings_refusal(asked, live)
    assert (f"({difference})" in why) if difference else why == ""


def test_the_synthetic_tasks_model_names_its_heads_which_no_parameter_shape_shows():
    two, four = (make_task("synthetic-lm", TaskConfig(d_model=32, n_heads=h)) for h in (2, 4))
    shapes = [[p.shape for p in task.build_model().parameters()] for task in (two, four)]
    assert shapes[0] == shapes[1]
    assert "heads 2" in two.model_settings() and "heads 4" in four.model_settings()
    assert make_task("digits", TaskConfig(d_model=32)).model_settings() == ("model mlp", "hidden 32")


def test_an_optimizer_names_its_codec_aggregator_and_round_settings_for_its_joins():
    model = torch.nn.Linear(4, 2)
    opt = DiLoCo(model, torch.optim.SGD(model.parameters(), lr=0.1), LocalPeer(), codec="int4",
                 outer=OuterConfig(lr=0.3))
    assert opt.run_settings() == ("codec int4", "aggregator mean", *opt.config.round_settings())
    assert "outer lr 0.3" in opt.run_settings() and opt.algorithm_name() == "diloco"


@pytest.fixture
def coordinator() -> Iterator[Callable[..., Live]]:
    with live_coordinators(BY_HAND) as start:
        yield start


def refused_join(c: Live, address: str, **fields) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as info:
        c.join(address, **fields)
    return info.value


def test_a_founders_algorithm_refuses_a_second_founder_of_another(coordinator):
    c = coordinator()
    c.join("127.0.0.1:1", algorithm="diloco")
    error = refused_join(c, "127.0.0.1:2", algorithm="streaming")
    assert error.code() == grpc.StatusCode.FAILED_PRECONDITION and REFUSED in error.details()
    assert c.join("127.0.0.1:3", algorithm="diloco").peer_id  # the run goes on taking its own
    assert c.status()["refusals"]["algorithm"] == 1


def test_a_peer_restarted_at_its_address_with_another_algorithm_replaces_itself(coordinator):
    c = coordinator()
    c.join("127.0.0.1:1", algorithm="diloco")
    assert c.join("127.0.0.1:1", algorithm="streaming").peer_id


def test_once_every_peer_of_an_algorithm_left_the_run_takes_another(coordinator):
    c = coordinator()
    first = c.join("127.0.0.1:1", algorithm="diloco").peer_id
    refused_join(c, "127.0.0.1:2", algorithm="streaming")
    c.leave(first, last_round=0)
    assert c.join("127.0.0.1:2", algorithm="streaming").peer_id


def test_a_joiner_of_other_settings_is_refused_naming_what_differs(coordinator):
    c = coordinator()
    c.join("127.0.0.1:1", algorithm="diloco", settings=INT8)
    error = refused_join(c, "127.0.0.1:2", algorithm="diloco", settings=INT8.replace("int8", "int4"))
    assert error.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert DIFFERS in error.details() and "(codec int4, the run's: codec int8)" in error.details()
    assert c.status()["refusals"]["settings"] == 1


@pytest.mark.parametrize("fields", [{"algorithm": "x" * (MAX_ALGORITHM_CHARS + 1)},
                                    {"settings": "x" * (MAX_FORMAT_CHARS + 1)}])
def test_an_algorithm_or_settings_beyond_their_limit_are_refused_at_the_edge(coordinator, fields):
    c = coordinator()
    error = refused_join(c, "127.0.0.1:1", **fields)
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT


@pytest.mark.timeout(300)
def test_founders_of_different_algorithms_one_stops_in_one_line_and_the_other_runs_on(tmp_path):
    run = DaemonRun(tmp_path, "algo")
    try:
        # Started together: whichever joins first is the run's; before this, both trained alone, each to its end.
        founders = {"a": run.add("a", "--steps", "200"), "b": run.add("b", "--algorithm", "streaming",
                                                                    "--overlap", "1", "--steps", "200")}
        stopped = wait_for_an_exit(founders, 120)
        assert founders[stopped].proc.returncode != 0
        errors = [line for line in (tmp_path / f"{stopped}.log").read_text().splitlines()
                  if line.startswith("loconet:")]
        assert len(errors) == 1 and REFUSED in errors[0], errors
        kept = "b" if stopped == "a" else "a"
        algorithm = ("--algorithm", "streaming", "--overlap", "1") if kept == "b" else ()
        second = run.add("c", *algorithm, "--steps", "200")
        for peer in (founders[kept], second):
            finished = peer.wait_event(lambda e: e["event"] == "finished", 240)
            assert finished["rounds"] > 0
    finally:
        run.close()


@pytest.mark.timeout(300)
def test_founders_of_different_attention_heads_one_stops_in_one_line_naming_them(tmp_path):
    run = DaemonRun(tmp_path, "heads")
    try:
        founders = {"a": run.add("a", "--steps", "200"), "b": run.add("b", "--heads", "4", "--steps", "200")}
        stopped = wait_for_an_exit(founders, 120)
        assert founders[stopped].proc.returncode != 0
        errors = [line for line in (tmp_path / f"{stopped}.log").read_text().splitlines()
                  if line.startswith("loconet:")]
        mine, theirs = ("heads 2", "heads 4") if stopped == "a" else ("heads 4", "heads 2")
        assert len(errors) == 1 and DIFFERS in errors[0] and f"{mine}, the run's: {theirs}" in errors[0], errors
    finally:
        run.close()


def wait_for_an_exit(procs: dict, timeout_s: float) -> str:
    """The name of the first of procs to exit within timeout_s."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        for name, p in procs.items():
            if p.proc.poll() is not None:
                return name
        time.sleep(0.1)
    raise AssertionError(f"none of {sorted(procs)} exited in {timeout_s} s")
