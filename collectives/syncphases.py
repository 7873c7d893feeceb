"""What one sync call of a member goes through and how it can end: its phases, their allowed moves, and its outcomes.

The phases are the state machine ``ElasticCollective.sync`` walks
(``collectives/elasticsync.py`` draws it); a move outside ``TRANSITIONS`` is a
bug. A sync ends in one of: ``SyncResult`` (the round committed),
``Resynced`` (this peer had missed rounds and takes the run's state),
``CaughtUp`` (it applies the committed results of the rounds it missed),
``WaitingForState`` (it is behind, and nobody holds the run's last round),
``RetriesExhausted``, ``GroupTooSmall``, ``Stopped``, or one of the
``Incompatible`` errors, after which the caller should stop:
``QuorumMismatch`` (the run's quorum policy cannot serve its algorithm) and
``FormatMismatch`` (its rounds carry another codec, aggregator or length
than the run's). The callables a sync takes (``Weight``, ``Prepare``,
``Within``) are typed here, so algorithms need not import the member itself.
"""

from __future__ import annotations

import enum
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from collectives.codecs import check_finite
from collectives.errors import LoconetError, NonFiniteError, ProtocolError, RoundFailed
from collectives.membership.roundplan import RoundPlan
from collectives.reduce.results import CommittedResult
from collectives.statesync import StateSnapshot
from collectives.stats import RoundStats


class Phase(enum.Enum):
    """Where one sync call is in the round protocol."""

    IDLE = "idle"
    QUORUM = "quorum"
    ALLREDUCE = "allreduce"
    COMMIT = "commit"
    COMMITTED = "committed"
    ABORTED = "aborted"
    RESYNC = "resync"
    CAUGHT_UP = "caught-up"
    REJOIN = "rejoin"
    FAILED = "failed"


# The only moves a sync call makes; anything else is a bug.
TRANSITIONS: dict[Phase, set[Phase]] = {
    Phase.IDLE: {Phase.QUORUM},
    Phase.QUORUM: {Phase.ALLREDUCE, Phase.RESYNC, Phase.CAUGHT_UP, Phase.REJOIN, Phase.FAILED},
    Phase.ALLREDUCE: {Phase.COMMIT},
    Phase.COMMIT: {Phase.COMMITTED, Phase.ABORTED},
    Phase.ABORTED: {Phase.QUORUM, Phase.REJOIN, Phase.FAILED},
    Phase.REJOIN: {Phase.QUORUM, Phase.RESYNC, Phase.FAILED},
    Phase.RESYNC: set(),
    Phase.CAUGHT_UP: set(),
    Phase.COMMITTED: set(),
    Phase.FAILED: set(),
}


class Resynced(LoconetError):
    """This peer had missed committed rounds; ``snapshot`` is the run's state to load. The contribution was not used."""

    def __init__(self, snapshot: StateSnapshot, source: str) -> None:
        self.snapshot = snapshot
        self.source = source
        super().__init__(f"state replaced by round {snapshot.round_id} from {source}; load it and continue")


class CaughtUp(LoconetError):
    """Rounds went on without this peer; ``rounds`` are their committed results, to apply in order.

    The contribution of the sync that raised this was not used. ``pending_tag``: the tag of the quorum the
    run's peers wait in now ("": none), which this peer may join at once if it is the round it syncs next.
    """

    def __init__(self, rounds: list[CommittedResult], pending_tag: str = "") -> None:
        self.rounds = rounds
        self.pending_tag = pending_tag
        ids = ", ".join(str(r.round_id) for r in rounds)
        super().__init__(f"late for round(s) {ids}: apply their committed results and continue")


# A contribution's weight: a number, or a function of the round's plan evaluated after the quorum.
Weight = float | Callable[[RoundPlan], float]
# What a member sends in an attempt, made from the round's plan and its flat contribution (see the docstring).
Prepare = Callable[[RoundPlan, torch.Tensor], torch.Tensor]
# The peer ids (this peer among them) a member reduces with inside a round, from the round's plan: NoLoCo's
# pairs. Every member computes it from the same plan; None: the whole round.
Within = Callable[[RoundPlan], Sequence[str]]


def check_prepared(sent: Any, flat: torch.Tensor, round_id: int) -> torch.Tensor:
    """``sent`` if it is a new finite fp32 tensor shaped like flat; ProtocolError (this member refuses) otherwise."""
    if sent is flat:
        raise ProtocolError(f"prepare returned its input for round {round_id}: it must return a new tensor")
    if not isinstance(sent, torch.Tensor) or sent.dtype != torch.float32 or sent.shape != flat.shape:
        got = f"{sent.dtype} {tuple(sent.shape)}" if isinstance(sent, torch.Tensor) else type(sent).__name__
        raise ProtocolError(f"prepare gave {got} for round {round_id}, not float32 {tuple(flat.shape)}")
    try:
        check_finite(sent, f"the prepared values of round {round_id}")
    except NonFiniteError as exc:
        raise ProtocolError(str(exc)) from None
    return sent.contiguous()


class WaitingForState(RoundFailed):
    """This peer is behind the run and nobody live holds the run's last committed round: the sync is void. The
    peer trains on locally and asks again at its next sync; the message says what brings the state back."""


class RetriesExhausted(RoundFailed):
    """Every attempt of a round aborted; the message gives the last reason."""


class Stopped(Exception):
    """The peer was asked to stop (``interrupt``): the call in flight was abandoned and nothing was applied.

    Not a LoconetError on purpose: algorithms that train on through a failed round
    catch those, and a stop must reach the caller's loop. Close the peer next.
    """


@dataclass
class SyncResult:
    """A committed round: the reduced tensors and what it took."""

    # Shaped and typed like the input, on the host whatever device the input was on: results are decoded
    # there, and the run's global state lives there (move them with .to(device) where needed).
    value: torch.Tensor | list[torch.Tensor]
    round_id: int
    epoch: int
    # Peer ids of the round's members, in rank order.
    members: tuple[str, ...]
    attempts: int
    stats: RoundStats
    # The aggregator's decisions (e.g. which contributions Krum selected), one per statistic round.
    decisions: list[dict] = field(default_factory=list)
    # The furthest inner step a member asked for the round at (0: unknown): see RoundPlan.members_step.
    members_step: int = 0
