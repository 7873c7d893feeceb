"""The Quorum call: a peer asking for the run's next round is held until its round forms, or told to resync.

Each call notes what the peer reports (its round, step and state digest), is held while an attempt it is not a
member of is in flight (until it is decided), is answered RESYNC when the peer is behind the run or its state
lost to the run's (``resync.py``), and is otherwise queued for the round the quorum policy forms
(``Quorums.enqueue``), until ``quorum_timeout_s`` has passed. The Coordinator
(``peer/coordinator/service.py``) owns one ``QuorumCalls`` and checks the call's run and caller first.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

import grpc

from collectives.membership.coordinatorerrors import NO_QUORUM
from collectives.membership.roundformat import MAX_FORMAT_CHARS
from collectives.reduce.aggregation import MAX_ROUND_MEMBERS
from peer.coordinator.config import CoordinatorConfig
from peer.coordinator.durable import DurableRun, checked_digest
from peer.coordinator.quorum import BadRequest, Quorums
from peer.coordinator.resync import Resyncs
from peer.coordinator.runstate import PeerRecord, RunState
from peer.coordinator.sources import Sources
from protos import membership_pb2 as pb

MAX_TAG_CHARS = 200
# The largest round minimum a peer may ask for (QuorumRequest.min_members): Krum with f in the thousands.
MAX_MIN_MEMBERS = MAX_ROUND_MEMBERS


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


class QuorumCalls:
    """The Quorum calls of one run's coordinator, on its loop."""

    def __init__(
        self,
        config: CoordinatorConfig,
        state: RunState,
        quorums: Quorums,
        sources: Sources,
        durable: DurableRun,
        resyncs: Resyncs,
        *,
        peer: Callable[[str], PeerRecord],
        stopping: Callable[[], bool],
    ) -> None:
        self.config = config
        self.state = state
        self.quorums = quorums
        self.sources = sources
        self.durable = durable
        self.resyncs = resyncs
        # The coordinator's: the live peer of an id (its lease renewed; BadRequest NOT_FOUND for none), and whether
        # it is stopping (then a waiting call it ends is told to retry, not that it was superseded).
        self.peer = peer
        self.stopping = stopping

    async def answer(self, req: pb.QuorumRequest) -> pb.QuorumResponse | bytes:
        """The answer to a peer's Quorum call (of this run): RESYNC, or its round once formed (bytes, as
        ``Quorums`` serialises it); raises BadRequest (no quorum in time, a malformed request)."""
        digest = checked_digest(req.state_digest)
        give_up = time.monotonic() + self.config.quorum_timeout_s
        tag = req.tag[:MAX_TAG_CHARS]
        if req.min_members > MAX_MIN_MEMBERS:
            raise BadRequest(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"min_members {req.min_members} is beyond any run this coordinator forms rounds for "
                f"({MAX_MIN_MEMBERS})",
            )
        least = max(1, req.min_members)
        if len(req.round_format) > MAX_FORMAT_CHARS:
            raise BadRequest(grpc.StatusCode.INVALID_ARGUMENT,
                             f"round_format of {len(req.round_format)} characters (at most {MAX_FORMAT_CHARS})")
        noted = False
        while True:
            peer = self.peer(req.peer_id)
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
                self.durable.note_digest(req.last_round, digest, peer.peer_id)
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
            resync = self.resyncs.realign_answer(peer) or self.resyncs.resync_answer(peer, req.last_round)
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
        if fut.cancelled() and self.stopping():
            raise BadRequest(grpc.StatusCode.UNAVAILABLE, "the coordinator is stopping; retry when it is back")
        if fut.cancelled():
            # The same peer asked again (Quorums.enqueue keeps its newest request): this call gets a status.
            raise BadRequest(grpc.StatusCode.ABORTED, "superseded by a newer Quorum request from the same peer")
        return fut.result()
