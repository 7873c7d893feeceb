"""Keeping other rounds' results: a peer's side of the coordinator's result holders.

A round of only some of the live peers (an asynchronous buffer, a sample,
first-k) is held by its members alone until the others catch up. The
coordinator therefore names, in a heartbeat answer, recent rounds too few
live peers hold (``peer/coordinator/resultholders.py``); the peer fetches
each one's result from its holders, checked as a catch-up's is
(``collectives/results.py``), and keeps it in its ``ResultStore``, from which
it serves late peers and, at its own next sync, catches up without fetching
it again. Its heartbeats list the results it keeps.

A peer offers once it holds the run's state (its collective says so) and
its optimizer says its rounds' results are the run's (not NoLoCo's pairs). One batch of fetches runs
at a time, as a task on the transport's loop that ``stop`` cancels.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Sequence

from collectives.asynctasks import cancel_and_wait
from collectives.errors import LoconetError
from collectives.membership import MissedRound
from collectives.results import CommittedResult, ResultStore, fetch_result
from collectives.statesync import StateSyncConfig
from collectives.transport import Transport

log = logging.getLogger(__name__)


class ResultKeeper:
    """Fetches and keeps the committed results the coordinator asks this peer to hold."""

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
        self.config = config
        self.results = results
        self._keep = keep
        # Set by the optimizer (ElasticCollective.provide_state): a round's size by its tag, and whether its rounds'
        # results are the run's.
        self.round_numel: Callable[[str], int] | None = None
        self.results_are_the_runs = False
        self._task: asyncio.Task | None = None
        # Results fetched to hold, and their bytes on the wire (for reports and tests).
        self.fetched: list[int] = []
        self.fetched_bytes = 0

    def offers(self) -> bool:
        """Whether this peer offers to keep other rounds' results (once it holds the run's state: the caller's part)."""
        return self.results_are_the_runs and self.round_numel is not None and self.results.keep_last > 0

    def held(self) -> list[int] | None:
        """The rounds whose results this peer keeps (for its heartbeats), or None when it does not offer."""
        return self.results.rounds() if self.offers() else None

    def hold(self, rounds: Sequence[MissedRound], peer_id: str, last_round: int) -> None:
        """Start fetching these rounds' results to keep (on the loop), unless a batch is still being fetched."""
        if self._task is not None and not self._task.done():
            return
        wanted = [m for m in rounds if m.round_id > last_round and m.round_id not in self.results.rounds()]
        if wanted and self.offers():
            self._task = asyncio.get_running_loop().create_task(self._fetch(wanted, peer_id))

    async def _fetch(self, rounds: Sequence[MissedRound], peer_id: str) -> None:
        for missed in rounds:
            try:
                numel = self.round_numel(missed.tag)
                got = await fetch_result(self.transport, self.run_id, peer_id, self.config, missed, numel)
            except LoconetError as exc:  # a tag it does not know, or the transport closing: keeping is optional
                log.info("not keeping round %d's result: %s", missed.round_id, exc)
                continue
            if got is None:
                continue
            await self._keep(got)
            self.fetched.append(got.round_id)
            self.fetched_bytes += got.wire_bytes
            log.info("keeping round %d's result for the run (%d bytes from %s)", got.round_id, got.wire_bytes, got.source)

    async def stop(self) -> None:
        """Cancel a batch of fetches in flight."""
        if self._task is not None:
            await cancel_and_wait([self._task])
