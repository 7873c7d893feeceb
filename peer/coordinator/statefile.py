"""What a coordinator remembers across restarts when given a state file.

The coordinator's state is soft: after a restart the peers re-register and
tell it where the run is. One thing they cannot tell it in time is whether
the run exists at all. A peer joining in the first moments after a restart,
before any old peer's heartbeat, would otherwise found the run anew with its
own initial state (see docs/membership.md, "Coordinator restart"). With
``loconet coordinator --state-file PATH`` the coordinator writes this small
record when the run is founded, when it forms a round at a new epoch and
after every committed round, and a restarted coordinator that finds it knows
the run is under way from its first moment, where it got to (the next round
is ``last_committed_round + 1``), the last epoch it gave out (its first
round gets a newer one) and the SHA-256 its peers reported for the state of
that round (``digest``, empty until one reported it), and the epoch of the
attempt that committed it (``committed_epoch``): a member whose Commit call
the old coordinator decided but never answered (it stopped in between) asks
the restarted one again and is told the round committed. A run that committed a
round is then never founded again from a fresh peer's random weights: only a
peer holding that state (or an older checkpoint of it) can bring it back, or
``loconet coordinator --new-run`` starts over. Files written before the
digest was kept load with an empty one, and without the committed epoch
with -1 (unknown: such a member is told the coordinator lost the round).
"""

from __future__ import annotations

import json
import logging
import os
import pathlib
import tempfile
from dataclasses import asdict, dataclass

from collectives.errors import ConfigError
from peer.coordinator.rules import MAX_CLAIM, valid_digest
from peer.filelock import ExclusiveHold

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SavedRun:
    """A run that has been founded, and how far it had got when last saved."""

    run_id: str
    last_committed_round: int
    epoch: int
    # SHA-256 (hex) of the state as of last_committed_round, as its holders reported it (at round 0: the founder's
    # initial state, which a fresh joiner with the same one keeps); "" unknown.
    digest: str = ""
    # The epoch of the attempt that committed last_committed_round; -1 unknown.
    committed_epoch: int = -1


def load_run(path: str | os.PathLike, run_id: str) -> SavedRun | None:
    """The run saved at path (None if there is no file); ConfigError if it is unreadable, malformed, for another run,
    or its folder cannot take the record's next writes."""
    p = pathlib.Path(path)
    # Checked now, not at the first commit: a run whose record cannot be written would lose its history at a restart
    # with only a warning to say so.
    check_writable(p)
    try:
        raw = p.read_bytes()
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise ConfigError(f"cannot read the coordinator state file {p}: {exc}") from None
    saved = _parse(p, raw)
    if saved.run_id != run_id:
        raise ConfigError(
            f"coordinator state file {p} is for run {saved.run_id!r}, not {run_id!r}: "
            "give each run its own state file"
        )
    for name in ("last_committed_round", "epoch"):
        value = getattr(saved, name)
        if value < 0:
            raise ConfigError(
                f"coordinator state file {p} holds a negative {name} ({value}); delete it to start afresh"
            )
        # The messages carry them as uint64, and a joiner's claims beyond MAX_CLAIM are refused as absurd: a larger
        # value would fail every Join (or leave no holder of the run acceptable).
        if value > MAX_CLAIM:
            raise ConfigError(
                f"coordinator state file {p} holds {name} {value}, beyond {MAX_CLAIM} (2^48), more than a run "
                "reaches; fix or delete it"
            )
    if not -1 <= saved.committed_epoch <= saved.epoch:
        raise ConfigError(
            f"coordinator state file {p} says round {saved.last_committed_round} committed at epoch "
            f"{saved.committed_epoch}, outside -1..{saved.epoch}; fix or delete it"
        )
    if not valid_digest(saved.digest):
        raise ConfigError(
            f"coordinator state file {p} holds digest {saved.digest[:80]!r}, not 64 lowercase hex characters; "
            "fix or delete it (loconet coordinator --new-run starts the run over)"
        )
    return saved


# The record's fields: (name, JSON type, default; None: required).
_FIELDS: tuple[tuple[str, type, object], ...] = (
    ("run_id", str, None),
    ("last_committed_round", int, None),
    ("epoch", int, None),
    ("digest", str, ""),
    ("committed_epoch", int, -1),
)
_KINDS = {str: "a string", int: "a whole number"}


def _parse(p: pathlib.Path, raw: bytes) -> SavedRun:
    """The record in a state file's bytes, each field of its exact JSON type; ConfigError saying what is wrong."""

    def refuse(why: str) -> ConfigError:
        return ConfigError(f"coordinator state file {p} is not a saved run: {why}; delete it to start the run afresh")

    try:
        data = json.loads(raw.decode("utf-8"))
    except UnicodeDecodeError:
        raise refuse("it is not UTF-8 text") from None
    except (ValueError, RecursionError) as exc:
        raise refuse(f"it is not JSON ({exc})") from None
    if not isinstance(data, dict):
        raise refuse(f"it holds a JSON {type(data).__name__}, not an object of fields")
    values = {}
    for name, kind, default in _FIELDS:
        if name not in data:
            if default is None:
                raise refuse(f"field {name!r} is missing")
            values[name] = default
            continue
        value = data[name]
        # Exactly the type: bool is an int to Python, and 1.7, 1e400 or "12" are not rounds.
        if type(value) is not kind:
            raise refuse(f"field {name!r} is {json.dumps(value)[:80]}, not {_KINDS[kind]}")
        values[name] = value
    return SavedRun(**values)


def check_writable(path: pathlib.Path) -> None:
    """Raise ConfigError unless the state file's folder exists and takes a new file (save_run writes one beside it)."""
    folder = path.parent
    if folder.exists() and not folder.is_dir():
        raise ConfigError(f"--state-file {path}: {folder} is a file, not a folder; choose another path")
    if not folder.is_dir():
        raise ConfigError(f"--state-file {path}: its folder {folder} does not exist; create it or choose another path")
    try:
        fd, probe = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".check", dir=folder)
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        raise ConfigError(
            f"--state-file {path}: cannot write in its folder {folder} ({exc.strerror}); choose a writable one"
        ) from None


def hold_state_file(path: str | os.PathLike) -> ExclusiveHold:
    """A serving coordinator's exclusive hold on its state file (``PATH.lock``): two coordinators writing one record
    would each overwrite the other's round and epoch, and a restart would resume whichever wrote last."""
    return ExclusiveHold(f"{path}.lock", f"--state-file {path}", "another coordinator",
                         "stop it first, or give each coordinator its own state file")


def save_run(path: str | os.PathLike, saved: SavedRun) -> None:
    """Write the record atomically (a crash mid-write leaves the previous one)."""
    p = pathlib.Path(path)
    tmp = p.with_name(p.name + ".tmp")
    try:
        tmp.write_text(json.dumps(asdict(saved)) + "\n")
        os.replace(tmp, p)
    except OSError as exc:
        # The run goes on; only a restart of this coordinator loses the memory of it.
        log.warning("could not write the coordinator state file %s: %s", p, exc)
