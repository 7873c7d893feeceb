"""The coordinator: membership authority of one run.

It holds soft state only (``RunState``; optionally a small state file, see
``peer/coordstate.py``) and is never on the data path. All gRPC handlers and
a periodic tick run on one asyncio loop, so the state needs no locks; the
dashboard (an HTTP server on its own thread, started by
``peer/coordserver.py``) reads a snapshot built on that loop. Protocol
decisions come from ``collectives/quorum.py``.

A round, as the coordinator sees it::

    peers ask Quorum(last_round) --> pending quorum --(quorum_ready)--> round formed
      (a peer behind the last committed round is told RESYNC instead)
    members run the all-reduce, then report Commit(ok, failed)
    --(commit_decision)--> committed: last_committed_round = round
                        \\-> aborted: dropped members are out, epoch bumps,
                                     survivors ask Quorum again (same contributions)
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import time
from dataclasses import dataclass, field

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from protos import membership_pb2 as pb
from protos import membership_pb2_grpc as pb_grpc
from collectives.errors import ConfigError
from collectives.membership import NO_QUORUM
from peer.coordinator.rules import (
    CommitInputs,
    Decision,
    QuorumRules,
    Report,
    choose_sync_source,
    commit_decision,
    head_round,
    join_action,
    needs_resync,
    next_epoch,
    order_members,
    peers_to_probe,
    quorum_hopeless,
    quorum_ready,
)
from collectives.transport import consume_exception
from peer.coordinator.statefile import SavedRun, load_run, save_run
from peer.coordinator.runstate import PeerRecord, RoundRecord, RunState

log = logging.getLogger(__name__)

VERSION = "0.1.0"
TICK_S = 0.05
LEASE_CHECK_S = 0.5
MAX_ADDRESS_CHARS = 256
MAX_TEXT_CHARS = 2000


@dataclass(frozen=True)
class CoordinatorConfig:
    """Settings of a coordinator process (filled by ``loconet coordinator``)."""

    run_id: str = "demo"
    host: str = "127.0.0.1"
    port: int = 7070
    # None: no dashboard.
    dashboard_port: int | None = 8080
    dashboard_host: str = "127.0.0.1"
    min_peers: int = 1
    # A quorum closes this long after its first request even if some live peers have not asked.
    join_timeout_s: float = 5.0
    lease_s: float = 5.0
    heartbeat_s: float = 1.0
    # After the first report of a round, how long the others have to report.
    commit_timeout_s: float = 30.0
    # How long a Quorum call waits before telling the peer the group is too small.
    quorum_timeout_s: float = 120.0
    # After a (re)start, quorums wait this long for peers to re-register (None: one lease).
    startup_grace_s: float | None = None
    history: int = 500
    # Check that peers a quorum waits for still listen (a dead one is dropped at once, not
    # after its lease). Off for simulated peers that have no server (bench membership).
    probe_peers: bool = True
    # Where to remember that the run was founded, across restarts (peer/coordstate.py); None: nowhere.
    state_file: str | None = None

    def __post_init__(self) -> None:
        if not self.run_id:
            raise ConfigError("run id must not be empty")
        if self.heartbeat_s <= 0 or self.lease_s <= self.heartbeat_s:
            raise ConfigError(f"lease ({self.lease_s} s) must be longer than the heartbeat interval ({self.heartbeat_s} s)")
        for name in ("join_timeout_s", "commit_timeout_s", "quorum_timeout_s"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"{name} must be positive")

    @property
    def rules(self) -> QuorumRules:
        """The quorum rule's settings."""
        grace = self.lease_s if self.startup_grace_s is None else self.startup_grace_s
        return QuorumRules(self.min_peers, self.join_timeout_s, grace)


class BadRequest(Exception):
    """A request the coordinator refuses; carries the gRPC status to answer with."""

    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(message)
        self.code = code


@dataclass
class PendingQuorum:
    """Requests waiting for the next round's group."""

    first_at: float
    tag: str
    waiting: dict[str, asyncio.Future] = field(default_factory=dict)


@dataclass
class PendingCommit:
    """A formed round waiting for its members' reports."""

    record: RoundRecord
    formed_at: float
    reports: dict[str, Report] = field(default_factory=dict)
    first_report_at: float | None = None
    decided: asyncio.Future | None = None
    bytes: int = 0
    wall_s: float = 0.0


class Coordinator(pb_grpc.CoordinatorServicer):
    """The Coordinator gRPC service of one run, with its tick loop."""

    def __init__(self, config: CoordinatorConfig) -> None:
        self.config = config
        self.state = RunState(config.run_id, config.min_peers, history=config.history)
        self.address = ""
        self._started = time.monotonic()
        # Whether the run is known to be under way: a peer registered by an earlier coordinator
        # has called, or the state file says the run was founded (see join_action).
        self._run_under_way = False
        self._saved: SavedRun | None = None
        if config.state_file:
            self._saved = load_run(config.state_file, config.run_id)
        if self._saved is not None:
            self._run_under_way = True
            self.state.last_committed_round = self._saved.last_committed_round
            self.state.next_round_id = max(self.state.next_round_id, self._saved.last_committed_round + 1)
            self.state.epoch = self._saved.epoch
            log.info(
                "state file %s: run %s was founded (last committed round %d); joiners wait up to %g s for its holders",
                config.state_file, config.run_id, self._saved.last_committed_round, config.rules.startup_grace_s,
            )
        self._pending: PendingQuorum | None = None
        self._commits: dict[int, PendingCommit] = {}
        self._decided: dict[int, Decision] = {}
        self._tick_task: asyncio.Task | None = None
        self._serving: dict[str, int] = {}
        # Liveness probes of peers a quorum waits for: peer id -> when last probed.
        self._probed: dict[str, float] = {}
        self._last_lease_check = time.monotonic()
        self._probes: set[asyncio.Task] = set()
        self.state.event("coordinator-start", "", f"run {config.run_id}")

    # -- lifecycle ---------------------------------------------------------------------

    def start_ticking(self) -> None:
        """Start the periodic lease/quorum/commit checks on the running loop."""
        self._tick_task = asyncio.get_running_loop().create_task(self._tick_forever())

    async def stop(self) -> None:
        """Stop the tick loop and fail every waiting call."""
        if self._tick_task is not None:
            self._tick_task.cancel()
            await asyncio.gather(self._tick_task, return_exceptions=True)
        for task in list(self._probes):
            task.cancel()
        await asyncio.gather(*self._probes, return_exceptions=True)
        for fut in self._all_waiting():
            fut.cancel()

    def _all_waiting(self) -> list[asyncio.Future]:
        futs = list(self._pending.waiting.values()) if self._pending else []
        futs += [c.decided for c in self._commits.values() if c.decided is not None]
        return futs

    async def _tick_forever(self) -> None:
        while True:
            try:
                self.tick()
            except Exception:  # a bug in one tick must not stop leases and quorums for good
                log.exception("coordinator tick failed")
            await asyncio.sleep(TICK_S)

    def tick(self) -> None:
        """Expire leases (twice a second), close a ready quorum, decide rounds."""
        if time.monotonic() - self._last_lease_check >= LEASE_CHECK_S:
            self._expire_leases()
        self._probe_missing()
        self._maybe_close_quorum()
        for round_id in list(self._commits):
            self._maybe_decide(round_id)

    # -- validation --------------------------------------------------------------------

    def _check_run(self, run_id: str) -> None:
        if run_id != self.config.run_id:
            raise BadRequest(
                grpc.StatusCode.FAILED_PRECONDITION,
                f"this coordinator serves run {self.config.run_id!r}, not {run_id[:100]!r}: check --run",
            )

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
        return await self._answer(context, self._join, request)

    async def Heartbeat(self, request: pb.HeartbeatRequest, context) -> pb.HeartbeatResponse:
        return await self._answer(context, self._heartbeat, request)

    async def Leave(self, request: pb.LeaveRequest, context) -> pb.LeaveResponse:
        return await self._answer(context, self._leave, request)

    async def Quorum(self, request: pb.QuorumRequest, context) -> pb.QuorumResponse:
        return await self._answer(context, self._quorum, request)

    async def Commit(self, request: pb.CommitRequest, context) -> pb.CommitResponse:
        return await self._answer(context, self._commit, request)

    async def Status(self, request: pb.StatusRequest, context) -> pb.StatusResponse:
        return await self._answer(context, self._status_rpc, request)

    async def _answer(self, context: grpc.aio.ServicerContext, handler, request):
        try:
            result = handler(request)
            if asyncio.iscoroutine(result):
                result = await result
            return result
        except BadRequest as exc:
            await context.abort(exc.code, str(exc))

    def _join(self, req: pb.JoinRequest) -> pb.JoinResponse:
        self._check_run(req.run_id)
        address = req.address.strip()
        if not address or len(address) > MAX_ADDRESS_CHARS or ":" not in address:
            raise BadRequest(grpc.StatusCode.INVALID_ARGUMENT, f"join needs the peer's host:port, got {address[:100]!r}")
        s = self.state
        holder_alive = any(s.peers[p].has_state for p in s.live if s.peers[p].address != address)
        action = join_action(
            req.has_state, holder_alive, self._run_under_way, time.monotonic() - self._started, self.config.rules
        )
        if action == "wait":
            # UNAVAILABLE: the client retries with backoff; the holders re-register within a lease.
            raise BadRequest(
                grpc.StatusCode.UNAVAILABLE,
                "this coordinator just restarted and the peers holding the run's state have not re-registered yet; retry",
            )
        other_id = s.by_address.get(address)
        if other_id is not None and other_id != req.peer_id:
            # The same address again means the old process is gone (a restart).
            self._mark_lost(s.peers[other_id], "replaced by a new process at the same address", kind="leave")
        known = s.peers.get(req.peer_id)
        rejoin = known is not None and known.alive and known.address == address
        peer_id = req.peer_id if rejoin else s.new_peer_id(req.peer_id)
        # What the peer holds tells a restarted coordinator where the run is.
        if req.has_state:
            s.last_committed_round = max(s.last_committed_round, req.last_round)
            s.next_round_id = max(s.next_round_id, req.last_round + 1)
        s.epoch = max(s.epoch, req.epoch)
        heartbeat_s, lease_s = self._lease_terms()
        peer = PeerRecord(
            peer_id=peer_id,
            address=address,
            name=req.name[:200],
            last_round=req.last_round,
            has_state=req.has_state,
            codecs=tuple(c[:32] for c in req.codecs[:32]),
            lease_s=lease_s,
        )
        founder = action == "found"
        sync_from = ""
        if founder:
            # Nobody holds a state: this peer's initial state becomes the run's.
            peer.has_state = True
            peer.state = "active"
            self._save()
        elif not req.has_state or needs_resync(req.last_round, s.last_committed_round):
            source = choose_sync_source([p.view() for p in s.alive_peers()], peer_id, s.last_committed_round, self._serving)
            if source is not None:
                sync_from = source.address
                self._serving[source.peer_id] = self._serving.get(source.peer_id, 0) + 1
            peer.state = "syncing"
        else:
            peer.state = "active"
        s.add_peer(peer)
        s.event("rejoin" if req.peer_id else "join", peer_id, f"{'founder ' if founder else ''}from {address}")
        log.info("peer %s joined from %s (sync from %s)", peer_id, address, sync_from or "-")
        return pb.JoinResponse(
            peer_id=peer_id,
            lease_s=lease_s,
            heartbeat_s=heartbeat_s,
            epoch=s.epoch,
            last_committed_round=s.last_committed_round,
            sync_from=sync_from,
        )

    def _lease_terms(self) -> tuple[float, float]:
        """(heartbeat interval, lease) for a joining peer: heartbeats slow down as the run grows.

        One heartbeat costs the coordinator ~0.5 ms of CPU (mostly gRPC); beyond ~500 peers
        the interval grows so heartbeats stay under about half a core, and the lease stays
        at least three intervals.
        """
        heartbeat = max(self.config.heartbeat_s, len(self.state.live) / 500.0)
        return heartbeat, max(self.config.lease_s, 3.0 * heartbeat)

    def _heartbeat(self, req: pb.HeartbeatRequest) -> pb.HeartbeatResponse:
        self._check_run(req.run_id)
        peer = self.state.peers.get(req.peer_id)
        if peer is None or not peer.alive:
            self._note_stranger(req.peer_id)
            return pb.HeartbeatResponse(known=False, epoch=self.state.epoch)
        peer.last_seen = time.monotonic()
        m = req.metrics
        peer.step = m.step
        peer.steps_per_s = m.steps_per_s if math.isfinite(m.steps_per_s) else None
        peer.loss = m.loss if math.isfinite(m.loss) else None
        peer.samples = m.samples
        peer.bytes_sent = m.bytes_sent
        peer.bytes_received = m.bytes_received
        peer.activity = m.activity[:64]
        if peer.loss is not None:
            self.state.record_loss(peer.peer_id, m.step, peer.loss)
        return pb.HeartbeatResponse(
            known=True, epoch=self.state.epoch, last_committed_round=self.state.last_committed_round
        )

    def _leave(self, req: pb.LeaveRequest) -> pb.LeaveResponse:
        self._check_run(req.run_id)
        peer = self.state.peers.get(req.peer_id)
        if peer is not None and peer.alive:
            self._mark_lost(peer, req.reason[:200] or "left", kind="leave", state="left")
        return pb.LeaveResponse()

    async def _quorum(self, req: pb.QuorumRequest) -> pb.QuorumResponse:
        self._check_run(req.run_id)
        peer = self._peer(req.peer_id)
        s = self.state
        peer.last_round = req.last_round
        if req.last_round > 0 or peer.has_state:
            peer.has_state = True
        if needs_resync(req.last_round, s.last_committed_round):
            # Only a peer that is behind needs this check (a scan of every peer).
            head = head_round([p.view() for p in s.alive_peers()], s.last_committed_round)
            if head < s.last_committed_round:
                s.event("rollback", "", f"peers holding round {s.last_committed_round} are gone; continuing from round {head}")
                log.warning("no live peer holds round %d; the run continues from round %d", s.last_committed_round, head)
                s.last_committed_round = head
        if needs_resync(req.last_round, s.last_committed_round):
            source = choose_sync_source([p.view() for p in s.alive_peers()], peer.peer_id, s.last_committed_round, self._serving)
            if source is None:
                raise BadRequest(grpc.StatusCode.UNAVAILABLE, "no up-to-date peer to resync from yet; retry")
            peer.state = "syncing"
            s.event("resync", peer.peer_id, f"behind round {s.last_committed_round}; from {source.peer_id}")
            return pb.QuorumResponse(
                action=pb.QuorumResponse.RESYNC,
                sync_from=source.address,
                last_committed_round=s.last_committed_round,
                epoch=s.epoch,
            )
        peer.has_state = True
        peer.state = "active"
        self._serving.pop(peer.peer_id, None)
        tag = req.tag[:200]
        if self._pending is None:
            self._pending = PendingQuorum(first_at=time.monotonic(), tag=tag)
        elif self._pending.tag != tag:
            raise BadRequest(
                grpc.StatusCode.FAILED_PRECONDITION,
                f"quorum for {tag!r} while the pending one is for {self._pending.tag!r}: peers disagree on the schedule",
            )
        previous = self._pending.waiting.get(peer.peer_id)
        if previous is not None and not previous.done():
            previous.cancel()
        fut: asyncio.Future = asyncio.get_running_loop().create_future()
        self._pending.waiting[peer.peer_id] = fut
        self._maybe_close_quorum(cheap=True)
        try:
            return await asyncio.wait_for(asyncio.shield(fut), self.config.quorum_timeout_s)
        except asyncio.TimeoutError:
            if self._pending is not None and self._pending.waiting.get(peer.peer_id) is fut:
                del self._pending.waiting[peer.peer_id]
            alive = len([p for p in s.alive_peers() if p.has_state])
            raise BadRequest(
                grpc.StatusCode.FAILED_PRECONDITION,
                f"{NO_QUORUM} in {self.config.quorum_timeout_s:g} s: {alive} live peer(s), min_peers is "
                f"{self.config.min_peers}; start more peers or lower --min-peers",
            ) from None

    async def _commit(self, req: pb.CommitRequest) -> pb.CommitResponse:
        self._check_run(req.run_id)
        if req.round_id in self._decided:
            # Also for a member the decision dropped: it must learn the outcome to apply nothing.
            return self._decision_message(self._decided[req.round_id])
        self._peer(req.peer_id)
        pending = self._commits.get(req.round_id)
        if pending is None:
            raise BadRequest(grpc.StatusCode.NOT_FOUND, f"round {req.round_id} is unknown to this coordinator")
        if req.peer_id not in pending.record.members:
            raise BadRequest(
                grpc.StatusCode.FAILED_PRECONDITION,
                f"peer {req.peer_id} is not a member of round {req.round_id} (members: {', '.join(pending.record.members)})",
            )
        if req.epoch != pending.record.epoch:
            raise BadRequest(grpc.StatusCode.FAILED_PRECONDITION, f"round {req.round_id} is at epoch {pending.record.epoch}, not {req.epoch}")
        failed = tuple(f[:100] for f in req.failed_peers[:1000])
        pending.reports.setdefault(req.peer_id, Report(ok=req.ok, failed=failed, reason=req.reason[:MAX_TEXT_CHARS]))
        pending.first_report_at = pending.first_report_at or time.monotonic()
        pending.bytes += req.report.bytes_sent
        if math.isfinite(req.report.wall_s):
            pending.wall_s = max(pending.wall_s, req.report.wall_s)
        decided = pending.decided
        if not req.ok or len(pending.reports) == len(pending.record.members):
            # Otherwise the tick decides: deciding on every report would cost O(members^2) a round.
            self._maybe_decide(req.round_id)
        decision = await asyncio.wait_for(asyncio.shield(decided), self.config.commit_timeout_s + self.config.lease_s + 5)
        return self._decision_message(decision)

    def _status_rpc(self, req: pb.StatusRequest) -> pb.StatusResponse:
        self._check_run(req.run_id)
        return pb.StatusResponse(json=json.dumps(self.status()))

    # -- the protocol's moves -------------------------------------------------------------

    def status(self) -> dict:
        """The status document (call on the coordinator's loop)."""
        return self.state.status(self.address, VERSION)

    def _eligible(self) -> set[str]:
        # Every live peer, syncing joiners included: a quorum waits (up to the join
        # timeout) for a joiner to finish syncing, so that joiners are admitted at the
        # next round boundary instead of chasing rounds that form without them.
        return self.state.live

    def _maybe_close_quorum(self, cheap: bool = False) -> None:
        pending = self._pending
        if pending is None:
            return
        now = time.monotonic()
        if cheap:
            # Per request: counts only, so n requests cost O(n), not O(n^2).
            waiting = len(pending.waiting)
            timed_out = now - pending.first_at >= self.config.join_timeout_s
            if waiting < self.config.min_peers or (waiting < len(self.state.live) and not timed_out):
                return
        pending.waiting = {pid: f for pid, f in pending.waiting.items() if not f.done()}
        if not pending.waiting:
            self._pending = None
            return
        requesting = set(pending.waiting)
        eligible = self._eligible() | requesting
        started = self.state.last_committed_round > 0
        if quorum_hopeless(len(eligible), now - pending.first_at, now - self._started, started, self.config.rules):
            self._refuse_pending(pending, len(eligible))
            return
        if not quorum_ready(requesting, eligible, now - pending.first_at, now - self._started, self.config.rules):
            return
        s = self.state
        members = order_members(requesting)
        s.epoch = next_epoch(s.epoch, s.last_members, members, s.aborted_since)
        s.last_members, s.aborted_since = members, False
        round_id = s.next_round_id
        s.next_round_id += 1
        record = RoundRecord(round_id, s.epoch, members, time.time(), tag=pending.tag)
        s.rounds.append(record)
        loop = asyncio.get_running_loop()
        self._commits[round_id] = PendingCommit(record=record, formed_at=now, decided=loop.create_future())
        template = pb.QuorumResponse(
            action=pb.QuorumResponse.ROUND,
            round_id=round_id,
            epoch=s.epoch,
            members=[pb.Member(peer_id=m, address=s.peers[m].address) for m in members],
            last_committed_round=s.last_committed_round,
        )
        for rank, pid in enumerate(members):
            # One member list copied per answer (C++ copy), instead of n new Member objects each.
            answer = pb.QuorumResponse()
            answer.CopyFrom(template)
            answer.rank = rank
            pending.waiting[pid].set_result(answer)
        self._pending = None
        log.info("round %d formed at epoch %d with %s", round_id, s.epoch, ", ".join(members))

    def _maybe_decide(self, round_id: int) -> None:
        pending = self._commits.get(round_id)
        if pending is None:
            return
        s = self.state
        now = time.monotonic()
        expired = frozenset(m for m in pending.record.members if m not in s.live)
        deadline = pending.first_report_at is not None and now - pending.first_report_at >= self.config.commit_timeout_s
        decision = commit_decision(CommitInputs(tuple(pending.record.members), pending.reports, expired, deadline))
        if decision is None:
            return
        del self._commits[round_id]
        self._decided[round_id] = decision
        while len(self._decided) > self.config.history:
            del self._decided[min(self._decided)]
        record = pending.record
        record.duration_s = pending.wall_s or (now - pending.formed_at)
        record.bytes = pending.bytes
        if decision.commit:
            record.status = "committed"
            s.rounds_committed += 1
            s.last_committed_round = max(s.last_committed_round, round_id)
            for m in record.members:
                if m in s.peers:
                    s.peers[m].last_round = round_id
            s.event("commit", "", f"round {round_id} ({len(record.members)} members)")
            self._save()
        else:
            record.status = "aborted"
            record.reason = decision.reason
            s.rounds_aborted += 1
            s.aborted_since = True
            for m in decision.dropped:
                peer = s.peers.get(m)
                if peer is not None and peer.alive:
                    self._mark_lost(peer, f"dropped after round {round_id}: {decision.reason[:200]}", kind="failure")
            s.event("abort", "", f"round {round_id}: {decision.reason[:300]}")
            log.info("round %d aborted: %s (dropped %s)", round_id, decision.reason, ", ".join(decision.dropped) or "-")
        if pending.decided is not None and not pending.decided.done():
            pending.decided.set_result(decision)

    def _save(self) -> None:
        """Record in the state file (if any) that the run exists and how far it got."""
        if not self.config.state_file:
            return
        saved = SavedRun(self.config.run_id, self.state.last_committed_round, self.state.epoch)
        if saved != self._saved:
            save_run(self.config.state_file, saved)
            self._saved = saved

    def _decision_message(self, decision: Decision) -> pb.CommitResponse:
        return pb.CommitResponse(
            commit=decision.commit, reason=decision.reason, epoch=self.state.epoch, dropped=list(decision.dropped)
        )

    def _refuse_pending(self, pending: PendingQuorum, live: int) -> None:
        """Answer every waiting Quorum call with 'too few peers' (the peers train on and ask again)."""
        reason = (
            f"{NO_QUORUM}: {live} live peer(s) left after the {self.config.join_timeout_s:g} s join timeout, "
            f"min_peers is {self.config.min_peers}; training goes on locally until more peers join"
        )
        for fut in pending.waiting.values():
            _refuse_waiter(fut, grpc.StatusCode.FAILED_PRECONDITION, reason)
        self._pending = None
        self.state.event("quorum-refused", "", reason)
        log.info("%s", reason)

    def _probe_missing(self) -> None:
        pending = self._pending
        if pending is None or not self.config.probe_peers:
            return
        now = time.monotonic()
        missing = self._eligible() - set(pending.waiting)
        # Only peers still missing need their probe times (keeps this bounded as peers come and go).
        self._probed = {p: t for p, t in self._probed.items() if p in missing}
        ages = {p: now - t for p, t in self._probed.items()}
        for peer_id in peers_to_probe(missing, now - pending.first_at, ages):
            self._probed[peer_id] = now
            task = asyncio.get_running_loop().create_task(self._probe(self.state.peers[peer_id]))
            self._probes.add(task)
            task.add_done_callback(self._probes.discard)

    async def _probe(self, peer: PeerRecord) -> None:
        """Mark a peer lost if its port refuses connections (its process is gone)."""
        channel = grpc.aio.insecure_channel(peer.address)
        try:
            await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=1.0)
        except grpc.aio.AioRpcError as exc:
            # UNAVAILABLE = refused: dead. A deadline means it may be paused: leave it to its lease.
            if exc.code() == grpc.StatusCode.UNAVAILABLE and peer.alive:
                self._mark_lost(peer, f"its port refuses connections ({exc.details()[:100]})", kind="lost")
        finally:
            await channel.close()

    def _expire_leases(self) -> None:
        now = time.monotonic()
        gap, self._last_lease_check = now - self._last_lease_check, now
        if gap > 1.0:
            # The loop itself stalled: heartbeats may be queued unanswered. Do not blame
            # the peers for the coordinator's own delay; check again next time.
            return
        for peer in self.state.alive_peers():
            if now - peer.last_seen > peer.lease_s:
                self._mark_lost(peer, f"no heartbeat for {now - peer.last_seen:.1f} s", kind="lost")

    def _mark_lost(self, peer: PeerRecord, why: str, kind: str, state: str = "lost") -> None:
        self.state.drop_peer(peer, state)
        self._serving.pop(peer.peer_id, None)
        if self._pending is not None:
            fut = self._pending.waiting.pop(peer.peer_id, None)
            if fut is not None:
                _refuse_waiter(fut, grpc.StatusCode.NOT_FOUND, f"peer {peer.peer_id} is out of the run: {why}")
        self.state.event(kind, peer.peer_id, why)
        log.info("peer %s %s: %s", peer.peer_id, state, why)


def _refuse_waiter(fut: asyncio.Future, code: grpc.StatusCode, message: str) -> None:
    """Answer a Quorum call waiting on fut with an error (unless it was answered already)."""
    if not fut.done():
        fut.set_exception(BadRequest(code, message))
        fut.add_done_callback(consume_exception)  # its caller may have gone already
