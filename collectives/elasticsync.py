"""The elastic all-reduce: one sync of a member, run through quorum, all-reduce and commit until a round commits.

``ElasticCollective.sync`` (``collectives/elastic.py``) checks and flattens
what it is given (``sync_request``) and hands it to its ``ElasticSync``, which
runs this state machine (``Phase``, with its outcomes, in
``collectives/syncphases.py``)::

    QUORUM --round--> ALLREDUCE --(done or failed)--> COMMIT --commit--> COMMITTED  (returns)
       |                                                 \\--abort--> ABORTED --> QUORUM (same contribution)
       |                                                                   \\--> FAILED (RetriesExhausted; or at once,
       |                                                                        QuorumMismatch, when this peer refused
       |                                                                        the round as one the run's --quorum
       |                                                                        cannot make for its algorithm)
       +--resync--> RESYNC (raises Resynced with the run's state: the contribution is void)
       +--late--> CAUGHT_UP (raises CaughtUp with the committed results it missed: the contribution is void)
       +--unknown peer--> REJOIN --> QUORUM            +--too few peers--> FAILED (GroupTooSmall)
                             \\--told to wait--> QUORUM, up to holder_wait_s (not at all once the coordinator
                                 says the round's holders finished and left); then FAILED (WaitingForState:
                                 behind, and nobody holds the run's last round; the caller trains on locally;
                                 later syncs go QUORUM --> FAILED at once until the heartbeats register it again)
       +--another round format than the run's (codec, aggregator, length)--> FAILED (FormatMismatch)

Nothing is applied twice: a peer records a round as applied only when the
coordinator answered commit, and round ids only grow. Nothing is lost: an
aborted attempt is retried with the contribution the peer still holds. A
peer that missed a committed round (paused, dropped, or unsure of an
outcome because the coordinator restarted) is told to resync, and fetches
the state from an up-to-date peer instead of applying anything.

A peer that a round went on without (a ``first-k`` or ``sample`` quorum, or a
short pause) need not fetch the whole state: every member keeps the committed
results of its last ``keep_results`` rounds and serves them, and the late
peer fetches the rounds it missed and hands them to its optimizer, which
applies them in order (``CaughtUp``), when that costs fewer bytes than the
state. Anything wrong with a fetched result (gone, wrong size, not finite)
falls back to the full state (``collectives/reduce/catchup.py``, which also keeps
the results of rounds of some of the peers for the run, when the coordinator
asks).

A contribution's weight may be a number or a function of the round's plan
(its members in rank order, its round id), evaluated after the quorum of
each attempt: gradient coding's decoding coefficients depend on who made the
round.

A sync may pass ``within``, a function of the round's plan naming the
members this peer reduces with (NoLoCo's pairs, ``optimizers/pairing.py``):
the round then runs as several small all-reduces in parallel, one per group,
and commits as one. With ``own_state`` the peer's state is its own (replicas
differ): a round it missed is skipped rather than caught up.

A sync may also pass ``prepare``, a function of the round's plan and the flat
contribution, run after each attempt's quorum (off the event loop): what is
sent in that attempt is its result, a new tensor made from the original
contribution each time, so a retried round never prepares twice. It is how
differential privacy adds each member's share of the noise, which depends on
the number of members.

A contribution on a GPU stays there: the round encodes its chunks where
they live (``collectives/codecs/device.py``), so only encoded bytes come to the
host, which is where every result is decoded and returned.

Where each phase's work lives: the quorum and commit calls are the coordinator
client's (``collectives/membership/client.py``), the all-reduce is the member's
``Collective`` (``collectives/allreduce.py``; one round of it,
``collectives/reduce/round.py``), a resync's fetch is state sync's
(``collectives/statesync/``), and a catch-up's is ``collectives/reduce/catchup.py``'s.

What a sync needs of its member, it is given (``ElasticSync``'s arguments):
the member's parts and where it stands in the run (``Member``), and the steps
of the member's life a sync takes (registering again, fetching the state,
hashing it, keeping a committed result). This module imports nothing of
``collectives/elastic.py``, which owns one ``ElasticSync`` per member.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import math
import time
from collections import deque
from collections.abc import Awaitable, Callable, Coroutine, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import torch

from collectives.allreduce import AllReduceConfig, AllReduceResult, Collective
from collectives.codecs import CodecConfig, check_finite
from collectives.errors import (
    InternalError,
    LoconetError,
    MemberFailure,
    ProtocolError,
    QuorumMismatch,
    RoundFailed,
)
from collectives.hosts.local import round_hosts
from collectives.membership.client import MembershipClient
from collectives.membership.coordinatorerrors import CommitUnknown, Unregistered
from collectives.membership.roundformat import round_format
from collectives.membership.roundplan import CommitOutcome, RoundPlan
from collectives.net.transport import Transport
from collectives.notes import RepeatNote
from collectives.reduce.aggregators import AggregatorConfig, make_aggregator
from collectives.reduce.catchup import LateRounds
from collectives.reduce.inbox import Group
from collectives.reduce.parts import flatten, shared_device, total_numel, unflatten_like
from collectives.reduce.results import CommittedResult
from collectives.statesync import ExpectedState, StateServer, StateSnapshot, StateSyncError
from collectives.syncphases import (
    TRANSITIONS,
    CaughtUp,
    Phase,
    Prepare,
    Resynced,
    RetriesExhausted,
    SyncResult,
    WaitingForState,
    Weight,
    Within,
    check_prepared,
)

log = logging.getLogger(__name__)

# A peer told to wait for the run's state asks the coordinator again this often (unless it says how often),
# and repeats why it waits now and then (collectives/notes.py).
WAIT_POLL_S = 2.0

# The activity a peer reports (PeerStatus.activity) as its sync enters a phase; the others keep the caller's.
ACTIVITIES = {Phase.QUORUM: "awaiting-round", Phase.ALLREDUCE: "in-round", Phase.RESYNC: "syncing"}


def _waited_for(done: AllReduceResult | None, reduce_with: Sequence[tuple[str, str]]) -> tuple[str, float]:
    """(peer id, seconds): the member whose data this one received last in a round, and how long after every
    other's; ("", 0.0) when unknown (a failed attempt, a round of one, a hierarchical round)."""
    rank = done.stats.waited_for_rank if done is not None else -1
    if not 0 <= rank < len(reduce_with):
        return "", 0.0
    return reduce_with[rank][0], done.stats.waited_s


@dataclass(frozen=True)
class SyncRequest:
    """One sync as its caller asked it, checked and flattened (``sync_request``)."""

    flat: torch.Tensor  # the contribution, flat, where the input lives
    like: torch.Tensor | list[torch.Tensor]  # the input's shapes, for the result
    weight: Weight
    tag: str
    allreduce: AllReduceConfig  # the member's, with this sync's codec and aggregator
    prepare: Prepare | None = None
    within: Within | None = None
    own_state: bool = False
    residual: torch.Tensor | None = None
    settings: tuple[str, ...] = ()
    min_members: int = 1


def sync_request(
    tensors: torch.Tensor | Sequence[torch.Tensor],
    allreduce: AllReduceConfig,
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
) -> SyncRequest:
    """A sync's arguments checked, its input flattened (a copy: training may go on) and ``codec`` and ``aggregator``
    put in ``allreduce``; TypeError, ValueError or NonFiniteError before anything is sent."""
    if prepare is not None and not callable(prepare):
        raise TypeError(f"prepare must be a function of (plan, flat tensor), got {prepare!r}")
    # A GPU's contribution is flattened there: the round encodes it where it lives.
    flat = flatten(tensors, device=shared_device(tensors))
    # Refused before the quorum, so a NaN never costs the others a round.
    check_finite(flat, "the values to sync (nothing was sent)")
    like = tensors if isinstance(tensors, torch.Tensor) else list(tensors)
    if total_numel(like) != flat.numel():
        raise ValueError("tensors changed while being flattened")
    config = allreduce
    if codec is not None:
        config = dataclasses.replace(config, codec=codec)
    if aggregator is not None:
        config = dataclasses.replace(config, aggregator=aggregator)
    if not callable(weight):
        weight = float(weight)
    if residual is not None and (residual.shape != (flat.numel(),) or residual.dtype != torch.float32
                                 or not residual.is_contiguous() or residual.device != flat.device):
        raise ValueError(f"residual must be a contiguous float32 tensor of shape ({flat.numel()},) on {flat.device}")
    return SyncRequest(flat, like, weight, tag, config, prepare, within, own_state, residual, tuple(settings),
                       min_members)


class SyncSettings(Protocol):
    """The member's settings a sync reads (``ElasticConfig``'s fields of these names)."""

    run_id: str
    max_attempts: int
    quorum_timeout_s: float
    commit_timeout_s: float
    stop_decision_wait_s: float
    holder_wait_s: float


class Member(Protocol):
    """What a sync uses of its member (``ElasticCollective``): its parts, its settings (read at each use: they may
    be replaced), and where it stands in the run, which a sync moves on."""

    config: SyncSettings
    transport: Transport
    collective: Collective
    state_server: StateServer
    late: LateRounds
    membership: MembershipClient
    last_round: int
    epoch: int

    @property
    def interrupted(self) -> bool:
        """Whether the member was told to stop."""


class ElasticSync:
    """A member's elastic all-reduce: runs each of its syncs through the phases (one at a time, on its loop)."""

    def __init__(
        self,
        member: Member,
        waiting: RepeatNote,
        rejoin: Callable[[], Awaitable[str]],
        fetch: Callable[[Sequence[str], ExpectedState | None], Awaitable[StateSnapshot]],
        state_digest: Callable[[], Awaitable[str]],
        keep_result: Callable[..., Coroutine[Any, Any, None]],
    ) -> None:
        """``member``'s sync. The member's steps it takes: ``rejoin`` (register again: "", or why the coordinator
        said to wait, noted in ``waiting``), ``fetch`` the run's state, the ``state_digest`` it asks with, and
        ``keep_result`` (round id, tag, flat, codec, parts, epoch[, digest]) of a committed round."""
        self.member = member
        self.membership = member.membership
        self.transport = member.transport
        self.collective = member.collective
        self.state_server = member.state_server
        self.late = member.late
        self._waiting = waiting
        self._rejoin = rejoin
        self._fetch = fetch
        self._state_digest = state_digest
        self._keep_result = keep_result
        self.phase = Phase.IDLE
        # (round id, phase) of recent moves, for tests and the dashboard.
        self.history: deque[tuple[int, Phase]] = deque(maxlen=1000)
        # Where to fetch the run's state from before the next round (empty: nowhere), and what it must be.
        self.pending_resync: tuple[str, ...] = ()
        self.pending_expect: ExpectedState | None = None
        # Whether a sync already waited holder_wait_s for a holder of the run's last round in vain (reset once
        # registered again): the syncs after it do not wait again.
        self.waited_out = False
        # Whether the coordinator said, at the last join that told this peer to wait, that every holder of the
        # run's last round finished and left: waiting for one is in vain (the run's end; a straggler behind it).
        self.holders_finished = False

    @property
    def peer_id(self) -> str:
        """The id the coordinator gave the member."""
        return self.membership.peer_id

    def resync_from(self, sources: tuple[str, ...], expect: ExpectedState | None) -> None:
        """Fetch the run's state from ``sources``, checked against ``expect``, before the next round (none: do not)."""
        self.pending_resync, self.pending_expect = sources, expect

    async def run(self, request: SyncRequest) -> SyncResult:
        """Run one sync through its phases until a round commits (on the transport's loop); raises as ``sync`` says."""
        flat, weight, tag, like, allreduce = request.flat, request.weight, request.tag, request.like, request.allreduce
        prepare, within, own_state, residual = request.prepare, request.within, request.own_state, request.residual
        settings, min_members = request.settings, request.min_members
        config = self.member.config
        out = torch.empty(flat.numel(), dtype=torch.float32)  # the host: results are decoded there
        attempts = 0
        last_reason = ""
        # The coordinator forms no round the aggregator cannot run with (Krum's 2f+3), nor one smaller than min_members:
        # the peers train on instead of aborting attempts. Groups ``within`` a round are the caller's business.
        least = max(make_aggregator(allreduce.aggregator).min_group() if within is None else 1, min_members)
        self.phase = Phase.IDLE  # every sync starts afresh; the previous one ended in a final phase
        started = time.monotonic()
        self._move(0, Phase.QUORUM)
        # Peers of one round must agree on what a contribution is and what they do with the result; the coordinator
        # checks it (a peer started with another --codec would otherwise break every round it joins, one with
        # another --outer-lr leave the replicas different after each).
        fmt = round_format(allreduce.codec, allreduce.aggregator, flat.numel(), settings)
        while True:
            plan = await self._ask(tag, least, started, fmt)
            if plan is None:
                continue
            if plan.action == "resync":
                await self._behind(plan, own_state, allreduce.codec)
                continue
            attempts += 1
            self.member.epoch = max(self.member.epoch, plan.epoch)
            self._move(plan.round_id, Phase.ALLREDUCE)
            refusal: LoconetError | None = None
            try:
                sent, w, reduce_with = await self._contribution(plan, flat, weight, within, prepare, least)
            except (ProtocolError, QuorumMismatch) as exc:  # this member refuses the round; it says so, sends nothing
                done, failed, reduce_with, refusal, spent = None, (), (), exc, (0, 0)
                reason = f"{self.peer_id} refused round {plan.round_id}: {exc}"
            else:
                # Error feedback on a copy per attempt: the residual moves on only with a committed round.
                work = None if residual is None else residual.clone()
                before = self._round_traffic()
                done, failed, reason = await self._allreduce(plan, sent, w, out, allreduce, reduce_with, work)
                spent = tuple(now - then for now, then in zip(self._round_traffic(), before))
            self._move(plan.round_id, Phase.COMMIT)
            outcome = await self._decision(plan, done, failed, reason, spent, _waited_for(done, reduce_with))
            self.member.epoch = max(self.member.epoch, outcome.epoch)
            if outcome.commit and done is not None:
                self._move(plan.round_id, Phase.COMMITTED)
                self.member.last_round = plan.round_id
                await self._committed(
                    self._keep_result(plan.round_id, tag, out, allreduce.codec, len(reduce_with), plan.epoch)
                )
                if residual is not None:
                    residual.copy_(work)
                return SyncResult(
                    value=unflatten_like(out, like, device="cpu"),
                    round_id=plan.round_id,
                    epoch=plan.epoch,
                    members=tuple(pid for pid, _ in plan.members),
                    attempts=attempts,
                    stats=done.stats,
                    decisions=done.decisions,
                    members_step=plan.members_step,
                )
            self._move(plan.round_id, Phase.ABORTED)
            if isinstance(refusal, QuorumMismatch):  # so would every later attempt and round: end the peer
                self._move(plan.round_id, Phase.FAILED)
                raise refusal
            last_reason = outcome.reason or reason
            log.info("round %d aborted (attempt %d): %s", plan.round_id, attempts, last_reason)
            if attempts >= config.max_attempts:
                self._move(plan.round_id, Phase.FAILED)
                raise RetriesExhausted(f"{attempts} attempts of a round aborted; last: {last_reason}")
            # A member the decision dropped (outcome.dropped) is not told to join here: its heartbeats may have
            # registered it again since; if not, the next quorum call says so (Unregistered) and it joins then.
            if self.membership.unregistered.is_set():
                self._move(plan.round_id, Phase.REJOIN)
                await self._rejoin()
            self._move(plan.round_id, Phase.QUORUM)

    def _move(self, round_id: int, to: Phase) -> None:
        """Enter phase ``to`` (InternalError for a move TRANSITIONS does not allow), and record it."""
        if to not in TRANSITIONS[self.phase]:
            raise InternalError(f"illegal round transition {self.phase.value} -> {to.value}")
        self.phase = to
        self.history.append((round_id, to))
        # What the dashboard shows: a peer waiting for a round to form (its partners late, or paused) is not training.
        self.membership.status.activity = ACTIVITIES.get(to, self.membership.status.activity)

    async def _committed(self, keeping: Coroutine[Any, Any, None]) -> None:
        """Finish ``keeping`` (keeping a committed round's result) even when a stop comes meanwhile: the round is
        this member's, and it is returned and applied; the next call raises Stopped. (A stop that landed here lost
        the round: a peer that came back with its checkpoint held the round before the run's last.)"""
        task = asyncio.ensure_future(keeping)
        try:
            await asyncio.shield(task)
        except asyncio.CancelledError:
            if not self.member.interrupted:
                task.cancel()
                raise
            log.info("stopped while keeping the result of round %d: it is applied first", self.member.last_round)
            await task
            asyncio.current_task().uncancel()  # the stop was honoured: the round is applied, then the caller stops

    async def _ask(self, tag: str, least: int, started: float, fmt: str = "") -> RoundPlan | None:
        """QUORUM: fetch a state the coordinator named before (raises Resynced), then ask for a round; None when
        this peer had to register again first (ask again). Raises WaitingForState once it waited in vain for a
        holder of the run's state, and the quorum's own errors (FormatMismatch: ``fmt``, this peer's round format,
        is not the run's)."""
        config = self.member.config
        if self.waited_out and self.membership.unregistered.is_set():
            # This peer waited holder_wait_s for a holder in vain already. Its heartbeats ask the coordinator
            # again every interval and register it once a holder is back; until then a sync ends at once
            # (it cost a Join and a heartbeat interval's sleep per sync, 1 s a step for a peer left behind).
            self._move(0, Phase.FAILED)
            raise WaitingForState(f"no sync: {self._waiting.key}")
        if self.pending_resync:
            sources = self.pending_resync
            snapshot = await self._try_fetch(sources, self.pending_expect)
            if snapshot is not None:
                self._move(0, Phase.RESYNC)
                raise Resynced(snapshot, ", ".join(sources))
        try:
            return await self.membership.quorum(
                self.member.last_round, tag, config.quorum_timeout_s, digest=await self._state_digest(),
                min_members=least, round_format=fmt,
            )
        except Unregistered:
            self._move(0, Phase.REJOIN)
            waiting = await self._rejoin()
            if waiting and (self.holders_finished or time.monotonic() - started > config.holder_wait_s):
                self.waited_out = True
                self._move(0, Phase.FAILED)
                raise WaitingForState(f"no sync: {waiting}") from None
            self._move(0, Phase.QUORUM)
            return None
        except LoconetError:
            self._move(0, Phase.FAILED)
            raise

    async def _try_fetch(self, sources: Sequence[str], expect: ExpectedState | None) -> StateSnapshot | None:
        """The run's state from sources, or None when the fetch failed (forget them: the coordinator names others)."""
        try:
            return await self._fetch(sources, expect)
        except StateSyncError as exc:
            log.warning("%s; will ask the coordinator again", exc)
            self.resync_from((), None)
            await asyncio.sleep(0.5)
            return None

    async def _behind(self, plan: RoundPlan, own_state: bool, codec: CodecConfig | None) -> None:
        """A RESYNC answer: catch up by the missed rounds' results (raises CaughtUp), or note where to fetch the
        state from at the next ask; with ``own_state``, skip the rounds instead."""
        if own_state:
            # This peer's state is its own (NoLoCo's replicas differ): a round it missed is skipped, not
            # caught up; it is up to date with the run's count of rounds.
            self.member.last_round = max(self.member.last_round, plan.last_committed_round)
            return
        # The rounds it missed carried what this sync would (the algorithm's codec for the tag).
        results = await self._catch_up(plan, codec) if plan.missed else None
        if results is not None:
            self._move(results[-1].round_id, Phase.CAUGHT_UP)
            raise CaughtUp(results, plan.pending_tag)
        # Fetched at the next ask; if that fails, the quorum is asked again and the coordinator names another source.
        self.resync_from(plan.sync_sources or ((plan.sync_from,) if plan.sync_from else ()),
                         ExpectedState(plan.last_committed_round, plan.state_digest))
        if not self.pending_resync:
            # Only the missed rounds' results were named, and not one of them came: ask again (the
            # coordinator names other holders, or tells this peer to wait for the run's state).
            await asyncio.sleep(WAIT_POLL_S)

    async def _contribution(
        self, plan: RoundPlan, flat: torch.Tensor, weight: Weight, within: Within | None, prepare: Prepare | None,
        least: int = 1,
    ) -> tuple[torch.Tensor, float, tuple[tuple[str, str], ...]]:
        """What this member sends in an attempt, with its weight and whom it reduces with; ProtocolError when it
        refuses the round (a sample that is not the seeded one of at least ``least``, a weight that is not finite, a
        group without it)."""
        plan.check_sample(least)
        w = float(weight(plan)) if callable(weight) else weight
        if not math.isfinite(w):
            raise ProtocolError(f"the weight function gave {w} for round {plan.round_id}")
        reduce_with = self._reduce_with(plan, within)
        sent = flat
        if prepare is not None:
            # Off the loop (noise for a large model takes a while), from the original flat every attempt.
            sent = check_prepared(await self.transport.run_off_loop(prepare, plan, flat), flat, plan.round_id)
        return sent, w, reduce_with

    async def _catch_up(self, plan: RoundPlan, codec: CodecConfig | None) -> list[CommittedResult] | None:
        """The committed results of the rounds this peer missed, kept here or fetched; None: fetch the state."""
        results = await self.late.results_of(plan, codec, self.member.last_round, self.peer_id)
        if results is None:
            return None
        self.member.last_round = results[-1].round_id
        for r in results:
            await self._keep_result(r.round_id, r.tag, r.value, codec, r.parts, r.epoch, r.digest)
        log.info(
            "caught up rounds %d-%d by their results (%d bytes)",
            results[0].round_id, results[-1].round_id, sum(r.wire_bytes for r in results),
        )
        return results

    def _reduce_with(self, plan: RoundPlan, within: Within | None) -> tuple[tuple[str, str], ...]:
        """The (peer id, address) of the members this peer reduces with, in rank order; ProtocolError (this member
        refuses the round) when ``within`` names itself out or a peer outside the round."""
        if within is None:
            return plan.members
        chosen = set(within(plan))
        ids = {pid for pid, _ in plan.members}
        if self.peer_id not in chosen or not chosen <= ids:
            raise ProtocolError(f"round {plan.round_id}: this peer reduces with {sorted(chosen)}, which is not a "
                                f"part of the round's members {sorted(ids)} that holds it")
        return tuple(m for m in plan.members if m[0] in chosen)

    async def _allreduce(
        self, plan: RoundPlan, flat: torch.Tensor, weight: float, out: torch.Tensor, config: AllReduceConfig,
        members: tuple[tuple[str, str], ...] | None = None, residual: torch.Tensor | None = None,
    ) -> tuple[AllReduceResult | None, tuple[str, ...], str]:
        """(the result, or None with the members to blame and why) of the round among ``members`` (default all)."""
        members = plan.members if members is None else members
        ids = [pid for pid, _ in members]
        group = Group(self.member.config.run_id, plan.epoch, plan.round_id, tuple(addr for _, addr in members),
                      ids.index(self.peer_id))
        exchange = asyncio.ensure_future(self.collective.reduce_flat(
            group, flat, weight=weight, config=config, out=out, residual=residual, hosts=round_hosts(plan, ids)
        ))
        # The coordinator may end the attempt while this member waits for data that will not come (a paused
        # member's, whose lease lapsed): the heartbeats say so, and the member reports at once, blaming nobody.
        over = self.membership.watch(plan.round_id, plan.epoch)
        try:
            await asyncio.wait((exchange, over), return_when=asyncio.FIRST_COMPLETED)
            if not exchange.done():
                return None, (), over.result()  # the exchange is cancelled below
            return exchange.result(), (), ""
        except MemberFailure as exc:
            return None, tuple(ids[r] for r in exc.failed_ranks), str(exc)
        except RoundFailed as exc:
            return None, (), str(exc)
        finally:
            self.membership.unwatch(over)
            if not exchange.done():  # the coordinator ended the attempt, or this sync was cancelled (interrupt)
                exchange.cancel()
                await asyncio.gather(exchange, return_exceptions=True)

    def _round_traffic(self) -> tuple[int, int]:
        """(bytes sent, received) by this peer's data plane so far, less the state it served: a failed attempt's
        traffic is what they grow by over it (a round's own stats die with it)."""
        counters = self.transport.counters
        return counters.bytes_sent - self.state_server.bytes_served, counters.bytes_received

    async def _decision(
        self, plan: RoundPlan, done: AllReduceResult | None, failed: tuple[str, ...], reason: str,
        spent: tuple[int, int] = (0, 0), waited: tuple[str, float] = ("", 0.0),
    ) -> CommitOutcome:
        """This member's Commit and the round's decision. A stop that comes once this member has its result waits
        up to stop_decision_wait_s for a commit, which is then applied: a round the run commits is not lost with
        this member (it may be the only one left to hold it). Any other outcome of a stopped round: cancelled."""
        call = asyncio.ensure_future(self._commit(plan, done, failed, reason, spent, waited))
        try:
            return await asyncio.shield(call)
        except asyncio.CancelledError:
            if not self.member.interrupted or done is None:
                call.cancel()
                raise
        log.info("stopped while round %d is being decided: waiting up to %g s for its decision",
                 plan.round_id, self.member.config.stop_decision_wait_s)
        try:
            outcome = await asyncio.wait_for(call, self.member.config.stop_decision_wait_s)
        except TimeoutError:
            raise asyncio.CancelledError from None
        if not outcome.commit:
            raise asyncio.CancelledError
        asyncio.current_task().uncancel()  # the stop was honoured: the round is applied, then the caller stops
        return outcome

    async def _commit(
        self, plan: RoundPlan, done: AllReduceResult | None, failed: tuple[str, ...], reason: str,
        spent: tuple[int, int] = (0, 0), waited: tuple[str, float] = ("", 0.0),
    ) -> CommitOutcome:
        """This member's report of the attempt (its traffic: the round's stats, or ``spent`` for a failed one; whom
        it waited for last, and how long)."""
        stats = done.stats if done is not None else None
        try:
            return await self.membership.commit(
                plan,
                done is not None,
                failed,
                reason,
                bytes_sent=stats.bytes_sent if stats else spent[0],
                bytes_received=stats.bytes_received if stats else spent[1],
                wall_s=stats.wall_s if stats else 0.0,
                timeout_s=self.member.config.commit_timeout_s,
                waited_for=waited[0],
                waited_s=waited[1],
            )
        except CommitUnknown as exc:
            # Not applied; if others did apply it, the next quorum tells this peer to resync.
            self.membership.unregistered.set()
            return CommitOutcome(commit=False, reason=str(exc), epoch=self.member.epoch)
