"""The run's committed state, as the coordinator keeps track of it so that it never silently restarts.

Peers report the SHA-256 of their state as of their last round; the
coordinator records the first report of each recent committed round
(``RunState.note_digest``), flags a different one as a divergence, hands the
digest out with every sync source, and keeps the last one in its state file.
A run that has committed a round is never founded again
(``rules.join_action``): a joiner without state that finds no live holder
waits, told in one line why and what would bring the state back. The
service (``peer/coordinator/service.py``) owns a ``DurableRun``: the state
file's record of the run, and whether this coordinator knows the run's
history (then a joiner's claim is checked against it). The decisions
themselves are in ``rules.py``.
"""

from __future__ import annotations

import logging

import grpc

from peer.coordinator.config import CoordinatorConfig
from peer.coordinator.quorum import BadRequest
from peer.coordinator.rules import valid_digest
from peer.coordinator.runstate import RunState
from peer.coordinator.statefile import SavedRun, load_run, save_run

log = logging.getLogger(__name__)


def checked_digest(digest: str) -> str:
    """A reported state digest, or BadRequest INVALID_ARGUMENT when it is not SHA-256 hex (empty: unknown)."""
    if not valid_digest(digest):
        raise BadRequest(
            grpc.StatusCode.INVALID_ARGUMENT,
            f"state_digest must be the state's SHA-256 as 64 lowercase hex characters (or empty), got {digest[:80]!r}",
        )
    return digest


def short(digest: str) -> str:
    """A digest as messages show it: its first 12 characters, or that it is unknown."""
    return f"state sha256 {digest[:12]}..." if digest else "state digest unknown"


def wait_reason(run_id: str, state: RunState, grace_left_s: float, older_round: int = 0) -> str:
    """Why a peer must wait for the run's state, and what brings it back, in one line.

    ``older_round``: the newest older committed round a live peer holds (0: none), which
    ``--allow-rollback`` would continue from.
    """
    if state.last_committed_round == 0:
        return (
            f"the coordinator of run {run_id} restarted and the peers holding the run's state have not "
            f"re-registered yet; waiting up to {max(grace_left_s, 0.0):.0f} s more for them"
        )
    last = state.last_committed_round
    rollback = ""
    if 0 < older_round < last:
        lost = f"round {last} is lost" if older_round + 1 == last else f"rounds {older_round + 1}-{last} are lost"
        rollback = (
            f"; a peer holds round {older_round}: `loconet coordinator --allow-rollback` goes on from it ({lost})"
        )
    # Every holder ran to its end (a straggler of the run's last round asks): nobody is expected back.
    nobody = "every peer holding it finished and left" if state.holders_finished() else "no live peer holds it"
    return (
        f"run {run_id} has committed round {last} ({short(state.last_digest)}) but {nobody}: restart a peer "
        "that holds it (with its checkpoint directory), or start one with "
        f"--resume-from CHECKPOINT_DIR{rollback}; `loconet coordinator --new-run` starts the run over"
    )


def refused_checkpoint(run_id: str, round_id: int, digest: str, recorded: str) -> BadRequest:
    """The refusal of a joiner whose state of round_id hashes differently from what the run recorded for it."""
    return BadRequest(
        grpc.StatusCode.FAILED_PRECONDITION,
        f"this peer's state of round {round_id} has sha256 {digest[:16]}..., but run {run_id} recorded "
        f"{recorded[:16]}... for that round: it is not this run's state (a checkpoint of another run, or one that "
        "diverged); start the peer without it to fetch the run's state, or resume from a checkpoint of this run",
    )


def note_digest(state: RunState, round_id: int, digest: str, peer_id: str) -> None:
    """Record a peer's digest of its state at round_id; one that differs from the recorded one is a divergence
    (the digest more of the round's members report is recorded; on a tie, its earliest joiner's)."""
    conflict = state.note_digest(round_id, digest, peer_id)
    if conflict is not None:
        first, recorded = conflict
        kept = "the run keeps this peer's" if state.digest_of(round_id) == digest else "the first is kept"
        detail = (
            f"round {round_id}: {peer_id} holds state sha256 {digest[:12]}..., but {first or 'the state file'} "
            f"reported {recorded[:12]}... first; {kept}"
        )
        state.event("diverged", peer_id, detail)
        log.error("peers' states diverged at %s", detail)


def resume_saved_run(state: RunState, saved: SavedRun, config: CoordinatorConfig) -> None:
    """Start from the state file's run: it was founded; its round, epoch and state digest."""
    state.last_committed_round, state.epoch = saved.last_committed_round, saved.epoch
    state.last_committed_epoch = saved.committed_epoch
    if saved.digest and saved.last_committed_round > 0:
        state.digest_book.record(saved.last_committed_round, saved.digest)
    elif saved.digest:
        state.initial_digest = saved.digest  # founded, nothing committed: the founder's initial state's
    if saved.last_committed_round > 0:
        log.info(
            "state file %s: run %s has committed round %d (%s); a joiner without state waits for a peer holding it",
            config.state_file, saved.run_id, saved.last_committed_round, short(saved.digest),
        )
    else:
        log.info(
            "state file %s: run %s was founded; joiners without state wait up to %g s for its holders",
            config.state_file, saved.run_id, config.rules.startup_grace_s,
        )


def discard_saved_run(state: RunState, saved: SavedRun) -> None:
    """--new-run: the run starts over; only the epoch goes on, so no (round, epoch) pair is given out twice."""
    state.epoch = saved.epoch
    what = f"round {saved.last_committed_round} (state sha256 {saved.digest or 'unknown'})"
    log.warning("--new-run: run %s starts over; the saved %s is discarded", saved.run_id, what)
    state.event("new-run", "", f"starts over; discarded {what}")


class DurableRun:
    """What this coordinator knows of its run's past: the state file's record (loaded, resumed or discarded at
    start, saved as the run moves on), whether the run is under way or was founded here."""

    def __init__(self, config: CoordinatorConfig, state: RunState) -> None:
        self.config = config
        self.state = state
        # Whether the run is known to be under way: a peer registered by an earlier coordinator
        # has called, or the state file says the run was founded (see join_action).
        self.under_way = False
        # Whether a peer founded the run at this coordinator (its initial state the run's round 0): with no state
        # file, that or a round committed here is what tells it the run's history (history_known).
        self.founded = False
        self.saved: SavedRun | None = None
        if config.state_file:
            self.saved = load_run(config.state_file, config.run_id)
        if self.saved is not None and config.new_run:
            discard_saved_run(state, self.saved)
        elif self.saved is not None:
            self.under_way = True
            resume_saved_run(state, self.saved, config)
        elif config.new_run:
            log.info("--new-run: no saved run to discard (%s)", config.state_file or "no --state-file")

    @property
    def history_known(self) -> bool:
        """Whether this coordinator knows the run's history: its state file says it, or the run was founded or has
        committed a round here and no peer of an earlier coordinator has called (every peer is its own). Then a
        claim beyond what it gave out is refused; otherwise (started without a state file, the run's peers
        restarted from their checkpoints) the round a majority of the returning holders reach is adopted."""
        started_here = self.founded or self.state.rounds_committed > 0
        return self.saved is not None or (started_here and not self.under_way)

    def note_stranger(self, peer_id: str) -> None:
        """Note a call from peer_id: an id this coordinator never gave out is a peer registered by an earlier
        coordinator (the run is under way, and that peer is about to rejoin)."""
        if peer_id and peer_id not in self.state.peers:
            self.under_way = True

    def save(self) -> None:
        """Record in the state file (if any) that the run exists and how far it got."""
        if not self.config.state_file:
            return
        s = self.state
        # Before the first commit the run's state is the founder's initial state: its digest is the one to keep.
        digest = s.last_digest if s.last_committed_round > 0 else s.initial_digest
        saved = SavedRun(self.config.run_id, s.last_committed_round, s.epoch, digest, s.last_committed_epoch)
        if saved != self.saved:
            save_run(self.config.state_file, saved)
            self.saved = saved

    def note_digest(self, round_id: int, digest: str, peer_id: str) -> None:
        """Record a peer's digest of its state at round_id (note_digest), saved once it is the last committed
        round's."""
        note_digest(self.state, round_id, digest, peer_id)
        if round_id == self.state.last_committed_round:
            self.save()  # the digest of the last committed round, once known (saved only when it changed)
