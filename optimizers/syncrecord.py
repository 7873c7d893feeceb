"""The record of one sync attempt (SyncRecord), and how many recent ones an optimizer keeps."""

from __future__ import annotations

from dataclasses import dataclass, field

# The records of this many recent syncs are kept (``history``, and the algorithms' per-round lists): a record is
# ~400 bytes, and a per-step algorithm makes a million in a day. What counts every sync is a counter.
RECENT_SYNCS = 10_000


@dataclass
class SyncRecord:
    """What one sync attempt did (for progress displays and benchmarks)."""

    step: int
    # The global parameters advanced to round_id (by this peer's round, or by applying a round it was late for).
    committed: bool
    round_id: int = 0
    bytes_sent: int = 0
    # The whole sync (quorum, all-reduce, commit), and the all-reduce alone.
    wall_s: float = 0.0
    allreduce_s: float = 0.0
    reason: str = ""
    # Why it did not commit, as the error's type (e.g. "WaitingForState": nobody live holds the run's state).
    error: str = ""
    # This peer's contribution is in the round (False for a round it applied late).
    contributed: bool = True
    # The round's attempt: after a rollback the run reuses round ids at a new epoch.
    epoch: int = 0
    # What the round's aggregator decided (e.g. the contributions Krum selected), one dict per statistic round.
    decisions: list[dict] = field(default_factory=list)
    # Differential privacy: the privacy spent by the run so far (epsilon at the algorithm's delta); None: no DP.
    epsilon: float | None = None
    # Asynchronous rounds: how many rounds stale this peer's contribution was (None: a synchronous algorithm).
    staleness: int | None = None
    # Rounds reduced within groups (NoLoCo's pairs): the size of this peer's group (None: the whole round).
    group_size: int | None = None
    # A round applied late: the bytes its committed result took to fetch (catch-up traffic).
    fetched_bytes: int = 0
    # The run's whole state replaced this peer's (it was too far behind): round_id is the round of that state.
    resynced: bool = False
