"""The coordinator: membership authority of one run.

It holds soft state only (``RunState``; optionally a small state file, see
``peer/coordinator/statefile.py``) and is never on the data path. All gRPC
handlers and a periodic tick run on one asyncio loop, so the state needs no
locks; the dashboard (an HTTP server on its own thread, started by
``peer/coordinator/server.py``) reads a snapshot built on that loop. Protocol
decisions come from ``peer/coordinator/rules.py``, who takes part in a round
from the quorum policy (``peer/coordinator/policies.py``); forming and
deciding the attempts of rounds is ``peer/coordinator/quorum.py``'s
``Quorums``; where a peer behind the run fetches the state or the missed
rounds' results from is ``peer/coordinator/sources.py``'s ``Sources``; the
settings are ``peer/coordinator/config.py``'s ``CoordinatorConfig``.

A round, as the coordinator sees it (round id = last committed round + 1)::

    peers ask Quorum(last_round) --> pending quorum --(policy.decide)--> attempt (round, epoch) formed
      (a peer behind the last committed round is told RESYNC instead, with the rounds it missed;
       a peer asking while an attempt is in flight, or that the attempt formed without, is held
       until the attempt is decided)
    members run the all-reduce, then report Commit(ok, failed)
    --(commit_decision)--> committed: last_committed_round = round
                        \\-> aborted: dropped members are out, epoch bumps,
                                     survivors ask Quorum again (same round id, same contributions)
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import time
from collections.abc import Callable, Coroutine, Sequence
from typing import Any

import grpc
from google.protobuf.message import Message

from collectives.aggregation import MAX_ROUND_MEMBERS
from collectives.asynctasks import cancel_and_wait
from collectives.membership import FINISHED, NO_QUORUM, NOT_THIS_RUN
from collectives.roundformat import MAX_FORMAT_CHARS
from peer.coordinator.config import CoordinatorConfig
from peer.coordinator.durable import (
    checked_digest,
    discard_saved_run,
    note_digest,
    refused_checkpoint,
    resume_saved_run,
    short,
    wait_reason,
)
from peer.coordinator.identity import Caller, Callers, Rejoin
from peer.coordinator.liveness import Liveness
from peer.coordinator.quorum import BadRequest, Quorums
from peer.coordinator.rules import (
    Decision,
    PeerView,
    Report,
    algorithm_refusal,
    attempt_over,
    claim_verdict,
    head_round,
    holds_committed_state,
    join_action,
    majority_round,
    needs_resync,
    settings_refusal,
)
from peer.coordinator.runstate import PeerRecord, RunState
from peer.coordinator.sessions import PeerStreams, pushed_bytes
from peer.coordinator.sources import Sources
from peer.coordinator.statefile import SavedRun, load_run, save_run
from peer.version import package_version
from protos import membership_pb2 as pb
from protos import membership_pb2_grpc as pb_grpc

log = logging.getLogger(__name__)

# Why a peer told to wait for the run's state is no member meanwhile (so that quorums do not wait for it).
WAITS_FOR_STATE = "waits for a holder of the run's state"

# What the status document says this coordinator runs.
VERSION = package_version()
TICK_S = 0.05
MAX_ADDRESS_CHARS = 256
MAX_PEER_ID_CHARS = 100
MAX_TEXT_CHARS = 2000
MAX_TAG_CHARS = 200
# A peer's host id: --host-id's 128 characters, and the "~" and 8 hex digits of what it shares (hostid).
MAX_HOST_ID_CHARS = 160
MAX_ALGORITHM_CHARS = 64
# The largest round minimum a peer may ask for (QuorumRequest.min_members): Krum with f in the thousands.
MAX_MIN_MEMBERS = MAX_ROUND_MEMBERS
# How often one peer registration is told to fetch the run's state again because its own lost to it: a peer
# whose state keeps differing (a nondeterministic device) would otherwise fetch the whole state every round.
MAX_REALIGNS = 3

# CoordinatorConfig lives in peer/coordinator/config.py, BadRequest in quorum.py; importing them from here still works.
__all__ = ["VERSION", "BadRequest", "Coordinator", "CoordinatorConfig"]


async def settled(fut: asyncio.Future, timeout_s: float) -> bool:
    """Wait until fut is done (True) or timeout_s has passed (False); cancelling the wait leaves fut as it is.

    What ``asyncio.wait_for(asyncio.shield(fut), timeout_s)`` waits for, with one hop through the loop per
    waiter instead of three and no extra tasks or futures: a formed round wakes 1,000 calls at once.
    """
    loop = asyncio.get_running_loop()
    woken = loop.create_future()

    def wake(_: object = None) -> None:
        if not woken.done():
            woken.set_result(None)

    fut.add_done_callback(wake)
    timer = loop.call_later(timeout_s, wake)
    try:
        await woken
    finally:
        timer.cancel()
        fut.remove_done_callback(wake)
    return fut.done()


class Coordinator(pb_grpc.CoordinatorServicer):
    """The Coordinator gRPC service of one run, with its tick loop."""

    def __init__(self, config: CoordinatorConfig) -> None:
        self.config = config
        self.policy = config.policy
        self.state = RunState(
            config.run_id, config.min_peers, history=config.history, catchup_rounds=config.catchup_rounds,
            policy=self.policy.spec,
        )
        self.address = ""
        # With a run secret (--token-file): the run-secret checks, and the key that signs peer credentials (kept
        # beside the state file, so a restarted coordinator still recognises the credentials it issued).
        self.auth = config.security.call_auth(config.run_id)
        self.callers = Callers(config, self.auth, self.state, self._refuse)
        # Calls refused, by reason (the metrics): unauthenticated, forged peer ids, absurd claims, a full run.
        self.refusals: dict[str, int] = {}
        # Calls refused for their client's rate, by method (set by the server that runs the limits).
        self.rate_limited: Callable[[], dict[str, int]] = dict
        # Calls refused for lacking the run's secret (counted by the server's interceptor, which sets this).
        self.unauthenticated: Callable[[], int] = int
        self._started = time.monotonic()
        # Whether the run is known to be under way: a peer registered by an earlier coordinator
        # has called, or the state file says the run was founded (see join_action).
        self._run_under_way = False
        # Whether a peer founded the run at this coordinator (its initial state the run's round 0): with no state
        # file, that or a round committed here is what tells it the run's history (_history_known).
        self._founded = False
        self._saved: SavedRun | None = None
        # Returning holders' claimed rounds, while this coordinator does not know the run's history.
        self._claims: dict[str, int] = {}
        if config.state_file:
            self._saved = load_run(config.state_file, config.run_id)
        if self._saved is not None and config.new_run:
            discard_saved_run(self.state, self._saved)
        elif self._saved is not None:
            self._run_under_way = True
            resume_saved_run(self.state, self._saved, config)
        elif config.new_run:
            log.info("--new-run: no saved run to discard (%s)", config.state_file or "no --state-file")
        self.quorums = Quorums(
            config, self.policy, self.state, self._started,
            drop=lambda peer, why: self._mark_lost(peer, why, kind="failure"),
            save=self._save,
            run_under_way=lambda: self._run_under_way,
            committed=self._push_holds,
        )
        if self._saved is not None and not config.new_run:
            self.quorums.remember_commit(self.state.last_committed_round, self.state.last_committed_epoch)
        self._tick_task: asyncio.Task | None = None
        # What each call a peer makes as itself does, once its caller is checked (peer_call).
        self._peer_handlers = {
            "Heartbeat": self._heartbeat, "Leave": self._leave, "Quorum": self._quorum, "Commit": self._commit,
        }
        # Set by stop(): the waiting Quorum calls it ends are told to retry, not that they were superseded.
        self._stopping = False
        # Where peers behind the run fetch the state or the missed rounds' results from.
        self.sources = Sources(config, self.state)
        # Each peer's open Session stream, for what the coordinator tells it unasked (_push_holds).
        self.streams = PeerStreams()
        # Leases past their time, and probes of the peers a quorum waits for.
        self.liveness = Liveness(config, self.state, self.quorums, self._mark_lost)
        self.state.event("coordinator-start", "", f"run {config.run_id}")
        if config.new_run and self._saved is not None:
            self._save()  # the state file forgets the old run at once, before anything else happens

    # -- lifecycle ---------------------------------------------------------------------

    def start_ticking(self) -> None:
        """Start the periodic lease/quorum/commit checks on the running loop."""
        self._tick_task = asyncio.get_running_loop().create_task(self._tick_forever())

    async def stop(self) -> None:
        """Stop the tick loop, fail every waiting call and end the peers' Session streams."""
        if self._tick_task is not None:
            await cancel_and_wait([self._tick_task])
        await self.liveness.stop()
        self._stopping = True
        for fut in self.quorums.waiting():
            fut.cancel()
        await self.streams.end_all()

    async def _tick_forever(self) -> None:
        while True:
            try:
                self.tick()
            except Exception:  # a bug in one tick must not stop leases and quorums for good
                log.exception("coordinator tick failed")
            await asyncio.sleep(TICK_S)

    def tick(self) -> None:
        """Expire leases (twice a second), probe the peers a quorum waits for, close a ready quorum, decide rounds."""
        self.liveness.check()
        self.quorums.close_if_ready()
        self.quorums.decide_all()

    # -- validation --------------------------------------------------------------------

    def _check_run(self, run_id: str) -> None:
        if run_id != self.config.run_id:
            raise BadRequest(
                grpc.StatusCode.FAILED_PRECONDITION,
                f"this coordinator serves run {self.config.run_id!r}, not {run_id[:100]!r}: "
                f"give the peer --run {self.config.run_id} (or point --coordinator at the coordinator of run {run_id[:100]!r})",
            )

    @property
    def _history_known(self) -> bool:
        """Whether this coordinator knows the run's history: its state file says it, or the run was founded or has
        committed a round here and no peer of an earlier coordinator has called (every peer is its own). Then a
        claim beyond what it gave out is refused; otherwise (started without a state file, the run's peers
        restarted from their checkpoints) the round a majority of the returning holders reach is adopted."""
        started_here = self._founded or self.state.rounds_committed > 0
        return self._saved is not None or (started_here and not self._run_under_way)

    def _note_stranger(self, peer_id: str) -> None:
        # An id this coordinator never gave out: a peer registered by an earlier coordinator
        # (the run is under way, and that peer is about to rejoin).
        if peer_id and peer_id not in self.state.peers:
            self._run_under_way = True

    def _peer(self, peer_id: str) -> PeerRecord:
        peer = self.state.peers.get(peer_id)
        if peer is None or not peer.alive:
            self._note_stranger(peer_id)
            raise BadRequest(grpc.StatusCode.NOT_FOUND, f"unknown peer id {peer_id[:100]!r}: join the run first")
        peer.last_seen = time.monotonic()
        return peer

    # -- RPCs ---------------------------------------------------------------------------

    async def Join(self, request: pb.JoinRequest, context: grpc.aio.ServicerContext) -> pb.JoinResponse:
        """gRPC handler: see ``_join``."""
        return await self._answer(context, lambda req: self._join(req, self.callers.joiner_key(context, req)), request)

    async def Heartbeat(self, request: pb.HeartbeatRequest, context: grpc.aio.ServicerContext) -> pb.HeartbeatResponse:
        """gRPC handler, as the peer the call proves to be: see ``_heartbeat``."""
        return await self._as_peer(context, "Heartbeat", request)

    async def Leave(self, request: pb.LeaveRequest, context: grpc.aio.ServicerContext) -> pb.LeaveResponse:
        """gRPC handler, as the peer the call proves to be: see ``_leave``."""
        return await self._as_peer(context, "Leave", request)

    async def Quorum(self, request: pb.QuorumRequest, context: grpc.aio.ServicerContext) -> pb.QuorumResponse:
        """gRPC handler for in-process callers (the server sends ``quorum_wire``'s bytes): see ``_quorum``."""
        answer = await self.quorum_wire(request, context)
        # In-process callers get a message; the server sends quorum_wire's bytes as they are.
        return pb.QuorumResponse.FromString(answer) if isinstance(answer, bytes) else answer

    async def quorum_wire(self, request: pb.QuorumRequest, context: grpc.aio.ServicerContext) -> pb.QuorumResponse | bytes:
        """Quorum as the server sends it: a ROUND answer comes serialised, its member list once for all members
        (Quorums._form) and left out for an asker that holds it, so answering 1,000 members costs one
        serialisation, not 1,000."""
        return await self._as_peer(context, "Quorum", request)

    async def Commit(self, request: pb.CommitRequest, context: grpc.aio.ServicerContext) -> pb.CommitResponse:
        """gRPC handler, as the peer the call proves to be: see ``_commit``."""
        return await self._as_peer(context, "Commit", request)

    async def Status(self, request: pb.StatusRequest, context: grpc.aio.ServicerContext) -> pb.StatusResponse:
        """gRPC handler: see ``_status_rpc``."""
        return await self._answer(context, self._status_rpc, request)

    def peer_call(self, caller: Caller, rpc: str, request: Message) -> Message | bytes | Coroutine[Any, Any, Message | bytes]:
        """One call a peer makes as itself (rpc: Heartbeat, Leave, Quorum or Commit; its own RPC, or a message of
        its Session stream) from caller, checked as the call or the stream opened: the answer, or a coroutine for
        it (a Quorum answer may be bytes, as from quorum_wire); raises BadRequest."""
        try:
            self.callers.check(caller, rpc, request.peer_id)
        except Rejoin:  # Heartbeat only: a credential of an earlier coordinator is told to join again
            return pb.HeartbeatResponse(known=False, epoch=self.state.epoch)
        self.state.silence.heard(time.monotonic())
        return self._peer_handlers[rpc](request)

    async def _as_peer(self, context: grpc.aio.ServicerContext, rpc: str, request):
        """A peer's own RPC: its credential checked (with a run secret), then peer_call; a BadRequest becomes its status."""
        return await self._answer(context, lambda req: self.peer_call(self.callers.caller(context, rpc), rpc, req), request)

    async def _answer(self, context: grpc.aio.ServicerContext, handler, request):
        """handler(request) (its result awaited if a coroutine); a BadRequest becomes the call's status."""
        try:
            result = handler(request)
            if asyncio.iscoroutine(result):
                result = await result
            return result
        except BadRequest as exc:
            await context.abort(exc.code, str(exc))

    def _refuse(self, kind: str, code: grpc.StatusCode, why: str) -> BadRequest:
        """A refusal of this kind, counted for the metrics (refusals in the status)."""
        self.refusals[kind] = self.refusals.get(kind, 0) + 1
        return BadRequest(code, why)

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
                raise self._refuse(kind, grpc.StatusCode.FAILED_PRECONDITION, why)

    def _join(self, req: pb.JoinRequest, key: bytes | None = None) -> pb.JoinResponse:
        """Register a peer (key: with a run secret, the public key it proved; its credential binds the id to it)."""
        self._check_run(req.run_id)
        self.state.silence.heard(time.monotonic())
        # A re-registration under an id this coordinator never gave out: the run is under way.
        self._note_stranger(req.peer_id)
        if len(req.peer_id) > MAX_PEER_ID_CHARS:
            raise BadRequest(grpc.StatusCode.INVALID_ARGUMENT, f"a peer id has at most {MAX_PEER_ID_CHARS} characters")
        address = req.address.strip()
        if not address or len(address) > MAX_ADDRESS_CHARS or ":" not in address:
            raise BadRequest(grpc.StatusCode.INVALID_ARGUMENT, f"join needs the peer's host:port, got {address[:100]!r}")
        digest = checked_digest(req.state_digest)
        s = self.state
        self._check_settings(req, address)
        committed = s.last_committed_round
        verdict = claim_verdict(req.last_round, req.epoch, committed, s.epoch, self._history_known)
        if verdict != "ok":
            raise self._refuse(
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
            req.has_state, holder_alive or bool(catch_up), self._run_under_way, self._age(), self.config.rules,
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
            self._mark_lost(s.peers[other_id], "replaced by a new process at the same address", kind="leave")
        known = s.peers.get(req.peer_id)
        rejoin = known is not None and known.alive and known.address == address
        peer_id = req.peer_id if rejoin else s.new_peer_id(req.peer_id)
        # A round-0 state once the run has committed a round is a fresh peer's: it counts as none.
        has_state = holds_committed_state(req.has_state or kept_initial, req.last_round, committed)
        if has_state and not self._history_known:
            has_state = self._claim_accepted(peer_id, req.last_round)
        # What the peer holds tells a restarted coordinator where the run is (a newer state is adopted).
        if has_state and req.last_round > committed:
            s.last_committed_round = req.last_round
            if committed > 0:
                s.event("adopt", peer_id, f"holds round {req.last_round}, beyond the last committed {committed}")
        s.epoch = max(s.epoch, req.epoch)
        if has_state:
            self._note_digest(req.last_round, digest, peer_id)
        heartbeat_s, lease_s = self._lease_terms()
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
            self._founded = True
            self._save()
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
            raise self._refuse(
                "address-held", grpc.StatusCode.UNAVAILABLE,
                f"{address} belongs to live peer {other_id} with another key; retry once its lease ends",
            )
        known = s.peers.get(peer_id)
        live = known is not None and known.alive
        if key is not None and live and known.public_key != key:
            raise self._refuse(
                "forged-identity", grpc.StatusCode.UNAUTHENTICATED,
                f"peer id {peer_id[:100]!r} is a live peer's, with another key",
            )
        if not live and len(s.live) >= self.config.max_peers:
            raise self._refuse(
                "full", grpc.StatusCode.RESOURCE_EXHAUSTED,
                f"run {self.config.run_id} has its most peers ({self.config.max_peers}, --max-peers); try later",
            )

    def _claim_accepted(self, peer_id: str, last_round: int) -> bool:
        """Whether a returning holder's state counts, for a coordinator that does not know the run's history.

        Such a coordinator (restarted without its state file) adopts the round a majority of the returning
        holders reach, never one peer's word beyond it: a peer claiming more fetches the run's state like a
        fresh one.
        """
        self._claims[peer_id] = last_round
        while len(self._claims) > self.config.max_peers:  # bounded like the run (oldest claim first)
            self._claims.pop(next(iter(self._claims)))
        adopted = majority_round(self._claims.values())
        if last_round <= adopted:
            return True
        self.state.event("claim", peer_id, f"claims round {last_round}; the returning majority holds {adopted}")
        return False

    def _wait_answer(self, req: pb.JoinRequest, address: str) -> pb.JoinResponse:
        """Tell a joiner to wait: nobody live holds the run's last committed state, and it holds none or an older
        one (it is not registered)."""
        s = self.state
        held = req.last_round if holds_committed_state(req.has_state, req.last_round, s.last_committed_round) else 0
        reason = self._note_waiter(address, req.name[:200], req.peer_id[:100], held)
        other_id = s.by_address.get(address)
        if other_id is not None:
            # An earlier registration from this address (a joiner whose source died mid-fetch): it is no
            # member while it waits, so quorums must not wait for it.
            self._mark_lost(s.peers[other_id], WAITS_FOR_STATE, kind="leave", state="left")
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

    def _note_waiter(self, address: str, name: str, peer_id: str, held_round: int) -> str:
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
        return wait_reason(self.config.run_id, s, self.config.rules.startup_grace_s - self._age(), older)

    def _age(self) -> float:
        """Seconds since this coordinator started."""
        return time.monotonic() - self._started

    def _note_digest(self, round_id: int, digest: str, peer_id: str) -> None:
        note_digest(self.state, round_id, digest, peer_id)
        if round_id == self.state.last_committed_round:
            self._save()  # the digest of the last committed round, once known (saved only when it changed)

    def _lease_terms(self) -> tuple[float, float]:
        """(heartbeat interval, lease) for a peer joining or heartbeating now: heartbeats slow down as the run grows.

        One heartbeat costs the coordinator ~0.5 ms of CPU (mostly gRPC); beyond ~500 peers
        the interval grows so heartbeats stay under about half a core, and the lease stays
        at least three intervals.
        """
        heartbeat = max(self.config.heartbeat_s, len(self.state.live) / 500.0)
        return heartbeat, max(self.config.lease_s, 3.0 * heartbeat)

    def _heartbeat(self, req: pb.HeartbeatRequest) -> pb.HeartbeatResponse:
        self._check_run(req.run_id)
        peer = self.state.peers.get(req.peer_id)
        # Answered to a stranger too: a member dropped by the abort it is waiting in learns of it here.
        over = attempt_over((req.round_id, req.round_epoch), self.quorums.commits, self.quorums.decided)
        if peer is None or not peer.alive:
            self._note_stranger(req.peer_id)
            return pb.HeartbeatResponse(known=False, epoch=self.state.epoch, round_over=over)
        peer.last_seen = now = time.monotonic()
        if req.state_digest:
            # Refused before anything else is taken from this heartbeat when malformed.
            digest = checked_digest(req.state_digest)
            # Told to fetch the run's state, it says what it holds next when it asks for a round: a heartbeat sent
            # before its fetch would mark it to fetch again (CI at 12c3e36: test_realign saw two fetches).
            if not peer.fetch_told:
                self._note_digest(req.last_round, digest, peer.peer_id)
        self._take_metrics(peer, req.metrics, req.last_round)
        peer.offers_results = req.holds_results
        heartbeat_s, lease_s = self._lease_terms()
        # The lease only grows: an older peer keeps the interval its join gave, however the run shrinks since.
        peer.lease_s = max(peer.lease_s, lease_s)
        return pb.HeartbeatResponse(
            known=True, epoch=self.state.epoch, last_committed_round=self.state.last_committed_round,
            run_step=self.state.run_step, round_step=self.state.round_step, heartbeat_s=heartbeat_s, round_over=over,
            since_commit_s=self.quorums.since_commit(now), hold=self.sources.to_hold(peer.peer_id, req, now),
        )

    def _take_metrics(self, peer: PeerRecord, m: pb.PeerMetrics, last_round: int) -> None:
        """Keep the figures a peer's heartbeat (or its leave) carries; a figure that is not finite counts as none."""
        peer.step = m.step
        peer.steps_per_s = m.steps_per_s if math.isfinite(m.steps_per_s) else None
        peer.loss = m.loss if math.isfinite(m.loss) else None
        peer.eval_loss = m.eval_loss if math.isfinite(m.eval_loss) else None
        # Absent in an older peer's heartbeat (0.0): only a positive finite value is a privacy figure.
        peer.epsilon = m.privacy_epsilon if math.isfinite(m.privacy_epsilon) and m.privacy_epsilon > 0 else None
        peer.spread = m.spread if math.isfinite(m.spread) and m.spread > 0 else None
        peer.samples = m.samples
        peer.bytes_sent = m.bytes_sent
        peer.bytes_received = m.bytes_received
        peer.activity = m.activity[:64]
        # At most a few kinds (the peer's own names), each a short string: a peer cannot grow this.
        peer.refusals = {kind[:32]: count for kind, count in sorted(m.refusals.items())[:16]}
        self.state.record_metrics(peer)
        self.state.note_step(peer.peer_id, last_round, m.step)

    def _push_holds(self, round_id: int) -> None:
        """As a round of too few holders commits, ask peers at once, on their Session streams, to keep its result:
        by their next heartbeats its members may all be gone (docs/durability.md). Advice: a failure here is logged
        and never the commit's (the heartbeats ask later)."""
        try:
            heartbeat_s, _ = self._lease_terms()
            # Heard from within two heartbeat intervals: not a peer paused or cut off (chaos seed 1179 asked one).
            chosen, message = self.sources.to_push(round_id, self.streams, time.monotonic(), heard_s=2 * heartbeat_s)
            if message is None:
                return
            raw = pushed_bytes(pb.HeartbeatResponse(hold=[message]))
            for peer_id in chosen:
                self.streams.push(peer_id, raw)
        except Exception:  # noqa: BLE001 - the round is committed and its members answered already
            log.exception("asking peers at once to keep round %d's result failed", round_id)
            return
        log.info("asked %s at once to keep round %d's result", ", ".join(chosen), round_id)

    def _leave(self, req: pb.LeaveRequest) -> pb.LeaveResponse:
        self._check_run(req.run_id)
        peer = self.state.peers.get(req.peer_id)
        if peer is None:
            return pb.LeaveResponse()
        why = req.reason[:200] or "left"
        if peer.alive and req.state_digest:
            self._note_digest(req.last_round, checked_digest(req.state_digest), peer.peer_id)
        if req.HasField("metrics"):
            self._take_metrics(peer, req.metrics, req.last_round)
        peer.finished = req.reason == FINISHED
        if peer.alive:
            self._mark_lost(peer, why, kind="leave", state="left")
        elif peer.state == "lost":
            # Its lease lapsed before its Leave came (a slow link, a long last round): it left all the same.
            peer.state, peer.activity = "left", ""
            self.state.event("leave", peer.peer_id, why)
        return pb.LeaveResponse()

    async def _quorum(self, req: pb.QuorumRequest) -> pb.QuorumResponse | bytes:
        self._check_run(req.run_id)
        digest = checked_digest(req.state_digest)
        give_up = time.monotonic() + self.config.quorum_timeout_s
        tag = req.tag[:MAX_TAG_CHARS]
        if req.min_members > MAX_MIN_MEMBERS:
            raise BadRequest(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"min_members {req.min_members} is beyond any run this coordinator forms rounds for ({MAX_MIN_MEMBERS})",
            )
        least = max(1, req.min_members)
        if len(req.round_format) > MAX_FORMAT_CHARS:
            raise BadRequest(grpc.StatusCode.INVALID_ARGUMENT,
                             f"round_format of {len(req.round_format)} characters (at most {MAX_FORMAT_CHARS})")
        noted = False
        while True:
            peer = self._peer(req.peer_id)
            if not noted:
                # Where the run trains now, fresher than the heartbeats: a peer sent to catch up while the others
                # wait in a quorum lines up with the step they asked at, not one a heartbeat said a second ago.
                self.state.note_step(peer.peer_id, req.last_round, req.step)
            peer.last_round = req.last_round
            # A peer asks for rounds only once it holds a state (the run's, fetched or founded,
            # or its checkpoint), even at round 0: so it may catch up by results too.
            peer.has_state = True
            self.state.synced(peer)  # its fetch went through (if it had failed): quorums wait for it again
            peer.fetch_told = False  # its digest counts again, heartbeats' too
            if not noted:
                self._note_digest(req.last_round, digest, peer.peer_id)
                noted = True
            # A member of the attempt in flight asking before it reported lost the answer naming it: that attempt
            # fails now, instead of waiting for a report that never comes.
            self.quorums.forget_lost_answer(peer.peer_id)
            attempt = self.quorums.in_flight()
            if attempt is not None:
                # An attempt is in flight (this peer is not in it): hold the call until it is decided. Committed:
                # this peer lacks the round and is told to resync; aborted: it is in time for the retry's quorum.
                await self._wait(attempt.decided, give_up, peer.peer_id)
                continue
            resync = self._realign_answer(peer) or self._resync_answer(peer, req.last_round)
            self.state.waiting.done(peer.address)
            if resync is not None:
                return resync
            peer.state = "active"
            self.sources.done_serving(peer.peer_id)
            answer = await self._wait(
                self.quorums.enqueue(peer.peer_id, tag, least, req.round_format, req.step), give_up, peer.peer_id
            )
            if answer is not None:
                return answer.wire(req.known_members, req.member_changes, req.packed_members)
            # None: the round formed without this peer; it is held (above) until that attempt is decided.

    def _resync_answer(self, peer: PeerRecord, last_round: int) -> pb.QuorumResponse | None:
        """RESYNC (with the rounds it missed, when remembered) for a peer behind the run; None if it is up to date."""
        s = self.state
        rules = self.config.rules
        # Within the startup grace the holders of newer rounds may still be re-registering: no rollback yet.
        settled = self._age() >= rules.startup_grace_s
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
                self._save()
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
            reason = self._note_waiter(peer.address, peer.name, peer.peer_id, last_round if peer.has_state else 0)
            self._mark_lost(peer, WAITS_FOR_STATE, kind="leave", state="left")
            raise BadRequest(grpc.StatusCode.NOT_FOUND, f"this peer waits for the run's state: {reason}")
        peer.state = "syncing"
        if missed:
            how = f"catch up {len(missed)} round(s)"
        else:
            how = f"from {sources[0].peer_id}" if sources else "skips them: its state is its own"
        s.event("resync", peer.peer_id, f"behind round {s.last_committed_round}; {how}")
        return self._resync_message(peer, sources, missed)

    def _realign_answer(self, peer: PeerRecord) -> pb.QuorumResponse | None:
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
        detail = f"its state of round {peer.last_round} is not the run's ({short(s.last_digest)}); from {sources[0].peer_id}"
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

    async def _wait(self, fut: asyncio.Future, give_up: float, peer_id: str):
        """fut's result, or the 'no quorum' refusal once the Quorum call has waited quorum_timeout_s."""
        try:
            done = await settled(fut, max(0.0, give_up - time.monotonic()))
        except asyncio.CancelledError:
            # The caller went away (its deadline passed, or it cancelled): a round formed now must not count
            # it as a member, or the others would find it absent and retry without it.
            self.quorums.withdraw(peer_id, fut)
            raise
        if not done:
            minimum = self.quorums.minimum(self.quorums.pending)
            self.quorums.withdraw(peer_id, fut)
            alive = len([p for p in self.state.alive_peers() if p.has_state])
            raise BadRequest(
                grpc.StatusCode.FAILED_PRECONDITION,
                f"{NO_QUORUM} in {self.config.quorum_timeout_s:g} s: {alive} live peer(s), {minimum}; "
                "start more peers or lower --min-peers",
            )
        if fut.cancelled() and self._stopping:
            raise BadRequest(grpc.StatusCode.UNAVAILABLE, "the coordinator is stopping; retry when it is back")
        if fut.cancelled():
            # The same peer asked again (Quorums.enqueue keeps its newest request): this call gets a status.
            raise BadRequest(grpc.StatusCode.ABORTED, "superseded by a newer Quorum request from the same peer")
        return fut.result()

    async def _commit(self, req: pb.CommitRequest) -> pb.CommitResponse:
        self._check_run(req.run_id)
        attempt = (req.round_id, req.epoch)
        quorums = self.quorums
        if attempt in quorums.decided:
            # Also for a member the decision dropped: it must learn the outcome to apply nothing.
            if attempt == quorums.remembered:
                log.info("peer %s asked again about round %d, which committed before this coordinator started: "
                         "it applies it", req.peer_id[:100], req.round_id)
            return self._decision_message(quorums.decided[attempt])
        self._peer(req.peer_id)
        pending = quorums.commits.get(attempt)
        if pending is None:
            other = next((c.record.epoch for (r, _), c in quorums.commits.items() if r == req.round_id), None)
            if other is not None:
                raise BadRequest(
                    grpc.StatusCode.FAILED_PRECONDITION, f"round {req.round_id} is at epoch {other}, not {req.epoch}"
                )
            raise BadRequest(
                grpc.StatusCode.NOT_FOUND, f"round {req.round_id} at epoch {req.epoch} is unknown to this coordinator"
            )
        if req.peer_id not in pending.member_set:
            raise BadRequest(
                grpc.StatusCode.FAILED_PRECONDITION,
                f"peer {req.peer_id} is not a member of round {req.round_id} (members: {', '.join(pending.record.members)})",
            )
        failed = tuple(f[:100] for f in req.failed_peers[:1000])
        if req.peer_id not in pending.reports:  # a report sent again (a retried call) counts once
            pending.reports[req.peer_id] = Report(ok=req.ok, failed=failed, reason=req.reason[:MAX_TEXT_CHARS])
            pending.bytes += req.report.bytes_sent
            waited = req.report.waited_s
            if waited > 0 and math.isfinite(waited) and req.report.waited_for in pending.member_set:
                pending.waits[req.peer_id] = (req.report.waited_for, waited)
        pending.first_report_at = pending.first_report_at or time.monotonic()
        if not req.ok:
            pending.first_failure_at = pending.first_failure_at or time.monotonic()
        if math.isfinite(req.report.wall_s):
            pending.wall_s = max(pending.wall_s, req.report.wall_s)
        decided = pending.decided
        if not req.ok or len(pending.reports) == len(pending.record.members):
            # Otherwise the tick decides: deciding on every report would cost O(members^2) a round.
            quorums.decide_if_known(attempt)
        if not await settled(decided, self.config.commit_timeout_s + self.config.lease_s + 5):
            raise TimeoutError(f"round {req.round_id} at epoch {req.epoch} was not decided in time")
        return self._decision_message(decided.result())

    def _status_rpc(self, req: pb.StatusRequest) -> pb.StatusResponse:
        self._check_run(req.run_id)
        return pb.StatusResponse(json=json.dumps(self.status()))

    # -- the protocol's moves -------------------------------------------------------------

    def status(self) -> dict:
        """The status document (call on the coordinator's loop)."""
        doc = self.state.status(self.address, VERSION)
        refusals = dict(self.refusals)
        if self.unauthenticated():
            refusals["unauthenticated"] = self.unauthenticated()
        doc["refusals"] = dict(sorted(refusals.items()))
        doc["rate_limited"] = self.rate_limited()
        return doc

    def _save(self) -> None:
        """Record in the state file (if any) that the run exists and how far it got."""
        if not self.config.state_file:
            return
        s = self.state
        # Before the first commit the run's state is the founder's initial state: its digest is the one to keep.
        digest = s.last_digest if s.last_committed_round > 0 else s.initial_digest
        saved = SavedRun(self.config.run_id, s.last_committed_round, s.epoch, digest, s.last_committed_epoch)
        if saved != self._saved:
            save_run(self.config.state_file, saved)
            self._saved = saved

    def _decision_message(self, decision: Decision) -> pb.CommitResponse:
        return pb.CommitResponse(
            commit=decision.commit, reason=decision.reason, epoch=self.state.epoch, dropped=list(decision.dropped)
        )

    def _mark_lost(self, peer: PeerRecord, why: str, kind: str, state: str = "lost") -> None:
        self.state.drop_peer(peer, state)
        self.sources.done_serving(peer.peer_id)
        self.quorums.refuse(peer.peer_id, grpc.StatusCode.NOT_FOUND, f"peer {peer.peer_id} is out of the run: {why}")
        self.state.event(kind, peer.peer_id, why)
        log.info("peer %s %s: %s", peer.label, state, why)

