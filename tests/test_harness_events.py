"""How the harness carries out stop events and their restarts, against stand-in peer processes (no process runs)."""

from __future__ import annotations

import signal
import subprocess
import sys
from pathlib import Path

import pytest

from peer.harness.harness import STOP_EXIT_S, Harness, HarnessConfig
from peer.harness.scenario import parse_event

sys.path.insert(0, str(Path(__file__).parent))
from support.scenarios import SMALL

pytestmark = pytest.mark.timeout(60)


class StandInPeer:
    """What the harness uses of a peer's Proc: signals are recorded; it exits only when told to, or on SIGKILL."""

    def __init__(self) -> None:
        self.signals: list[int] = []
        self.alive = True
        self.proc = self

    def signal(self, sig: int) -> None:
        self.signals.append(sig)
        if sig == signal.SIGKILL:
            self.alive = False

    def wait(self, timeout: float | None = None) -> int:
        if self.alive:
            raise subprocess.TimeoutExpired("stand-in", timeout)
        return -signal.SIGKILL


@pytest.fixture
def harness(tmp_path):
    """A harness whose peer1 is a stand-in and which records the peers it would start."""
    h = Harness(HarnessConfig(peers=2, task_config=SMALL, workdir=str(tmp_path)))
    h.peers["peer1"] = StandInPeer()
    h.started = []
    h._start_peer = lambda name, gate=None: h.started.append(name)
    return h


def test_a_stop_event_sends_sigterm_then_sigcont_so_a_paused_peer_handles_it(harness):
    harness._fire(parse_event("pause:peer1@0s,for=20s"), now=0.0)
    harness._fire(parse_event("stop:peer1@1s,for=2s"), now=1.0)
    assert harness.peers["peer1"].signals == [signal.SIGSTOP, signal.SIGTERM, signal.SIGCONT]


def test_a_restart_due_while_the_stopped_peer_still_runs_waits_without_holding_up_the_harness(harness):
    earlier = harness.peers["peer1"]
    fired = harness._fire(parse_event("stop:peer1@0s,for=2s"), now=0.0)
    harness._restore(fired, now=2.0)
    assert (fired.restore_at, harness.started, harness.retired) == (2.0, [], [])
    earlier.alive = False  # it checkpointed and left
    harness._restore(fired, now=2.1)
    assert (fired.restore_at, harness.started, harness.retired) == (None, ["peer1"], [earlier])


def test_a_stopped_peer_that_has_not_exited_when_its_exit_time_is_over_is_killed_and_started_again(harness):
    earlier = harness.peers["peer1"]
    fired = harness._fire(parse_event("stop:peer1@0s,for=2s"), now=0.0)
    harness._restore(fired, now=2.0 + STOP_EXIT_S - 0.1)
    assert earlier.signals == [signal.SIGTERM, signal.SIGCONT] and harness.started == []
    harness._restore(fired, now=2.0 + STOP_EXIT_S)
    assert earlier.signals == [signal.SIGTERM, signal.SIGCONT, signal.SIGKILL]
    assert (fired.restore_at, harness.started, harness.retired) == (None, ["peer1"], [earlier])
