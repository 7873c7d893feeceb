"""The coordinator: membership authority of one run.

It holds soft state only (``RunState``; optionally a small state file, see
``peer/coordinator/statefile.py``) and is never on the data path. All gRPC
handlers and a periodic tick run on one asyncio loop, so the state needs no
locks; the dashboard (an HTTP server on its own thread, started by
``peer/coordinator/server.py``) reads a snapshot built on that loop. Protocol
decisions come from ``peer/coordinator/rules.py``, who takes part in a round
from the quorum policy (``peer/coordinator/policies/``); forming and
deciding the attempts of rounds is ``peer/coordinator/quorum.py``'s
``Quorums``; where a peer behind the run fetches the state or the missed
rounds' results from is ``peer/coordinator/sources.py``'s ``Sources``; the
settings are ``peer/coordinator/config.py``'s ``CoordinatorConfig``.

The ``Coordinator`` here answers the calls (checking their run and caller),
ticks, and owns the collaborators that do the longer calls' work: the Join
call is ``peer/coordinator/joins.py``'s ``Joins``; the Quorum call
``peer/coordinator/quorumcall.py``'s ``QuorumCalls``, whose RESYNC answers
for peers behind the run are ``peer/coordinator/resync.py``'s ``Resyncs``;
the state file's record of the run, and whether this coordinator knows the
run's history, ``peer/coordinator/durable.py``'s ``DurableRun``. Heartbeat,
Leave, Commit and Status are answered here.

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
from collections.abc import Callable, Coroutine
from typing import Any

import grpc
from google.protobuf.message import Message

from collectives.asynctasks import cancel_and_wait
from collectives.membership.roundplan import FINISHED
from peer.coordinator.config import CoordinatorConfig
from peer.coordinator.durable import DurableRun, checked_digest
from peer.coordinator.identity import Caller, Callers, Rejoin
from peer.coordinator.joins import MAX_ALGORITHM_CHARS, Joins
from peer.coordinator.liveness import Liveness, lease_terms
from peer.coordinator.quorum import BadRequest, Quorums
from peer.coordinator.quorumcall import QuorumCalls, settled
from peer.coordinator.resync import Resyncs
from peer.coordinator.rules import Decision, Report, attempt_over
from peer.coordinator.runstate import PeerRecord, RunState
from peer.coordinator.sessions import PeerStreams, pushed_bytes
from peer.coordinator.sources import Sources
from peer.version import package_version
from protos import membership_pb2 as pb
from protos import membership_pb2_grpc as pb_grpc

log = logging.getLogger(__name__)

# What the status document says this coordinator runs.
VERSION = package_version()
TICK_S = 0.05
MAX_TEXT_CHARS = 2000

# CoordinatorConfig lives in peer/coordinator/config.py, BadRequest in quorum.py, MAX_ALGORITHM_CHARS in joins.py;
# importing them from here still works.
__all__ = ["MAX_ALGORITHM_CHARS", "VERSION", "BadRequest", "Coordinator", "CoordinatorConfig"]


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
        # The state file's record of the run, and whether this coordinator knows the run's history.
        self.durable = DurableRun(config, self.state)
        self.quorums = Quorums(
            config, self.policy, self.state, self._started,
            drop=lambda peer, why: self._mark_lost(peer, why, kind="failure"),
            save=self.durable.save,
            run_under_way=lambda: self.durable.under_way,
            committed=self._push_holds,
        )
        if self.durable.saved is not None and not config.new_run:
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
        # The Join call, the Quorum answers for peers behind the run, and the Quorum call.
        self.joins = Joins(
            config, self.state, self.sources, self.callers, self.durable,
            age=self._age, mark_lost=self._mark_lost, refuse=self._refuse,
        )
        self.resyncs = Resyncs(
            config, self.state, self.sources, self.quorums,
            age=self._age, save=self.durable.save, mark_lost=self._mark_lost, note_waiter=self.joins.note_waiter,
        )
        self.quorum_calls = QuorumCalls(
            config, self.state, self.quorums, self.sources, self.durable, self.resyncs,
            peer=self._peer, stopping=lambda: self._stopping,
        )
        self.state.event("coordinator-start", "", f"run {config.run_id}")
        if config.new_run and self.durable.saved is not None:
            self.durable.save()  # the state file forgets the old run at once, before anything else happens

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
                f"give the peer --run {self.config.run_id} "
                f"(or point --coordinator at the coordinator of run {run_id[:100]!r})",
            )

    def _peer(self, peer_id: str) -> PeerRecord:
        peer = self.state.peers.get(peer_id)
        if peer is None or not peer.alive:
            self.durable.note_stranger(peer_id)
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
        """gRPC handler for in-process callers (the server sends ``quorum_wire``'s bytes): see
        ``QuorumCalls.answer``."""
        answer = await self.quorum_wire(request, context)
        # In-process callers get a message; the server sends quorum_wire's bytes as they are.
        return pb.QuorumResponse.FromString(answer) if isinstance(answer, bytes) else answer

    async def quorum_wire(
        self, request: pb.QuorumRequest, context: grpc.aio.ServicerContext
    ) -> pb.QuorumResponse | bytes:
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

    def peer_call(
        self, caller: Caller, rpc: str, request: Message
    ) -> Message | bytes | Coroutine[Any, Any, Message | bytes]:
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
        """A peer's own RPC: its credential checked (with a run secret), then peer_call; a BadRequest becomes its
        status."""
        return await self._answer(
            context, lambda req: self.peer_call(self.callers.caller(context, rpc), rpc, req), request
        )

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

    def _join(self, req: pb.JoinRequest, key: bytes | None = None) -> pb.JoinResponse:
        """Register a peer (key: with a run secret, the public key it proved): ``Joins.join``, once the call is
        checked to be for this run."""
        self._check_run(req.run_id)
        return self.joins.join(req, key)

    def _age(self) -> float:
        """Seconds since this coordinator started."""
        return time.monotonic() - self._started

    def _heartbeat(self, req: pb.HeartbeatRequest) -> pb.HeartbeatResponse:
        self._check_run(req.run_id)
        peer = self.state.peers.get(req.peer_id)
        # Answered to a stranger too: a member dropped by the abort it is waiting in learns of it here.
        over = attempt_over((req.round_id, req.round_epoch), self.quorums.commits, self.quorums.decided)
        if peer is None or not peer.alive:
            self.durable.note_stranger(req.peer_id)
            return pb.HeartbeatResponse(known=False, epoch=self.state.epoch, round_over=over)
        peer.last_seen = now = time.monotonic()
        if req.state_digest:
            # Refused before anything else is taken from this heartbeat when malformed.
            digest = checked_digest(req.state_digest)
            # Told to fetch the run's state, it says what it holds next when it asks for a round: a heartbeat sent
            # before its fetch would mark it to fetch again (CI at 12c3e36: test_realign saw two fetches).
            if not peer.fetch_told:
                self.durable.note_digest(req.last_round, digest, peer.peer_id)
        self._take_metrics(peer, req.metrics, req.last_round)
        peer.offers_results = req.holds_results
        heartbeat_s, lease_s = lease_terms(self.config, len(self.state.live))
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
            heartbeat_s, _ = lease_terms(self.config, len(self.state.live))
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
            self.durable.note_digest(req.last_round, checked_digest(req.state_digest), peer.peer_id)
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
        return await self.quorum_calls.answer(req)

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
                f"peer {req.peer_id} is not a member of round {req.round_id} "
                f"(members: {', '.join(pending.record.members)})",
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

