"""When a harness scenario cannot finish: the errors it ends with, and the pure decisions its run loop takes to end
at once with the reason instead of waiting for its time limit."""

from __future__ import annotations

from collections.abc import Iterable, Sequence

from collectives.errors import LoconetError
from peer.harness.scenario import Event


class ScenarioTimeout(LoconetError):
    """A harness run did not finish in its time limit."""


class ScenarioStuck(LoconetError):
    """A harness run cannot finish: its pending events can never happen, or the peers still joining all wait for a
    state that nothing left in the scenario can bring back."""


# How often the harness asks the coordinator whether the running peers only wait for the run's state, and how many
# answers in a row must say so: a holder restarting or a peer about to register changes it within seconds.
STUCK_CHECK_S = 2.0
STUCK_CHECKS = 3


def untimed(pending: Sequence[Event]) -> bool:
    """Whether every pending event waits for rounds or syncs (none for a time, which comes anyway)."""
    return all(e.at.seconds is None for e in pending)


def never_due(pending: Sequence[Event], running: bool, restoring: bool) -> bool:
    """Whether the pending events can never happen: there are some, no peer runs or is about to start again, and
    none is a timed join (rounds and syncs come only from running peers; a timed join comes anyway and starts one;
    any other timed event would come to a network with nobody left in it)."""
    timed_join = any(e.action == "join" and e.at.seconds is not None for e in pending)
    return bool(pending) and not running and not restoring and not timed_join


def stuck_waiters(joining: Iterable[str], status: dict | None) -> tuple[list[str], str]:
    """The joining peers' names and the coordinator's reason when every one of them waits for the run's state and
    no live peer is registered (nobody can serve it); ([], "") otherwise."""
    names = sorted(joining)
    waiting = (status or {}).get("waiting")
    if not names or not waiting or status["summary"]["peers_alive"] > 0:
        return [], ""
    waiters = {w["name"] for w in waiting["peers"]}
    return (names, waiting["reason"]) if waiters.issuperset(names) else ([], "")

