"""A member of a run: it joins, fetches the run's state, and reduces tensors in rounds that survive faults.

``ElasticCollective`` puts the pieces together: a transport (data plane),
the all-reduce, a state server for joiners, and the coordinator client. Its
``sync`` is the elastic all-reduce the optimizers use. One call runs this
state machine (``Phase``)::

    QUORUM --round--> ALLREDUCE --(done or failed)--> COMMIT --commit--> COMMITTED  (returns)
       |                                                 \\--abort--> ABORTED --> QUORUM (same contribution)
       |                                                                   \\--> FAILED (RetriesExhausted)
       +--resync--> RESYNC (raises Resynced with the run's state: the contribution is void)
       +--unknown peer--> REJOIN --> QUORUM            +--too few peers--> FAILED (GroupTooSmall)

Nothing is applied twice: a peer records a round as applied only when the
coordinator answered commit, and round ids only grow. Nothing is lost: an
aborted attempt is retried with the contribution the peer still holds. A
peer that missed a committed round (paused, dropped, or unsure of an
outcome because the coordinator restarted) is told to resync, and fetches
the state from an up-to-date peer instead of applying anything.

State handed to the caller (``Resynced.snapshot``, ``start()``'s return)
is applied by the caller, on its own thread: this module never touches the
model.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import enum
import logging
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

from collectives.allreduce import AllReduceConfig, AllReduceResult, Collective
from collectives.codecs import check_finite
from collectives.errors import LoconetError, MemberFailure, RoundFailed
from collectives.inbox import Group
from collectives.membership import (
    CommitOutcome,
    CommitUnknown,
    MembershipClient,
    MembershipConfig,
    PeerStatus,
    RoundPlan,
    Unregistered,
)
from collectives.parts import flatten, total_numel, unflatten_like
from collectives.stats import RoundStats
from collectives.statesync import StateServer, StateSnapshot, StateSyncConfig, StateSyncError, fetch_state_async
from collectives.transport import Transport, TransportConfig

log = logging.getLogger(__name__)


class Phase(enum.Enum):
    """Where one sync call is in the round protocol."""

    IDLE = "idle"
    QUORUM = "quorum"
    ALLREDUCE = "allreduce"
    COMMIT = "commit"
    COMMITTED = "committed"
    ABORTED = "aborted"
    RESYNC = "resync"
    REJOIN = "rejoin"
    FAILED = "failed"


# The only moves a sync call makes; anything else is a bug.
TRANSITIONS: dict[Phase, set[Phase]] = {
    Phase.IDLE: {Phase.QUORUM},
    Phase.QUORUM: {Phase.ALLREDUCE, Phase.RESYNC, Phase.REJOIN, Phase.FAILED},
    Phase.ALLREDUCE: {Phase.COMMIT},
    Phase.COMMIT: {Phase.COMMITTED, Phase.ABORTED},
    Phase.ABORTED: {Phase.QUORUM, Phase.REJOIN, Phase.FAILED},
    Phase.REJOIN: {Phase.QUORUM, Phase.RESYNC},
    Phase.RESYNC: set(),
    Phase.COMMITTED: set(),
    Phase.FAILED: set(),
}


class Resynced(LoconetError):
    """This peer had missed committed rounds; ``snapshot`` is the run's state to load. The contribution was not used."""

    def __init__(self, snapshot: StateSnapshot, source: str) -> None:
        self.snapshot = snapshot
        self.source = source
        super().__init__(f"state replaced by round {snapshot.round_id} from {source}; load it and continue")


class RetriesExhausted(RoundFailed):
    """Every attempt of a round aborted; the message gives the last reason."""


@dataclass(frozen=True)
class ElasticConfig:
    """Everything a member of a run needs to know (filled by ``loconet peer`` or the user)."""

    coordinator: str
    run_id: str
    name: str = ""
    transport: TransportConfig = field(default_factory=TransportConfig)
    allreduce: AllReduceConfig = field(default_factory=AllReduceConfig)
    state_sync: StateSyncConfig = field(default_factory=StateSyncConfig)
    # Attempts of one round before giving up (each abort drops the failed members).
    max_attempts: int = 5
    quorum_timeout_s: float = 600.0
    commit_timeout_s: float = 120.0
    # How long calls keep retrying an unreachable coordinator.
    patience_s: float = 300.0


@dataclass
class SyncResult:
    """A committed round: the reduced tensors and what it took."""

    value: torch.Tensor | list[torch.Tensor]
    round_id: int
    epoch: int
    # Peer ids of the round's members, in rank order.
    members: tuple[str, ...]
    attempts: int
    stats: RoundStats


class ElasticCollective:
    """A peer's membership in a run plus its elastic all-reduce. Thread-safe entry points; one sync at a time."""

    def __init__(
        self,
        config: ElasticConfig,
        provider: Callable[[], StateSnapshot | None] | None = None,
        phase_hook: Callable[[Group, str], None] | None = None,
    ) -> None:
        self.config = config
        self.transport = Transport(config.transport)
        self.collective = Collective(self.transport, config.run_id, phase_hook=phase_hook)
        self.state_server = StateServer(self.transport, config.run_id, provider or (lambda: None), config.state_sync)
        self.membership = MembershipClient(
            self.transport,
            MembershipConfig(config.coordinator, config.run_id, name=config.name, patience_s=config.patience_s),
        )
        self.address = ""
        self.last_round = 0
        self.epoch = 0
        self.phase = Phase.IDLE
        # (round id, phase) of recent moves, for tests and the dashboard.
        self.history: deque[tuple[int, Phase]] = deque(maxlen=1000)
        self._heartbeat: asyncio.Task | None = None
        self._pending_resync = ""

    def provide_state(self, provider: Callable[[], StateSnapshot | None]) -> None:
        """Serve joiners the state this function returns (a strategy registers its snapshot here)."""
        self.state_server.provider = provider

    @property
    def peer_id(self) -> str:
        """The id the coordinator gave this peer."""
        return self.membership.peer_id

    @property
    def status(self) -> PeerStatus:
        """What heartbeats report; the training loop updates it."""
        return self.membership.status

    # -- lifecycle -------------------------------------------------------------------

    def start(self, has_state: bool = False, last_round: int = 0) -> StateSnapshot | None:
        """Listen, join the run, and return the run's state to load first (None: keep your own).

        ``has_state``/``last_round``: a peer restarting from its checkpoint holds
        the state of that round; a fresh peer holds none.
        """
        self.address = self.transport.start(self.collective.handlers() + self.state_server.handlers())
        self.last_round = last_round
        try:
            return self.transport.submit(self._start(has_state)).result()
        except BaseException:
            self.transport.close()
            raise

    async def _start(self, has_state: bool) -> StateSnapshot | None:
        give_up = time.monotonic() + self.config.patience_s
        delay = 0.1
        while True:
            joined = await self.membership.join(self.address, self.last_round, self.epoch, has_state)
            self.epoch = joined.epoch
            if self._heartbeat is None:
                self._heartbeat = asyncio.get_running_loop().create_task(self._heartbeat_forever(joined.heartbeat_s))
            if not joined.sync_from:
                return None
            try:
                return await self._fetch(joined.sync_from)
            except StateSyncError as exc:
                # The source may have died meanwhile: ask the coordinator again (it names
                # another peer once the dead one's lease lapses).
                if time.monotonic() + delay > give_up:
                    raise
                log.warning("%s; asking for another source", exc)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 2.0)

    def close(self, leave: bool = True, reason: str = "closing") -> None:
        """Leave the run (optional), stop heartbeats and the transport. Idempotent."""
        try:
            if self.transport._loop is not None:  # noqa: SLF001 - closing twice is fine
                self.transport.submit(self._close(leave, reason)).result(timeout=30)
        except (RuntimeError, concurrent.futures.TimeoutError) as exc:
            log.warning("closing %s: %s", self.peer_id, exc)
        self.transport.close()

    async def _close(self, leave: bool, reason: str) -> None:
        if self._heartbeat is not None:
            self._heartbeat.cancel()
            await asyncio.gather(self._heartbeat, return_exceptions=True)
        if leave:
            await self.membership.leave(reason)

    async def _heartbeat_forever(self, interval_s: float) -> None:
        client = self.membership
        counters = self.transport.counters
        beat = asyncio.get_running_loop().create_task(
            client.heartbeat_forever(interval_s, lambda: self.last_round, lambda: (counters.bytes_sent, counters.bytes_received))
        )
        try:
            while True:
                await client.unregistered.wait()
                # The lease lapsed or the coordinator restarted: register again at once,
                # so that a restarted coordinator rebuilds its view quickly.
                await self._rejoin()
        finally:
            beat.cancel()
            await asyncio.gather(beat, return_exceptions=True)

    async def _rejoin(self) -> None:
        joined = await self.membership.join(self.address, self.last_round, self.epoch, has_state=True)
        self.epoch = max(self.epoch, joined.epoch)
        if joined.sync_from:
            self._pending_resync = joined.sync_from
        log.info("%s rejoined the run (resync from %s)", self.peer_id, joined.sync_from or "-")

    async def _fetch(self, source: str) -> StateSnapshot:
        snapshot = await fetch_state_async(self.transport, source, self.config.run_id, self.peer_id, self.config.state_sync)
        self.last_round = snapshot.round_id
        self._pending_resync = ""
        return snapshot

    async def _try_fetch(self, source: str) -> StateSnapshot | None:
        try:
            return await self._fetch(source)
        except StateSyncError as exc:
            log.warning("%s; will ask the coordinator again", exc)
            self._pending_resync = ""
            await asyncio.sleep(0.5)
            return None

    # -- the elastic all-reduce ----------------------------------------------------------

    def sync(
        self,
        tensors: torch.Tensor | Sequence[torch.Tensor],
        weight: float = 1.0,
        tag: str = "",
        config: AllReduceConfig | None = None,
    ) -> SyncResult:
        """Reduce tensors with the run in a committed round (blocking); raises Resynced, GroupTooSmall, RetriesExhausted."""
        return self.sync_async(tensors, weight=weight, tag=tag, config=config).result()

    def sync_async(
        self,
        tensors: torch.Tensor | Sequence[torch.Tensor],
        weight: float = 1.0,
        tag: str = "",
        config: AllReduceConfig | None = None,
    ) -> concurrent.futures.Future[SyncResult]:
        """Start a sync and return its future; the input is copied first, so training may go on.

        ``config`` overrides the peer's all-reduce settings for this sync (every member of
        the run must pass the same, e.g. a strategy's codec for its pseudo-gradients).
        """
        flat = flatten(tensors)
        # Refused before the quorum, so a NaN never costs the others a round.
        check_finite(flat, "the values to sync (nothing was sent)")
        like = tensors if isinstance(tensors, torch.Tensor) else list(tensors)
        if total_numel(like) != flat.numel():
            raise ValueError("tensors changed while being flattened")
        return self.transport.submit(self._sync(flat, float(weight), tag, like, config or self.config.allreduce))

    def _move(self, round_id: int, to: Phase) -> None:
        if to not in TRANSITIONS[self.phase]:
            raise RuntimeError(f"illegal round transition {self.phase.value} -> {to.value}")
        self.phase = to
        self.history.append((round_id, to))
        self.membership.status.activity = {Phase.ALLREDUCE: "in-round", Phase.RESYNC: "syncing"}.get(to, self.membership.status.activity)

    async def _sync(self, flat: torch.Tensor, weight: float, tag: str, like, allreduce: AllReduceConfig) -> SyncResult:
        config = self.config
        out = torch.empty_like(flat)
        attempts = 0
        last_reason = ""
        self.phase = Phase.IDLE  # every sync starts afresh; the previous one ended in a final phase
        self._move(0, Phase.QUORUM)
        while True:
            if self._pending_resync:
                source = self._pending_resync
                snapshot = await self._try_fetch(source)
                if snapshot is not None:
                    self._move(0, Phase.RESYNC)
                    raise Resynced(snapshot, source)
            try:
                plan = await self.membership.quorum(self.last_round, tag, config.quorum_timeout_s)
            except Unregistered:
                self._move(0, Phase.REJOIN)
                await self._rejoin()
                self._move(0, Phase.QUORUM)
                continue
            except LoconetError:
                self._move(0, Phase.FAILED)
                raise
            if plan.action == "resync":
                # Fetched at the top of the loop; if that fails, the quorum is asked again
                # and the coordinator names another source.
                self._pending_resync = plan.sync_from
                continue
            attempts += 1
            self._move(plan.round_id, Phase.ALLREDUCE)
            done, failed, reason = await self._allreduce(plan, flat, weight, out, allreduce)
            self._move(plan.round_id, Phase.COMMIT)
            outcome = await self._commit(plan, done, failed, reason)
            self.epoch = max(self.epoch, outcome.epoch)
            if outcome.commit and done is not None:
                self._move(plan.round_id, Phase.COMMITTED)
                self.last_round = plan.round_id
                return SyncResult(
                    value=unflatten_like(out, like),
                    round_id=plan.round_id,
                    epoch=plan.epoch,
                    members=tuple(pid for pid, _ in plan.members),
                    attempts=attempts,
                    stats=done.stats,
                )
            self._move(plan.round_id, Phase.ABORTED)
            last_reason = outcome.reason or reason
            log.info("round %d aborted (attempt %d): %s", plan.round_id, attempts, last_reason)
            if attempts >= config.max_attempts:
                self._move(plan.round_id, Phase.FAILED)
                raise RetriesExhausted(f"{attempts} attempts of a round aborted; last: {last_reason}")
            if self.peer_id in outcome.dropped or self.membership.unregistered.is_set():
                self._move(plan.round_id, Phase.REJOIN)
                await self._rejoin()
            self._move(plan.round_id, Phase.QUORUM)

    async def _allreduce(
        self, plan: RoundPlan, flat: torch.Tensor, weight: float, out: torch.Tensor, config: AllReduceConfig
    ) -> tuple[AllReduceResult | None, tuple[str, ...], str]:
        """(the result, or None with the members to blame and why)."""
        ids = [pid for pid, _ in plan.members]
        group = Group(self.config.run_id, plan.epoch, plan.round_id, tuple(addr for _, addr in plan.members), plan.rank)
        try:
            done = await self.collective.reduce_flat(group, flat, weight=weight, config=config, out=out)
            return done, (), ""
        except MemberFailure as exc:
            return None, tuple(ids[r] for r in exc.failed_ranks), str(exc)
        except RoundFailed as exc:
            return None, (), str(exc)

    async def _commit(
        self, plan: RoundPlan, done: AllReduceResult | None, failed: tuple[str, ...], reason: str
    ) -> CommitOutcome:
        stats = done.stats if done is not None else None
        try:
            return await self.membership.commit(
                plan,
                done is not None,
                failed,
                reason,
                bytes_sent=stats.bytes_sent if stats else 0,
                bytes_received=stats.bytes_received if stats else 0,
                wall_s=stats.wall_s if stats else 0.0,
                timeout_s=self.config.commit_timeout_s,
            )
        except CommitUnknown as exc:
            # Not applied; if others did apply it, the next quorum tells this peer to resync.
            self.membership.unregistered.set()
            return CommitOutcome(commit=False, reason=str(exc), epoch=self.epoch)

