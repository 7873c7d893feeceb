"""The coordinator's soft state of one run: peers, rounds, history, metrics.

Plain data and the bookkeeping around it, no I/O. Everything here can be
lost (the coordinator restarts) and rebuilt from what the peers report when
they re-register; decisions about it are made by ``peer/coordinator/rules.py``
and the quorum policies (``peer/coordinator/policies/``).
"""

from __future__ import annotations

import math
import secrets
import time
from collections import deque
from dataclasses import dataclass, field

from peer.coordinator.digests import DIGEST_ROUNDS, UNKNOWN_SENIORITY, DigestBook
from peer.coordinator.forgetting import ForgetRule, peers_to_forget
from peer.coordinator.history import Series, SeriesBook
from peer.coordinator.resultholders import ResultHolders
from peer.coordinator.rules import CommittedRound, PeerView
from peer.coordinator.silence import Silence
from peer.coordinator.waiting import WaitingRoom

PEER_STATES = ("joining", "syncing", "active", "lost", "left")


@dataclass
class PeerRecord:
    """One peer of the run, as the coordinator sees it."""

    peer_id: str
    address: str
    name: str = ""
    state: str = "joining"
    joined_at: float = field(default_factory=time.time)
    last_seen: float = field(default_factory=time.monotonic)
    # The lease this peer was given at join (no default: the coordinator's config gives it, ``lease_s``).
    lease_s: float = field(kw_only=True)
    last_round: int = 0
    has_state: bool = False
    step: int = 0
    steps_per_s: float | None = None
    loss: float | None = None
    eval_loss: float | None = None
    epsilon: float | None = None
    spread: float | None = None
    samples: int = 0
    bytes_sent: int = 0
    bytes_received: int = 0
    activity: str = ""
    codecs: tuple[str, ...] = ()
    # The host the peer said it runs on (its round partners there reduce through shared memory); "": its own.
    host_id: str = ""
    # Whether its last heartbeat offered to keep other rounds' results (HeartbeatRequest.holds_results).
    offers_results: bool = False
    # Whether its state is its own (JoinRequest.own_state: NoLoCo's replicas differ): behind the run with nobody
    # to catch up from, it skips the rounds it missed instead of waiting.
    own_state: bool = False
    # The algorithm it runs (JoinRequest.algorithm; "": not said): a joiner running another is refused.
    algorithm: str = ""
    # What else it must agree on with the run (JoinRequest.settings; "": not said).
    settings: str = ""
    # How often it was told to fetch the run's state because its own lost to the run's digest (digests.py), and
    # whether it was since its last quorum request (its heartbeats' digests then predate the fetch).
    realigned: int = 0
    fetch_told: bool = False
    # Whether it left saying it finished (LeaveRequest.reason "finished"): not expected back.
    finished: bool = False
    # Joins again while still syncing (its fetch failed: a slow or cut link, a partition from its sources):
    # quorums stop waiting for it until it asks for a round (RunState.struggling).
    sync_failures: int = 0
    # Calls the peer refused or cut off, by kind (its heartbeats say; docs/security.md).
    refusals: dict[str, int] = field(default_factory=dict)
    # With a run secret: the Ed25519 key the peer's credential binds its id to (collectives.net.credentials).
    public_key: bytes = field(default=b"", repr=False)
    # Which registration of the peer this record is (Member.registration), set by RunState.add_peer.
    registration: int = 0

    @property
    def alive(self) -> bool:
        """Whether the peer holds a valid lease."""
        return self.state in ("joining", "syncing", "active")

    @property
    def label(self) -> str:
        """Its id, with its name when it has one, as the peer's own log says it ("p3-2f7c4f (peer1)")."""
        return f"{self.peer_id} ({self.name})" if self.name else self.peer_id

    def view(self) -> PeerView:
        """The peer as the pure decisions see it."""
        return PeerView(self.peer_id, self.address, self.last_round, alive=self.alive, has_state=self.has_state)


@dataclass
class RoundRecord:
    """One attempt of a round, for history and the dashboard: (round_id, epoch) names it."""

    round_id: int
    epoch: int
    members: list[str]
    started_at: float
    tag: str = ""
    status: str = "running"
    reason: str = ""
    duration_s: float | None = None
    bytes: int = 0
    # The round's candidates as its policy named them: a sample's pool (its members are sample_members of them), or
    # the live roster of a roster policy (allbut, backup, grace, coded, buffer); empty for the others.
    candidates: list[str] = field(default_factory=list)
    # What each member's contribution was (QuorumRequest.round_format; "": not said).
    round_format: str = ""

    def as_dict(self) -> dict:
        """The round as the status document shows it."""
        return {
            "round_id": self.round_id,
            "epoch": self.epoch,
            "members": list(self.members),
            "started_at": self.started_at,
            "duration_s": self.duration_s,
            "bytes": self.bytes,
            "status": self.status,
            "reason": self.reason,
            "tag": self.tag,
            "candidates": list(self.candidates),
        }


@dataclass
class Event:
    """Something that happened in the run (join, failure, commit...)."""

    time: float
    kind: str
    peer_id: str
    detail: str


@dataclass
class RunState:
    """Everything the coordinator knows about its run."""

    run_id: str
    min_peers: int
    history: int = 500
    # The dashboard's charts (bounded as peer/coordinator/history.py says): points per series of a
    # peer's loss, eval loss and traffic, of the peers-alive curve, and how many peers keep series.
    # (A chart is about 500 pixels wide: more points would not show, and the page reads them every second.)
    loss_points: int = 600
    eval_points: int = 200
    traffic_points: int = 300
    alive_points: int = 500
    series_peers: int = 64
    # A peer's traffic samples are at least this far apart (heartbeats may come faster).
    traffic_interval_s: float = 0.5
    # How many of the last committed rounds are remembered for catch-up (rounds_to_catch_up).
    catchup_rounds: int = 4
    # The quorum policy's spec, for the status document.
    policy: str = "all"
    epoch: int = 0
    last_committed_round: int = 0
    # The epoch of the attempt that committed last_committed_round (-1: unknown, after a rollback or from an older
    # state file): a restarted coordinator answers that attempt's Commit calls with its decision.
    last_committed_epoch: int = -1
    # The furthest inner step an up-to-date peer reported in a heartbeat (where the run's training is);
    # late peers skip ahead to it. Reset by a rollback.
    run_step: int = 0
    # run_step when the last round committed (its members have trained run_step - round_step steps since).
    round_step: int = 0
    peers: dict[str, PeerRecord] = field(default_factory=dict)
    # Ids of the peers holding a lease, and who is at which address: kept up to date by
    # add_peer/drop_peer so that per-request work does not scan every peer.
    live: set[str] = field(default_factory=set)
    by_address: dict[str, str] = field(default_factory=dict)
    # Live peers whose state fetch failed and that sync again (PeerRecord.sync_failures): no quorum waits for them
    # (a joiner that cannot reach its sources cost every round the join timeout for as long as it could not).
    struggling: set[str] = field(default_factory=set)
    # Leases lapsed with no call heard in between, and the last outage that took every one (silence.py).
    silence: Silence = field(default_factory=Silence)
    rounds: deque[RoundRecord] = field(init=False)
    # The last catchup_rounds committed rounds, oldest first, with their members.
    committed: deque[CommittedRound] = field(init=False)
    # Which peers keep which of those rounds' results besides their members, and who was asked to.
    result_holders: ResultHolders = field(default_factory=ResultHolders)
    events: deque[Event] = field(init=False)
    # Per peer: (step, loss), (step, eval loss) and (unix time, bytes sent, bytes received) points.
    loss: SeriesBook = field(init=False)
    eval_loss: SeriesBook = field(init=False)
    traffic: SeriesBook = field(init=False)
    # (unix time, peers alive), a point whenever the count changes.
    alive: Series = field(init=False)
    rounds_committed: int = 0
    rounds_aborted: int = 0
    # Members of the last formed quorum, and whether the next attempt must get a new epoch
    # anyway: an attempt aborted since, or the run rolled back to an older round (epoch rule).
    last_members: list[str] | None = None
    bump_epoch: bool = False
    # Members of the last committed round (the dashboard marks them: with a sample quorum, who was drawn).
    last_round_members: frozenset[str] = frozenset()
    started_at: float = field(default_factory=time.time)
    # Fresh peer ids carry this coordinator's random tag: after a restart, a peer still using
    # an id from the previous coordinator must be unknown here (so it rejoins), never taken
    # for a new peer that happened to get the same number.
    incarnation: str = field(default_factory=lambda: secrets.token_hex(3))
    # Recent committed rounds' state digests, who reported which, and whose state lost (digests.py).
    digest_book: DigestBook = field(default_factory=DigestBook)
    # SHA-256 of the founder's initial state (its Join said, "" unknown): before the first commit, a fresh peer
    # whose own initial state has it holds the run's state already, and keeps it instead of fetching it.
    initial_digest: str = ""
    # Peers waiting for a holder of the run's state (no live peer holds it).
    waiting: WaitingRoom = field(default_factory=WaitingRoom)
    # Gone (left or lost) peers still remembered: peer id -> when it went (monotonic), in the order they went.
    # Which are forgotten, and when: forgetting.py. The forgotten ones' traffic stays in the run's totals
    # (the dashboard exports them as counters, which must never go down).
    gone: dict[str, float] = field(default_factory=dict)
    forget: ForgetRule = field(default_factory=ForgetRule)
    peers_forgotten: int = 0
    # Peers taken out of the live set so far (the dashboard's series books look for a free place only after one).
    departures: int = 0
    forgotten_bytes: tuple[int, int] = (0, 0)
    _next_peer_number: int = 1
    # The registrations handed out (PeerRecord.registration): the last one's number.
    _registrations: int = 0

    def __post_init__(self) -> None:
        self.rounds = deque(maxlen=self.history)
        self.events = deque(maxlen=self.history * 2)
        self.committed = deque(maxlen=self.catchup_rounds)
        # A gone peer's curves stay until a new peer needs their place; a live peer's always stay.
        self.loss = SeriesBook(self.loss_points, self.series_peers, self._gone, self._departures)
        self.eval_loss = SeriesBook(self.eval_points, self.series_peers, self._gone, self._departures)
        self.traffic = SeriesBook(self.traffic_points, self.series_peers, self._gone, self._departures)
        self.alive = Series(self.alive_points)
        self.alive.append((self.started_at, 0))

    # -- rounds ----------------------------------------------------------------------

    @property
    def next_round_id(self) -> int:
        """The id of the next round: rounds of a run are 1, 2, 3...; a retry after an abort keeps its id."""
        return self.last_committed_round + 1

    def note_step(self, peer_id: str, last_round: int, step: int) -> None:
        """A registered peer's step (a heartbeat's, or a Quorum request's): the run's step if the peer is up to
        date and was a member of the run's last round (any such peer before this coordinator's first commit).

        Only an up-to-date peer says where the run's training is (a late one is behind by definition), and only
        a member's word counts (a peer outside every round could set the run's step to 2^63 for good). A late
        peer never skips past one sync interval after the last round on this word (OuterOptimizer)."""
        if last_round < self.last_committed_round:
            return
        if not self.last_round_members or peer_id in self.last_round_members:
            self.run_step = max(self.run_step, step)

    def record_commit(self, record: RoundRecord) -> None:
        """Note a committed round: it is the run's last, and is remembered for catch-up."""
        if record.round_id >= self.last_committed_round:
            self.last_committed_round, self.last_committed_epoch = record.round_id, record.epoch
        self.last_round_members = frozenset(record.members)
        self.digest_book.round_committed(record.round_id, record.members)
        # Members wait in a synchronous round, so their heartbeats' steps are the round's step by now.
        self.round_step = self.run_step
        if self.catchup_rounds > 0:
            self.committed.append(CommittedRound(record.round_id, record.epoch, record.tag, tuple(record.members)))
        self.result_holders.forget({c.round_id for c in self.committed})

    def roll_back(self, round_id: int) -> None:
        """Continue the run from ``round_id``, as nobody holds the later rounds: forget them; new epoch next.

        Never to round 0 once a round committed (rules.head_round): that would re-found the run.
        """
        if round_id <= 0 < self.last_committed_round:
            raise ValueError(f"run {self.run_id} committed round {self.last_committed_round}: it never rolls back to 0")
        self.last_committed_round, self.last_committed_epoch = round_id, -1
        self.run_step = self.round_step = 0
        self.bump_epoch = True
        kept = [c for c in self.committed if c.round_id <= round_id]
        self.committed.clear()
        self.committed.extend(kept)
        self.result_holders.forget({c.round_id for c in kept})
        self.digest_book.forget_after(round_id)

    # -- state digests ---------------------------------------------------------------

    @property
    def last_digest(self) -> str:
        """The SHA-256 (hex) recorded for the state of the last committed round; "" when nobody reported it."""
        return self.digest_of(self.last_committed_round)

    def digest_of(self, round_id: int) -> str:
        """The SHA-256 recorded for the state of a recent committed round; "" when unknown or forgotten."""
        return self.digest_book.digest_of(round_id)

    def note_digest(self, round_id: int, digest: str, peer_id: str) -> tuple[str, str] | None:
        """Record a peer's digest of its state at a committed round (DigestBook.note: the one more of the round's
        members report is kept, on a tie its most senior reporter's; a peer that reports another must realign).

        Returns (reporter, digest) of the recorded digest this peer's differs from, the first time it does for
        that round; None otherwise. Rounds 0 (no committed state), beyond the last committed round or too old,
        and empty digests (unknown) are ignored.
        """
        oldest = self.last_committed_round - DIGEST_ROUNDS
        if not digest or round_id <= max(0, oldest) or round_id > self.last_committed_round:
            return None
        return self.digest_book.note(round_id, digest, peer_id, oldest, self._seniority)

    def _seniority(self, peer_id: str) -> float:
        """When a live peer joined (earlier: more senior); unknown or gone peers are the most junior."""
        peer = self.peers.get(peer_id)
        return peer.joined_at if peer is not None and peer.alive else UNKNOWN_SENIORITY

    # -- peers ---------------------------------------------------------------------

    def new_peer_id(self, wanted: str = "") -> str:
        """A fresh peer id (``p<n>-<incarnation>``), or ``wanted`` when it is free (peers keep their id across
        restarts)."""
        if wanted and (wanted not in self.peers or not self.peers[wanted].alive):
            return wanted
        while (peer_id := f"p{self._next_peer_number}-{self.incarnation}") in self.peers:
            self._next_peer_number += 1
        self._next_peer_number += 1
        return peer_id

    def alive_peers(self) -> list[PeerRecord]:
        """Peers holding a valid lease."""
        return [self.peers[p] for p in self.live]

    def add_peer(self, peer: PeerRecord) -> None:
        """Register a (re)joined peer as live."""
        earlier = self.peers.get(peer.peer_id)
        if earlier is not None and earlier.state == "syncing" and peer.state == "syncing" and earlier.alive:
            peer.sync_failures = earlier.sync_failures + 1
        if peer.sync_failures:
            self.struggling.add(peer.peer_id)
        else:
            self.struggling.discard(peer.peer_id)
        # A live peer joining again from its address is the same registration (the same process, its connections
        # sound); any other join is a new one, and the members drop their connections to the address (Member).
        same = earlier is not None and earlier.alive and earlier.address == peer.address and earlier.registration
        if same:
            peer.registration = earlier.registration
        else:
            self._registrations += 1
            peer.registration = self._registrations
        if earlier is not None and earlier is not peer:
            # Its id again (a rejoin; a restart keeps its id too): its counters go on from its last figures until
            # its next heartbeat says otherwise, so neither they nor the run's totals dip to 0 meanwhile (a
            # Prometheus counter that goes back reads as a reset, and its whole history would count again).
            peer.bytes_sent, peer.bytes_received = earlier.bytes_sent, earlier.bytes_received
            peer.samples, peer.step = earlier.samples, earlier.step
        self.peers[peer.peer_id] = peer
        self.live.add(peer.peer_id)
        self.gone.pop(peer.peer_id, None)
        self.by_address[peer.address] = peer.peer_id
        self._note_alive()

    def synced(self, peer: PeerRecord) -> None:
        """The peer holds a state now (it asked for a round): a fetch that failed before no longer counts."""
        if peer.sync_failures:
            peer.sync_failures = 0
            self.struggling.discard(peer.peer_id)

    def drop_peer(self, peer: PeerRecord, state: str) -> None:
        """Take a peer out of the live set (lost or left)."""
        peer.state = state
        peer.activity = ""  # what it last said it was doing, it no longer does
        self.live.discard(peer.peer_id)
        self.struggling.discard(peer.peer_id)
        self.digest_book.realigned(peer.peer_id)  # a new process under its id reports its own state again
        self.departures += 1
        if self.by_address.get(peer.address) == peer.peer_id:
            del self.by_address[peer.address]
        self._note_alive()
        self.gone.pop(peer.peer_id, None)
        self.gone[peer.peer_id] = time.monotonic()
        self.forget_gone()

    def holders_finished(self) -> bool:
        """Whether every peer known to hold the run's last committed round left saying it finished (and one did):
        a peer waiting for a holder of that round waits in vain."""
        holders = [p for p in self.peers.values() if p.has_state and p.last_round >= self.last_committed_round]
        return bool(holders) and all(p.finished and not p.alive for p in holders)

    def forget_gone(self, now: float | None = None) -> list[str]:
        """Forget the records of gone peers the forget rule lets go (never a live peer's); return their ids."""
        now = time.monotonic() if now is None else now
        forgotten = peers_to_forget(list(self.gone.items()), now, self.forget)
        for peer_id in forgotten:
            del self.gone[peer_id]
            peer = self.peers.get(peer_id)
            if peer is not None and not peer.alive:
                sent, received = self.forgotten_bytes
                self.forgotten_bytes = (sent + peer.bytes_sent, received + peer.bytes_received)
                self.peers_forgotten += 1
                del self.peers[peer_id]
        return forgotten

    def _gone(self, peer_id: str) -> bool:
        return peer_id not in self.live

    def _departures(self) -> int:
        # Only a departure makes a peer's curves evictable (_gone): the books' "generation".
        return self.departures

    def _note_alive(self) -> None:
        if self.alive.last is None or self.alive.last[1] != len(self.live):
            self.alive.append((time.time(), len(self.live)))

    def event(self, kind: str, peer_id: str = "", detail: str = "") -> None:
        """Record an event for the dashboard."""
        self.events.append(Event(time.time(), kind, peer_id, detail[:500]))

    def record_metrics(self, peer: PeerRecord) -> None:
        """Add a heartbeat's figures to the peer's curves: loss, eval loss (when new) and traffic (spaced out)."""
        if peer.loss is not None:
            self.record_loss(peer.peer_id, peer.step, peer.loss)
        if peer.eval_loss is not None:
            self.record_eval(peer.peer_id, peer.step, peer.eval_loss)
        now = time.time()
        series = self.traffic.get(peer.peer_id)
        if series is None or series.last is None or now - series.last[0] >= self.traffic_interval_s:
            self.traffic.append(peer.peer_id, (now, peer.bytes_sent, peer.bytes_received))

    def record_loss(self, peer_id: str, step: int, loss: float) -> None:
        """Add a point to a peer's loss curve (bounded; older points are thinned, not dropped)."""
        if not math.isfinite(loss):
            return
        series = self.loss.get(peer_id)
        if series is not None and series.last is not None and series.last[0] >= step:
            return
        self.loss.append(peer_id, (step, loss))

    def record_eval(self, peer_id: str, step: int, loss: float) -> None:
        """Add a point to a peer's eval curve when its eval loss is new (every heartbeat repeats the last one).

        Heartbeats carry the last eval loss but not the step it was measured at: the point
        is placed at the step of the first heartbeat that carried it (at most one heartbeat late).
        """
        if not math.isfinite(loss):
            return
        series = self.eval_loss.get(peer_id)
        if series is not None and series.last is not None and series.last[1] == loss:
            return
        self.eval_loss.append(peer_id, (step, loss))

    # -- status document ---------------------------------------------------------------

    def status(self, address: str, version: str) -> dict:
        """The status document served as /api/status and by the Status RPC."""
        now_mono = time.monotonic()
        peers = sorted(self.peers.values(), key=lambda p: p.peer_id)
        kept = self.result_holders.by_peer(self.committed)
        return {
            "run_id": self.run_id,
            "coordinator": {
                "address": address,
                "started_at": self.started_at,
                "uptime_s": time.time() - self.started_at,
                "version": version,
            },
            "epoch": self.epoch,
            "last_committed_round": self.last_committed_round,
            # SHA-256 of the state as of last_committed_round ("" until a holder reported it).
            "state_digest": self.last_digest,
            # Peers waiting for a holder of the run's state (None: nobody waits).
            "waiting": self.waiting.as_dict(),
            "min_peers": self.min_peers,
            "quorum_policy": self.policy,
            "summary": {
                "peers_alive": sum(p.alive for p in peers),
                "rounds_committed": self.rounds_committed,
                "rounds_aborted": self.rounds_aborted,
                "bytes_sent": self.forgotten_bytes[0] + sum(p.bytes_sent for p in peers),
                "bytes_received": self.forgotten_bytes[1] + sum(p.bytes_received for p in peers),
                # Records of gone peers dropped so far (forgetting.py): the peers list shows the rest.
                "peers_forgotten": self.peers_forgotten,
                # Differential privacy: the most any live peer reports the run has spent (None: no DP).
                "epsilon": max((p.epsilon for p in peers if p.alive and p.epsilon is not None), default=None),
                # NoLoCo: the largest distance of a live replica from the replicas' mean (None: not measured).
                "spread": max((p.spread for p in peers if p.alive and p.spread is not None), default=None),
            },
            "peers": [
                {
                    "peer_id": p.peer_id,
                    "address": p.address,
                    "name": p.name,
                    "state": p.state,
                    "last_heartbeat_s_ago": now_mono - p.last_seen,
                    "step": p.step,
                    "steps_per_s": p.steps_per_s,
                    "loss": p.loss,
                    "eval_loss": p.eval_loss,
                    "epsilon": p.epsilon,
                    "spread": p.spread,
                    "samples": p.samples,
                    "bytes_sent": p.bytes_sent,
                    "bytes_received": p.bytes_received,
                    "last_round": p.last_round,
                    "in_last_round": p.peer_id in self.last_round_members,
                    # Remembered rounds whose result it keeps for the run though it was no member (resultholders.py).
                    "kept_results": kept.get(p.peer_id, []),
                    "activity": p.activity,
                    "refusals": dict(p.refusals),
                    "joined_at": p.joined_at,
                }
                for p in peers
            ],
            "rounds": [r.as_dict() for r in reversed(self.rounds)],
            "events": [
                {"time": e.time, "kind": e.kind, "peer_id": e.peer_id, "detail": e.detail}
                for e in reversed(self.events)
            ],
            "loss": self.loss.as_dict(),
            "eval_loss": self.eval_loss.as_dict(),
            "history": {
                "time": time.time(),
                "alive": self.alive.as_lists(),
                "traffic": self.traffic.as_dict(),
            },
        }
