"""Which peers are gone: leases past their time, and port probes of the peers a quorum waits for.

The coordinator's tick calls ``Liveness.check``. A peer whose last call is older
than its lease is lost (every lease is checked twice a second, the silent
members of the round in flight on every tick); so is one a quorum waits for whose port refuses a
health check (its process is gone: known within a tick or two instead of a
lease). A probe that times out says nothing (the peer may be paused): its lease
decides. ``mark_lost`` is the coordinator's, which drops the peer and tells the
calls waiting on it. How long a lease is, and how often a peer heartbeats, is
``lease_terms``.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable

import grpc

from collectives.asynctasks import cancel_and_wait
from collectives.net.rpc import RpcSettings, health_check
from peer.coordinator.config import CoordinatorConfig
from peer.coordinator.quorum import Quorums
from peer.coordinator.rules import peers_to_probe
from peer.coordinator.runstate import PeerRecord, RunState

log = logging.getLogger(__name__)

# How often every lease is checked (the tick runs more often; it checks the silent members of the attempt in flight).
LEASE_CHECK_S = 0.5
# A gap between two checks longer than this means the coordinator's own loop stalled: heartbeats may sit unread,
# so nobody's lease is judged on that check.
LOOP_STALL_S = 1.0
# A health check's deadline: a peer that does not answer within it is left to its lease.
PROBE_TIMEOUT_S = 1.0

def lease_terms(config: CoordinatorConfig, live: int) -> tuple[float, float]:
    """(heartbeat interval, lease) for a peer joining or heartbeating now, with live peers in the run: heartbeats
    slow down as the run grows.

    One heartbeat costs the coordinator ~0.5 ms of CPU (mostly gRPC); beyond ~500 peers
    the interval grows so heartbeats stay under about half a core, and the lease stays
    at least three intervals.
    """
    heartbeat = max(config.heartbeat_s, live / 500.0)
    return heartbeat, max(config.lease_s, 3.0 * heartbeat)


# mark_lost(peer, why, kind): drop the peer from the run (Coordinator._mark_lost).
MarkLost = Callable[[PeerRecord, str, str], None]


class Liveness:
    """Leases and probes of one run's peers, on the coordinator's loop."""

    def __init__(self, config: CoordinatorConfig, state: RunState, quorums: Quorums, mark_lost: MarkLost) -> None:
        self.config = config
        self.state = state
        self.quorums = quorums
        self.mark_lost = mark_lost
        # How probes dial peers: the run's TLS (peers' servers speak it), nothing else of the coordinator's settings.
        self._probe_settings = RpcSettings(security=config.security)
        # Peer id -> when last probed, for the peers a quorum waits for.
        self._probed: dict[str, float] = {}
        self._probes: set[asyncio.Task] = set()
        self._last_lease_check = self._last_tick = time.monotonic()

    def check(self) -> None:
        """Expire leases (every LEASE_CHECK_S; the silent members of the attempt in flight on every tick) and probe
        the peers a quorum waits for (on the running loop)."""
        now = time.monotonic()
        stalled, self._last_tick = now - self._last_tick > LOOP_STALL_S, now
        if now - self._last_lease_check >= LEASE_CHECK_S:
            self._expire_leases()
        elif not stalled:
            self._expire_silent_members(now)
        self._probe_missing()

    def _expire_silent_members(self, now: float) -> None:
        """Drop the silent members of the attempt in flight whose lease lapsed: the others may be waiting for their
        data, and learn of the abort from their heartbeats (rules.attempt_over), so it comes within a tick of the
        lease, not of the next full check. Reporters are left to it: their lease decides nothing in this round."""
        attempt = self.quorums.in_flight()
        if attempt is None:
            return
        for member in attempt.record.members:
            peer = self.state.peers.get(member)
            if member not in attempt.reports and peer is not None and peer.alive:
                self._expire(peer, now)

    def _expire(self, peer: PeerRecord, now: float) -> None:
        """Drop a live peer whose lease lapsed."""
        if now - peer.last_seen <= peer.lease_s:
            return
        self.mark_lost(peer, f"no heartbeat for {now - peer.last_seen:.1f} s", "lost")
        taken = self.state.silence.lapse(peer.peer_id, len(self.state.live))
        if taken:
            detail = (
                f"heard from none of the run's {len(taken)} peers while all their leases lapsed: this coordinator's "
                f"link or host may have failed; the next round waits up to {self.config.rules.startup_grace_s:g} s "
                "after the first of them is back for the others"
            )
            self.state.event("outage", "", detail)
            log.warning("%s", detail)

    async def stop(self) -> None:
        """Cancel the probes in flight."""
        await cancel_and_wait(self._probes)

    def _probe_missing(self) -> None:
        pending = self.quorums.pending
        if pending is None or not self.config.probe_peers:
            return
        now = time.monotonic()
        missing = self.quorums.awaited(now)
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
        try:
            # With the run's TLS settings: a plaintext probe of a TLS peer fails as if nothing listened there.
            await health_check(peer.address, timeout_s=PROBE_TIMEOUT_S, settings=self._probe_settings)
        except grpc.aio.AioRpcError as exc:
            # UNAVAILABLE = refused: dead. A deadline means it may be paused: leave it to its lease.
            if exc.code() == grpc.StatusCode.UNAVAILABLE and peer.alive:
                self.mark_lost(peer, f"its port refuses connections ({exc.details()[:100]})", "lost")

    def _expire_leases(self) -> None:
        now = time.monotonic()
        gap, self._last_lease_check = now - self._last_lease_check, now
        if gap > LOOP_STALL_S:
            # The loop itself stalled: heartbeats may be queued unanswered. Do not blame
            # the peers for the coordinator's own delay; check again next time.
            return
        for peer in self.state.alive_peers():
            self._expire(peer, now)
        self.state.forget_gone(now)  # gone peers' records past their time (forgetting.py)
        # A waiter asks again every heartbeat interval; one silent for a lease gave up.
        for waiter in self.state.waiting.expire(now, self.config.lease_s):
            self.state.event("leave", waiter.peer_id, f"{waiter.address} stopped waiting for the run's state")
