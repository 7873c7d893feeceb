"""One member's hierarchical round: its host's members reduce through shared memory, one leader per host crosses.

With the members' host ids, a round of an aggregator that may be reduced within
a host first (``Aggregator.pre_reducible``: mean, sum) runs in three steps
instead of the butterfly between every pair of members:

1. every local member copies its contribution into its slot of the host's
   segment (``collectives/hosts/local.py``) and records its weight;
2. once all have, local member j reduces slice j of every slot into the
   host's result, with the aggregator's arithmetic in rank order (so one
   host's result is bit for bit the flat round's, codec ``none``);
3. with one host, that is the round's result. With several, each host's
   leader (its lowest rank) runs the gRPC all-reduce among the leaders with
   the host's pre-reduced tensor and weight (``Aggregator.host_coefficients``:
   the sum of its members' weights for a mean), writes the result back, and
   every local member copies it out.

The codec, and so error feedback, applies between hosts only: a leader's
residual holds the compression error of its host's tensor; the other
members' residuals are left unchanged (their contributions reach the host's
sum exactly).

Every member watches the others of its host while it waits: a recorded
process that is gone (or a zombie) is named at once, one that never attached
is named when its data-plane port refuses. A member that cannot take or open
the host's segment (permissions, ENOSPC, EMFILE) has no slot to record that
in, and its process and port stay alive: it leaves a marker file next to the
segment (``leave_marker``: its rank, the round's tag, the reason), and the
others, finding it within a liveness check, name it at once instead of at
the round's deadline. The member that sees a failure
first records it in its slot and raises ``MemberFailure``; the others read
the record and raise the same. A leader whose round between hosts fails
records that failure, its ranks mapped back to the whole group's. The last
member to leave removes the segment and its markers; ``sweep_stale`` removes
what crashed processes leave.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections.abc import Awaitable, Callable, Sequence

import torch

from collectives.asynctasks import cancel_and_wait
from collectives.errors import (
    LoconetError,
    MemberFailure,
    NonFiniteError,
    RoundFailed,
    SharedMemoryUnusable,
    StaleRound,
)
from collectives.hosts.cache import SegmentCache
from collectives.hosts.identity import SHM_DIR, process_state
from collectives.hosts.local import (
    ABORTED,
    ATTACHED,
    DONE,
    EMPTY,
    FINAL,
    LEFT,
    REDUCED,
    WRITTEN,
    HostPlan,
    HostSegment,
    SegmentStale,
    round_tag,
    segment_name,
    sweep_stale,
)
from collectives.hosts.markers import JoinWatch, leave_marker
from collectives.net.reachability import port_refuses
from collectives.net.transport import Transport
from collectives.reduce.aggregation import weighted_sum
from collectives.reduce.aggregators import make_aggregator
from collectives.reduce.inbox import Group
from collectives.reduce.parts import part_bounds
from collectives.reduce.round import AllReduceConfig
from collectives.stats import RoundStats

log = logging.getLogger(__name__)

# Polling: the first waits are short (the others are usually a moment behind), then at most this long.
POLL_MIN_S = 0.0002
POLL_MAX_S = 0.002
# How often a waiting member checks that the others' processes are alive.
LIVENESS_EVERY_S = 0.005
# A member that has not attached after this long is checked through its data-plane port, this often.
ATTACH_GRACE_S = 0.5
PORT_CHECK_EVERY_S = 0.5
# A local member whose process stays stopped (SIGSTOP, a debugger) this long is failed, as a paused peer on
# another host is once its connection's keepalive (10 s) goes unanswered.
PAUSED_AFTER_S = 10.0
STOPPED_STATES = ("T", "t")  # /proc/<pid>/stat: stopped by a signal, stopped by a tracer
# How many times a member may leave an abandoned segment for the newer one at its path in one round.
MAX_MOVES = 3
WRITTEN_OR_LATER = (WRITTEN, REDUCED, DONE)
# Elements reduced per step: a few rows of this stay in cache while they are summed.
REDUCE_STEP = 1 << 18

# The round between hosts: (leaders' group, the host's tensor, its weight, the leader's residual, out) -> its stats.
BetweenHosts = Callable[[Group, torch.Tensor, float, torch.Tensor | None, torch.Tensor], Awaitable[RoundStats]]


def reduce_rows(rows: torch.Tensor, coef: torch.Tensor, a: int, b: int) -> list[int]:
    """rows[0, a:b] = sum_t coef[t] * rows[t, a:b] in fp32, rows in order (the flat round's arithmetic), in place.

    Returns the rows to blame when the sum is not finite: those of rows 1.. holding NaN/Inf there, else row 0
    (whose values the sum has replaced; with finite rows a mean cannot overflow)."""
    bad = None
    for c0 in range(a, b, REDUCE_STEP):
        c1 = min(b, c0 + REDUCE_STEP)
        out = weighted_sum(rows[:, c0:c1], coef, out=rows[0, c0:c1])
        if bad is None and not bool(torch.isfinite(out.sum())):
            bad = (c0, c1)
    if bad is None:
        return []
    c0, c1 = bad
    return [t for t in range(1, rows.shape[0]) if not bool(torch.isfinite(rows[t, c0:c1]).all())] or [0]


def error_from(record: dict, round_id: int, rank: int) -> LoconetError:
    """The error a member raises for another member's failure record."""
    kind = record.get("kind")
    message = str(record.get("message", "a member of this host aborted the round"))
    if kind == "member":
        ranks = {int(r): str(a) for r, a in record.get("ranks", {}).items()}
        reasons = {int(r): str(w) for r, w in record.get("reasons", {}).items()}
        if rank in record.get("nonfinite", ()):
            return NonFiniteError(
                f"round {round_id}: this member's contribution holds NaN or Inf ({reasons.get(rank)})"
            )
        return MemberFailure(ranks, reasons, round_id)
    if kind == "stale":
        return StaleRound(message)
    return RoundFailed(message)


class HostRound:
    """One member's part in one hierarchical round (create per round, then ``run``)."""

    def __init__(
        self,
        transport: Transport,
        group: Group,
        hosts: Sequence[str],
        config: AllReduceConfig,
        phase_hook: Callable[[Group, str], None] | None = None,
        shm_dir: str = SHM_DIR,
    ) -> None:
        self.transport = transport
        self.group = group
        self.plan = HostPlan(tuple(hosts), group.rank)
        self.config = config
        self.phase_hook = phase_hook
        self.shm_dir = shm_dir
        self.local = self.plan.local
        self.me = self.plan.local_index
        self.others = [k for k in range(len(self.local)) if k != self.me]
        self.deadline = time.monotonic() + config.timeout_s
        self.gone: set[int] = set()  # local indexes known dead
        self._live_checked = 0.0
        self._stopped_since: dict[int, float] = {}  # local index -> when its process was first seen stopped
        self._port_checked: dict[int, float] = {}
        self._stale_checked = 0.0
        self.markers = JoinWatch()  # markers of local members that could not join the segment
        self.seg: HostSegment | None = None  # the segment this member is in (it may move to a newer one)
        self.stats = RoundStats(
            run_id=group.run_id, epoch=group.epoch, round_id=group.round_id, group_size=group.size, numel=0,
            codec=str(config.codec),
        )

    async def run(
        self, flat: torch.Tensor, weight: float, residual: torch.Tensor | None, result: torch.Tensor,
        between_hosts: BetweenHosts, cache: SegmentCache | None = None,
    ) -> RoundStats:
        """Reduce flat with the group into result (raises what the flat round raises); returns this member's stats.

        With a cache (the Collective's), the host's segment stays mapped for the next round; without, it is
        dropped at the end."""
        started = time.monotonic()
        numel = flat.numel()
        self.stats.numel = numel
        g = self.group
        own = cache is None
        cache = SegmentCache(self.shm_dir) if own else cache
        host, addresses = self.plan.hosts[g.rank], tuple(g.members[r] for r in self.local)
        key = (g.run_id, host, addresses, numel, self.me)
        name = segment_name(g.run_id, host, addresses, numel)
        deadline_unix = time.time() + self.config.timeout_s
        try:
            sweep_stale(self.shm_dir)
            self.seg = await cache.take(key, name, len(self.local), numel, self.me, deadline_unix)
        except Exception as exc:
            raise self._could_not_join(name, deadline_unix, exc) from exc
        final = LEFT
        try:
            await self._write(cache, key, name, deadline_unix, flat, weight)
            seg = self.seg
            alone = len(self.plan.leaders) == 1
            coef, host_weight = make_aggregator(self.config.aggregator).host_coefficients(
                [seg.weight(k) for k in range(len(self.local))], alone
            )
            a, b = part_bounds(numel, len(self.local))[self.me]
            t0 = time.monotonic()
            bad = await self.transport.run_off_loop(reduce_rows, seg.rows, coef, a, b)
            self.stats.reduce_s = time.monotonic() - t0
            if bad:
                ranks = [self.local[t] for t in bad]
                self._fail(
                    seg, [self.local.index(r) for r in ranks], "its contribution holds NaN or Inf", nonfinite=ranks
                )
            seg.set_state(REDUCED)
            await self._wait(seg, lambda k: seg.state(k) in (REDUCED, DONE), "reduce its slice")
            self.stats.scatter_s = time.monotonic() - started
            self._enter("gather")
            if alone:
                await self.transport.run_off_loop(result.copy_, seg.result)
            elif self.plan.is_leader:
                await self._lead(seg, host_weight, residual, result, between_hosts)
            else:
                await self._wait(seg, lambda k: k != 0 or seg.result_ready(), "bring the result from the other hosts")
                await self.transport.run_off_loop(result.copy_, seg.result)
            final = DONE
        except asyncio.CancelledError:
            self._record(self.seg, {"kind": "round", "message": f"round {g.round_id}: rank {g.rank} was cancelled"})
            raise
        except LoconetError as exc:
            if not isinstance(exc, MemberFailure | NonFiniteError) and not self.seg.closed \
                    and self.seg.state(self.me) != ABORTED:
                kind = "stale" if isinstance(exc, StaleRound) else "round"
                self._record(self.seg, {"kind": kind, "message": str(exc)})
            raise
        except BaseException as exc:
            self._record(self.seg, {"kind": "round", "message": f"rank {g.rank} failed: {type(exc).__name__}: {exc}"})
            raise
        finally:
            self.seg.finish(final, frozenset(self.gone))
            cache.give(key, self.seg)
            if own:
                cache.close()
            self.stats.wall_s = time.monotonic() - started
            self.stats.gather_s = self.stats.wall_s - self.stats.scatter_s
        return self.stats

    async def _write(
        self, cache: SegmentCache, key: tuple, name: str, deadline_unix: float, flat: torch.Tensor, weight: float
    ) -> None:
        """Join the host's segment, write this member's contribution, and wait until every local member's is there.

        A segment found abandoned before the write barrier is passed (an earlier round failed in it, or a member
        replaced it) is left for the one now at its path, at most MAX_MOVES times."""
        tag = round_tag(self.group.round_id, self.group.epoch)
        for moves in range(MAX_MOVES + 1):
            seg = self.seg
            try:
                seg.join(tag)
                if moves == 0:
                    self._enter("scatter")
                # A slow member may still be copying the previous round's result out of slot 0.
                await self._wait(seg, seg.previous_use_over, "finish the previous round with the segment", move=True)
                await self.transport.run_off_loop(seg.rows[self.me].copy_, flat)
                seg.set_weight(weight)
                seg.set_state(WRITTEN)
                await self._wait(seg, lambda k, seg=seg: seg.state(k) in WRITTEN_OR_LATER, "write its contribution",
                                 move=True, barrier=True)
                return
            except SegmentStale as exc:
                if moves == MAX_MOVES:
                    raise RoundFailed(f"round {self.group.round_id}: the host's shared-memory segment was replaced "
                                      f"{moves + 1} times while joining it ({exc})") from exc
                log.debug("round %d: %s; joining the newer segment", self.group.round_id, exc)
                try:
                    self.seg = cache.reopen(key, seg, name, deadline_unix)
                except Exception as err:  # it has left the old file and has no slot in the new one
                    raise self._could_not_join(name, deadline_unix, err) from err

    async def _lead(
        self, seg: HostSegment, host_weight: float, residual: torch.Tensor | None, result: torch.Tensor,
        between_hosts: BetweenHosts,
    ) -> None:
        """Run the round between hosts with the host's tensor, watching this host's members meanwhile."""
        g = self.group
        leaders = self.plan.leaders
        inter = Group(g.run_id, g.epoch, g.round_id, tuple(g.members[r] for r in leaders), leaders.index(g.rank))
        # The residual is corrected where the host's tensor lives, on the host's CPU.
        work = residual if residual is None or residual.device.type == "cpu" else residual.cpu()
        task = asyncio.ensure_future(between_hosts(inter, seg.result, host_weight, work, result))
        try:
            while not task.done():
                await asyncio.wait({task}, timeout=LIVENESS_EVERY_S)
                if not task.done():
                    with seg.synced():
                        self._check(seg)  # a local member that dies meanwhile cancels the round between hosts
        finally:
            await cancel_and_wait([task])
        try:
            inter_stats = task.result()
        except MemberFailure as exc:  # ranks among the leaders: named by their ranks in the whole group
            ranks = [leaders[r] for r in exc.failed_ranks]
            record = {"kind": "member", "ranks": {r: g.members[r] for r in ranks},
                      "reasons": {leaders[r]: exc.reasons.get(r, "failed") for r in exc.failed_ranks}}
            self._record(seg, record)
            raise error_from(record, g.round_id, g.rank) from exc
        if work is not None and work is not residual:
            residual.copy_(work)
        for key in ("bytes_sent", "bytes_received", "encode_s", "decode_s"):
            setattr(self.stats, key, getattr(inter_stats, key))
        await self.transport.run_off_loop(seg.result.copy_, result)
        seg.set_result_ready()

    # -- waiting and failing ------------------------------------------------------------------------------

    def _could_not_join(self, name: str, deadline_unix: float, exc: Exception) -> Exception:
        """Leave a marker that this member could not join the host's segment (it has no slot to record a failure in,
        and its port stays open), so the others name it at once (if even that fails, at the deadline); returns the
        error this member raises. Not a RoundFailed: a retry would fail the same way, so the peer stops, saying why."""
        g = self.group
        path = os.path.join(self.shm_dir, name)
        log.debug("round %d: rank %d could not join %s: %r", g.round_id, g.rank, path, exc)
        leave_marker(path, self.me, g.rank, round_tag(g.round_id, g.epoch), deadline_unix, exc)
        if isinstance(exc, LoconetError):
            return exc
        return SharedMemoryUnusable(
            f"cannot use this host's shared memory at {path} ({type(exc).__name__}: {exc}); check the permissions "
            "and free space of its directory (the peers of one host must run as one user), or give this peer a "
            "--host-id of its own so that it takes part over the network only"
        )

    def _enter(self, phase: str) -> None:
        if self.phase_hook is not None:
            self.phase_hook(self.group, phase)

    async def _wait(
        self, seg: HostSegment, ready: Callable[[int], bool], what: str, move: bool = False, barrier: bool = False
    ) -> None:
        """Until ready(k) for every other local member; raises at another's failure, a death, or the deadline.

        move: raise SegmentStale if the segment is found abandoned (and this member could leave it). barrier: the
        wait is the write barrier, passed under the segment's lock (``HostSegment.pass_barrier``)."""
        delay = POLL_MIN_S
        since = time.monotonic()
        while True:
            with seg.synced():  # what the others wrote before their states is then what this member reads
                self._check(seg)
                pending = [k for k in self.others if not ready(k)]
                if not pending and (not barrier or seg.pass_barrier(WRITTEN_OR_LATER)):
                    return
            now = time.monotonic()
            if move and now - self._stale_checked >= LIVENESS_EVERY_S:
                self._stale_checked = now
                if seg.abandoned():
                    self._check(seg)  # a failure of this round is recorded before its file is removed
                    if seg.try_move():
                        raise SegmentStale(f"shared-memory segment {seg.path} was abandoned or replaced")
            if now > self.deadline:
                self._fail(seg, pending, f"did not {what} before the round's deadline ({self.config.timeout_s:g} s)")
            if now - since > ATTACH_GRACE_S:
                await self._check_unattached(seg, pending, now)
            await asyncio.sleep(delay)
            delay = min(delay * 2, POLL_MAX_S)

    def _check(self, seg: HostSegment) -> None:
        """Raise another member's recorded failure, or name a member whose process is gone."""
        for k in self.others:
            record = seg.failure(k)
            if record is not None:
                raise error_from(record, self.group.round_id, self.group.rank)
        now = time.monotonic()
        if now - self._live_checked < LIVENESS_EVERY_S:
            return
        self._live_checked = now
        for k in self.others:
            # A member not yet in this round may have failed to take the segment: its marker is looked for here,
            # not in _check_unattached (only after ATTACH_GRACE_S), as it costs one lstat per member not attached,
            # and they attach within milliseconds in a round that goes well; it is then named within a check.
            if seg.state(k) == EMPTY:
                why = self.markers.reason(seg.path, k, self.local[k], seg.tag)
                if why is not None:
                    self._fail(seg, [k], f"it could not join the host's shared memory: {why}")
            pid, start = seg.pid(k)
            if not pid or seg.state(k) in FINAL:
                continue
            state = process_state(pid, start)
            if state is None:
                self._fail(seg, [k], f"its process (pid {pid}) died during the round")
            if state not in STOPPED_STATES:
                self._stopped_since.pop(k, None)
            elif now - self._stopped_since.setdefault(k, now) >= PAUSED_AFTER_S:
                self._fail(seg, [k], f"its process (pid {pid}) has been stopped for {PAUSED_AFTER_S:g} s "
                                     "(SIGSTOP or a debugger)")

    async def _check_unattached(self, seg: HostSegment, pending: list[int], now: float) -> None:
        for k in pending:
            if seg.state(k) >= ATTACHED or now - self._port_checked.get(k, 0.0) < PORT_CHECK_EVERY_S:
                continue
            self._port_checked[k] = now
            why = await port_refuses(self.group.members[self.local[k]], 0.5)
            if why is not None and seg.state(k) < ATTACHED:
                self._fail(seg, [k], f"it never joined the host's shared memory and its port refuses ({why})")

    def _fail(self, seg: HostSegment, ks: list[int], why: str, nonfinite: list[int] | None = None) -> None:
        """Record local members ks as failed and raise what every member of the host will raise."""
        ranks = [self.local[k] for k in ks]
        if nonfinite is None:
            self.gone.update(ks)
        record = {"kind": "member", "ranks": {r: self.group.members[r] for r in ranks},
                  "reasons": {r: why for r in ranks}, "nonfinite": nonfinite or []}
        self._record(seg, record)
        raise error_from(record, self.group.round_id, self.group.rank)

    def _record(self, seg: HostSegment, record: dict) -> None:
        if not seg.closed and seg.state(self.me) not in FINAL:
            seg.write_failure(record)
