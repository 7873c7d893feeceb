"""Rounds this peer was not in: catching up by their results, and keeping results for the run.

A peer that a round went on without (a ``first-k`` or ``sample`` quorum, an
asynchronous buffer, a short pause) need not fetch the whole state: the
round's holders keep its committed result (``collectives/reduce/results.py``), and
the late peer fetches the result of each round it missed, checked, for its
optimizer to apply in order (``LateRounds.results_of``), when that costs
fewer bytes than the state. Anything wrong with a fetched result (gone,
wrong size, not finite) falls back to the whole state.

A result not flowing from one holder for ``RESULT_STALL_S`` is fetched from
the next: a stalled holder is left quickly. When every holder of a round
stalled so (none refused, was gone, did not keep it or sent a bad result),
the link is more likely slow and busy with the run's rounds than every
holder stalled: those whose server answers a health check (a paused one
does not) are asked once more, waiting the state-sync config's own
``stall_timeout_s`` (``results.fetch_result``'s patient pass). Both the
peer's own catch-up and the results it keeps for the run get it: without it
one fetches the whole state instead, the other loses the round's result.

A round of only some of the live peers is held by its members alone until
the others catch up. The coordinator therefore names, in a heartbeat
answer, recent rounds too few live peers hold
(``peer/coordinator/resultholders.py``); the peer fetches each one's result
from its holders the same way and keeps it in its ``ResultStore``
(``LateRounds.hold``), from which it serves late peers and, at its own next
sync, catches up without fetching it again. Its heartbeats list the results
it keeps, each with the SHA-256 of its bytes (computed in the background,
``digest_later``); the coordinator names with a round the digest most of its
members reported, and a fetched result with another is refused
(``results.decode_result``). A peer offers once it holds the run's state
(its collective says so) and its optimizer says its rounds' results are the
run's (not NoLoCo's pairs). The rounds asked for are fetched one at a time,
in the order asked, by a task on the transport's loop that ``stop`` cancels,
with the digests.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import math
from collections import deque
from collections.abc import Awaitable, Callable, Sequence

from collectives.asynctasks import cancel_and_wait
from collectives.codecs import CodecConfig
from collectives.errors import LoconetError
from collectives.membership.roundplan import MissedRound, RoundPlan
from collectives.net.transport import Transport
from collectives.reduce.results import CommittedResult, ResultStore, expected_wire_bytes, fetch_result
from collectives.statesync import StateSyncConfig

log = logging.getLogger(__name__)

# A result not flowing from one holder for this long is fetched from the next: another holds the same result,
# and the run may be waiting for this peer (a state's source gets the state fetch's longer stall timeout, and so
# do the holders of a result when every one of them stalled: the patient pass of fetch_result).
RESULT_STALL_S = 3.0
# Rounds waiting to be fetched to keep, at most (the newest stay): asks come two an answer and one per commit.
MAX_QUEUED = 8
# The round ids of this many recent results fetched to keep are listed (``fetched``); all of them are counted.
RECENT_FETCHED = 1000


class LateRounds:
    """Catches this peer up by the results of rounds it missed; fetches and keeps those the coordinator asks it to."""

    def __init__(
        self,
        transport: Transport,
        run_id: str,
        config: StateSyncConfig,
        results: ResultStore,
        keep: Callable[[CommittedResult], Awaitable[None]],
    ) -> None:
        self.transport = transport
        self.run_id = run_id
        self.config = dataclasses.replace(config, stall_timeout_s=min(config.stall_timeout_s, RESULT_STALL_S))
        # The holders of a round that all stalled within RESULT_STALL_S are asked again with the state's own window.
        self.patient_config = config
        self.results = results
        self._keep = keep
        # Set by the optimizer (ElasticCollective.provide_state): a round's size by its tag, the state's bytes, and
        # whether its rounds' results are the run's.
        self.round_numel: Callable[[str], int] | None = None
        self.state_nbytes: Callable[[], int] | None = None
        self.results_are_the_runs = False
        # Rounds the coordinator asked this peer to keep, not fetched yet (fetched one at a time, in order, by _task).
        self._queue: list[MissedRound] = []
        self._fetching: MissedRound | None = None
        self._task: asyncio.Task | None = None
        self._digesting: set[asyncio.Task] = set()
        # Results fetched to hold: the recent ones' round ids, how many, and their bytes on the wire (for reports).
        self.fetched: deque[int] = deque(maxlen=RECENT_FETCHED)
        self.fetched_count = 0
        self.fetched_bytes = 0

    async def results_of(
        self, plan: RoundPlan, codec: CodecConfig | None, last_round: int, peer_id: str
    ) -> list[CommittedResult] | None:
        """The committed results of the rounds plan says this peer (at last_round) missed, in order: kept here
        already, or fetched from their holders; None: fetch the state instead."""
        if self.round_numel is None:
            return None
        ids = [m.round_id for m in plan.missed]
        if ids != list(range(last_round + 1, last_round + 1 + len(ids))):
            log.warning("missed rounds %s do not follow round %d; fetching the state", ids[:10], last_round)
            return None
        try:
            numels = [self.round_numel(m.tag) for m in plan.missed]
        except LoconetError as exc:
            log.warning("cannot catch up by results (%s); fetching the state", exc)
            return None
        # Results this peer keeps already (the coordinator asked it to hold them) are not fetched again.
        local = [self.results.get(m.round_id, m.tag, m.epoch) for m in plan.missed]
        local = [r if r is not None and r.value.numel() == n else None for r, n in zip(local, numels)]
        wire = sum(expected_wire_bytes(n, codec) for n, r in zip(numels, local) if r is None)
        state_bytes = self.state_nbytes() if self.state_nbytes is not None else math.inf
        # Equal bytes favour the results: the source then copies nothing (a state fetch snapshots the state).
        # With nobody holding the state (only the results outlived the round's members) the results it is.
        if wire > state_bytes and (plan.sync_sources or plan.sync_from):
            log.info(
                "%d missed round(s) are about %d bytes, the state %d: fetching the state",
                len(numels), wire, state_bytes,
            )
            return None
        results = []
        for missed, numel, kept in zip(plan.missed, numels, local):
            got = kept or await fetch_result(
                self.transport, self.run_id, peer_id, self.config, missed, numel, patient=self.patient_config
            )
            if got is None:
                return None
            results.append(got)
        return results

    def offers(self) -> bool:
        """Whether this peer offers to keep other rounds' results (once it holds the run's state: the caller's part)."""
        return self.results_are_the_runs and self.round_numel is not None and self.results.keep_last > 0

    def held(self) -> list[tuple[int, int, str]] | None:
        """(round id, epoch, digest) of the results this peer keeps (for its heartbeats), or None when it does not
        offer."""
        return self.results.attempts() if self.offers() else None

    def digest_later(self, round_id: int) -> None:
        """Compute a kept result's digest off the loop, in the background (its heartbeats report it once known)."""
        if not self.offers():
            return  # nobody is told its digest: its results are not the run's (NoLoCo), or it keeps none
        task = asyncio.get_running_loop().create_task(self.transport.run_off_loop(self.results.digest, round_id))
        self._digesting.add(task)
        task.add_done_callback(self._digested)

    def _digested(self, task: asyncio.Task) -> None:
        self._digesting.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.info("a kept result's digest was not computed: %r", task.exception())

    def hold(self, rounds: Sequence[MissedRound], peer_id: str, last_round: int) -> None:
        """Fetch these rounds' results to keep (on the loop), after those asked for before; a round this peer's
        state (at last_round) has, or one kept or queued already, is not fetched."""
        if not self.offers():
            return
        have = {(r, e) for r, e, _ in self.results.attempts()} | {(m.round_id, m.epoch) for m in self._queue}
        if self._fetching is not None:
            have.add((self._fetching.round_id, self._fetching.epoch))
        self._queue += [m for m in rounds if m.round_id > last_round and (m.round_id, m.epoch) not in have]
        # The coordinator asks for recent rounds, at most two an answer: the newest few are what it needs kept.
        del self._queue[:-MAX_QUEUED]
        if self._queue and (self._task is None or self._task.done()):
            self._task = asyncio.get_running_loop().create_task(self._fetch(peer_id))

    async def _fetch(self, peer_id: str) -> None:
        while self._queue:
            self._fetching = self._queue.pop(0)
            try:
                await self._fetch_one(self._fetching, peer_id)
            finally:
                self._fetching = None

    async def _fetch_one(self, missed: MissedRound, peer_id: str) -> None:
        try:
            numel = self.round_numel(missed.tag)
            got = await fetch_result(
                self.transport, self.run_id, peer_id, self.config, missed, numel, patient=self.patient_config
            )
        except LoconetError as exc:  # a tag it does not know, or the transport closing: keeping is optional
            log.info("not keeping round %d's result: %s", missed.round_id, exc)
            return
        if got is None:
            return
        await self._keep(got)
        self.fetched.append(got.round_id)
        self.fetched_count += 1
        self.fetched_bytes += got.wire_bytes
        log.info("keeping round %d's result for the run (%d bytes from %s)", got.round_id, got.wire_bytes, got.source)

    async def stop(self) -> None:
        """Cancel the fetches in flight and queued, and the digests being computed."""
        self._queue.clear()
        await cancel_and_wait([t for t in (self._task, *self._digesting) if t is not None])
