"""A run's peers run one algorithm: a joiner whose ``--algorithm`` is not the live peers' is refused at its join,
and stops with one line (docs/membership.md).

Once the run committed a round, a joiner fetches its state and refuses one of another algorithm itself; before
that, nothing else told two founders of different algorithms apart: their quorum requests refused each other
("peers disagree on the schedule") for now, and each trained alone to its last step. The rule is a pure
function with a table; the live cases run a real coordinator in this process (``support.coordinator.Live``)
with made-up peers, and the last test real ``loconet peer`` processes.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import grpc
import pytest

from peer.coordinator.rules import algorithm_refusal
from peer.coordinator.service import MAX_ALGORITHM_CHARS

sys.path.insert(0, str(Path(__file__).parent))
from support.coordinator import RUN, Live, live_coordinators
from support.procs import DaemonRun

pytestmark = pytest.mark.timeout(120)

REFUSED = "the run's live peers run"


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


@pytest.fixture
def coordinator() -> Iterator[Callable[..., Live]]:
    with live_coordinators(
        {"run_id": RUN, "port": 0, "dashboard_port": None, "startup_grace_s": 0.0, "min_peers": 1,
         "join_timeout_s": 0.5, "heartbeat_s": 0.5, "lease_s": 30.0}
    ) as start:
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


def test_an_algorithm_name_beyond_its_limit_is_refused_at_the_edge(coordinator):
    c = coordinator()
    error = refused_join(c, "127.0.0.1:1", algorithm="x" * (MAX_ALGORITHM_CHARS + 1))
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


def wait_for_an_exit(procs: dict, timeout_s: float) -> str:
    """The name of the first of procs to exit within timeout_s."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        for name, p in procs.items():
            if p.proc.poll() is not None:
                return name
        time.sleep(0.1)
    raise AssertionError(f"none of {sorted(procs)} exited in {timeout_s} s")
