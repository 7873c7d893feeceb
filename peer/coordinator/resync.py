"""The Quorum answers for a peer behind the run: RESYNC, naming where to fetch the run's state or the rounds it
missed, to catch up by their results.

A peer asking for a round while behind the run's last committed round (``rules.needs_resync``) catches up by
the missed rounds' results while each has a live holder (``Sources.missed``), else fetches the state from its
holders; with ``--allow-rollback`` and nobody holding the run's last round, the run goes on from the newest
round a live peer holds. A peer whose state lost to the run's (``digests.py``) is realigned: told to fetch the
run's state, at most ``MAX_REALIGNS`` times. The Coordinator (``peer/coordinator/service.py``) owns one
``Resyncs``; its Quorum call asks it before queueing a peer for a round.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence

import grpc

from peer.coordinator.config import CoordinatorConfig
from peer.coordinator.durable import short
from peer.coordinator.joins import WAITS_FOR_STATE, MarkLost
from peer.coordinator.quorum import BadRequest, Quorums
from peer.coordinator.rules import PeerView, head_round, needs_resync
from peer.coordinator.runstate import PeerRecord, RunState
from peer.coordinator.sources import Sources
from protos import membership_pb2 as pb

log = logging.getLogger(__name__)

# How often one peer registration is told to fetch the run's state again because its own lost to it: a peer
# whose state keeps differing (a nondeterministic device) would otherwise fetch the whole state every round.
MAX_REALIGNS = 3


class Resyncs:
    """The RESYNC answers of one run's coordinator, on its loop."""

    def __init__(
        self,
        config: CoordinatorConfig,
        state: RunState,
        sources: Sources,
        quorums: Quorums,
        *,
        age: Callable[[], float],
        save: Callable[[], None],
        mark_lost: MarkLost,
        note_waiter: Callable[[str, str, str, int], str],
    ) -> None:
        self.config = config
        self.state = state
        self.sources = sources
        self.quorums = quorums
        # The coordinator's: seconds since it started (its startup grace), its state file's save (a rollback),
        # a peer dropped from the run, and a peer told to wait for the run's state noted (Joins.note_waiter).
        self.age = age
        self.save = save
        self.mark_lost = mark_lost
        self.note_waiter = note_waiter

    def resync_answer(self, peer: PeerRecord, last_round: int) -> pb.QuorumResponse | None:
        """RESYNC (with the rounds it missed, when remembered) for a peer behind the run; None if it is up to date."""
        s = self.state
        rules = self.config.rules
        # Within the startup grace the holders of newer rounds may still be re-registering: no rollback yet.
        settled = self.age() >= rules.startup_grace_s
        if not needs_resync(last_round, s.last_committed_round):
            return None
        # The rounds it missed, if it can catch up by their results: each still has a live holder (then the
        # run's last round is not lost, even with nobody holding its state yet).
        missed = self.sources.missed(peer.peer_id, last_round) if peer.has_state else []
        if rules.allow_rollback and not missed:
            # Only a peer that is behind needs this check (a scan of every peer), and only where rollbacks are allowed.
            views = [p.view() for p in s.alive_peers()]
            head = head_round(views, s.last_committed_round, settled=settled, allow_rollback=rules.allow_rollback)
            if head < s.last_committed_round:
                gone = s.last_committed_round
                s.roll_back(head)
                detail = f"peers holding round {gone} are gone; continuing from round {head} ({short(s.last_digest)})"
                s.event("rollback", "", detail)
                log.warning("no live peer holds round %d; the run continues from round %d", gone, head)
                self.save()
                if not needs_resync(last_round, s.last_committed_round):
                    return None
                missed = self.sources.missed(peer.peer_id, last_round) if peer.has_state else []
        # A peer that can catch up by results fetches no state: it is not counted against a donor.
        sources = self.sources.state_sources(peer.peer_id, count=not missed)
        if not sources and not missed and not settled:
            reason = (
                f"the coordinator restarted; waiting for the peers holding round {s.last_committed_round} "
                "to re-register"
            )
            if s.waiting.note(peer.address, reason, peer.name, peer.peer_id):
                s.event("wait", peer.peer_id, reason)
            raise BadRequest(grpc.StatusCode.UNAVAILABLE, f"no up-to-date peer to resync from yet: {reason}; retry")
        if not sources and not missed and not (peer.own_state and peer.has_state):
            # Nobody holds the run's last round: this member waits like a joiner (it is no member meanwhile, so
            # quorums do not wait for it), and joins again until a holder is back. Its join is told to wait.
            reason = self.note_waiter(peer.address, peer.name, peer.peer_id, last_round if peer.has_state else 0)
            self.mark_lost(peer, WAITS_FOR_STATE, kind="leave", state="left")
            raise BadRequest(grpc.StatusCode.NOT_FOUND, f"this peer waits for the run's state: {reason}")
        peer.state = "syncing"
        if missed:
            how = f"catch up {len(missed)} round(s)"
        else:
            how = f"from {sources[0].peer_id}" if sources else "skips them: its state is its own"
        s.event("resync", peer.peer_id, f"behind round {s.last_committed_round}; {how}")
        return self._resync_message(peer, sources, missed)

    def realign_answer(self, peer: PeerRecord) -> pb.QuorumResponse | None:
        """RESYNC for a peer whose state lost to the run's (digests.py): it fetches the run's state from a holder
        of it instead of training on its own; None when it need not, or nobody else holds the run's state."""
        s = self.state
        book = s.digest_book
        if not book.must_realign(peer.peer_id):
            return None
        if peer.realigned >= MAX_REALIGNS:
            book.realigned(peer.peer_id)
            detail = (
                f"its state differs from the run's again after fetching it {peer.realigned} times; not told to "
                "again (does it load the state it is given? is its training deterministic with the others'?)"
            )
            s.event("diverged", peer.peer_id, detail)
            log.error("%s: %s", peer.peer_id, detail)
            return None
        # Only holders of the state the run keeps (one that lost too would fail the fetch's digest check).
        sources = self.sources.state_sources(peer.peer_id, exclude=book.realign)
        if not sources:
            return None
        book.realigned(peer.peer_id)
        peer.realigned += 1
        peer.fetch_told = True
        peer.state = "syncing"
        detail = (
            f"its state of round {peer.last_round} is not the run's ({short(s.last_digest)}); "
            f"from {sources[0].peer_id}"
        )
        s.event("resync", peer.peer_id, detail)
        log.warning("%s fetches the run's state again: %s", peer.peer_id, detail)
        return self._resync_message(peer, sources, [])

    def _resync_message(
        self, peer: PeerRecord, sources: Sequence[PeerView], missed: list[pb.CommittedRound]
    ) -> pb.QuorumResponse:
        """The RESYNC answer: fetch the state from ``sources`` or catch up by the ``missed`` rounds' results."""
        s = self.state
        now = time.monotonic()
        return pb.QuorumResponse(
            action=pb.QuorumResponse.RESYNC,
            sync_from=sources[0].address if sources else "",
            last_committed_round=s.last_committed_round,
            epoch=s.epoch,
            missed=missed,
            state_digest=s.last_digest,
            sync_sources=[p.address for p in sources],
            run_step=s.run_step,
            round_step=s.round_step,
            pending_tag=self.quorums.pending_tag(peer.peer_id, now),
            since_commit_s=self.quorums.since_commit(now),
        )
