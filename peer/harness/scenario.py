"""Fault-injection scenarios: what to break, when, and for how long (parsed, validated, plain data).

An event is written ``ACTION[:TARGET]@WHEN[,for=DURATION][,x=FACTOR]``:

- ``kill:peer2@round3``          SIGKILL peer2 once 3 rounds have committed
- ``stop:peer0@round3,for=5s``   stop peer0 (SIGTERM: it checkpoints and leaves the run) once 3 rounds have
  committed; with ``for=``, start it again that much later with its checkpoint directory (once the stopped
  process has exited; a paused peer is resumed to see the SIGTERM, as systemd stops a service). An event aimed
  at a peer while it is down between the two waits for its new process
- ``pause:peer1@10s,for=8s``     SIGSTOP peer1 10 s after the start, SIGCONT 8 s later
- ``join@round5``                start one more peer (a late joiner)
- ``restart-coordinator@20s``    kill the coordinator and start it again on the same address
- ``straggle:peer3@round2,x=3``  make peer3 train 3 times slower (for the rest of the run, or ``for=``)
- ``straggle:random@0s,x=4``     from then on, at each step one random peer trains 4 times slower
- ``straggle:bursty@0s,B=1,W=2,lambda=1,x=4``  bursty stragglers of the (B, W, lambda) model, 4 times slower
- ``cut:peer0@round4,for=10s``   take peer0's network link down for 10 s (needs ``--netns`` and ``for=``)
- ``diverge:peer1@round2``       make peer1's local training blow up (its parameters become NaN)
- ``byzantine:peer2@round3,attack=signflip``  make peer2 send -10 times its honest update from then on
- ``stall:peer1@round1``         hold 300 idle PushPart streams and 10 unread state fetches against peer1

``WHEN`` is ``roundN`` (after N committed rounds), ``syncN`` (when the
target peer starts its N-th sync: the kill lands inside a round) or ``Ns``
(seconds after the start). An option an action does nothing with is refused (``kill:peer1@round2,for=5s``
would read as a restart: that is ``stop:peer1@round2,for=5s``). A TOML scenario file holds the same as a list of
tables; its numbers are TOML numbers or the event's text (``for = 8`` is ``for = "8s"``, ``factor = "3"`` is
``factor = 3``)::

    [[event]]
    action = "pause"
    target = "peer1"
    at = "round2"
    for = "8s"

Straggler patterns. ``straggle:PATTERN@WHEN,OPTIONS[,for=DURATION]`` slows the whole network down by a
seeded, reproducible pattern (``peer/stragglers.py`` has the definitions) from WHEN on, for the rest of the
run or for DURATION. Peer ``peerI`` is worker I of the n peers in the run (those started and those that
joined); the step that counts is the run's step (a joiner's count continues the run's). PATTERN is:

- ``random,x=X[,seed=N]``        at each step one peer, drawn uniformly (seeded by N and the step), is X
  times slower: ``straggle:random@0s,x=4``
- ``bursty,B=B,W=W,lambda=L,x=X[,p=P][,seed=N]``  in every W consecutive steps at most L distinct peers
  straggle, each within a burst of at most B steps (Krishnan et al., ICLR 2023); P is the probability that
  a peer starts a burst at a step (default L/(n*W)): ``straggle:bursty@0s,B=1,W=2,lambda=1,x=4``
- ``persistent,worker=I,x=X``    peer I is X times slower at every step (as ``straggle:peerI@WHEN,x=X``)
- ``none``                       nobody is slowed: ``straggle:none@round20`` ends a pattern

A later pattern replaces an earlier one; a slowed peer that is also in a ``straggle:peerI`` event is slowed
by the product of both factors. A step X times slower takes X times its forward and backward pass.
In a TOML file: ``target`` is the pattern's kind, ``factor`` its x, and its other options are keys::

    [[event]]
    action = "straggle"
    target = "bursty"
    at = "0s"
    factor = 4
    B = 1
    W = 2
    lambda = 1

Byzantine peers. ``byzantine:PEER@WHEN,attack=ATTACK[,k=K][,s=S][,seed=N][,for=DURATION]`` makes the
peer corrupt every contribution it sends from WHEN on (``@0s``: from the start) for the rest of the run,
or for DURATION. What it sends stays finite, so the NaN checks do not catch it; its events say so
(``byzantine-started``, one ``byzantine-sent`` per corrupted contribution, ``byzantine-stopped``). ATTACK is
(``peer/attacks.py`` has the math):

- ``attack=signflip``            -K times its honest update (``k=``, default 10): ``attack=signflip,k=5``
- ``attack=scale=K``             K times its honest update (also ``attack=scale,k=K``)
- ``attack=noise=S``             Gaussian noise of std S per coordinate instead of its update
  (also ``attack=noise,s=S``; ``seed=N`` picks the noise, default 0)
- ``attack=zero``                a zero update
- ``attack=labelflip``           it trains on labels y -> C-1-y (classification tasks only)

In a TOML file: ``action = "byzantine"``, ``attack = "signflip"`` and, as separate keys or inside the
attack's text, ``k``, ``s`` and ``seed``::

    [[event]]
    action = "byzantine"
    target = "peer2"
    at = "0s"
    attack = "signflip"
    k = 5

Stuck callers. ``stall:PEER@WHEN[,streams=N][,fetches=M][,for=DURATION]`` makes the harness itself play callers
that open calls to the peer's data plane and then do nothing (``peer/harness/stall.py``): N PushPart streams
(default 300; half send nothing, half one header of a round that never opens, and none ever ends its side)
and M whole-state fetches (default 10) that read their first message and nothing after, spread over 10
connections. Each call the peer ends is opened again, at most once a second per call, so the pressure
stays on for the rest of the run, or for DURATION. The harness report has, per stall event, the calls
opened and re-opened, the peer's refusals by status code, the fetches it cut off, and what the run did
meanwhile. ``streams=0`` or ``fetches=0`` leaves that kind out. In a TOML file::

    [[event]]
    action = "stall"
    target = "peer1"
    at = "round1"
    streams = 300
    fetches = 10
"""

from __future__ import annotations

import math
import re
import tomllib
from dataclasses import dataclass
from pathlib import Path

from collectives.errors import ConfigError
from peer.attacks import Attack, parse_attack
from peer.stragglers import FORMS, StragglerPattern, parse_pattern
from peer.stragglers import KINDS as PATTERN_KINDS

ACTIONS = ("kill", "stop", "pause", "join", "restart-coordinator", "straggle", "cut", "diverge", "byzantine", "stall")
_TARGETED = ("kill", "stop", "pause", "straggle", "cut", "diverge", "byzantine", "stall")
# Options of an event's text, those that belong to a byzantine event's attack, and those of a straggler pattern
# (besides x, and seed, which attacks share).
_PATTERN_OPTIONS = ("B", "W", "lambda", "p", "worker")
# A stall event's options: how many idle streams and unread fetches it holds (and their defaults).
_STALL_OPTIONS = ("streams", "fetches")
STALL_DEFAULTS = {"streams": 300, "fetches": 10}
_OPTIONS = ("for", "x", "attack", "k", "s", "seed", *_PATTERN_OPTIONS, *_STALL_OPTIONS)
_ATTACK_OPTIONS = ("k", "s", "seed")
# The keys of a TOML scenario's [[event]] table.
_TABLE_KEYS = (
    "action", "target", "at", "for", "factor", "attack", "k", "s", "seed", *_PATTERN_OPTIONS, *_STALL_OPTIONS
)
# The TOML types each key takes, what to call them, and an example. Numbers may also be written as the text of the
# --event form (factor = "3" as x=3, k = "5", for = "8s"): a scenario file holds the same events as --event, and
# the text is checked as --event's is. A bare number of at or for is seconds, as ``@8`` and ``for=8`` are.
_TEXT, _NUMBER, _WHOLE = (str,), (str, int, float), (str, int)
_KEY_TYPES = {  # key: (the types it takes, what to call them, an example)
    "action": (_TEXT, "a string", '"pause"'),
    "target": (_TEXT, "a string", '"peer1"'),
    "at": (_NUMBER, 'a time ("round2", "sync3", "10s") or a number of seconds', '"round2"'),
    "for": (_NUMBER, 'a duration ("8s", "500ms", "2m") or a number of seconds', '"8s"'),
    "factor": (_NUMBER, "a number", "3"),
    "attack": (_TEXT, "a string", '"signflip"'),
    "k": (_NUMBER, "a number", "5"),
    "s": (_NUMBER, "a number", "0.5"),
    "seed": (_WHOLE, "a whole number", "1"),
    "B": (_WHOLE, "a whole number", "1"),
    "W": (_WHOLE, "a whole number", "2"),
    "lambda": (_WHOLE, "a whole number", "1"),
    "p": (_NUMBER, "a number", "0.2"),
    "worker": (_WHOLE, "a whole number", "1"),
    "streams": (_WHOLE, "a whole number", str(STALL_DEFAULTS["streams"])),
    "fetches": (_WHOLE, "a whole number", str(STALL_DEFAULTS["fetches"])),
}
# The only top-level key of a scenario file.
_TOP_KEYS = ("event",)
# What each action takes of the options any event's text may carry (for=, x=); the options of one action only
# (attack=, streams=, B=...) are refused on the others with their own messages. An option an action does nothing
# with is refused rather than dropped: kill:peer1@round2,for=5s reads as a restart that would never happen.
_TAKES = {
    "kill": (),
    "stop": ("for",),
    "pause": ("for",),
    "join": (),
    "restart-coordinator": (),
    "straggle": ("for", "x"),
    "cut": ("for",),
    "diverge": (),
    "byzantine": ("for",),
    "stall": ("for",),
}
# Without a duration these would end as soon as they fire (SIGCONT, link up at once).
_NEEDS_FOR = ("pause", "cut")
_FORMS = {
    "kill": "kill:PEER@WHEN",
    "stop": "stop:PEER@WHEN[,for=DURATION]",
    "pause": "pause:PEER@WHEN,for=DURATION",
    "join": "join@WHEN",
    "restart-coordinator": "restart-coordinator@WHEN",
    "straggle": "straggle:PEER@WHEN,x=FACTOR[,for=DURATION]",
    "cut": "cut:PEER@WHEN,for=DURATION",
    "diverge": "diverge:PEER@WHEN",
    "byzantine": "byzantine:PEER@WHEN,attack=ATTACK[,k=K][,s=S][,seed=N][,for=DURATION]",
    "stall": "stall:PEER@WHEN[,streams=N][,fetches=M][,for=DURATION]",
}
# The largest slowdown: a step's sleep is its compute time times x, and far beyond this the peer never finishes a
# step (use stop or pause for that) and a sleep of inf, or of a huge x, overflows in the peer (peer/harness/control.py).
MAX_FACTOR = 1000.0
_TARGET = re.compile(r"[\w.-]+")
_EVENT = re.compile(r"^(?P<action>[a-z-]+)(?::(?P<target>[\w.-]+))?@(?P<when>[^,]+)(?P<opts>(?:,[A-Za-z]+=[^,]+)*)$")


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
    # What a byzantine peer does (peer.attacks).
    attack: Attack | None = None
    # A straggle event's pattern over the whole network (peer.stragglers); None when it slows one target peer.
    pattern: StragglerPattern | None = None
    # A stall event's idle PushPart streams and unread state fetches (None for other events).
    streams: int | None = None
    fetches: int | None = None

    def __str__(self) -> str:
        if self.pattern is not None:
            kind, _, options = self.pattern.spec.partition(",")
            text = f"{self.action}:{kind}@{self.at}" + (f",{options}" if options else "")
        else:
            text = f"{self.action}{':' + self.target if self.target else ''}@{self.at}"
        if self.attack is not None:
            text += f",attack={self.attack}"
        if self.streams is not None:
            text += f",streams={self.streams},fetches={self.fetches}"
        if self.duration_s is not None:
            text += f",for={self.duration_s:g}s"
        if self.factor is not None:
            text += f",x={self.factor:g}"
        return text


def _seconds(text: str | float, what: str) -> float:
    """Seconds from a duration's text (8s, 500ms, 2m, 8) or a number of seconds (finite, 0 or more)."""
    if isinstance(text, (int, float)) and not isinstance(text, bool):
        if not (math.isfinite(text) and text >= 0):
            raise ConfigError(f"{what}: {text!r} is no duration; give seconds 0 or more, or write e.g. 8s, 500ms or 2m")
        return float(text)
    if not isinstance(text, str):
        raise ConfigError(f"{what}: cannot read a duration from {text!r}; write e.g. 8s, 500ms or 2m")
    m = re.fullmatch(r"(\d+(?:\.\d+)?)\s*(ms|s|m)?", text.strip())
    if not m:
        raise ConfigError(f"{what}: cannot read a duration from {text!r}; write e.g. 8s, 500ms or 2m")
    value = float(m.group(1))
    return value / 1000 if m.group(2) == "ms" else value * 60 if m.group(2) == "m" else value


def _when(text: str | float) -> When:
    if not isinstance(text, str):
        return When(seconds=_seconds(text, "event time"))
    text = text.strip()
    for word in ("round", "sync"):
        if text.startswith(word):
            digits = text[len(word):]
            if not digits.isdigit():
                raise ConfigError(f"cannot read {text!r}: write {word}N, e.g. {word}3")
            return When(rounds=int(digits)) if word == "round" else When(sync=int(digits))
    return When(seconds=_seconds(text, "event time"))


def make_event(
    action: str,
    at: str | float,
    target: str | None = None,
    duration: str | float | None = None,
    factor: float | None = None,
    attack: str | None = None,
    pattern: str | None = None,
    streams: int | str | None = None,
    fetches: int | str | None = None,
) -> Event:
    """A validated event (ConfigError with what to write instead); ``attack`` is a byzantine event's attack text,
    ``pattern`` a straggle event's pattern text (``peer.stragglers``; it slows the whole network: no target),
    ``streams`` and ``fetches`` a stall event's counts (defaults STALL_DEFAULTS); ``at`` and ``duration`` may be
    numbers of seconds."""
    if action not in ACTIONS:
        raise ConfigError(f"unknown event action {action!r}; choose one of {', '.join(ACTIONS)}")
    if target is not None and not (isinstance(target, str) and _TARGET.fullmatch(target)):
        # Names only: the report writes the event back as text (Event.__str__), after the whole run.
        raise ConfigError(f"{action}: the target must be a peer's name such as \"peer1\", got {target!r}")
    if pattern is not None and action != "straggle":
        raise ConfigError(f"{action} takes no straggler pattern (only straggle does)")
    if pattern is not None and (target or factor is not None):
        raise ConfigError(
            "a straggle event slows a target peer by x= (straggle:peer1@10s,x=3) or the network by a pattern "
            "that has its own x= (straggle:random@0s,x=4), not both"
        )
    if action in _TARGETED and not target and pattern is None:
        raise ConfigError(f"{action} needs a target peer, e.g. {action}:peer1@round2")
    if action not in _TARGETED and target:
        raise ConfigError(f"{action} takes no target")
    _refuse_unused(action, {"for": duration, "x": factor}, {"for": "for=", "x": "x="})
    when = _when(at)
    if when.sync is not None and not target:
        raise ConfigError(f"{action}@{at}: syncN needs a target peer, whose N-th sync triggers the event")
    if action in _NEEDS_FOR and duration is None:
        raise ConfigError(f"{action} needs a duration, e.g. {action}:peer1@round2,for=8s")
    if factor is not None and (isinstance(factor, bool) or not isinstance(factor, (int, float))):
        raise ConfigError(f"{action}: x= needs a number, e.g. x=3; got {factor!r}")
    if action == "straggle" and pattern is None and (factor is None or factor <= 1):
        raise ConfigError(
            "straggle needs a slowdown factor above 1, e.g. straggle:peer1@10s,x=3 (or a pattern over every peer, "
            "e.g. straggle:random@0s,x=4)"
        )
    if factor is not None and not factor <= MAX_FACTOR:  # also nan, which no comparison holds for
        raise ConfigError(f"{action}: x= must be a finite number at most {MAX_FACTOR:g}, got {factor}")
    if action == "byzantine" and not attack:
        raise ConfigError(
            "byzantine needs an attack, e.g. byzantine:peer1@round2,attack=signflip "
            "(or scale=K, noise=S, zero, labelflip)"
        )
    if action != "byzantine" and attack:
        raise ConfigError(f"{action} takes no attack (only byzantine does)")
    load = _stall_load(action, streams, fetches)
    return Event(
        action=action,
        at=when,
        target=target,
        duration_s=None if duration is None else _seconds(duration, f"{action} duration"),
        factor=factor,
        attack=parse_attack(attack) if attack else None,
        pattern=parse_pattern(pattern) if pattern is not None else None,
        **load,
    )


def _count(value: int | str, name: str) -> int:
    """A stall count given as a whole number 0 or more (ConfigError otherwise)."""
    if isinstance(value, int) and not isinstance(value, bool):
        number = value
    elif isinstance(value, str) and value.strip().isdigit():
        number = int(value)
    else:
        number = -1
    if number < 0:
        raise ConfigError(f"stall: {name}= needs a whole number, 0 or more, e.g. {name}={STALL_DEFAULTS[name]}")
    return number


def _refuse_unused(action: str, given: dict[str, object], spelled: dict[str, str], where: str = "") -> None:
    """Refuse for= and x= (``given``, None when absent) on an action that does nothing with them, naming each as
    ``spelled`` (the text form's for=, a scenario file's factor)."""
    unused = [spelled[name] for name, value in given.items() if value is not None and name not in _TAKES[action]]
    if not unused:
        return
    hint = ""
    if action == "kill" and given.get("for") is not None:
        hint = "; to start the peer again later, stop it instead: stop:PEER@WHEN,for=DURATION"
    raise ConfigError(f"{where}{action} takes no {', '.join(unused)}; write {_FORMS[action]}{hint}")


def _stall_load(action: str, streams: int | str | None, fetches: int | str | None) -> dict:
    """A stall event's stream and fetch counts (its defaults filled in); nothing for other events."""
    if action != "stall":
        given = [name for name, value in (("streams", streams), ("fetches", fetches)) if value is not None]
        if given:
            raise ConfigError(
                f"{action} takes no {', '.join(n + '=' for n in given)}; only a stall event does, "
                "e.g. stall:peer1@round1,streams=300,fetches=10"
            )
        return {}
    load = {
        "streams": _count(STALL_DEFAULTS["streams"] if streams is None else streams, "streams"),
        "fetches": _count(STALL_DEFAULTS["fetches"] if fetches is None else fetches, "fetches"),
    }
    if not any(load.values()):
        raise ConfigError("a stall with streams=0 and fetches=0 holds nothing; give at least one of them")
    return load


def _pattern_event(at: str | float, duration: str | float | None, kind: str, options: dict, where: str) -> Event:
    """A straggle event over the whole network: the pattern ``kind`` with its options (``x`` and its own)."""
    keys = [key for key in ("x", *_PATTERN_OPTIONS, "seed") if key in options]
    foreign = sorted(set(options) - set(keys) - {"for", "action", "target", "at"})
    if foreign:
        raise ConfigError(
            f"{where}: a straggler pattern takes no {', '.join(k + '=' for k in foreign)}; write "
            f"straggle:PATTERN@WHEN[,for=DURATION] with PATTERN one of: {'; '.join(FORMS)}"
        )
    text = ",".join([kind, *(f"{key}={options[key]}" for key in keys)])
    try:
        event = make_event("straggle", at, duration=duration, pattern=text)
    except ConfigError as exc:
        raise ConfigError(f"{where}: {exc}") from None
    x = getattr(event.pattern, "x", 1.0)
    if x > MAX_FACTOR:
        raise ConfigError(f"{where}: x= must be at most {MAX_FACTOR:g}, got {x:g}")
    return event


def _no_pattern_options(options: dict, where: str) -> None:
    """Refuse a straggler pattern's options on any other event."""
    extra = [key for key in _PATTERN_OPTIONS if key in options]
    if extra:
        raise ConfigError(
            f"{where}: {', '.join(k + '=' for k in extra)} {'belongs' if len(extra) == 1 else 'belong'} to a straggler "
            "pattern, e.g. straggle:bursty@0s,B=1,W=2,lambda=1,x=4 "
            f"(patterns: {', '.join(PATTERN_KINDS)})"
        )


def _attack_text(attack: object, options: dict, where: str) -> str | None:
    """A byzantine event's attack text: ``attack`` with its separately given k=, s= and seed= appended."""
    extra = [key for key in _ATTACK_OPTIONS if key in options]
    if attack is None:
        if extra:
            raise ConfigError(f"{where}: {', '.join(extra)} belong to a byzantine event's attack; add attack=...")
        return None
    return ",".join([str(attack), *(f"{key}={options[key]}" for key in extra)])


def parse_event(text: str) -> Event:
    """Parse ``ACTION[:TARGET]@WHEN[,for=D][,x=F]`` (byzantine: ``,attack=A[,k=K][,s=S][,seed=N]`` too; a straggler
    pattern: ``straggle:KIND@WHEN,OPTIONS``)."""
    m = _EVENT.match(text.strip())
    if not m:
        raise ConfigError(
            f"cannot read event {text!r}; write ACTION[:PEER]@WHEN[,for=DURATION][,x=FACTOR], e.g. kill:peer2@round3"
        )
    opts: dict[str, str] = {}
    for kv in m.group("opts").split(",")[1:]:
        key, value = kv.split("=", 1)
        if key in opts:
            raise ConfigError(f"event {text!r}: {key}= is given twice")
        opts[key] = value
    unknown = set(opts) - set(_OPTIONS)
    if unknown:
        raise ConfigError(
            f"event {text!r}: unknown option(s) {', '.join(sorted(unknown))}; use for=, x= "
            "(byzantine: attack=, k=, s=, seed=; straggler patterns: B=, W=, lambda=, p=, worker=, seed=; "
            "stall: streams=, fetches=)"
        )
    action, target = m.group("action"), m.group("target")
    if action == "straggle" and target in PATTERN_KINDS:
        return _pattern_event(m.group("when"), opts.get("for"), target, opts, f"event {text!r}")
    _no_pattern_options(opts, f"event {text!r}")
    factor = _factor(opts["x"], f"event {text!r}: x=") if "x" in opts else None
    attack = _attack_text(opts.get("attack"), opts, f"event {text!r}")
    try:
        return make_event(
            action, m.group("when"), target, opts.get("for"), factor, attack,
            streams=opts.get("streams"), fetches=opts.get("fetches"),
        )
    except ConfigError as exc:
        raise ConfigError(f"event {text!r}: {exc}") from None


def _check_types(table: dict, where: str) -> None:
    """Refuse a key of an [[event]] table whose value is of a type it cannot take (_KEY_TYPES)."""
    for key, value in table.items():
        types, what, example = _KEY_TYPES[key]
        if isinstance(value, bool) or not isinstance(value, types):
            raise ConfigError(f"{where}: {key} must be {what}, e.g. {key} = {example}; got {value!r}")


def _event_tables(data: dict, path: str | Path) -> list[dict]:
    """The [[event]] tables of a scenario file's data (ConfigError for anything else in it)."""
    unknown = sorted(set(data) - set(_TOP_KEYS))
    if unknown:
        raise ConfigError(
            f"scenario {path}: unknown top-level key(s) {', '.join(unknown)}; a scenario holds only [[event]] tables"
        )
    tables = data.get("event", [])
    if isinstance(tables, dict):
        raise ConfigError(
            f"scenario {path}: events are [[event]] tables (an array of tables); write [[event]], not [event]"
        )
    if not isinstance(tables, list):
        raise ConfigError(f"scenario {path}: event must be [[event]] tables, not {tables!r}")
    for i, table in enumerate(tables):
        if not isinstance(table, dict):
            raise ConfigError(
                f"scenario {path}: event {i + 1} is {table!r}, not a table; write each event as an [[event]] table"
            )
    return tables


def load_scenario(path: str | Path) -> list[Event]:
    """Events of a TOML scenario file."""
    try:
        # TOML is UTF-8 whatever the locale says.
        data = tomllib.loads(Path(path).read_bytes().decode("utf-8"))
    except UnicodeDecodeError as exc:
        raise ConfigError(
            f"cannot read scenario {path}: it is not UTF-8 text (byte {exc.start}); save it as UTF-8"
        ) from None
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise ConfigError(f"cannot read scenario {path}: {exc}") from None
    events = []
    for i, table in enumerate(_event_tables(data, path)):
        if "action" not in table or "at" not in table:
            raise ConfigError(f"scenario {path}: event {i + 1} needs 'action' and 'at'")
        unknown = set(table) - set(_TABLE_KEYS)
        if unknown:
            raise ConfigError(
                f"scenario {path}: event {i + 1} has unknown key(s) {', '.join(sorted(unknown))}; "
                f"an event's keys are {', '.join(_TABLE_KEYS)}"
            )
        where = f"scenario {path}: event {i + 1}"
        _check_types(table, where)
        action, at, target = table["action"], table["at"], table.get("target")
        if action in _TAKES:
            _refuse_unused(
                action, {"for": table.get("for"), "x": table.get("factor")}, {"for": "for", "x": "factor"}, f"{where}: "
            )
        if action == "straggle" and target in PATTERN_KINDS:
            options = {("x" if key == "factor" else key): value for key, value in table.items()}
            events.append(_pattern_event(at, table.get("for"), target, options, where))
            continue
        _no_pattern_options(table, where)
        attack = _attack_text(table.get("attack"), table, where)
        factor = _factor(table["factor"], f"{where}: factor") if "factor" in table else None
        try:
            events.append(make_event(
                action, at, target, table.get("for"), factor, attack,
                streams=table.get("streams"), fetches=table.get("fetches"),
            ))
        except ConfigError as exc:
            raise ConfigError(f"{where}: {exc}") from None
    return events


def _factor(value: str | float, what: str) -> float:
    """A slowdown factor from a number or its text (make_event checks its range)."""
    try:
        return float(value)
    except ValueError:
        raise ConfigError(f"{what} needs a number, e.g. 3; got {value!r}") from None

