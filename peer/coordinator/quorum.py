"""The quorums and attempts of one run: forming each round by the quorum policy, deciding it by its members' reports.

The Coordinator service (``peer/coordinator/service.py``) owns one
``Quorums`` and calls it from its RPC handlers and its tick, all on one
asyncio loop, so nothing here needs a lock. The decisions themselves are pure
(``policies/`` says who is in a round, ``rules.commit_decision`` whether it
commits); this module keeps the waiting calls and carries the decisions out.

An attempt of a round is named by (round id, epoch): the round id is the last
committed round + 1, so a retry after an abort keeps it with a new epoch.
While an attempt is in flight no quorum forms: the service holds every
Quorum call until the attempt is decided.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field, replace

import grpc

from collectives.asynctasks import consume_exception
from collectives.membership.coordinatorerrors import NO_QUORUM
from collectives.membership.memberlists import Entry, change_bytes, list_bytes, member_change, pack_list
from collectives.net.wire import encode_varint
from peer.coordinator.bottleneck import STREAK, Bottlenecks, bottleneck
from peer.coordinator.config import CoordinatorConfig
from peer.coordinator.policies import FormRound, QuorumInputs, QuorumPolicy, Refuse
from peer.coordinator.rules import (
    CommitInputs,
    Decision,
    QuorumRules,
    Report,
    SitOut,
    answer_lost,
    commit_decision,
    format_refusal,
    next_epoch,
    sit_out,
    sitting_out,
)
from peer.coordinator.runstate import PeerRecord, RoundRecord, RunState
from protos import membership_pb2 as pb

log = logging.getLogger(__name__)

Attempt = tuple[int, int]  # (round id, epoch)
# Members named in the log line of a formed round (the status document has them all).
LOGGED_MEMBERS = 20
# Member lists of this many recent rounds are kept, so that an answer can carry the change from the one its asker
# holds: a peer that missed a few rounds (a pause, a late report) still gets a change, not the whole list.
RECENT_LISTS = 4
# The round formats of this many tags are kept (a run has a few: streaming's fragments, NoLoCo's spread, dynamic k's).
KEPT_FORMATS = 64
# QuorumResponse.rank's wire tag: field 5, varint.
_RANK_TAG = bytes([5 << 3])


def rank_field(rank: int) -> bytes:
    """QuorumResponse.rank as serialised bytes, to append to a serialised answer ("" for 0, proto3's default).

    Protobuf reads concatenated serialisations as one message, so ``shared + rank_field(r)`` is the answer with
    rank r: the member list is serialised once per round, not once per member.
    """
    return _RANK_TAG + encode_varint(rank) if rank else b""


class RoundLists:
    """A formed round's answer bodies, serialised once per round and per list an asker holds (all but the rank).

    An asker that holds the round's list gets it left out; one that holds a recent round's list gets the change from it
    (``collectives/membership/memberlists.py``) when that is smaller; any other gets the whole list, packed when it
    reads a packed one (QuorumRequest.packed_members).
    """

    def __init__(self, rest: bytes, entries: tuple[Entry, ...], member_list: bytes, digest: bytes,
                 recent: dict[bytes, tuple[Entry, ...]]) -> None:
        """rest: the answer without members or rank; member_list: list_bytes(entries), whose SHA-256 is digest;
        recent: the lists an asker may hold, by digest."""
        self.rest = rest
        self.entries = entries
        self.with_members = rest + member_list
        self.digest = digest
        self._member_list = member_list
        self._with_packed: bytes | None = None
        self._recent = recent
        self._bodies: dict[tuple[bytes, bool], bytes] = {}

    def whole(self, packed: bool) -> bytes:
        """The answer's body with the whole list: packed (compressed on first use, once per round) or not."""
        if not packed:
            return self.with_members
        if self._with_packed is None:
            self._with_packed = (
                self.rest + pb.QuorumResponse(members_packed=pack_list(self._member_list)).SerializeToString()
            )
        return self._with_packed

    def body(self, known_members: bytes, changes: bool = True, packed: bool = False) -> bytes:
        """The answer's body for an asker that holds the list named known_members (b"": none), applies a change
        to it (QuorumRequest.member_changes) and reads a packed list (QuorumRequest.packed_members); an older
        peer does neither."""
        if known_members == self.digest:
            return self.rest
        if not changes:
            return self.whole(packed)
        body = self._bodies.get((known_members, packed))
        if body is not None:
            return body
        base = self._recent.get(known_members)
        if base is None:  # an unknown name is not cached: the cache stays as small as `recent`
            return self.whole(packed)
        change = member_change(base, self.entries)
        body = self.whole(packed)
        if change is not None:
            changed = self.rest + change_bytes(known_members, *change)
            body = changed if len(changed) < len(body) else body
        self._bodies[(known_members, packed)] = body
        return body


@dataclass(frozen=True)
class RoundAnswer:
    """One member's ROUND answer: its round's shared bodies plus its own rank."""

    lists: RoundLists
    rank: int

    def wire(self, known_members: bytes, changes: bool = True, packed: bool = False) -> bytes:
        """The serialised QuorumResponse for an asker that holds the list named known_members (b"": none),
        applies a change to it (changes) and reads a packed list (packed)."""
        return self.lists.body(known_members, changes, packed) + rank_field(self.rank)


class BadRequest(Exception):
    """A request the coordinator refuses; carries the gRPC status to answer with."""

    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(message)
        self.code = code


@dataclass
class PendingQuorum:
    """Requests waiting for the next round's group, in order of arrival.

    A waiter's future gets its QuorumResponse, serialised (bytes: the round's member list is
    serialised once for all), or None when the round formed without it (it is then held until
    that attempt is decided).
    """

    first_at: float
    tag: str
    waiting: dict[str, asyncio.Future] = field(default_factory=dict)
    # When each waiter asked (monotonic seconds), for policies that look at arrival times.
    asked_at: dict[str, float] = field(default_factory=dict)
    # The inner step each waiter asked at (QuorumRequest.step): the round's furthest is sent to its members.
    asked_step: dict[str, int] = field(default_factory=dict)
    # The most members any waiter's round needs (QuorumRequest.min_members: its aggregator's, or differential
    # privacy's minimum): no smaller round forms.
    min_members: int = 1
    # What its waiters' contributions are (QuorumRequest.round_format): the first that said ("": none said yet).
    round_format: str = ""


@dataclass
class PendingCommit:
    """A formed attempt waiting for its members' reports."""

    record: RoundRecord
    formed_at: float
    # record.members as a set: every member's report checks it is one (a list scan each was O(n^2) a round).
    member_set: frozenset[str] = frozenset()
    reports: dict[str, Report] = field(default_factory=dict)
    first_report_at: float | None = None
    first_failure_at: float | None = None
    decided: asyncio.Future | None = None
    bytes: int = 0
    wall_s: float = 0.0
    # reporter -> (the member whose data it received last, seconds after every other's): bottleneck.py.
    waits: dict[str, tuple[str, float]] = field(default_factory=dict)


class Quorums:
    """The pending quorum, the attempt in flight and the last decisions of a run (use on the coordinator's loop)."""

    def __init__(
        self,
        config: CoordinatorConfig,
        policy: QuorumPolicy,
        state: RunState,
        started: float,
        drop: Callable[[PeerRecord, str], None],
        save: Callable[[], None],
        run_under_way: Callable[[], bool],
        committed: Callable[[int], None] = lambda round_id: None,
    ) -> None:
        """``drop(peer, why)``: take a member an abort dropped out of the run; ``save()``: update the state file;
        ``run_under_way()``: the run had rounds before this coordinator (its first attempt gets a new epoch);
        ``committed(round_id)``: a round was just committed (after its members are answered)."""
        self.config = config
        self.policy = policy
        self.state = state
        self._started = started
        # When the last round committed (monotonic): where the next round's work began.
        self.last_commit_at: float | None = None
        self._drop = drop
        self._save = save
        self._run_under_way = run_under_way
        self._committed = committed
        self.pending: PendingQuorum | None = None
        # Attempts formed and not yet decided, and the last `history` decisions, by (round id, epoch):
        # a member of an aborted attempt must read that attempt's decision, never its retry's.
        # Quorum calls are held while an attempt is in flight, so at most one is.
        self.commits: dict[Attempt, PendingCommit] = {}
        self.decided: dict[Attempt, Decision] = {}
        # The attempt a restarted coordinator's state file says committed last (remember_commit), if any.
        self.remembered: Attempt | None = None
        # The member lists of the last rounds formed, by digest: an answer carries the change from the one its
        # asker holds.
        self._recent_lists: OrderedDict[bytes, tuple[Entry, ...]] = OrderedDict()
        # The live peers and the least members a round needed when a quorum was last refused for too few, until
        # a round forms.
        self._refused: tuple[frozenset[str], int] | None = None
        # By tag, the round format of its last committed round and that round's members (rules.format_refusal).
        self.formats: OrderedDict[str, tuple[str, frozenset[str]]] = OrderedDict()
        # Members dropped because others named them as failed, and their sitting out (rules.sit_out).
        self.sitting: dict[str, SitOut] = {}
        # The peers named as a round's bottleneck lately (bottleneck.py).
        self.bottlenecks = Bottlenecks()

    def pending_tag(self, peer_id: str, now: float) -> str:
        """The tag of the quorum peers are waiting in now, if its policy waits for peer_id too ("": none)."""
        pending = self.pending
        if pending is None or not pending.waiting:
            return ""
        return pending.tag if self.policy.waits_for(self.inputs(pending, now), peer_id) else ""

    def since_commit(self, now: float) -> float:
        """Seconds since the last round committed (0.0: none since this coordinator started)."""
        return 0.0 if self.last_commit_at is None else max(now - self.last_commit_at, 1e-6)

    def in_flight(self) -> PendingCommit | None:
        """The attempt formed and not yet decided, if any."""
        return next(iter(self.commits.values()), None)

    def waiting(self) -> list[asyncio.Future]:
        """Every future a call waits on (cancelled when the coordinator stops)."""
        futs = list(self.pending.waiting.values()) if self.pending else []
        futs += [c.decided for c in self.commits.values() if c.decided is not None]
        return futs

    # -- forming ---------------------------------------------------------------------

    def run_format(self, tag: str) -> str:
        """The round format of tag's last committed round while a member of it is live ("": none, or forgotten)."""
        kept = self.formats.get(tag)
        if kept is None:
            return ""
        if kept[1].isdisjoint(self.state.live):  # stops at the first live member: O(1) per request in a healthy run
            # Every member of that round is gone: a run whose peers all restarted with a new codec goes on with it.
            del self.formats[tag]
            return ""
        return kept[0]

    def enqueue(
        self, peer_id: str, tag: str, min_members: int = 1, round_format: str = "", step: int = 0
    ) -> asyncio.Future:
        """Add an up-to-date peer to the pending quorum; the future gets its RoundAnswer (None: held).

        ``min_members``: the fewest members this peer's round can run with; ``round_format``: what its
        contribution is (refused, BadRequest, when it is not the run's or the pending round's); ``step``: the inner
        step it asks at."""
        if self.pending is not None and not self.policy.joins(self.pending.tag, tag):
            raise BadRequest(
                grpc.StatusCode.FAILED_PRECONDITION,
                f"quorum for {tag!r} while the pending one is for {self.pending.tag!r}: peers disagree on the schedule",
            )
        pending_format = "" if self.pending is None else self.pending.round_format
        why, for_good = format_refusal(round_format, pending_format, self.run_format(tag) if round_format else "")
        if why:
            if for_good:  # the peer stops: worth a line on the dashboard
                self.state.event("format-refused", peer_id, why)
                log.warning("peer %s refused: %s", peer_id, why)
            raise BadRequest(grpc.StatusCode.FAILED_PRECONDITION, why)
        if self.pending is None:
            self.pending = PendingQuorum(first_at=time.monotonic(), tag=tag)
        if not self.pending.round_format:
            self.pending.round_format = round_format
        previous = self.pending.waiting.get(peer_id)
        if previous is not None and not previous.done():
            previous.cancel()
        fut: asyncio.Future = asyncio.get_running_loop().create_future()
        self.pending.min_members = max(self.pending.min_members, min_members)
        self.pending.waiting[peer_id] = fut
        self.pending.asked_at.setdefault(peer_id, time.monotonic())
        self.pending.asked_step[peer_id] = step
        self.close_if_ready(cheap=True)
        return fut

    def forget_lost_answer(self, peer_id: str) -> None:
        """Count a member of the attempt in flight that asks for a new round as that attempt's failed member: it will
        never report (rules.answer_lost), and the attempt would wait for it as long as its lease holds, with no other
        round formed meanwhile. Chaos seed 1336: a peer paused past its lease rejoined, a round of one formed with it,
        the answer never reached it (a rejoin under a run token resets the Session stream), and the run stood still."""
        lost = next((a for a, c in self.commits.items() if answer_lost(c.record.members, c.reports, peer_id)), None)
        if lost is None:
            return
        pending = self.commits[lost]
        why = f"{peer_id} asked for a new round before reporting: the answer naming it a member never reached it"
        log.info("round %d at epoch %d: %s", lost[0], lost[1], why)
        now = time.monotonic()
        pending.reports[peer_id] = Report(ok=False, reason=why)
        pending.first_report_at = pending.first_report_at or now
        pending.first_failure_at = pending.first_failure_at or now
        self.decide_if_known(lost)

    def withdraw(self, peer_id: str, fut: asyncio.Future) -> None:
        """Take a waiter out of the pending quorum (its call gave up)."""
        if self.pending is not None and self.pending.waiting.get(peer_id) is fut:
            del self.pending.waiting[peer_id]

    def refuse(self, peer_id: str, code: grpc.StatusCode, message: str) -> None:
        """Answer a peer waiting in the pending quorum with an error (it is out of the run)."""
        if self.pending is not None:
            fut = self.pending.waiting.pop(peer_id, None)
            if fut is not None:
                refuse_waiter(fut, code, message)

    def _name_bottleneck(self, record: RoundRecord, waits: dict[str, tuple[str, float]]) -> None:
        """Note which member a committed round waited for, if most others did, and say so in the log and the run's
        events once it did STREAK rounds in a row (bottleneck.py; then at most every NOTE_EVERY_ROUNDS rounds)."""
        slow = bottleneck(waits, record.members, record.duration_s)
        peer_id, wait = slow if slow is not None else ("", 0.0)
        self.bottlenecks.forget(self.state.live)
        if not self.bottlenecks.due(peer_id, record.round_id):
            return
        detail = (
            f"round {record.round_id} waited {wait:.1f} s of its {record.duration_s:.1f} s for {peer_id}'s data, "
            f"the last to arrive at most members, as in the {STREAK - 1} rounds before: its link (or its CPU) sets "
            "the pace of every round it is in (a --quorum first-k:K or allbut:S goes on without the slowest)"
        )
        self.state.event("slow", peer_id, detail)
        log.warning("%s", detail)

    def sitting_now(self, now: float) -> frozenset[str]:
        """The members sitting out the quorum now (rules.sitting_out); records of gone peers are forgotten."""
        if not self.sitting:
            return frozenset()
        s = self.state
        for peer_id in [p for p in self.sitting if p not in s.peers]:
            del self.sitting[peer_id]
        return frozenset(p for p, e in self.sitting.items() if sitting_out(e, s.last_committed_round, now))

    def excluded(self, now: float) -> frozenset[str]:
        """Peers no quorum waits for now: members sitting out, and joiners syncing again after a failed fetch."""
        out = self.sitting_now(now)
        struggling = self.state.struggling
        return out | struggling if struggling else out

    def inputs(self, pending: PendingQuorum, now: float) -> QuorumInputs:
        """What the policy decides the pending quorum from: sitting-out members neither asked nor live."""
        s = self.state
        # Arrivals count from the last commit (when the round's work began), or from the first request.
        since = self.last_commit_at if self.last_commit_at is not None else pending.first_at
        live, rules = frozenset(s.live), self.rules(pending)
        out = self.excluded(now)
        asking = tuple(p for p in pending.waiting if p not in out) if out else tuple(pending.waiting)
        return QuorumInputs(
            requesting=asking,
            # Every live peer, syncing joiners included: `all` waits (up to the join timeout) for a
            # joiner to finish syncing, so joiners are admitted at the next round boundary instead
            # of chasing rounds that form without them; `sample` draws from them all. Not a joiner whose
            # fetch failed already (RunState.struggling): it waits for no round either.
            eligible=live - out if out else live,
            waited_s=now - pending.first_at,
            # Quorums hold after a start, and after an outage that took every lease until its peers are back.
            coordinator_age_s=min(now - self._started, s.silence.settle_age(now, live, rules.startup_grace_s)),
            round_id=s.next_round_id,
            seed=self.config.seed,
            rules=rules,
            refused_before=self._refused == (live, rules.least),
            run_started=s.last_committed_round > 0,
            tag=pending.tag,
            arrivals_s=tuple(max(0.0, pending.asked_at.get(p, now) - since) for p in asking),
            since_s=now - since,
        )

    def rules(self, pending: PendingQuorum) -> QuorumRules:
        """The quorum rules for this pending quorum: with min_members, what its peers' rounds need."""
        rules = self.config.rules
        return rules if pending.min_members == rules.min_members else replace(rules, min_members=pending.min_members)

    def minimum(self, pending: PendingQuorum | None) -> str:
        """What a round needs at least, in words ("min_peers is 2", and the peers' need when larger)."""
        text = f"min_peers is {self.config.min_peers}"
        if pending is not None and pending.min_members > self.config.min_peers:
            text += (
                f", and the peers' rounds need {pending.min_members} members (their aggregator's or --dp-min-members)"
            )
        return text

    def awaited(self, now: float) -> set[str]:
        """Live peers the pending quorum still waits for (empty if none is pending)."""
        if self.pending is None:
            return set()
        return set(self.policy.awaited(self.inputs(self.pending, now)))

    def close_if_ready(self, cheap: bool = False) -> None:
        """Form the pending quorum's round, or refuse it, if the policy says so now."""
        pending = self.pending
        if pending is None or self.commits:
            # With an attempt in flight, calls are held, not queued; nothing can form.
            return
        now = time.monotonic()
        if cheap:
            # Per request: counts only, so n requests cost O(n), not O(n^2). (decide's inputs leave the sitting out.)
            out = self.excluded(now)
            # Counted over the (few) sitting out: no copy of the live set or the waiters per request.
            asking = len(pending.waiting) - sum(p in pending.waiting for p in out)
            live = len(self.state.live) - sum(p in self.state.live for p in out)
            if not self.policy.may_form(asking, live, now - pending.first_at, self.rules(pending)):
                return
        pending.waiting = {pid: f for pid, f in pending.waiting.items() if not f.done()}
        if not pending.waiting:
            self.pending = None
            return
        outcome = self.policy.decide(self.inputs(pending, now))
        if isinstance(outcome, Refuse):
            self._refuse_pending(pending, outcome.live)
        elif isinstance(outcome, FormRound):
            self._form(pending, outcome, now)

    def _form(self, pending: PendingQuorum, outcome: FormRound, now: float) -> None:
        """Start an attempt with the policy's members; the other waiting peers are held until it is decided."""
        s = self.state
        members = list(outcome.members)
        # A run that makes rounds again waits out the join timeout at its next shortage: a peer that leaves
        # then may be one restarted by its supervisor.
        self._refused = None
        # A restarted coordinator (the run had rounds before it) cannot know which (round, epoch)
        # pairs its predecessor gave out: its first attempt gets a new epoch.
        restarted = self._run_under_way() or s.last_committed_round > 0 or s.epoch > 0
        s.epoch = next_epoch(s.epoch, s.last_members, members, s.bump_epoch, restarted)
        s.last_members, s.bump_epoch = members, False
        round_id = s.next_round_id
        record = RoundRecord(round_id, s.epoch, members, time.time(), tag=pending.tag,
                             candidates=list(outcome.candidates), round_format=pending.round_format)
        s.rounds.append(record)
        loop = asyncio.get_running_loop()
        self.commits[(round_id, s.epoch)] = PendingCommit(
            record=record, formed_at=now, member_set=frozenset(members), decided=loop.create_future()
        )
        entries = tuple(Entry(m, (peer := s.peers[m]).address, peer.host_id, peer.registration) for m in members)
        member_list = list_bytes(entries)
        digest = hashlib.sha256(member_list).digest()
        rest = pb.QuorumResponse(
            action=pb.QuorumResponse.ROUND,
            round_id=round_id,
            epoch=s.epoch,
            last_committed_round=s.last_committed_round,
            policy=self.policy.spec,
            seed=self.config.seed,
            candidates=outcome.candidates,
            members_digest=digest,
            members_step=max((pending.asked_step.get(m, 0) for m in members), default=0),
        ).SerializeToString()
        # Serialised once for all members (protobuf reads concatenated serialisations as one message): each
        # answer is these bytes plus its own rank field. A serialisation per member cost ~100 us each, and
        # sending the list again ~40 KB per member at 1,000: an asker that holds it, or a recent one, gets it
        # left out, or the change.
        lists = RoundLists(rest, entries, member_list, digest, dict(self._recent_lists))
        self._recent_lists[digest] = entries
        self._recent_lists.move_to_end(digest)
        while len(self._recent_lists) > RECENT_LISTS:
            self._recent_lists.popitem(last=False)
        for rank, pid in enumerate(members):
            pending.waiting.pop(pid).set_result(RoundAnswer(lists, rank))
        for fut in pending.waiting.values():
            if not fut.done():
                fut.set_result(None)  # held until this attempt is decided
        self.pending = None
        # With a state file, a restarted coordinator starts from the epoch given out, not just the last committed one.
        self._save()
        more = len(members) - LOGGED_MEMBERS
        shown = ", ".join(members[:LOGGED_MEMBERS]) + (f" and {more} more" if more > 0 else "")
        log.info("round %d formed at epoch %d with %d members: %s", round_id, s.epoch, len(members), shown)

    def _refuse_pending(self, pending: PendingQuorum, live: int) -> None:
        """Answer every waiting Quorum call with 'too few peers' (the peers train on and ask again)."""
        reason = (
            f"{NO_QUORUM}: {live} live peer(s), {self.minimum(pending)}; "
            "training goes on locally until more peers join"
        )
        for fut in pending.waiting.values():
            refuse_waiter(fut, grpc.StatusCode.FAILED_PRECONDITION, reason)
        refused = (frozenset(self.state.live), self.rules(pending).least)
        self.pending = None
        if refused == self._refused:
            # The same shortage, asked about again at every sync: one event and one line are enough.
            log.debug("%s", reason)
            return
        self._refused = refused
        self.state.event("quorum-refused", "", reason)
        log.info("%s", reason)

    # -- deciding --------------------------------------------------------------------

    def remember_commit(self, round_id: int, epoch: int) -> None:
        """Answer that attempt's Commit calls: it committed (a restarted coordinator's state file says so).

        The coordinator before the restart may have decided it and stopped before answering every member; a
        member asking again must then learn the round committed, or nobody would hold the run's state.
        """
        if round_id > 0 and epoch >= 0:
            self.remembered = (round_id, epoch)
            self.decided[self.remembered] = Decision(commit=True, reason="committed before the coordinator restarted")

    def decide_if_known(self, attempt: Attempt) -> None:
        """Decide an attempt if its outcome is known (rules.commit_decision), and carry the decision out."""
        pending = self.commits.get(attempt)
        if pending is None:
            return
        s = self.state
        now = time.monotonic()
        expired = frozenset(m for m in pending.record.members if m not in s.live)
        deadline = pending.first_report_at is not None and now - pending.first_report_at >= self.config.commit_timeout_s
        grace = pending.first_failure_at is not None and now - pending.first_failure_at >= self.config.failure_grace_s
        decision = commit_decision(
            CommitInputs(tuple(pending.record.members), pending.reports, expired, deadline, grace)
        )
        if decision is None:
            return
        del self.commits[attempt]
        self.decided[attempt] = decision
        while len(self.decided) > self.config.history:
            del self.decided[next(iter(self.decided))]  # the oldest decision (dicts keep insertion order)
        record = pending.record
        round_id = record.round_id
        record.duration_s = pending.wall_s or (now - pending.formed_at)
        record.bytes = pending.bytes
        if decision.commit:
            record.status = "committed"
            s.rounds_committed += 1
            self.last_commit_at = now
            s.record_commit(record)
            for m in record.members:
                if m in s.peers:
                    s.peers[m].last_round = round_id
                self.sitting.pop(m, None)  # a round it made: its strikes end
            s.event("commit", "", f"round {round_id} ({len(record.members)} members)")
            self._name_bottleneck(record, pending.waits)
            if record.round_format:
                self.formats[record.tag] = (record.round_format, frozenset(record.members))
                self.formats.move_to_end(record.tag)
                while len(self.formats) > KEPT_FORMATS:
                    self.formats.popitem(last=False)
            self._save()
        else:
            record.status = "aborted"
            record.reason = decision.reason
            s.rounds_aborted += 1
            s.bump_epoch = True
            for m in decision.dropped:
                peer = s.peers.get(m)
                if peer is not None and peer.alive:
                    self._drop(peer, f"dropped after round {round_id}: {decision.reason[:200]}")
            for m in decision.blamed:
                self._sit_out(m, round_id, now)
            s.event("abort", "", f"round {round_id} (epoch {record.epoch}): {decision.reason[:300]}")
            log.info(
                "round %d at epoch %d aborted: %s (dropped %s)",
                round_id, record.epoch, decision.reason, ", ".join(decision.dropped) or "-",
            )
        if pending.decided is not None and not pending.decided.done():
            pending.decided.set_result(decision)
        if decision.commit:
            self._committed(round_id)

    def _sit_out(self, peer_id: str, round_id: int, now: float) -> None:
        """Make a member the others named as failed sit out the next rounds (it rejoins at once, and would be a
        member of the retry again: one peer the others cannot reach then aborts every attempt of the run)."""
        s = self.state
        peer = s.peers.get(peer_id)
        if peer is None:
            return
        before = self.sitting.get(peer_id)
        entry = sit_out((before.strikes if before else 0) + 1, s.last_committed_round, now, peer.lease_s)
        self.sitting[peer_id] = entry
        rounds = entry.until_round - s.last_committed_round
        why = (f"the other members of round {round_id} named it as failed ({entry.strikes} time(s) in a row): it sits "
               f"out up to {rounds} round(s) or {entry.until_s - now:.0f} s; if they cannot reach it, check its "
               f"--advertise/--host ({peer.address}) and firewall")
        s.event("sit-out", peer_id, why)
        log.warning("peer %s: %s", peer_id, why)

    def decide_all(self) -> None:
        """Decide every attempt whose outcome is known (on the tick)."""
        for attempt in list(self.commits):
            self.decide_if_known(attempt)


def refuse_waiter(fut: asyncio.Future, code: grpc.StatusCode, message: str) -> None:
    """Answer a Quorum call waiting on fut with an error (unless it was answered already)."""
    if not fut.done():
        fut.set_exception(BadRequest(code, message))
        fut.add_done_callback(consume_exception)  # its caller may have gone already
