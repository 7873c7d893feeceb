"""A harness scenario's schedule: its pending fault events, when each is due, firing it on the running network and
undoing it when its duration is over (``Schedule``, which the ``Harness`` owns), and the record of each fired one.

The schedule decides and signals; starting processes again (a stopped peer, a restarted coordinator) is the
harness's, which it reaches through ``Stage``.
"""

from __future__ import annotations

import logging
import signal
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from peer.harness.config import HarnessConfig
from peer.harness.control import write_control
from peer.harness.processes import Proc
from peer.harness.scenario import Event
from peer.harness.stall import Stall, StallPlan, StallRecord, serving_address

# How long a stopped peer may take to checkpoint and leave after its restart is due, before it is killed.
STOP_EXIT_S = 30.0

log = logging.getLogger(__name__)


@dataclass
class Fired:
    """An event the harness carried out."""

    event: Event
    time_s: float
    wall: float
    detail: str = ""
    recovery_s: float | None = None
    lost_s: float | None = None
    # For an event that takes its target out for a while (recovery.COMES_BACK): when it contributed again.
    back_s: float | None = None
    restore_at: float | None = None


class Stage(Protocol):
    """What the schedule acts on: the harness's running network (``peer.harness.harness.Harness``)."""

    config: HarnessConfig
    workdir: Path
    peers: dict[str, Proc]
    network: Any

    def restart_peer(self, name: str) -> None:
        """Start peer name again with its checkpoint, its exited process retired."""

    def restart_coordinator(self) -> None:
        """Kill the coordinator and start a new one where it served."""


class Schedule:
    """The scenario's events: pending, fired, and what firing them changed that must be undone or told to peers."""

    def __init__(self, stage: Stage, events: tuple[Event, ...]) -> None:
        self.stage = stage
        self.pending = list(events)
        self.fired: list[Fired] = []
        # The scenario's time zero (monotonic): timed events count from it. start() sets it.
        self.started_at = 0.0
        # The joiners whose processes still wait behind their gates, in the order their join events open them.
        self.joiners: list[str] = []
        # The stuck callers of stall events (each stops itself at its for= end; stop_stalls() stops the rest).
        self.stalls: list[StallRecord] = []
        # What each peer's control file asks of it: {"slowdown": x, "diverge": n, "byzantine": attack or None,
        # "straggle": pattern or None, "worker": its number, "n": peers in the run}.
        self._control: dict[str, dict[str, float | str | None]] = {}
        # The straggle event whose pattern the network follows now.
        self._pattern: Event | None = None

    @property
    def restoring(self) -> bool:
        """Whether a fired event's undo is still to come (a paused peer resumes, a stopped one starts again...)."""
        return any(f.restore_at is not None for f in self.fired)

    def start(self, now: float) -> None:
        """Start the scenario's clock at now, and fire the byzantine events from the start (at 0 s): a peer finds
        its attack in its control file before its first step."""
        self.started_at = now
        for event in [e for e in self.pending if e.action == "byzantine" and e.at.seconds == 0]:
            self.pending.remove(event)
            self.fired.append(self.fire(event, now))

    def tick(self, now: float, rounds: int) -> None:
        """Fire the events due with rounds committed so far, then undo those whose duration is over."""
        self.fire_due(now, rounds)
        for f in self.fired:
            if f.restore_at is not None and now >= f.restore_at:
                self.restore(f, now)

    def due(self, event: Event, now: float, rounds: int) -> bool:
        """Whether a pending event is due now, with rounds committed so far."""
        if event.target and self._between_lives(event.target):
            # Aimed at a peer a stop took down and will start again: it waits for that next process, rather
            # than signal one that has exited (and a stop's restart then kill the new one, never told to stop).
            return False
        if event.at.rounds is not None:
            return rounds >= event.at.rounds
        if event.at.sync is not None:
            target = self.stage.peers.get(event.target)
            starts = sum(e["event"] == "sync-start" for e in target.events) if target else 0
            return starts >= event.at.sync
        return now - self.started_at >= (event.at.seconds or 0)

    def fire_due(self, now: float, rounds: int) -> None:
        """Fire the pending events that are due, in order.

        Each is judged after the ones before it have fired: a stop fired in this tick holds the events aimed at
        the same peer until its new process starts (two stops due at once would otherwise both signal the old one,
        and the second's restart would then kill the new process, which nobody told to stop)."""
        for event in list(self.pending):
            if self.due(event, now, rounds):
                self.pending.remove(event)
                self.fired.append(self.fire(event, now))

    def fire(self, event: Event, now: float) -> Fired:
        """Carry an event out on the network; returns its record (not yet added to ``fired``)."""
        stage = self.stage
        fired = Fired(event, now - self.started_at, time.time())
        target = stage.peers.get(event.target) if event.target else None
        if event.target and target is None:
            fired.detail = f"no peer called {event.target}"
            return fired
        if event.target in self.joiners:
            # Its process waits behind its gate, idle: killing or pausing it now would undo its join to come.
            fired.detail = f"{event.target} has not joined yet: nothing done"
            log.info("fired %s at %.1f s: %s", event, fired.time_s, fired.detail)
            return fired
        if event.action == "kill":
            target.signal(signal.SIGKILL)
        elif event.action == "stop":
            target.signal(signal.SIGTERM)
            # As systemd stops a service: a peer that a pause event holds would not see the SIGTERM until it
            # resumes, and its restart would wait for it (the pause's own SIGCONT then finds it running).
            target.signal(signal.SIGCONT)
            if event.duration_s is not None:
                fired.restore_at = now + event.duration_s
                fired.detail = f"{event.target} stops; it starts again with its checkpoint in {event.duration_s:g} s"
            else:
                fired.detail = f"{event.target} stops"
        elif event.action == "pause":
            target.signal(signal.SIGSTOP)
            fired.restore_at = now + (event.duration_s or 0)
        elif event.action == "join":
            # The joiner's process was started (idle) at the beginning, so that joining is not
            # delayed by Python's start-up; opening its gate makes it join now. It counts the
            # run's steps from the state it fetches, so it ends with the others.
            name = self.joiners.pop(0)
            (stage.workdir / f"{name}.gate").touch()
            fired.detail = f"{name} joins"
            if self._pattern is not None:
                self._spread_pattern()  # the joiner is one more worker of the pattern
        elif event.action == "restart-coordinator":
            stage.restart_coordinator()
        elif event.action == "straggle" and event.pattern is not None:
            self._pattern = event
            names = self._spread_pattern()
            fired.detail = f"{event.pattern.describe()}, over {len(names)} peers"
            if event.duration_s:
                fired.restore_at = now + event.duration_s
        elif event.action == "straggle":
            self._write_control(event.target, slowdown=event.factor or 1.0)
            if event.duration_s:
                fired.restore_at = now + event.duration_s
        elif event.action == "diverge":
            self._write_control(event.target, diverge=self._control.get(event.target, {}).get("diverge", 0) + 1)
        elif event.action == "cut":
            stage.network.cut(event.target)
            fired.restore_at = now + (event.duration_s or 0)
        elif event.action == "byzantine":
            self._write_control(event.target, byzantine=str(event.attack))
            fired.detail = f"{event.target} sends {event.attack.describe()}"
            if event.duration_s:
                fired.restore_at = now + event.duration_s
        elif event.action == "stall":
            plan = StallPlan(stage.config.run_id, event.streams, event.fetches, duration_s=event.duration_s)
            stall = Stall(plan, lambda events=target.events: serving_address(events))
            stall.start()
            self.stalls.append(StallRecord(str(event), event.target, fired.wall, stall))
            fired.detail = f"{event.streams} idle streams and {event.fetches} unread fetches against {event.target}"
        log.info("fired %s at %.1f s %s", event, fired.time_s, fired.detail)
        return fired

    def _between_lives(self, name: str) -> bool:
        """Whether a stop event took peer name down and its restart is still to come."""
        return any(f.restore_at is not None and f.event.action == "stop" and f.event.target == name
                   for f in self.fired)

    def _held_by_another(self, fired: Fired) -> bool:
        """Whether another fired event of the same kind still holds the same peer (its undo is not done yet)."""
        e = fired.event
        return any(f is not fired and f.restore_at is not None and f.event.action == e.action
                   and f.event.target == e.target for f in self.fired)

    def restore(self, fired: Fired, now: float) -> None:
        """Undo a fired event whose duration is over (restart a stopped peer); an undo that must wait for a
        process leaves ``fired.restore_at`` set, and the loop calls again on its next tick."""
        e = fired.event
        if e.action in ("pause", "cut") and self._held_by_another(fired):
            pass  # an overlapping pause (or cut) of the same peer lasts longer: it resumes the peer when it ends
        elif e.action == "pause":
            self.stage.peers[e.target].signal(signal.SIGCONT)
        elif e.action == "stop":
            earlier = self.stage.peers[e.target]
            if earlier.alive:
                assert fired.restore_at is not None
                if now < fired.restore_at + STOP_EXIT_S:
                    return  # still checkpointing and leaving: the loop goes on meanwhile (other events fire)
                log.warning("%s did not exit within %g s of its stop; killing it to start it again",
                            e.target, STOP_EXIT_S)
                earlier.signal(signal.SIGKILL)
                earlier.proc.wait(timeout=10)
            self.stage.restart_peer(e.target)
        elif e.action == "straggle" and e.pattern is not None:
            if self._pattern is e:  # not one that a later pattern replaced
                self._pattern = None
                self._spread_pattern()
        elif e.action == "straggle":
            self._write_control(e.target, slowdown=1.0)
        elif e.action == "cut":
            self.stage.network.restore(e.target)
        elif e.action == "byzantine":
            self._write_control(e.target, byzantine=None)
        fired.restore_at = None

    def stop_stalls(self) -> None:
        """Stop the stuck callers still running; idempotent."""
        for record in self.stalls:
            record.stall.stop()

    def _spread_pattern(self) -> list[str]:
        """Tell every peer in the run the straggler pattern it now follows (or none) and its worker number in it:
        peerI is worker I of the n peers started at the beginning or joined so far. Returns their names."""
        config = self.stage.config
        joined = config.joins - len(self.joiners)
        names = [f"peer{i}" for i in range(config.peers + joined)]
        pattern = self._pattern.pattern if self._pattern is not None else None
        text = None if pattern is None or pattern.kind == "none" else pattern.spec
        for worker, name in enumerate(names):
            self._write_control(name, straggle=text, worker=worker, n=len(names))
        return names

    def _write_control(self, name: str, **changes: float | str | None) -> None:
        """Update what the peer's control file asks of it (see peer.harness.control.Control)."""
        control = self._control.setdefault(name, {})
        control.update(changes)
        write_control(self.stage.workdir / f"{name}.control.json", control)
