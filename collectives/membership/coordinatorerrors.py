"""What a failed call to the coordinator means, as a peer reads it: the errors its client raises and the signs.

A call that fails is one of: a coordinator not there right now (``RETRY_CODES``: retry), one that refuses
this client's rate for a while (``rate_limited_for``), something at the address that is no coordinator
(``not_a_coordinator``), or a refusal the peer acts on (``Unregistered``, ``GroupTooSmall``, ``RequestRefused``).
The coordinator's side (peer/coordinator/) words its refusals with the texts defined here, so that the client
can tell them apart. ``failure_reason`` says in a few words why the coordinator could not be reached.
"""

from __future__ import annotations

import grpc

from collectives.errors import LoconetError, RoundFailed
from collectives.membership.session import RETRY_AFTER_MS

# gRPC codes that mean "the coordinator is not there right now": retry.
RETRY_CODES = (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.CANCELLED)
# How the coordinator's refusal of a quorum with too few peers begins (the client raises GroupTooSmall).
NO_QUORUM = "no quorum"
# What the coordinator's refusal of a join claiming a round or epoch its run never gave out says (the client raises
# NotThisRun: the peer stops, rather than training on alone in a run that refuses its every rejoin).
NOT_THIS_RUN = "a state this run never gave out"


class CoordinatorUnavailable(LoconetError):
    """The coordinator did not answer before the deadline; check that it runs and --coordinator is right."""


class NotACoordinator(LoconetError):
    """Something answers at the coordinator's address, but it is not a loconet coordinator (a dashboard, a peer)."""


# A coordinator refusing a call for its client's rate (RESOURCE_EXHAUSTED, peer/coordinator/limits.py) starts the
# message with this, and says in trailing metadata (RETRY_AFTER_MS, from collectives/membership/session.py) when to
# retry.
RATE_LIMITED = "rate limited"


class Unregistered(LoconetError):
    """The coordinator does not know this peer (its lease lapsed, or the coordinator restarted): join again."""


class GroupTooSmall(RoundFailed):
    """Fewer live peers than min_peers: no round can form. Start more peers or lower --min-peers."""


class CommitUnknown(RoundFailed):
    """The coordinator lost the round before deciding it (a restart); nothing was applied."""


class RequestRefused(LoconetError):
    """The coordinator refused a request (wrong run id, not a member...); the message says why."""


def failure_reason(exc: grpc.aio.AioRpcError, timeout_s: float) -> str:
    """Why a call to the coordinator failed, in a few words a user can act on."""
    details = exc.details() or ""
    lower = details.lower()
    if "connection refused" in lower:
        return "connection refused: nothing listens there"
    if "resolv" in lower or "name not found" in lower:
        return "the host name does not resolve"
    if exc.code() == grpc.StatusCode.DEADLINE_EXCEEDED:
        return f"it accepts connections but gave no answer in {timeout_s:g} s (paused or overloaded?)"
    return f"{exc.code().name}: {details[:200]}"


def not_a_coordinator(address: str, exc: grpc.aio.AioRpcError) -> NotACoordinator | None:
    """NotACoordinator when the failure shows that something other than a coordinator answered, else None."""
    details = (exc.details() or "").lower()
    fix = "point --coordinator at the address `loconet coordinator` prints (\"run R at HOST:PORT\")"
    if exc.code() == grpc.StatusCode.UNIMPLEMENTED:
        return NotACoordinator(
            f"{address} answers gRPC but is not a loconet coordinator (is it a peer's data-plane port?); {fix}"
        )
    if exc.code() == grpc.StatusCode.UNAVAILABLE and ("parsing http/2" in details or "http1" in details):
        return NotACoordinator(
            f"{address} answers but is not a loconet coordinator: it does not speak gRPC "
            f"(is it the dashboard's HTTP port?); {fix}"
        )
    return None


def rate_limited_for(exc: grpc.aio.AioRpcError) -> float | None:
    """Seconds to wait before retrying a call the coordinator refused for its rate (None: not such a refusal)."""
    if exc.code() != grpc.StatusCode.RESOURCE_EXHAUSTED or not (exc.details() or "").startswith(RATE_LIMITED):
        return None
    hint = next((v for k, v in (exc.trailing_metadata() or ()) if k == RETRY_AFTER_MS), "100")
    try:
        return min(max(int(hint), 10), 10_000) / 1000.0
    except ValueError:
        return 0.1
