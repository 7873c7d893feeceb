"""A member of a run: it joins, fetches the run's state, stays registered, and leaves.

``ElasticCollective`` puts the pieces together: a transport (data plane,
``collectives/net/transport.py``), the all-reduce
(``collectives/allreduce.py``), a state server for joiners
(``collectives/statesync/``), the committed results it keeps for late peers
(``collectives/reduce/results.py``; catching up by them,
``collectives/reduce/catchup.py``), and the coordinator client
(``collectives/membership/client.py``). Its ``sync`` is the elastic all-reduce
the optimizers use: each sync is run through quorum, all-reduce and commit by
the member's ``ElasticSync`` (``collectives/elasticsync.py``, which draws that
state machine). This module is the member's life around it: ``start`` (listen,
join, fetch the run's state or keep its own), the heartbeats, registering again
when the coordinator lost it (a lapsed lease, a restart) or telling it to wait
for a holder of the run's state, the state digest it reports, ``interrupt``,
and ``close`` (leave the run).

State handed to the caller (``Resynced.snapshot``, ``start()``'s return)
is applied by the caller, on its own thread: neither module touches the
model.

Every blocking wait (``start``'s join and state fetch, a sync's quorum,
all-reduce and commit) can be cut short from any thread, a signal handler
included: ``interrupt()`` cancels the calls in flight on the transport's
loop and they raise ``Stopped`` (so do later ones). Nothing is applied by an
interrupted call; the caller then ``close()``s, which leaves the run so the
others retry their round without this peer. One exception: a stop that comes
once this member voted to commit waits (``stop_decision_wait_s``) for the
round's decision, and a committed round is applied and returned, since this
member may be the only one left holding it; the next call raises ``Stopped``.
So does a stop that comes while a committed round's result is being kept.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import time
from collections import deque
from collections.abc import Callable, Coroutine, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

import torch

from collectives.allreduce import AllReduceConfig, Collective
from collectives.asynctasks import cancel_and_wait
from collectives.codecs import CodecConfig
from collectives.elasticsync import WAIT_POLL_S, ElasticSync, sync_request
from collectives.errors import ConfigError, UsageError
from collectives.hosts.identity import resolve_host_id
from collectives.membership.client import PATIENCE_S, QUORUM_PATIENCE_S, MembershipClient, MembershipConfig, PeerStatus
from collectives.membership.roundplan import FINISHED
from collectives.net.addresses import coordinator_address
from collectives.net.transport import Transport
from collectives.net.transportconfig import TransportConfig
from collectives.notes import RepeatNote
from collectives.reduce.aggregators import AggregatorConfig
from collectives.reduce.catchup import LateRounds
from collectives.reduce.inbox import Group
from collectives.reduce.results import CommittedResult, ResultStore
from collectives.statesync import (
    SERVES_NO_STATE,
    ExpectedState,
    StateServer,
    StateSnapshot,
    StateSyncConfig,
    StateSyncError,
    fetch_state_async,
)
from collectives.syncphases import (
    CaughtUp,
    Phase,
    Prepare,
    Resynced,
    RetriesExhausted,
    Stopped,
    SyncResult,
    WaitingForState,
    Weight,
    Within,
    check_prepared,
)

# What other modules import from here: this module's own names, and a sync's outcomes and types, which
# callers of ElasticCollective.sync catch and pass (collectives/syncphases.py, collectives/reduce/results.py).
__all__ = [
    "LEAVE_DIGEST_S",
    "LEAVE_ON_STOP_S",
    "RECENT_FETCHES",
    "WAIT_POLL_S",
    "CaughtUp",
    "CommittedResult",
    "ElasticCollective",
    "ElasticConfig",
    "Phase",
    "Prepare",
    "Resynced",
    "RetriesExhausted",
    "Stopped",
    "SyncResult",
    "WaitingForState",
    "Weight",
    "Within",
    "check_prepared",
    "leave_reason",
]

log = logging.getLogger(__name__)

T = TypeVar("T")

# A peer that stops, or fails to start, tells the coordinator it leaves within this long: an unreachable
# coordinator must not hold up an exit someone asked for (it drops the peer when its lease lapses anyway).
LEAVE_ON_STOP_S = 2.0
# A leaving peer hashes its state for the Leave (when not hashed yet) for at most this long (25 MB: ~0.1 s).
LEAVE_DIGEST_S = 2.0
# The reports of this many recent state fetches are kept (``fetches``).
RECENT_FETCHES = 16


def _log_failure(future: concurrent.futures.Future) -> None:
    """Log the failure of a background task whose result nobody waits for."""
    if not future.cancelled() and future.exception() is not None:
        log.warning("background task failed: %s", future.exception())


def leave_reason(stopped_by: str | None, failure: BaseException | None, adopted: bool = True) -> str:
    """What a member tells the coordinator as it leaves: stopped by a signal, refused the run's state (it failed
    before adopting it), failed (after), or finished; at most 200 characters, as the coordinator keeps."""
    if stopped_by is not None:
        return f"stopped by {stopped_by}"
    if failure is None:
        return FINISHED
    what = "failed" if adopted else "refused the run's state"
    return f"{what}: {str(failure) or type(failure).__name__}"[:200]


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
    # A stop (interrupt()) that comes after this member voted to commit waits this long for the round's decision:
    # the run may commit the round, and this member may be the only one left to hold it.
    stop_decision_wait_s: float = 5.0
    # How long calls keep retrying an unreachable coordinator once joined (it may be restarting).
    patience_s: float = PATIENCE_S
    # How long a sync's Quorum call does: then the peer trains on locally, and later syncs end at once until a
    # heartbeat reaches the coordinator again (it may be away for minutes: moved, restarted without its port).
    quorum_patience_s: float = QUORUM_PATIENCE_S
    # How long start() keeps trying to reach the coordinator before giving up (a wrong address, or none yet).
    connect_timeout_s: float = 300.0
    # Committed results of this many recent rounds are kept and served to peers that were late for them.
    keep_results: int = 2
    # A sync of a peer behind the run, when nobody live holds the run's last round, waits this long for a holder
    # to come back (a restart takes seconds) before it ends with WaitingForState; later syncs end at once
    # until this peer is registered again.
    holder_wait_s: float = 15.0
    # What this peer's model is, as its task names it (``Task.model_settings``; () : not said). Joins carry it:
    # a joiner whose model is not the live peers' is refused (a different --heads changes no parameter's shape).
    model_settings: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        object.__setattr__(self, "coordinator", coordinator_address(self.coordinator))
        if not self.connect_timeout_s > 0:
            raise ConfigError(f"connect timeout must be positive, got {self.connect_timeout_s}")


class ElasticCollective:
    """A peer's membership in a run plus its elastic all-reduce. Thread-safe entry points; one sync at a time."""

    def __init__(
        self,
        config: ElasticConfig,
        provider: Callable[[], StateSnapshot | None] | None = None,
        phase_hook: Callable[[Group, str], None] | None = None,
    ) -> None:
        self.config = config
        # With a run secret, every call carries the run's credentials; the coordinator binds this peer's key at join.
        self.transport = Transport(config.transport, auth=config.transport.security.call_auth(config.run_id))
        # The committed results of recent rounds, served to peers that were late for them
        # (collectives/reduce/results.py).
        self.results = ResultStore(config.keep_results)
        self.collective = Collective(self.transport, config.run_id, phase_hook=phase_hook)
        self.state_server = StateServer(
            self.transport, config.run_id, provider, config.state_sync, results=self.results.snapshot
        )
        # Catching up by the results of rounds this peer missed, and keeping those the coordinator asks it to
        # hold for the run (collectives/reduce/catchup.py).
        self.late = LateRounds(
            self.transport, config.run_id, config.state_sync, self.results,
            keep=lambda r: self._keep_result(r.round_id, r.tag, r.value, r.codec, r.parts, r.epoch, r.digest),
        )
        self.membership = MembershipClient(
            self.transport,
            MembershipConfig(config.coordinator, config.run_id, name=config.name, patience_s=config.patience_s,
                             quorum_patience_s=config.quorum_patience_s,
                             host_id=resolve_host_id(config.transport.host_id),
                             model_settings=tuple(config.model_settings)),
        )
        self.address = ""
        self.last_round = 0
        self.epoch = 0
        self._heartbeat: asyncio.Task | None = None
        # (round id, digest) of this peer's state, reported to the coordinator; and what computes it.
        self._digest: tuple[int, str] = (-1, "")
        self._digest_of: Callable[[], tuple[int, str]] | None = None
        self._offers_initial = False  # provide_state's initial_is_the_runs
        # Whether this peer holds the run's state (its own or fetched): false while start() joins.
        self._holds_state = False
        self._waiting = RepeatNote(log)
        # What this peer's recent state fetches took (statesync.FetchReport), for reports and tests.
        self.fetches: deque = deque(maxlen=RECENT_FETCHES)
        # Whether this fresh peer kept its own initial state at its join, the founder's being the same (start()).
        self.kept_initial_state = False
        # Set by interrupt(): why the peer stops. The tasks of blocking calls in flight, cancelled by it.
        self._interrupted = ""
        self._inflight: set[asyncio.Task] = set()
        # The heartbeats and a sync may both find this peer out of the run (a dropped member learns it from
        # the decision and from its next heartbeat): one of them registers it again, the other finds it done.
        self._rejoining = asyncio.Lock()
        # The elastic all-reduce (collectives/elasticsync.py): it runs each sync through its phases, taking the
        # steps of this member's life a sync needs (registering again, fetching the state, keeping a result).
        self.rounds = ElasticSync(
            self, self._waiting, rejoin=self._rejoin, fetch=self._fetch, state_digest=self._state_digest,
            keep_result=self._keep_result,
        )

    def run_round(self) -> int:
        """The run's last committed round as the coordinator last said (every heartbeat refreshes it)."""
        return self.membership.run_round

    def run_progress(self) -> tuple[int, int]:
        """(the furthest inner step an up-to-date peer has reported, that step when the last round committed), as
        the coordinator last said (heartbeats): where the run's training is, and how far into its sync interval."""
        return self.membership.run_step, self.membership.round_step

    def run_committed_at(self) -> float | None:
        """When the run's last round committed, on time.monotonic()'s clock, as the coordinator last said (heartbeats,
        RESYNC answers); None before it said."""
        return self.membership.committed_at

    def provide_state(
        self,
        provider: Callable[[], StateSnapshot | None],
        round_numel: Callable[[str], int] | None = None,
        state_nbytes: Callable[[], int] | None = None,
        digest: Callable[[], tuple[int, str]] | None = None,
        initial_is_the_runs: bool = False,
        results_are_the_runs: bool = False,
        own_state: bool = False,
        algorithm: Callable[[], str] | None = None,
        settings: Callable[[], Sequence[str]] | None = None,
    ) -> None:
        """Serve joiners the state provider returns (an optimizer registers its snapshot here).

        ``digest()``: (round id, SHA-256 hex of the state's tensors as served) of this peer's state, reported
        to the coordinator so that it knows the committed state (None, or "": replicas differ).

        ``initial_is_the_runs``: a fresh peer's initial state is all a joiner would fetch before the run's
        first commit (no schedule or counters beyond the step count in it): it joins with that state's digest,
        and keeps the state when the founder's has the same (the same seed), instead of fetching it.

        ``round_numel(tag)``: how many elements a round with that tag reduces; with it, a late
        peer may catch up by fetching missed rounds' results (checked against it) instead of the
        state, when they are fewer bytes than ``state_nbytes()``.

        ``results_are_the_runs``: every member of a round gets the same result (not NoLoCo's pairs); with
        ``round_numel`` this peer then offers to keep other rounds' results for the run (collectives/reduce/catchup.py).

        ``own_state``: this peer's state is its own (NoLoCo's replicas differ): back with an older state than the
        run's and nobody to catch up from, it goes on from it instead of waiting for a holder (its joins say so).

        ``algorithm()``: the name of the algorithm this peer runs; ``settings()``: what the run's members must agree
        on (codec, aggregator, what a member does with a result). Its joins carry them, with the config's
        ``model_settings``: the coordinator refuses a joiner whose algorithm or settings are not the live peers'
        (before the run's first commit nothing else would).
        """
        self.state_server.provider = provider
        self.late.round_numel = round_numel
        self.late.state_nbytes = state_nbytes
        self.late.results_are_the_runs = results_are_the_runs
        self.membership.own_state = own_state
        self.membership.algorithm = algorithm
        self.membership.settings = settings
        self._digest_of = digest
        self._offers_initial = initial_is_the_runs

    def state_changed(self) -> None:
        """The optimizer applied a round or took a state: compute its digest now, off the loop (the next
        heartbeat reports it; the run's last round has no next quorum request to carry it)."""
        # A state taken at the same round id (a fetched round-0 state replacing this peer's own) has another digest.
        self._digest = (-1, "")
        if self._digest_of is not None and self.transport.running:
            self.transport.submit(self._state_digest()).add_done_callback(_log_failure)

    async def _state_digest(self) -> str:
        """The digest of this peer's state at last_round, computed off the loop once per round ("" if unknown)."""
        if self._digest_of is None:
            return ""
        if self._digest[0] != self.last_round:
            round_id, digest = await self.transport.run_off_loop(self._digest_of)
            if round_id != self.last_round:  # the optimizer has not applied last_round yet (streaming overlap)
                return ""
            self._digest = (round_id, digest)
        return self._digest[1]

    async def _leaving_digest(self) -> str:
        """The digest of this peer's state for its Leave ("" when it cannot be had within LEAVE_DIGEST_S): a peer
        that stops right after the run's last commit reports that round's digest nowhere else."""
        try:
            async with asyncio.timeout(LEAVE_DIGEST_S):
                return await self._state_digest()
        except Exception as exc:  # noqa: BLE001 - leaving goes on without it
            log.debug("no state digest to leave with: %s", exc)
            return ""

    async def _keep_result(
        self, round_id: int, tag: str, flat: torch.Tensor, codec: CodecConfig | None, parts: int, epoch: int,
        digest: str = "",
    ) -> None:
        """Keep a committed round's result (of the attempt at epoch; digest: its SHA-256 when known) for late peers,
        and every result a pinned snapshot's joiner needs."""
        pinned = self.state_server.pinned_rounds()
        # Off the loop: the copy takes ~40 ms at 25M parameters (seconds for a large model), and the loop
        # meanwhile carries this peer's transfers and serves its state. A late peer asking meanwhile waits.
        await self.transport.run_off_loop(
            self.results.keep, round_id, tag, flat, codec, min(pinned) if pinned else None, parts, epoch, digest
        )
        self.state_server.result_kept()
        if not digest:
            # Its digest (what late peers check their fetch against) is reported once computed, off the round's path.
            self.late.digest_later(round_id)

    @property
    def peer_id(self) -> str:
        """The id the coordinator gave this peer."""
        return self.membership.peer_id

    @property
    def status(self) -> PeerStatus:
        """What heartbeats report; the training loop updates it."""
        return self.membership.status

    @property
    def phase(self) -> Phase:
        """The phase of this peer's sync now (or the one its last sync ended in)."""
        return self.rounds.phase

    @property
    def history(self) -> deque[tuple[int, Phase]]:
        """(round id, phase) of this peer's recent moves, for tests and the dashboard."""
        return self.rounds.history

    # -- stopping ----------------------------------------------------------------------

    def interrupt(self, reason: str = "stopped on request") -> None:
        """Make the blocking calls in flight, and every later one, raise Stopped. Any thread; idempotent.

        Safe in a signal handler: it only sets a flag and schedules the cancellation on the loop.
        """
        if self._interrupted:
            return
        self._interrupted = reason
        if self.transport.running:
            try:
                self.transport.loop.call_soon_threadsafe(self._cancel_inflight)
            except RuntimeError:  # the loop closed meanwhile (TransportClosed is one too): nothing left to cancel
                pass

    @property
    def interrupted(self) -> bool:
        """Whether interrupt() was called."""
        return bool(self._interrupted)

    def _cancel_inflight(self) -> None:
        for task in list(self._inflight):
            task.cancel()

    async def _interruptible(self, coro: Coroutine[Any, Any, T]) -> T:
        """Run coro as a call interrupt() can cancel; its cancellation by interrupt() becomes Stopped."""
        if self._interrupted:
            coro.close()
            raise Stopped(self._interrupted)
        task = asyncio.current_task()
        self._inflight.add(task)
        try:
            return await coro
        except asyncio.CancelledError:
            if self._interrupted:
                raise Stopped(self._interrupted) from None
            raise
        finally:
            self._inflight.discard(task)

    # -- lifecycle -------------------------------------------------------------------

    def start(self, has_state: bool = False, last_round: int = 0) -> StateSnapshot | None:
        """Listen, join the run, and return the run's state to load first (None: keep your own).

        ``has_state``/``last_round``: a peer restarting from its checkpoint holds
        the state of that round; a fresh peer holds none. Gives up after
        ``connect_timeout_s`` without a coordinator (CoordinatorUnavailable), at once when
        something else answers at its address (NotACoordinator), and raises Stopped when
        interrupted. On any failure the peer leaves the run (if it had joined) and closes.
        """
        if self._interrupted:
            raise Stopped(self._interrupted)
        if self.address:
            raise UsageError(f"start() was called already: this peer joined run {self.config.run_id} at "
                               f"{self.address}; call it once")
        # The coordinator's address decides what a wildcard bind advertises (and refuses a loopback
        # bind when the coordinator is on another machine: collectives.net.addresses.check_reachable).
        self.address = self.transport.start(
            self.collective.handlers() + self.state_server.handlers(), coordinator=self.config.coordinator
        )
        self.last_round = last_round
        try:
            return self.transport.submit(self._interruptible(self._start(has_state))).result()
        except BaseException as exc:
            self.close(leave=True, reason=f"could not start: {exc}"[:200], leave_timeout_s=LEAVE_ON_STOP_S)
            raise

    async def _start(self, has_state: bool) -> StateSnapshot | None:
        give_up = time.monotonic() + self.config.patience_s
        delay = 0.1
        while True:
            # A fresh peer names its initial state too: if it is the founder's, it keeps it (rules.join_action).
            digest = await self._state_digest() if has_state or self._offers_initial else ""
            joined = await self.membership.join(
                self.address, self.last_round, self.epoch, has_state,
                digest=digest,
                patience_s=self.config.connect_timeout_s if not self.peer_id else None,
                hint=" (--connect-timeout sets how long to wait)" if not self.peer_id else "",
            )
            self.epoch = joined.epoch
            if joined.wait:
                # The run has committed rounds and nobody holds its state: never start it anew. Ask again
                # until a holder (or a peer resuming a matching checkpoint) is back, or this peer is stopped.
                self.membership.status.activity = "waiting"
                self._waiting.note(joined.wait_reason, "waiting for the run's state: %s", joined.wait_reason)
                await asyncio.sleep(joined.heartbeat_s if joined.heartbeat_s > 0 else WAIT_POLL_S)
                continue
            if self._heartbeat is None:
                self._heartbeat = asyncio.get_running_loop().create_task(self._heartbeat_forever(joined.heartbeat_s))
            if not joined.sync_from:
                self._holds_state = True
                self.kept_initial_state = not has_state and bool(digest) and joined.state_digest == digest
                return None
            try:
                snapshot = await self._fetch(
                    joined.sync_sources or (joined.sync_from,),
                    ExpectedState(joined.last_committed_round, joined.state_digest),
                )
                self._holds_state = True
                return snapshot
            except StateSyncError as exc:
                if SERVES_NO_STATE in str(exc):
                    # The run's peers hold no state to give: asking again would wait for good.
                    raise ConfigError(f"cannot join run {self.config.run_id}: {exc}") from None
                # The source may have died meanwhile: ask the coordinator again (it names
                # another peer once the dead one's lease lapses).
                if time.monotonic() + delay > give_up:
                    raise
                log.warning("%s; asking for another source", exc)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 2.0)

    def __enter__(self) -> ElasticCollective:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: object) -> None:
        """Leave the run and close; at once (within LEAVE_ON_STOP_S), saying why, when the block raised."""
        self.close(leave=True, reason=leave_reason(None, exc), leave_timeout_s=None if exc is None else LEAVE_ON_STOP_S)

    def close(self, leave: bool = True, reason: str = "closing", leave_timeout_s: float | None = None) -> None:
        """Leave the run (optional; within leave_timeout_s, None: one RPC deadline), stop heartbeats and the
        transport. Idempotent."""
        try:
            if self.transport.running:
                self.transport.submit(self._close(leave, reason, leave_timeout_s)).result(timeout=30)
        except (RuntimeError, concurrent.futures.TimeoutError) as exc:
            log.warning("closing %s: %s", self.peer_id, exc)
        self.collective.close()
        self.transport.close()

    async def _close(self, leave: bool, reason: str, leave_timeout_s: float | None) -> None:
        if self._heartbeat is not None:
            await cancel_and_wait([self._heartbeat])
        if leave:
            digest = await self._leaving_digest() if self._holds_state else ""
            counters = self.transport.counters
            await self.membership.leave(
                reason, leave_timeout_s, self.last_round if digest else 0, digest,
                traffic=(counters.bytes_sent, counters.bytes_received), refusals=self._refusals(),
            )
        await self.membership.close()

    def _refusals(self) -> dict[str, int]:
        """What this peer refused or cut off so far, by kind (sent with heartbeats, for the coordinator's metrics)."""
        counts = {kind: n for kind, n in self.transport.refusals.snapshot().items() if n}
        for kind, n in (
            ("fetch_refused", self.state_server.refused),
            ("fetch_stalled_out", self.state_server.stalled_out),
        ):
            if n:
                counts[kind] = n
        return counts

    async def _heartbeat_forever(self, interval_s: float) -> None:
        client = self.membership
        counters = self.transport.counters
        beat = asyncio.get_running_loop().create_task(
            client.heartbeat_forever(
                interval_s, lambda: self.last_round, lambda: (counters.bytes_sent, counters.bytes_received),
                digest=lambda: self._digest[1] if self._digest[0] == self.last_round else "",
                refusals=self._refusals,
                held=lambda: self.late.held() if self._holds_state else None,
                hold=lambda rounds: self.late.hold(rounds, self.peer_id, self.last_round),
            )
        )
        try:
            while True:
                await client.unregistered.wait()
                # The lease lapsed or the coordinator restarted: register again at once,
                # so that a restarted coordinator rebuilds its view quickly.
                await self._rejoin()
        finally:
            await cancel_and_wait([beat])
            await self.late.stop()

    async def _rejoin(self) -> str:
        """Register again, unless done since the coordinator last said this peer is out (``unregistered``); "" once
        registered, or why the coordinator said to wait (asked again later)."""
        if not self._holds_state:
            # Still joining: start() registers this peer again itself, once it has a source or the state.
            await asyncio.sleep(WAIT_POLL_S)
            return ""
        async with self._rejoining:
            if not self.membership.unregistered.is_set():
                return ""  # the other caller registered this peer again while this one waited
            return await self._register_again()

    async def _register_again(self) -> str:
        joined = await self.membership.join(
            self.address, self.last_round, self.epoch, has_state=True, digest=await self._state_digest()
        )
        self.epoch = max(self.epoch, joined.epoch)
        # The run ended ahead of this peer (a straggler of its last round): nobody will serve that round, so a
        # sync does not wait holder_wait_s for a holder (_ask); the heartbeats still ask every interval.
        self.rounds.holders_finished = joined.holders_finished
        if joined.wait:
            # Told to wait (nobody live holds the run's last round, which this state is behind): ask again later.
            self._waiting.note(joined.wait_reason, "waiting for the run's state: %s", joined.wait_reason)
            await asyncio.sleep(joined.heartbeat_s if joined.heartbeat_s > 0 else WAIT_POLL_S)
            return joined.wait_reason
        # With the rounds it missed named, the next quorum answer (which names them too) lets this
        # peer catch up by their results; otherwise it fetches the whole state first.
        if joined.sync_from and not joined.missed:
            self.rounds.resync_from(joined.sync_sources or (joined.sync_from,),
                                    ExpectedState(joined.last_committed_round, joined.state_digest))
        log.info(
            "%s rejoined the run (resync from %s, %d missed round(s))",
            self.peer_id, joined.sync_from or "-", len(joined.missed),
        )
        self.rounds.waited_out = False
        return ""

    async def _fetch(self, sources: Sequence[str], expect: ExpectedState | None = None) -> StateSnapshot:
        """The run's state, fetched in stripes from sources and checked against what the coordinator recorded."""
        snapshot = await fetch_state_async(
            self.transport, list(sources), self.config.run_id, self.peer_id, self.config.state_sync, expect=expect
        )
        self.last_round = snapshot.round_id
        self.rounds.resync_from((), None)
        report = snapshot.report
        if report is not None:
            self.fetches.append(report)
        return snapshot

    # -- the elastic all-reduce ----------------------------------------------------------

    def sync(
        self,
        tensors: torch.Tensor | Sequence[torch.Tensor],
        weight: Weight = 1.0,
        tag: str = "",
        codec: CodecConfig | None = None,
        aggregator: AggregatorConfig | None = None,
        prepare: Prepare | None = None,
        within: Within | None = None,
        own_state: bool = False,
        residual: torch.Tensor | None = None,
        settings: Sequence[str] = (),
        min_members: int = 1,
    ) -> SyncResult:
        """Reduce tensors with the run in a committed round (blocking); raises Resynced, CaughtUp, GroupTooSmall,
        RetriesExhausted, Stopped."""
        return self.sync_async(
            tensors, weight=weight, tag=tag, codec=codec, aggregator=aggregator, prepare=prepare, within=within,
            own_state=own_state, residual=residual, settings=settings, min_members=min_members,
        ).result()

    def sync_async(
        self,
        tensors: torch.Tensor | Sequence[torch.Tensor],
        weight: Weight = 1.0,
        tag: str = "",
        codec: CodecConfig | None = None,
        aggregator: AggregatorConfig | None = None,
        prepare: Prepare | None = None,
        within: Within | None = None,
        own_state: bool = False,
        residual: torch.Tensor | None = None,
        settings: Sequence[str] = (),
        min_members: int = 1,
    ) -> concurrent.futures.Future[SyncResult]:
        """Start a sync and return its future; the input is copied first, so training may go on.

        ``codec`` and ``aggregator`` override the peer's all-reduce settings for this sync (every
        member of the run must pass the same: the algorithm's). ``weight`` may be a function of
        the round's plan, called after each attempt's quorum; so is ``prepare`` (plan, flat) ->
        what this attempt sends. ``residual`` (a flat fp32 tensor of the input's size, on its device) enables
        error feedback: it changes only when the round commits (then by what the committed round did not carry).
        ``settings``: what this peer does with the result ("outer lr 0.7", ...), which the coordinator compares among
        the run's members with the codec, the aggregator and the length
        (collectives.membership.roundformat.round_format).
        ``min_members``: the fewest members a round may have (differential privacy's), beyond the aggregator's need.
        """
        request = sync_request(
            tensors, self.config.allreduce, weight=weight, tag=tag, codec=codec, aggregator=aggregator,
            prepare=prepare, within=within, own_state=own_state, residual=residual, settings=settings,
            min_members=min_members,
        )
        if not self.address:
            # A UsageError, which the optimizers re-raise: any other LoconetError of a sync reads as a missed round.
            raise UsageError("this peer has not joined the run: call start() before the first step or sync")
        return self.transport.submit(self._interruptible(self.rounds.run(request)))
