"""Exception types of the collective layer.

Every error says what went wrong and what the caller can do about it.
"""

from __future__ import annotations


class LoconetError(Exception):
    """Base class of every error loconet raises on purpose."""


class CodecError(LoconetError):
    """An encoding or decoding failed: bad input, or a payload that does not fit its codec."""


class NonFiniteError(CodecError):
    """A tensor to encode or reduce holds NaN or Inf (a round that meets one is aborted everywhere)."""


class UsageError(LoconetError, RuntimeError):
    """The Python API was misused: called out of order (a sync before ``start()``, ``start()`` twice) or given what
    it does not take (sparse gradients to an optimizer that needs dense ones): a bug in the caller.

    Also a RuntimeError, as torch's own optimizers raise for such misuse; the optimizers re-raise it rather than
    count it as a missed round."""


class TransportClosed(UsageError):
    """A transport was used after it was closed (or before it was started); start a new one.

    A UsageError, so a sync that meets it ends the step rather than reading as a missed round; still a RuntimeError
    for callers that caught it as one. ``collectives.net.transport`` re-exports it."""


class InternalError(RuntimeError):
    """An invariant of loconet's own code was broken (a round opened twice, an illegal round-phase transition): a
    bug in loconet, not in the caller, the configuration or the network; please report it with the traceback.

    Deliberately not a LoconetError: the handlers that read a LoconetError of a sync as a missed round must not hide
    a bug."""


class ConfigError(LoconetError, ValueError):
    """A configuration value is invalid (message says which and what is allowed)."""


class Unauthenticated(LoconetError):
    """A call did not prove the run's secret or the identity it claims (refused with gRPC's UNAUTHENTICATED)."""


class AddressInUse(LoconetError, OSError):
    """A server could not listen on its address (taken by another process, or not this machine's)."""


class ProtocolError(LoconetError, ValueError):
    """A message broke the protocol (malformed, stale epoch, foreign run, wrong size...); it was rejected."""


class Incompatible(ConfigError):
    """This peer cannot take part in the run's rounds as it is configured: no round can commit with it, so its sync
    ends the peer rather than training on alone; the message says what to change."""


class QuorumMismatch(Incompatible):
    """The run's quorum policy (the coordinator's --quorum) cannot serve this peer's algorithm; the message names
    the policy it needs."""


class FormatMismatch(Incompatible):
    """This peer's rounds carry another codec, aggregator or length than the run's rounds of the same tag (another
    --codec, --aggregator or model); the message names both."""


class NotThisRun(Incompatible):
    """The coordinator refused this peer's state as one its run never gave out (a run started again with --new-run,
    or another run's checkpoint): no round of this run can take it; the message says to remove the checkpoint."""


class SharedMemoryUnusable(LoconetError, OSError):
    """This peer cannot take or open its host's shared-memory segment for hierarchical rounds."""


class RoundFailed(LoconetError):
    """A round of a collective did not complete; no partial result was returned."""


class MemberFailure(RoundFailed):
    """Members of the round were unreachable, died, sent bad data or missed the deadline.

    ``failed`` holds the addresses of the failed members, ``failed_ranks`` their
    ranks in the round's group and ``reasons`` what was seen of each. Retry the
    round without them (the membership layer does this) or give up.
    """

    def __init__(self, addresses: dict[int, str], reasons: dict[int, str], round_id: int | None = None) -> None:
        self.failed_ranks: tuple[int, ...] = tuple(sorted(addresses))
        self.failed: tuple[str, ...] = tuple(addresses[r] for r in self.failed_ranks)
        self.reasons = dict(reasons)
        self.round_id = round_id
        where = f"round {round_id}: " if round_id is not None else ""
        what = "; ".join(f"rank {r} at {addresses[r]} ({reasons.get(r, 'failed')})" for r in self.failed_ranks)
        super().__init__(f"{where}{len(self.failed_ranks)} member(s) failed: {what}")


class StaleRound(RoundFailed):
    """This member's view of the round is stale (another member saw a newer epoch or a foreign run)."""
