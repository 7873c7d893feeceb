"""The coordinator's soft state of one run: peers, rounds, history, metrics.

Plain data and the bookkeeping around it, no I/O. Everything here can be
lost (the coordinator restarts) and rebuilt from what the peers report when
they re-register; decisions about it are made by ``peer/coordinator/rules.py``
and ``peer/coordinator/policies.py``.
"""

from __future__ import annotations

import math
import secrets
import time
from collections import deque
from dataclasses import dataclass, field

from peer.coordinator.rules import CommittedRound, PeerView

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
    # The lease and heartbeat interval this peer was given at join.
    lease_s: float = 5.0
    last_round: int = 0
    has_state: bool = False
    step: int = 0
    steps_per_s: float | None = None
    loss: float | None = None
    samples: int = 0
    bytes_sent: int = 0
    bytes_received: int = 0
    activity: str = ""
    codecs: tuple[str, ...] = ()

    @property
    def alive(self) -> bool:
        """Whether the peer holds a valid lease."""
        return self.state in ("joining", "syncing", "active")

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
    loss_points: int = 2000
    # How many of the last committed rounds are remembered for catch-up (rounds_to_catch_up).
    catchup_rounds: int = 4
    # The quorum policy's spec, for the status document.
    policy: str = "all"
    epoch: int = 0
    last_committed_round: int = 0
    peers: dict[str, PeerRecord] = field(default_factory=dict)
    # Ids of the peers holding a lease, and who is at which address: kept up to date by
    # add_peer/drop_peer so that per-request work does not scan every peer.
    live: set[str] = field(default_factory=set)
    by_address: dict[str, str] = field(default_factory=dict)
    rounds: deque[RoundRecord] = field(init=False)
    # The last catchup_rounds committed rounds, oldest first, with their members.
    committed: deque[CommittedRound] = field(init=False)
    events: deque[Event] = field(init=False)
    loss: dict[str, deque[tuple[int, float]]] = field(default_factory=dict)
    rounds_committed: int = 0
    rounds_aborted: int = 0
    # Members of the last formed quorum, and whether the next attempt must get a new epoch
    # anyway: an attempt aborted since, or the run rolled back to an older round (epoch rule).
    last_members: list[str] | None = None
    bump_epoch: bool = False
    started_at: float = field(default_factory=time.time)
    # Fresh peer ids carry this coordinator's random tag: after a restart, a peer still using
    # an id from the previous coordinator must be unknown here (so it rejoins), never taken
    # for a new peer that happened to get the same number.
    incarnation: str = field(default_factory=lambda: secrets.token_hex(3))
    _next_peer_number: int = 1

    def __post_init__(self) -> None:
        self.rounds = deque(maxlen=self.history)
        self.events = deque(maxlen=self.history * 2)
        self.committed = deque(maxlen=self.catchup_rounds)

    # -- rounds ----------------------------------------------------------------------

    @property
    def next_round_id(self) -> int:
        """The id of the next round: rounds of a run are 1, 2, 3...; a retry after an abort keeps its id."""
        return self.last_committed_round + 1

    def record_commit(self, record: RoundRecord) -> None:
        """Note a committed round: it is the run's last, and is remembered for catch-up."""
        self.last_committed_round = max(self.last_committed_round, record.round_id)
        if self.catchup_rounds > 0:
            self.committed.append(CommittedRound(record.round_id, record.epoch, record.tag, tuple(record.members)))

    def roll_back(self, round_id: int) -> None:
        """Continue the run from ``round_id``, as nobody holds the later rounds: forget them; new epoch next."""
        self.last_committed_round = round_id
        self.bump_epoch = True
        kept = [c for c in self.committed if c.round_id <= round_id]
        self.committed.clear()
        self.committed.extend(kept)

    # -- peers ---------------------------------------------------------------------

    def new_peer_id(self, wanted: str = "") -> str:
        """A fresh peer id (``p<n>-<incarnation>``), or ``wanted`` when it is free (peers keep their id across restarts)."""
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
        self.peers[peer.peer_id] = peer
        self.live.add(peer.peer_id)
        self.by_address[peer.address] = peer.peer_id

    def drop_peer(self, peer: PeerRecord, state: str) -> None:
        """Take a peer out of the live set (lost or left)."""
        peer.state = state
        self.live.discard(peer.peer_id)
        if self.by_address.get(peer.address) == peer.peer_id:
            del self.by_address[peer.address]

    def event(self, kind: str, peer_id: str = "", detail: str = "") -> None:
        """Record an event for the dashboard."""
        self.events.append(Event(time.time(), kind, peer_id, detail[:500]))

    def record_loss(self, peer_id: str, step: int, loss: float) -> None:
        """Add a point to a peer's loss curve (bounded; older points are thinned, not dropped)."""
        if not math.isfinite(loss):
            return
        series = self.loss.setdefault(peer_id, deque())
        if series and series[-1][0] >= step:
            return
        series.append((step, loss))
        if len(series) > self.loss_points:
            # Keep every other point of the older half: the curve stays whole, just coarser.
            old = list(series)[: self.loss_points // 2][::2]
            recent = list(series)[self.loss_points // 2 :]
            self.loss[peer_id] = deque(old + recent)

    # -- status document ---------------------------------------------------------------

    def status(self, address: str, version: str) -> dict:
        """The status document served as /api/status and by the Status RPC."""
        now_mono = time.monotonic()
        peers = sorted(self.peers.values(), key=lambda p: p.peer_id)
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
            "min_peers": self.min_peers,
            "quorum_policy": self.policy,
            "summary": {
                "peers_alive": sum(p.alive for p in peers),
                "rounds_committed": self.rounds_committed,
                "rounds_aborted": self.rounds_aborted,
                "bytes_sent": sum(p.bytes_sent for p in peers),
                "bytes_received": sum(p.bytes_received for p in peers),
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
                    "samples": p.samples,
                    "bytes_sent": p.bytes_sent,
                    "bytes_received": p.bytes_received,
                    "last_round": p.last_round,
                    "activity": p.activity,
                    "joined_at": p.joined_at,
                }
                for p in peers
            ],
            "rounds": [r.as_dict() for r in reversed(self.rounds)],
            "events": [
                {"time": e.time, "kind": e.kind, "peer_id": e.peer_id, "detail": e.detail} for e in reversed(self.events)
            ],
            "loss": {pid: [list(pt) for pt in series] for pid, series in self.loss.items()},
        }
