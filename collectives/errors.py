"""Exception types of the collective layer.

Every error says what went wrong and what the caller can do about it.
"""

from __future__ import annotations


class LoconetError(Exception):
    """Base class of every error loconet raises on purpose."""


class CodecError(LoconetError):
    """An encoding or decoding failed: bad input, or a payload that does not fit its codec."""


class NonFiniteError(CodecError):
    """A tensor to encode holds NaN or Inf; nothing was sent."""


class ConfigError(LoconetError, ValueError):
    """A configuration value is invalid (message says which and what is allowed)."""


class ProtocolError(LoconetError):
    """A message broke the protocol (stale epoch, foreign run, wrong size...); it was rejected."""


class RoundFailed(LoconetError):
    """A round of a collective did not complete; no partial result was returned."""


class MemberFailure(RoundFailed):
    """Members of the round were unreachable, died, sent bad data or missed the deadline.

    ``failed`` holds the addresses of the failed members, ``failed_ranks`` their
    ranks in the round's group. Retry the round without them (the membership
    layer does this) or give up.
    """

    def __init__(self, failed: dict[int, str], reason: str, round_id: int | None = None) -> None:
        self.failed_ranks: tuple[int, ...] = tuple(sorted(failed))
        self.failed: tuple[str, ...] = tuple(failed[r] for r in self.failed_ranks)
        self.reason = reason
        self.round_id = round_id
        names = ", ".join(f"rank {r} ({failed[r]})" for r in self.failed_ranks) or "unknown members"
        where = f"round {round_id}: " if round_id is not None else ""
        super().__init__(f"{where}members failed: {names}: {reason}")


class StaleRound(RoundFailed):
    """This member's view of the round is stale (another member saw a newer epoch or a foreign run)."""
