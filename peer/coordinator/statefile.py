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
from dataclasses import asdict, dataclass

from collectives.errors import ConfigError
from peer.coordinator.rules import valid_digest

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
    """The run saved at path (None if there is no file); ConfigError if it is unreadable or for another run."""
    p = pathlib.Path(path)
    try:
        text = p.read_text()
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise ConfigError(f"cannot read the coordinator state file {p}: {exc}") from None
    try:
        data = json.loads(text)
        saved = SavedRun(
            str(data["run_id"]), int(data["last_committed_round"]), int(data["epoch"]), str(data.get("digest", "")),
            int(data.get("committed_epoch", -1)),
        )
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        raise ConfigError(
            f"coordinator state file {p} is not a saved run ({exc}); delete it to start the run afresh"
        ) from None
    if saved.run_id != run_id:
        raise ConfigError(
            f"coordinator state file {p} is for run {saved.run_id!r}, not {run_id!r}: "
            "give each run its own state file"
        )
    if saved.last_committed_round < 0 or saved.epoch < 0:
        raise ConfigError(f"coordinator state file {p} holds negative rounds or epochs; delete it to start afresh")
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
