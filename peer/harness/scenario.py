"""Fault-injection scenarios: what to break, when, and for how long (parsed, validated, plain data).

An event is written ``ACTION[:TARGET]@WHEN[,for=DURATION][,x=FACTOR]``:

- ``kill:peer2@round3``          SIGKILL peer2 once 3 rounds have committed
- ``pause:peer1@10s,for=8s``     SIGSTOP peer1 10 s after the start, SIGCONT 8 s later
- ``join@round5``                start one more peer (a late joiner)
- ``restart-coordinator@20s``    kill the coordinator and start it again on the same address
- ``straggle:peer3@round2,x=3``  make peer3 train 3 times slower (for the rest of the run, or ``for=``)
- ``cut:peer0@round4,for=10s``   take peer0's network link down for 10 s (needs ``--netns``)
- ``diverge:peer1@round2``       make peer1's local training blow up (its parameters become NaN)

``WHEN`` is ``roundN`` (after N committed rounds), ``syncN`` (when the
target peer starts its N-th sync: the kill lands inside a round) or ``Ns``
(seconds after the start). A TOML scenario file holds the same as a list of tables::

    [[event]]
    action = "pause"
    target = "peer1"
    at = "round2"
    for = "8s"
"""

from __future__ import annotations

import re
import tomllib
from dataclasses import dataclass
from pathlib import Path

from collectives.errors import ConfigError

ACTIONS = ("kill", "pause", "join", "restart-coordinator", "straggle", "cut", "diverge")
_TARGETED = ("kill", "pause", "straggle", "cut", "diverge")
_EVENT = re.compile(r"^(?P<action>[a-z-]+)(?::(?P<target>[\w.-]+))?@(?P<when>[^,]+)(?P<opts>(?:,[a-z]+=[^,]+)*)$")


@dataclass(frozen=True)
class When:
    """A trigger: after `rounds` committed rounds, or `seconds` after the start."""

    rounds: int | None = None
    seconds: float | None = None
    # The target peer's N-th sync has started.
    sync: int | None = None

    def __str__(self) -> str:
        if self.rounds is not None:
            return f"round{self.rounds}"
        if self.sync is not None:
            return f"sync{self.sync}"
        return f"{self.seconds:g}s"


@dataclass(frozen=True)
class Event:
    """One thing the harness does to the run."""

    action: str
    at: When
    target: str | None = None
    duration_s: float | None = None
    factor: float | None = None

    def __str__(self) -> str:
        text = f"{self.action}{':' + self.target if self.target else ''}@{self.at}"
        if self.duration_s is not None:
            text += f",for={self.duration_s:g}s"
        if self.factor is not None:
            text += f",x={self.factor:g}"
        return text


def _seconds(text: str, what: str) -> float:
    m = re.fullmatch(r"(\d+(?:\.\d+)?)\s*(ms|s|m)?", text.strip())
    if not m:
        raise ConfigError(f"{what}: cannot read a duration from {text!r}; write e.g. 8s, 500ms or 2m")
    value = float(m.group(1))
    return value / 1000 if m.group(2) == "ms" else value * 60 if m.group(2) == "m" else value


def _when(text: str) -> When:
    text = text.strip()
    for word in ("round", "sync"):
        if text.startswith(word):
            digits = text[len(word):]
            if not digits.isdigit():
                raise ConfigError(f"cannot read {text!r}: write {word}N, e.g. {word}3")
            return When(rounds=int(digits)) if word == "round" else When(sync=int(digits))
    return When(seconds=_seconds(text, "event time"))


def make_event(action: str, at: str, target: str | None = None, duration: str | None = None, factor: float | None = None) -> Event:
    """A validated event (ConfigError with what to write instead)."""
    if action not in ACTIONS:
        raise ConfigError(f"unknown event action {action!r}; choose one of {', '.join(ACTIONS)}")
    if action in _TARGETED and not target:
        raise ConfigError(f"{action} needs a target peer, e.g. {action}:peer1@round2")
    if action not in _TARGETED and target:
        raise ConfigError(f"{action} takes no target peer")
    when = _when(at)
    if when.sync is not None and not target:
        raise ConfigError(f"{action}@{at}: syncN needs a target peer, whose N-th sync triggers the event")
    if action == "pause" and duration is None:
        raise ConfigError("pause needs a duration, e.g. pause:peer1@round2,for=8s")
    if action == "straggle" and (factor is None or factor <= 1):
        raise ConfigError("straggle needs a slowdown factor above 1, e.g. straggle:peer1@10s,x=3")
    return Event(
        action=action,
        at=when,
        target=target,
        duration_s=None if duration is None else _seconds(duration, f"{action} duration"),
        factor=factor,
    )


def parse_event(text: str) -> Event:
    """Parse ``ACTION[:TARGET]@WHEN[,for=D][,x=F]``."""
    m = _EVENT.match(text.strip())
    if not m:
        raise ConfigError(f"cannot read event {text!r}; write ACTION[:PEER]@WHEN[,for=DURATION][,x=FACTOR], e.g. kill:peer2@round3")
    opts = dict(kv.split("=", 1) for kv in m.group("opts").split(",") if kv)
    unknown = set(opts) - {"for", "x"}
    if unknown:
        raise ConfigError(f"event {text!r}: unknown option(s) {', '.join(sorted(unknown))}; use for= and x=")
    try:
        factor = float(opts["x"]) if "x" in opts else None
    except ValueError:
        raise ConfigError(f"event {text!r}: x= needs a number") from None
    return make_event(m.group("action"), m.group("when"), m.group("target"), opts.get("for"), factor)


def load_scenario(path: str | Path) -> list[Event]:
    """Events of a TOML scenario file."""
    try:
        data = tomllib.loads(Path(path).read_text())
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise ConfigError(f"cannot read scenario {path}: {exc}") from None
    events = []
    for i, table in enumerate(data.get("event", [])):
        if "action" not in table or "at" not in table:
            raise ConfigError(f"scenario {path}: event {i + 1} needs 'action' and 'at'")
        factor = table.get("factor")
        events.append(make_event(table["action"], str(table["at"]), table.get("target"), table.get("for"), factor))
    return events
