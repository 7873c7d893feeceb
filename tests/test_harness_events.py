"""How the harness carries out stop events and their restarts, and judges peers that lived in several processes,
against stand-in peer processes (no process runs)."""

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

    def __init__(self, name: str = "peer1", events: list[dict] | None = None) -> None:
        self.name = name
        self.events = events or []
        self.signals: list[int] = []
        self.alive = True
        self.proc = self
        self.log_path = Path(f"{name}.log")

    def keep_log_as(self, path: Path) -> None:
        self.log_path = path

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
    harness.schedule.fire(parse_event("pause:peer1@0s,for=20s"), now=0.0)
    harness.schedule.fire(parse_event("stop:peer1@1s,for=2s"), now=1.0)
    assert harness.peers["peer1"].signals == [signal.SIGSTOP, signal.SIGTERM, signal.SIGCONT]


def test_a_restart_due_while_the_stopped_peer_still_runs_waits_without_holding_up_the_harness(harness):
    earlier = harness.peers["peer1"]
    fired = harness.schedule.fire(parse_event("stop:peer1@0s,for=2s"), now=0.0)
    harness.schedule.restore(fired, now=2.0)
    assert (fired.restore_at, harness.started, harness.retired) == (2.0, [], [])
    earlier.alive = False  # it checkpointed and left
    harness.schedule.restore(fired, now=2.1)
    assert (fired.restore_at, harness.started, harness.retired) == (None, ["peer1"], [earlier])


def test_a_stopped_peer_that_has_not_exited_when_its_exit_time_is_over_is_killed_and_started_again(harness):
    earlier = harness.peers["peer1"]
    fired = harness.schedule.fire(parse_event("stop:peer1@0s,for=2s"), now=0.0)
    harness.schedule.restore(fired, now=2.0 + STOP_EXIT_S - 0.1)
    assert earlier.signals == [signal.SIGTERM, signal.SIGCONT] and harness.started == []
    harness.schedule.restore(fired, now=2.0 + STOP_EXIT_S)
    assert earlier.signals == [signal.SIGTERM, signal.SIGCONT, signal.SIGKILL]
    assert (fired.restore_at, harness.started, harness.retired) == (None, ["peer1"], [earlier])


def test_each_earlier_process_of_a_restarted_peer_keeps_its_own_log(harness, tmp_path):
    first = harness.peers["peer1"]
    first.alive = False
    harness.schedule.restore(harness.schedule.fire(parse_event("stop:peer1@0s,for=1s"), now=0.0), now=1.0)
    second = harness.peers["peer1"] = StandInPeer()
    second.alive = False
    harness.schedule.restore(harness.schedule.fire(parse_event("stop:peer1@2s,for=1s"), now=2.0), now=3.0)
    assert [p.log_path for p in harness.retired] == [tmp_path / "peer1.1.log", tmp_path / "peer1.2.log"]


def test_all_events_of_a_restarted_peer_are_its_earlier_processes_then_its_current_one(harness):
    first, second = {"event": "finished", "n": 1}, {"event": "finished", "n": 2}
    harness.retired = [StandInPeer("peer1", [first]), StandInPeer("peer0", [{"event": "other"}])]
    harness.peers = {"peer1": StandInPeer("peer1", [second])}
    assert harness.all_events("peer1") == [first, second]


def test_overlapping_pauses_of_a_peer_resume_it_when_the_last_one_ends(harness):
    harness.schedule.fired = [harness.schedule.fire(parse_event("pause:peer1@0s,for=12s"), now=0.0),
                     harness.schedule.fire(parse_event("pause:peer1@5s,for=1s"), now=5.0)]
    long, short = harness.schedule.fired
    harness.schedule.restore(short, now=6.0)
    assert harness.peers["peer1"].signals == [signal.SIGSTOP, signal.SIGSTOP]
    harness.schedule.restore(long, now=12.0)
    assert harness.peers["peer1"].signals == [signal.SIGSTOP, signal.SIGSTOP, signal.SIGCONT]
    assert (long.restore_at, short.restore_at) == (None, None)


def test_a_pause_of_another_peer_does_not_hold_this_one(harness):
    harness.peers["peer0"] = StandInPeer("peer0")
    harness.schedule.fired = [harness.schedule.fire(parse_event("pause:peer0@0s,for=12s"), now=0.0),
                     harness.schedule.fire(parse_event("pause:peer1@0s,for=1s"), now=0.0)]
    harness.schedule.restore(harness.schedule.fired[1], now=1.0)
    assert harness.peers["peer1"].signals == [signal.SIGSTOP, signal.SIGCONT]


def test_an_event_aimed_at_a_peer_down_between_a_stop_and_its_restart_waits_for_the_new_process(harness):
    earlier = harness.peers["peer1"]
    fired = harness.schedule.fire(parse_event("stop:peer1@round1,for=2s"), now=0.0)
    harness.schedule.fired.append(fired)
    earlier.alive = False  # it checkpointed and left
    second_stop = parse_event("stop:peer1@round2,for=1s")
    assert not harness.schedule.due(second_stop, now=1.0, rounds=2)
    harness.schedule.restore(fired, now=2.0)
    assert harness.started == ["peer1"] and harness.schedule.due(second_stop, now=2.0, rounds=2)


def test_two_stops_of_a_peer_due_in_the_same_tick_fire_one_and_leave_the_other_for_its_new_process(harness):
    first, second = parse_event("stop:peer1@round1,for=2s"), parse_event("stop:peer1@round2,for=1s")
    harness.schedule.pending = [first, second]
    harness.schedule.fire_due(now=0.0, rounds=2)  # the run went from round 0 to 2 between two ticks
    assert [f.event for f in harness.schedule.fired] == [first] and harness.schedule.pending == [second]
    assert harness.peers["peer1"].signals == [signal.SIGTERM, signal.SIGCONT]


def test_a_peer_down_between_a_stop_and_its_restart_does_not_hold_events_aimed_at_others(harness):
    harness.schedule.fired.append(harness.schedule.fire(parse_event("stop:peer1@round1,for=2s"), now=0.0))
    assert harness.schedule.due(parse_event("kill:peer0@round2"), now=1.0, rounds=2)


def test_a_reused_workdir_starts_a_new_run_without_the_earlier_runs_checkpoints_and_coordinator_state(
    harness, tmp_path
):
    (tmp_path / "ckpt-peer0").mkdir()
    (tmp_path / "ckpt-peer0" / "ckpt-0000000190.pt").write_bytes(b"round 19 of another run")
    (tmp_path / "coordinator-state.json").write_text("{}")
    (tmp_path / "notes.txt").write_text("the user's")
    harness._forget_earlier_run()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt"]


def test_a_reused_workdir_forgets_the_earlier_runs_gates_control_files_and_logs(harness, tmp_path):
    # An open gate started its peer at once (not with the others); a control file carried its attack over.
    earlier = [
        "peer0.gate",
        "peer0.start",
        "peer4.control.json",
        "peer1.log",
        "peer1.1.log",
        "coordinator.log",
        "coordinator1.log",
        "coordinator-state.json.key",
        "coordinator-state.json.lock",
    ]
    for name in earlier:
        (tmp_path / name).write_text('{"byzantine": "signflip"}')
    (tmp_path / "peers.log").write_text("the user's")
    harness._forget_earlier_run()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["peers.log"]


@pytest.mark.parametrize("spec", ["kill:peer2@0s", "pause:peer2@0s,for=5s", "stop:peer2@0s"])
def test_an_event_aimed_at_a_joiner_before_its_join_does_nothing_and_says_so(harness, spec):
    # Its idle process waits behind its gate: a kill of it used to leave the join to come with nobody to join.
    joiner = harness.peers["peer2"] = StandInPeer("peer2")
    harness.schedule.joiners = ["peer2"]
    fired = harness.schedule.fire(parse_event(spec), now=0.0)
    assert (joiner.signals, fired.detail, fired.restore_at) == ([], "peer2 has not joined yet: nothing done", None)
