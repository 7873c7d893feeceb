"""The Join call: who is admitted to the run, what a joiner's state counts for, and who is told to wait.

A joiner is checked (its run, address, id, settings and algorithm against the live peers', its key against a
live peer's at the same address or id, the run's size), its claimed round against what the run committed
(``rules.claim_verdict``; a coordinator that does not know the run's history adopts the round a majority of the
returning holders reach), and then ``rules.join_action`` says whether it founds the run, keeps its state,
fetches the run's (or catches up by the missed rounds' results) or waits for a holder of the run's state. The
Coordinator (``peer/coordinator/service.py``) owns one ``Joins`` and checks the call's run first.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Protocol

import grpc

from collectives.membership.coordinatorerrors import NOT_THIS_RUN
from collectives.membership.roundformat import MAX_FORMAT_CHARS
from peer.coordinator.config import CoordinatorConfig
from peer.coordinator.durable import DurableRun, checked_digest, refused_checkpoint, wait_reason
from peer.coordinator.identity import Callers
from peer.coordinator.liveness import lease_terms
from peer.coordinator.quorum import BadRequest
from peer.coordinator.rules import (
    PeerView,
    algorithm_refusal,
    claim_verdict,
    holds_committed_state,
    join_action,
    majority_round,
    needs_resync,
    settings_refusal,
)
from peer.coordinator.runstate import PeerRecord, RunState
from peer.coordinator.sources import Sources
from protos import membership_pb2 as pb

log = logging.getLogger(__name__)

# Why a peer told to wait for the run's state is no member meanwhile (so that quorums do not wait for it).
WAITS_FOR_STATE = "waits for a holder of the run's state"

MAX_ADDRESS_CHARS = 256
MAX_PEER_ID_CHARS = 100
# A peer's host id: --host-id's 128 characters, and the "~" and 8 hex digits of what it shares (hosts.identity).
MAX_HOST_ID_CHARS = 160
MAX_ALGORITHM_CHARS = 64


class MarkLost(Protocol):
    """Drop a peer from the run (``Coordinator._mark_lost``): kind names the event, state what the peer becomes."""

    def __call__(self, peer: PeerRecord, why: str, kind: str, state: str = "lost") -> None: ...


class Joins:
    """The Join call of one run's coordinator, on its loop."""

    def __init__(
        self,
        config: CoordinatorConfig,
        state: RunState,
        sources: Sources,
        callers: Callers,
        durable: DurableRun,
        *,
        age: Callable[[], float],
        mark_lost: MarkLost,
        refuse: Callable[[str, grpc.StatusCode, str], BadRequest],
    ) -> None:
        self.config = config
        self.state = state
        self.sources = sources
        self.callers = callers
        self.durable = durable
        # age(): seconds since the coordinator started (its startup grace); mark_lost and refuse are the
        # coordinator's (a peer dropped from the run; a refusal counted for the metrics).
        self.age = age
        self.mark_lost = mark_lost
        self.refuse = refuse
        # Returning holders' claimed rounds, while this coordinator does not know the run's history.
        self.claims: dict[str, int] = {}

    def _check_settings(self, req: pb.JoinRequest, address: str) -> None:
        """Refuse a joiner whose algorithm or settings are not the live peers' (BadRequest, counted): their rounds
        would not mix, and before the run's first commit nothing else tells them apart."""
        if len(req.algorithm) > MAX_ALGORITHM_CHARS or len(req.settings) > MAX_FORMAT_CHARS:
            raise BadRequest(grpc.StatusCode.INVALID_ARGUMENT, f"a join's algorithm has at most {MAX_ALGORITHM_CHARS} "
                             f"characters and its settings at most {MAX_FORMAT_CHARS}")
        if not req.algorithm and not req.settings:
            return  # a peer that does not say is not checked (and costs no pass over the peers)
        # An earlier process at this address is gone (a restart): what it ran is no longer the run's.
        others = [p for p in self.state.alive_peers() if p.address != address]
        for kind, why in (("algorithm", algorithm_refusal(req.algorithm, (p.algorithm for p in others))),
                          ("settings", settings_refusal(req.settings, (p.settings for p in others)))):
            if why:
                log.warning("a joiner at %s refused: %s", address, why)
                raise self.refuse(kind, grpc.StatusCode.FAILED_PRECONDITION, why)

    def join(self, req: pb.JoinRequest, key: bytes | None = None) -> pb.JoinResponse:
        """Register a peer (key: with a run secret, the public key it proved; its credential binds the id to it)."""
        self.state.silence.heard(time.monotonic())
        # A re-registration under an id this coordinator never gave out: the run is under way.
        self.durable.note_stranger(req.peer_id)
        if len(req.peer_id) > MAX_PEER_ID_CHARS:
            raise BadRequest(grpc.StatusCode.INVALID_ARGUMENT, f"a peer id has at most {MAX_PEER_ID_CHARS} characters")
        address = req.address.strip()
        if not address or len(address) > MAX_ADDRESS_CHARS or ":" not in address:
            raise BadRequest(
                grpc.StatusCode.INVALID_ARGUMENT, f"join needs the peer's host:port, got {address[:100]!r}"
            )
        digest = checked_digest(req.state_digest)
        s = self.state
        self._check_settings(req, address)
        committed = s.last_committed_round
        verdict = claim_verdict(req.last_round, req.epoch, committed, s.epoch, self.durable.history_known)
        if verdict != "ok":
            raise self.refuse(
                "claim", grpc.StatusCode.FAILED_PRECONDITION,
                f"the joiner claims round {req.last_round} at epoch {req.epoch}, but this run has committed round "
                f"{committed} at epoch {s.epoch} ({verdict}): it holds {NOT_THIS_RUN} (the run was started again "
                "with --new-run, or it is another run's checkpoint); remove its checkpoint, or join the run it came "
                "from",
            )
        # Another live peer (not an earlier process at this address) holds the run's up-to-date state.
        holder_alive = any(
            p.has_state and p.last_round >= committed for p in s.alive_peers() if p.address != address
        )
        # Nobody holds that state, but every round after the joiner's has a live holder of its result (a round of
        # some of the peers whose members are gone, kept by others): these rounds; it keeps its state and catches up.
        catch_up = (
            self.sources.missed(req.peer_id, req.last_round)
            if not holder_alive and holds_committed_state(req.has_state, req.last_round, committed)
            and req.last_round < committed else []
        )
        recorded = s.digest_of(req.last_round) if req.has_state else ""
        action = join_action(
            req.has_state, holder_alive or bool(catch_up), self.durable.under_way, self.age(), self.config.rules,
            committed_round=committed, last_round=req.last_round, digest=digest, recorded_digest=recorded,
            initial_digest=s.initial_digest, own_state=req.own_state,
        )
        # A fresh peer whose initial state is the founder's: it holds the run's round-0 state (join_action).
        kept_initial = action == "keep" and not req.has_state
        if action == "refuse":
            raise refused_checkpoint(self.config.run_id, req.last_round, digest, recorded)
        if action == "wait":
            return self._wait_answer(req, address)
        s.waiting.done(address)
        other_id = s.by_address.get(address)
        self._check_admission(req.peer_id, address, other_id, key)
        if other_id is not None and other_id != req.peer_id:
            # The same address again means the old process is gone (a restart).
            self.mark_lost(s.peers[other_id], "replaced by a new process at the same address", kind="leave")
        known = s.peers.get(req.peer_id)
        rejoin = known is not None and known.alive and known.address == address
        peer_id = req.peer_id if rejoin else s.new_peer_id(req.peer_id)
        # A round-0 state once the run has committed a round is a fresh peer's: it counts as none.
        has_state = holds_committed_state(req.has_state or kept_initial, req.last_round, committed)
        if has_state and not self.durable.history_known:
            has_state = self._claim_accepted(peer_id, req.last_round)
        # What the peer holds tells a restarted coordinator where the run is (a newer state is adopted).
        if has_state and req.last_round > committed:
            s.last_committed_round = req.last_round
            if committed > 0:
                s.event("adopt", peer_id, f"holds round {req.last_round}, beyond the last committed {committed}")
        s.epoch = max(s.epoch, req.epoch)
        if has_state:
            self.durable.note_digest(req.last_round, digest, peer_id)
        heartbeat_s, lease_s = lease_terms(self.config, len(s.live))
        peer = PeerRecord(
            peer_id=peer_id,
            address=address,
            name=req.name[:200],
            last_round=req.last_round,
            has_state=has_state,
            codecs=tuple(c[:32] for c in req.codecs[:32]),
            host_id=req.host_id[:MAX_HOST_ID_CHARS],
            own_state=req.own_state,
            algorithm=req.algorithm,
            settings=req.settings,
            lease_s=lease_s,
            public_key=key or b"",
        )
        founder = action == "found"
        sources: tuple[PeerView, ...] = ()
        missed: list[pb.CommittedRound] = []
        if founder:
            # Nobody holds a state and no round committed: this peer's initial state becomes the run's.
            peer.has_state = True
            peer.state = "active"
            s.initial_digest = digest
            self.durable.founded = True
            self.durable.save()
        elif not has_state or needs_resync(req.last_round, s.last_committed_round):
            sources = self.sources.state_sources(peer_id)
            if has_state:
                missed = catch_up or (self.sources.missed(peer_id, req.last_round) if sources else [])
            peer.state = "syncing"
        else:
            peer.state = "active"
            if committed > 0 and req.last_round >= committed and s.waiting.waiters and not holder_alive:
                s.event("resume", peer_id, f"holds round {req.last_round}: {len(s.waiting.waiters)} waiting peer(s) "
                        "can fetch the run's state from it")
        s.add_peer(peer)
        s.event("rejoin" if req.peer_id else "join", peer_id, f"{'founder ' if founder else ''}from {address}")
        sync_from = sources[0].address if sources else ""
        # With its name (harness peers are named peer0.. in start order, ids in join order).
        log.info("peer %s joined from %s (sync from %s)", peer.label, address, sync_from or "-")
        return pb.JoinResponse(
            peer_id=peer_id,
            lease_s=lease_s,
            heartbeat_s=heartbeat_s,
            epoch=s.epoch,
            last_committed_round=s.last_committed_round,
            sync_from=sync_from,
            missed=missed,
            # A fresh peer that keeps its initial state is told the digest it matched (the founder is told none).
            state_digest=s.initial_digest if kept_initial else s.last_digest,
            sync_sources=[p.address for p in sources],
            credential=None if key is None else self.callers.issue(peer_id, address, key),
        )

    def _check_admission(self, peer_id: str, address: str, other_id: str | None, key: bytes | None) -> None:
        """Refuse a join that takes a live peer's address or id with another key, or one beyond --max-peers.

        other_id: the live peer registered at address, if any; key: with a run secret, the joiner's public key.
        """
        s = self.state
        if key is not None and other_id is not None and s.peers[other_id].public_key != key:
            # Another key at a live peer's address: a restart of that peer, or someone else. Either way the
            # address is freed when its lease ends; the peer's join retries until then.
            raise self.refuse(
                "address-held", grpc.StatusCode.UNAVAILABLE,
                f"{address} belongs to live peer {other_id} with another key; retry once its lease ends",
            )
        known = s.peers.get(peer_id)
        live = known is not None and known.alive
        if key is not None and live and known.public_key != key:
            raise self.refuse(
                "forged-identity", grpc.StatusCode.UNAUTHENTICATED,
                f"peer id {peer_id[:100]!r} is a live peer's, with another key",
            )
        if not live and len(s.live) >= self.config.max_peers:
            raise self.refuse(
                "full", grpc.StatusCode.RESOURCE_EXHAUSTED,
                f"run {self.config.run_id} has its most peers ({self.config.max_peers}, --max-peers); try later",
            )

    def _claim_accepted(self, peer_id: str, last_round: int) -> bool:
        """Whether a returning holder's state counts, for a coordinator that does not know the run's history.

        Such a coordinator (restarted without its state file) adopts the round a majority of the returning
        holders reach, never one peer's word beyond it: a peer claiming more fetches the run's state like a
        fresh one.
        """
        self.claims[peer_id] = last_round
        while len(self.claims) > self.config.max_peers:  # bounded like the run (oldest claim first)
            self.claims.pop(next(iter(self.claims)))
        adopted = majority_round(self.claims.values())
        if last_round <= adopted:
            return True
        self.state.event("claim", peer_id, f"claims round {last_round}; the returning majority holds {adopted}")
        return False

    def _wait_answer(self, req: pb.JoinRequest, address: str) -> pb.JoinResponse:
        """Tell a joiner to wait: nobody live holds the run's last committed state, and it holds none or an older
        one (it is not registered)."""
        s = self.state
        held = req.last_round if holds_committed_state(req.has_state, req.last_round, s.last_committed_round) else 0
        reason = self.note_waiter(address, req.name[:200], req.peer_id[:100], held)
        other_id = s.by_address.get(address)
        if other_id is not None:
            # An earlier registration from this address (a joiner whose source died mid-fetch): it is no
            # member while it waits, so quorums must not wait for it.
            self.mark_lost(s.peers[other_id], WAITS_FOR_STATE, kind="leave", state="left")
        return pb.JoinResponse(
            peer_id=req.peer_id,
            lease_s=self.config.lease_s,
            heartbeat_s=self.config.heartbeat_s,
            epoch=s.epoch,
            last_committed_round=s.last_committed_round,
            state_digest=s.last_digest,
            wait=True,
            wait_reason=reason,
            holders_finished=s.holders_finished(),
        )

    def note_waiter(self, address: str, name: str, peer_id: str, held_round: int) -> str:
        """Record a peer told to wait for the run's state (an event and a warning the first time); return why."""
        reason = self._wait_reason(held_round)
        if self.state.waiting.note(address, reason, name, peer_id, held_round):
            self.state.event("wait", peer_id, f"{address}: {reason}")
            log.warning("a peer at %s waits: %s", address, reason)
        return reason

    def _wait_reason(self, held_round: int = 0) -> str:
        """Why a peer (holding the state of held_round, 0: none) waits for the run's state, naming the older
        round a rollback would go on from, if any."""
        s = self.state
        held = [held_round, s.waiting.newest_held()]
        held += [p.last_round for p in s.alive_peers() if p.has_state]
        older = max((r for r in held if r < s.last_committed_round), default=0)
        return wait_reason(self.config.run_id, s, self.config.rules.startup_grace_s - self.age(), older)
