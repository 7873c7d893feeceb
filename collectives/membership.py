"""The peer's side of the membership protocol: a client of the coordinator.

Every call runs on the transport's event loop, has a deadline, and retries
with exponential backoff while the coordinator is unreachable (it may be
restarting: peers keep training meanwhile). Answers the peer must act on
become specific exceptions: ``Unregistered`` (join again), ``GroupTooSmall``,
``CommitUnknown`` (the coordinator lost the round; treat as not applied).

Before a peer has joined, the coordinator's address may simply be wrong:
nothing listening, or something else listening there (the dashboard's HTTP
port, a peer's data-plane port). The client says so within a few seconds
(a warning naming the address and what it found, then a countdown every few
seconds) and gives up after its patience with ``CoordinatorUnavailable``;
something that answers but is not a coordinator is ``NotACoordinator`` at
once. ``coordinator_address`` checks and normalises a ``--coordinator``
value (a bare port means this machine).

A round is named by (round id, epoch): round ids are the run's last committed
round + 1, and a retry after an abort keeps the id with a new epoch. A peer
told to resync may get ``missed``: the committed rounds it lacks, each with
live members holding its result, to apply in order instead of fetching the
whole state.

The run's state survives its holders: peers report the SHA-256 of their
state as of their last round (``digest`` of ``join`` and ``quorum``), the
coordinator records it per committed round and hands it out with every
source (``state_digest``: a fetched state must hash to it), together with up
to four live holders to fetch stripes from (``sync_sources``, ``sync_from``
first). A run that has committed a round is never founded again: a joiner
without state that finds no live holder gets ``Joined.wait`` with a one-line
``wait_reason``; it is not registered, and joins again every
``heartbeat_s`` until a holder (a returning peer, or one resuming from its
checkpoint) is back.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import NoReturn

import grpc

from collectives.addresses import coordinator_address
from collectives.errors import FormatMismatch, LoconetError, NotThisRun, RoundFailed
from collectives.memberlists import BadMemberChange, BadPackedList, Entry, changed_list, entries_of, unpack_list
from collectives.roundformat import FORMAT_DIFFERS, FORMAT_SEPARATOR
from collectives.rpc import call_metadata
from collectives.sampling import check_sample, sample_size
from collectives.session import RETRY_AFTER_MS, SESSION_RPCS, CoordinatorSession, SessionUnsupported
from collectives.tlsprobe import REFUSED_CERTIFICATE, TLSMismatch, known_failure, probe, verdict
from collectives.transport import Transport
from protos import membership_pb2 as pb
from protos import membership_pb2_grpc as pb_grpc

log = logging.getLogger(__name__)

# A coordinator's "seconds since the last commit" above a day is not believed: no sync interval is that long.
MAX_SINCE_COMMIT_S = 86400.0

# gRPC codes that mean "the coordinator is not there right now": retry.
RETRY_CODES = (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.CANCELLED)
# How the coordinator's refusal of a quorum with too few peers begins (the client raises GroupTooSmall).
NO_QUORUM = "no quorum"
# What the coordinator's refusal of a join claiming a round or epoch its run never gave out says (the client raises
# NotThisRun: the peer stops, rather than training on alone in a run that refuses its every rejoin).
NOT_THIS_RUN = "a state this run never gave out"
# How long calls keep retrying an unreachable coordinator, and how long a Quorum call does (the defaults of
# MembershipConfig and ElasticConfig).
PATIENCE_S = 300.0
QUORUM_PATIENCE_S = 30.0
# The reason a member that ran to its end gives as it leaves (the coordinator then does not expect it back).
FINISHED = "finished"
# How a dynamic-k worker's round tag names the k it chose ("sync-sgd:k=3"), which the coordinator's backup policy reads.
BACKUP_TAG_KEY = ":k="
# A call that keeps failing says so after this long, then again every NOTE_EVERY_S with the time left:
# a wrong address shows at once, a blip of a moment stays quiet.
FIRST_NOTE_S = 0.5
NOTE_EVERY_S = 5.0
# A TLS coordinator that closed the connection on this peer's certificate is asked again after this long before
# the peer stops (collectives/tlsprobe.py).
PROBE_AGAIN_S = 0.5
# A --coordinator given as a port alone means a coordinator on this machine (its default --host).


class CoordinatorUnavailable(LoconetError):
    """The coordinator did not answer before the deadline; check that it runs and --coordinator is right."""


class NotACoordinator(LoconetError):
    """Something answers at the coordinator's address, but it is not a loconet coordinator (a dashboard, a peer)."""


# A coordinator refusing a call for its client's rate (RESOURCE_EXHAUSTED, peer/coordinator/limits.py) starts
# the message with this, and says in trailing metadata (RETRY_AFTER_MS, from collectives/session.py) when to retry.
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


def _not_a_coordinator(address: str, exc: grpc.aio.AioRpcError) -> NotACoordinator | None:
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


# The run id a coordinator serves and its peers ask for when none is given (the same everywhere,
# so a peer started without --run reaches a coordinator started without it).
DEFAULT_RUN_ID = "loconet"


@dataclass(frozen=True)
class MembershipConfig:
    """Where the coordinator is and how patiently to talk to it."""

    coordinator: str
    run_id: str
    name: str = ""
    # The host this peer runs on, sent at join (collectives/hostid.py; "": a host of its own).
    host_id: str = ""
    # What this peer's model is (its task's model_settings), sent at join with the optimizer's settings.
    model_settings: tuple[str, ...] = ()
    # Deadline of one short RPC (join, heartbeat, leave).
    rpc_timeout_s: float = 5.0
    # Longest a call keeps retrying an unreachable coordinator (it may be restarting).
    patience_s: float = PATIENCE_S
    # Longest a Quorum call (a sync's start) keeps retrying one: then the peer trains on locally, and later
    # Quorum calls end at once until a heartbeat reaches the coordinator again.
    quorum_patience_s: float = QUORUM_PATIENCE_S
    backoff_initial_s: float = 0.05
    backoff_max_s: float = 2.0

    def __post_init__(self) -> None:
        object.__setattr__(self, "coordinator", coordinator_address(self.coordinator))


@dataclass(frozen=True)
class MissedRound:
    """A committed round this peer lacks: fetch its result from one of ``members`` and apply it."""

    round_id: int
    epoch: int
    tag: str = ""
    members: tuple[tuple[str, str], ...] = ()  # (peer id, address) of live peers holding the result: members first
    # SHA-256 (hex) of the result's fp32 bytes as its members reported it ("" unknown): a fetched one must match.
    digest: str = ""


def _rate_limited_for(exc: grpc.aio.AioRpcError) -> float | None:
    """Seconds to wait before retrying a call the coordinator refused for its rate (None: not such a refusal)."""
    if exc.code() != grpc.StatusCode.RESOURCE_EXHAUSTED or not (exc.details() or "").startswith(RATE_LIMITED):
        return None
    hint = next((v for k, v in (exc.trailing_metadata() or ()) if k == RETRY_AFTER_MS), "100")
    try:
        return min(max(int(hint), 10), 10_000) / 1000.0
    except ValueError:
        return 0.1


# The heartbeat intervals a coordinator's answer may set (anything else is ignored: the peer keeps its own).
HEARTBEAT_RANGE_S = (0.05, 600.0)


def heartbeat_interval(current_s: float, told_s: float) -> float:
    """The interval to heartbeat at after an answer that said told_s: it when in range, else current_s
    (0 from an older coordinator; a NaN or absurd value is not obeyed)."""
    low, high = HEARTBEAT_RANGE_S
    return told_s if low <= told_s <= high else current_s


def _missed(rounds) -> tuple[MissedRound, ...]:
    """MissedRounds from the coordinator's CommittedRound messages, in order."""
    return tuple(
        MissedRound(r.round_id, r.epoch, r.tag, tuple((m.peer_id, m.address) for m in r.members), r.result_digest[:64])
        for r in rounds
    )


@dataclass(frozen=True)
class Joined:
    """The coordinator's answer to a join."""

    peer_id: str
    lease_s: float
    heartbeat_s: float
    epoch: int
    last_committed_round: int
    sync_from: str
    # With sync_from, for a peer that holds a state: the rounds it lacks, if all can be fetched (else empty).
    missed: tuple[MissedRound, ...] = ()
    # SHA-256 (hex) recorded for the state of last_committed_round; "" when unknown.
    state_digest: str = ""
    # Live up-to-date holders to fetch the state from, least busy first (sync_from is the first).
    sync_sources: tuple[str, ...] = ()
    # True: nobody live holds the run's committed state; this peer is not registered and must not start
    # from its own state: say wait_reason, and join again every heartbeat_s (lease_s: when it is forgotten).
    wait: bool = False
    wait_reason: str = ""
    # With wait: every known holder of the run's last round left saying it finished (none is expected back).
    holders_finished: bool = False


@dataclass(frozen=True)
class RoundPlan:
    """What the coordinator says to do next: take part in a round, or resync first."""

    action: str  # "round" or "resync"
    round_id: int = 0
    epoch: int = 0
    members: tuple[tuple[str, str], ...] = ()  # (peer id, address) in rank order
    rank: int = 0
    sync_from: str = ""
    last_committed_round: int = 0
    # resync: the committed rounds after this peer's last round, in order, when every one of them can be
    # fetched from a live member; empty: fetch the whole state from sync_from.
    missed: tuple[MissedRound, ...] = ()
    # round: the quorum policy that chose the members ("all", "first-k:K", "sample:K", "sample:F,min=M"),
    # the run's seed and, for sample, the peer ids the sample was drawn from (see check_sample).
    policy: str = ""
    seed: int = 0
    candidates: tuple[str, ...] = ()
    # resync: the SHA-256 recorded for last_committed_round ("" unknown), and live up-to-date holders
    # to fetch the state from, least busy first (sync_from is the first).
    state_digest: str = ""
    sync_sources: tuple[str, ...] = ()
    # round: each member's host id, in rank order ("": a host of its own), from which the round's hierarchy is built.
    hosts: tuple[str, ...] = ()
    # resync: the tag of the quorum the run's peers wait in now ("": none).
    pending_tag: str = ""
    # round: the furthest inner step a member asked for it at (0: unknown; QuorumResponse.members_step).
    members_step: int = 0

    def share(self) -> float:
        """Members / the candidates the plan names: the round's share of its policy's pool (a sample's, or the live
        roster); 1 when it names none."""
        return min(1.0, len(self.members) / len(self.candidates)) if self.candidates else 1.0

    def check_sample(self, least: int = 1) -> None:
        """Raise SampleMismatch if this is a sample round whose members are not the seeded sample.

        k is recomputed here from the policy and the candidates (for a fraction: of them, rounded up, at
        least its min), and ``least``, the members this peer's rounds need (as the run's peers all need), so a
        member outside the policy's sample is caught whatever k the coordinator used.
        """
        size = sample_size(self.policy)
        if self.action == "round" and size is not None:
            k = size.of(len(set(self.candidates)), least)
            check_sample(self.seed, self.round_id, self.candidates, k, [pid for pid, _ in self.members])


@dataclass(frozen=True)
class CommitOutcome:
    """The coordinator's decision on a round."""

    commit: bool
    reason: str
    epoch: int
    dropped: tuple[str, ...] = ()


@dataclass
class PeerStatus:
    """What the peer reports in its heartbeats (updated by the training loop, read by the heartbeat task)."""

    step: int = 0
    steps_per_s: float = math.nan
    loss: float = math.nan
    # Loss of the last evaluation (NaN until the first), for the dashboard's eval curve.
    eval_loss: float = math.nan
    # Differential privacy: the privacy the run has spent (epsilon at its delta); NaN when the run has no DP.
    epsilon: float = math.nan
    # NoLoCo: this replica's distance from the replicas' mean at the last evaluation; NaN when not measured.
    spread: float = math.nan
    samples: int = 0
    activity: str = "starting"
    extra: dict = field(default_factory=dict)


@dataclass
class KnownMembers:
    """The member list of a peer's last ROUND answer and its digest (QuorumResponse.members_digest)."""

    digest: bytes = b""
    entries: tuple[Entry, ...] = ()
    members: tuple[tuple[str, str], ...] = ()
    hosts: tuple[str, ...] = ()

    def of(self, reply: pb.QuorumResponse) -> tuple[tuple[tuple[str, str], ...], tuple[str, ...]]:
        """A ROUND answer's (peer id, address) members and host ids: its own list, the kept one changed as the
        answer says, or the kept one when the answer left it out (the result is kept); RoundFailed when the answer
        needs a list this peer does not hold, or its change does not give the round's list."""
        if reply.members:
            self._keep(reply.members_digest, entries_of(reply.members))
        elif reply.members_packed:
            try:
                self._keep(reply.members_digest, unpack_list(reply.members_packed, reply.members_digest))
            except BadPackedList as exc:
                self._fail(reply, f"carries a packed member list that is not sound: {exc}")
        elif reply.members_base:
            self._keep(reply.members_digest, self._changed(reply))
        elif not self.digest or reply.members_digest != self.digest:
            self._fail(reply, "left out a member list this peer does not hold")
        return self.members, self.hosts

    def _changed(self, reply: pb.QuorumResponse) -> tuple[Entry, ...]:
        if not self.digest or reply.members_base != self.digest:
            self._fail(reply, "carries a change to a member list this peer does not hold")
        try:
            return changed_list(self.entries, reply)
        except BadMemberChange as exc:
            self._fail(reply, f"carries a member-list change that does not apply: {exc}")

    def _keep(self, digest: bytes, entries: tuple[Entry, ...]) -> None:
        self.digest, self.entries = digest, entries
        self.members = tuple((e.peer_id, e.address) for e in entries)
        self.hosts = tuple(e.host_id for e in entries)

    def _fail(self, reply: pb.QuorumResponse, why: str) -> NoReturn:
        self.digest = b""  # the next request asks for the whole list
        raise RoundFailed(f"the coordinator's answer for round {reply.round_id} {why}; it asks again for the whole list")


def commit_time(since_commit_s: float, now: float) -> float | None:
    """The local time (now's clock) of the run's last commit, from a coordinator's seconds since it; None when it
    says none (0) or gives no sane duration (negative, not finite, or more than a day)."""
    if not (0.0 < since_commit_s <= MAX_SINCE_COMMIT_S):  # also refuses NaN
        return None
    return now - since_commit_s


class MembershipClient:
    """Talks to the coordinator on behalf of one peer (use from the transport's loop)."""

    def __init__(self, transport: Transport, config: MembershipConfig) -> None:
        self.transport = transport
        self.config = config
        self.peer_id = ""
        self.status = PeerStatus()
        # Whether this peer's state is its own (NoLoCo's replicas differ), as its joins say (JoinRequest.own_state).
        self.own_state = False
        # The algorithm this peer runs and the settings its members must agree on, as its joins say
        # (JoinRequest.algorithm and .settings, with the config's model_settings; None: not said).
        self.algorithm: Callable[[], str] | None = None
        self.settings: Callable[[], Sequence[str]] | None = None
        # Set when the coordinator said this peer is out of the run (a heartbeat answered known=False, a call
        # refused NOT_FOUND, a decision that dropped it); cleared by a join. The peer must join again.
        self.unregistered = asyncio.Event()
        # Registrations so far: an "unknown peer" answer to a call sent before the last one is stale, not news.
        self.registrations = 0
        # The run's last committed round as the coordinator last said (heartbeats, quorum answers): a worker
        # still computing a step the run has committed without it can stop (gradient coding's stragglers).
        self.run_round = 0
        # The furthest step an up-to-date peer reported, as the coordinator last said (heartbeats, RESYNC answers).
        self.run_step = 0
        self.round_step = 0
        # When the run's last round committed, on this process's monotonic clock (None: not said yet).
        self.committed_at: float | None = None
        # Why the last Quorum call gave up on an unreachable coordinator ("" : none did, or a heartbeat got
        # through since): until a heartbeat does, a Quorum call ends at once (a sync per quorum_patience_s cost
        # a peer all its training while the coordinator was away).
        self.coordinator_lost = ""
        # The attempt (round id, epoch) this peer is exchanging data for, and the future its heartbeats
        # resolve with the coordinator's reason once it will not commit (``watch``).
        self._watched: tuple[tuple[int, int], asyncio.Future[str]] | None = None
        self._stub: pb_grpc.CoordinatorStub | None = None
        # The member list of the last ROUND answer, named by its digest: an answer with the same list leaves it out.
        self._known_members = KnownMembers()
        # Heartbeat, Quorum and Commit go as messages on one stream (collectives/session.py), when the coordinator
        # has it; the other calls, and every call to an older coordinator, are calls of their own.
        self.session = CoordinatorSession(
            lambda: self.transport.channel(self.config.coordinator),
            lambda method: call_metadata(self.transport.auth, method, self.config.coordinator),
        )

    @property
    def stub(self) -> pb_grpc.CoordinatorStub:
        """The coordinator stub on the transport's pooled channel."""
        if self._stub is None:
            self._stub = pb_grpc.CoordinatorStub(self.transport.channel(self.config.coordinator))
        return self._stub

    async def _call(
        self, method: str, request, timeout_s: float, patience_s: float | None = None, hint: str = ""
    ):
        """Call with a deadline; retry with backoff while the coordinator is unreachable, saying so as it goes.

        ``hint``: what the final error adds about the patience (e.g. the option that sets it).
        """
        patience = self.config.patience_s if patience_s is None else patience_s
        address = self.config.coordinator
        started = time.monotonic()
        give_up = started + patience
        next_note, noted = started + FIRST_NOTE_S, False
        delay = self.config.backoff_initial_s
        probed = False  # a closed socket is looked into once a call (tlsprobe.probe)
        while True:
            registrations = self.registrations
            try:
                return await self._send(method, request, timeout_s)
            except grpc.aio.AioRpcError as exc:
                code = exc.code()
                if code == grpc.StatusCode.NOT_FOUND:
                    self._unknown(registrations)
                    raise Unregistered(exc.details()) from None
                limited = _rate_limited_for(exc)
                if limited is not None and time.monotonic() + limited <= give_up:
                    log.debug("%s: the coordinator rate-limits this client; retrying in %.2f s", method, limited)
                    await asyncio.sleep(limited)
                    continue
                wrong = _not_a_coordinator(address, exc) or await self._tls_mismatch(exc, probe_closed=not probed)
                if wrong is not None:
                    raise wrong from None
                probed = True
                if code not in RETRY_CODES:
                    raise RequestRefused(f"coordinator refused {method}: {exc.details()}") from None
                now = time.monotonic()
                why = failure_reason(exc, timeout_s)
                if now + delay > give_up:
                    raise CoordinatorUnavailable(
                        f"no loconet coordinator answered at {address} for {patience:g} s ({why}); "
                        f"start `loconet coordinator` there, or point --coordinator at it{hint}"
                    ) from None
                if now >= next_note:
                    left = f"giving up in {max(give_up - now, 0):.0f} s"
                    if noted:
                        log.warning("still no coordinator at %s (%s); %s", address, why, left)
                    else:
                        log.warning("no coordinator answers at %s (%s); retrying, %s", address, why, left)
                    next_note, noted = now + NOTE_EVERY_S, True
                log.debug("%s: coordinator unreachable (%s); retrying in %.2f s", method, code.name, delay)
                await asyncio.sleep(delay)
                delay = min(delay * 2, self.config.backoff_max_s)

    async def _tls_mismatch(self, exc: grpc.aio.AioRpcError, probe_closed: bool) -> TLSMismatch | None:
        """TLSMismatch when the call failed for TLS: a handshake failure gRPC names, or (``probe_closed``) a socket
        the coordinator closed, looked into with a handshake of our own (collectives/tlsprobe.py)."""
        details, address = exc.details() or "", self.config.coordinator
        security = self.transport.config.security
        known = known_failure(details, security, "the coordinator", address)
        if known is not None or not probe_closed or "socket closed" not in details.lower():
            return known
        loop = asyncio.get_running_loop()
        found = await loop.run_in_executor(None, probe, address, security)
        if found == REFUSED_CERTIFICATE and security.tls:
            # A coordinator killed between the handshake and its first frame looks the same once: ask again.
            await asyncio.sleep(PROBE_AGAIN_S)
            if await loop.run_in_executor(None, probe, address, security) != found:
                return None
        return verdict(found, security, "the coordinator", address)

    def _unknown(self, registrations: int) -> None:
        """The coordinator answered "unknown peer" to a call sent when this peer had registered ``registrations``
        times: it must register again, unless it did since (the answer then predates its last registration)."""
        if registrations == self.registrations:
            self.unregistered.set()
        else:
            log.debug("an unknown-peer answer to a call sent before this peer registered again: ignored")

    async def _send(self, method: str, request, timeout_s: float):
        """One attempt of a call: on the Session stream when it carries method and the coordinator has it."""
        if method in SESSION_RPCS and self.session.supported:
            try:
                return await self.session.call(method, request, timeout_s)
            except SessionUnsupported as exc:
                log.info("%s at %s: one call per request", exc, self.config.coordinator)
        return await getattr(self.stub, method)(request, timeout=timeout_s)

    async def close(self) -> None:
        """Close the Session stream (a later call opens it again)."""
        await self.session.close()

    async def join(
        self,
        address: str,
        last_round: int,
        epoch: int,
        has_state: bool,
        codecs: tuple[str, ...] = (),
        patience_s: float | None = None,
        hint: str = "",
        digest: str = "",
    ) -> Joined:
        """Register (or re-register) with the coordinator; keeps the peer id across rejoins.

        ``patience_s``: how long to keep trying an unreachable coordinator (None: the config's).
        ``digest``: with has_state, the SHA-256 (hex) of the state as of last_round ("" unknown).
        An answer with ``wait`` registers nothing: join again after ``heartbeat_s``.
        """
        request = pb.JoinRequest(
            run_id=self.config.run_id,
            address=address,
            peer_id=self.peer_id,
            last_round=last_round,
            epoch=epoch,
            has_state=has_state,
            name=self.config.name,
            codecs=list(codecs),
            state_digest=digest,
            host_id=self.config.host_id,
            own_state=self.own_state,
            algorithm=self.algorithm() if self.algorithm is not None else "",
            settings=FORMAT_SEPARATOR.join((*(self.settings() if self.settings is not None else ()),
                                            *self.config.model_settings)),
        )
        auth = self.transport.auth
        if auth is not None:
            request.public_key = auth.public_key
        try:
            reply = await self._call("Join", request, self.config.rpc_timeout_s, patience_s, hint)
        except RequestRefused as exc:
            if NOT_THIS_RUN in str(exc):
                raise NotThisRun(str(exc)) from None
            raise
        if reply.wait:
            # Not registered: the peer id stays as it was, and the peer asks again later. Debug only: it asks every
            # heartbeat interval, and the caller says why it waits at once and then every 30 s (collectives/notes.py).
            log.debug("run %s: waiting for its state: %s", self.config.run_id, reply.wait_reason)
        else:
            if auth is not None:
                if not reply.HasField("credential"):
                    raise RequestRefused(
                        "the coordinator answered without a peer credential: give it the run's --token-file too"
                    )
                auth.adopt(reply.credential)
            if self.peer_id:
                # Registered again: the coordinator had lost this peer, maybe in a cut that killed its connections.
                self.transport.retire_peer_channels()
            self.peer_id = reply.peer_id
            self.registrations += 1
            self.unregistered.clear()
            if auth is not None:
                # The stream's credential is checked as it opens: the next call opens one with the new credential.
                await self.session.reset()
            log.info("joined run %s as %s (epoch %d); state from %s", self.config.run_id, reply.peer_id, reply.epoch,
                     reply.sync_from or "-")
        return Joined(
            peer_id=reply.peer_id,
            lease_s=reply.lease_s,
            heartbeat_s=reply.heartbeat_s,
            epoch=reply.epoch,
            last_committed_round=reply.last_committed_round,
            sync_from="" if reply.wait else reply.sync_from,
            missed=() if reply.wait else _missed(reply.missed),
            state_digest=reply.state_digest,
            sync_sources=() if reply.wait else tuple(reply.sync_sources),
            wait=reply.wait,
            wait_reason=reply.wait_reason,
            holders_finished=reply.wait and reply.holders_finished,
        )

    async def heartbeat_forever(
        self,
        interval_s: float,
        last_round: Callable[[], int],
        traffic: Callable[[], tuple[int, int]],
        digest: Callable[[], str] = lambda: "",
        refusals: Callable[[], dict[str, int]] = dict,
        held: Callable[[], Sequence[tuple[int, int, str]] | None] = lambda: None,
        hold: Callable[[tuple[MissedRound, ...]], None] = lambda rounds: None,
    ) -> None:
        """Send heartbeats with the peer's status every interval_s (or as the coordinator's answers say) until cancelled.

        ``digest()``: the state's digest as of ``last_round()`` if already computed ("" otherwise; never computes).
        ``held()``: (round id, epoch, digest) of the results this peer keeps, or None when it does not offer to keep
        others';
        ``hold(rounds)``: the coordinator asks it to fetch and keep these rounds' results (called on the loop), in
        an answer or unasked on the Session stream as a round commits.
        """

        def take_hold(answer: pb.HeartbeatResponse) -> None:
            # The rounds an answer (or a push) asks this peer to keep, if it offers to.
            if answer.hold and held() is not None:
                hold(_missed(answer.hold))

        self.session.pushed = take_hold
        try:
            while True:
                request = self._heartbeat_request(last_round(), traffic(), digest(), refusals(), held())
                watched = self._watched
                if watched is not None:
                    request.round_id, request.round_epoch = watched[0]
                registrations = self.registrations
                try:
                    reply = await self._send("Heartbeat", request, max(interval_s, 1.0))
                    if self.coordinator_lost:
                        log.info("the coordinator at %s answers again: the next sync asks it for a round",
                                 self.config.coordinator)
                        self.coordinator_lost = ""
                    if reply.round_over and watched is not None and not watched[1].done():
                        log.info("%s", reply.round_over[:300])
                        watched[1].set_result(reply.round_over[:2000])
                    if not reply.known:
                        self._unknown(registrations)
                    self.run_round = reply.last_committed_round
                    self.run_step = reply.run_step
                    self.round_step = reply.round_step
                    self._note_commit_time(reply.since_commit_s)
                    interval_s = heartbeat_interval(interval_s, reply.heartbeat_s)
                    take_hold(reply)
                except grpc.aio.AioRpcError as exc:
                    # The coordinator may be restarting; training goes on, heartbeats keep trying.
                    log.debug("heartbeat failed: %s", exc.code().name)
                await asyncio.sleep(interval_s)
        finally:
            self.session.pushed = None

    def _heartbeat_request(
        self, last_round: int, traffic: tuple[int, int], digest: str, refusals: dict[str, int],
        kept: Sequence[tuple[int, int, str]] | None,
    ) -> pb.HeartbeatRequest:
        """A heartbeat with this peer's status, its traffic (bytes sent, received) and the results it keeps."""
        return pb.HeartbeatRequest(
            run_id=self.config.run_id,
            peer_id=self.peer_id,
            last_round=last_round,
            state_digest=digest,
            metrics=self._metrics(traffic, refusals),
            holds_results=kept is not None,
            held_results=[pb.HeldResult(round_id=r, epoch=e, digest=d) for r, e, d in kept or ()],
        )

    def _metrics(self, traffic: tuple[int, int], refusals: dict[str, int]) -> pb.PeerMetrics:
        """This peer's status as the coordinator shows it, with its traffic (bytes sent, received) and refusals."""
        s = self.status
        sent, received = traffic
        return pb.PeerMetrics(
            step=s.step,
            steps_per_s=s.steps_per_s,
            loss=s.loss,
            bytes_sent=sent,
            bytes_received=received,
            activity=s.activity,
            samples=s.samples,
            eval_loss=s.eval_loss,
            privacy_epsilon=s.epsilon,
            spread=s.spread,
            refusals=refusals,
        )

    def _note_commit_time(self, since_commit_s: float) -> None:
        """Keep when the run's last round committed, from an answer's since_commit_s (0 or not sane: unknown)."""
        at = commit_time(since_commit_s, time.monotonic())
        if at is not None:
            self.committed_at = at

    def watch(self, round_id: int, epoch: int) -> asyncio.Future[str]:
        """Name the attempt this peer exchanges data for in its heartbeats; the future resolves with the
        coordinator's reason once that attempt will not commit. Call ``unwatch`` when the exchange ends."""
        over: asyncio.Future[str] = asyncio.get_running_loop().create_future()
        self._watched = ((round_id, epoch), over)
        return over

    def unwatch(self, over: asyncio.Future[str]) -> None:
        """Stop naming the attempt ``over`` was made for (a newer watch stays)."""
        if self._watched is not None and self._watched[1] is over:
            self._watched = None
        over.cancel()

    async def quorum(
        self, last_round: int, tag: str = "", timeout_s: float = 600.0, digest: str = "", min_members: int = 1,
        round_format: str = "",
    ) -> RoundPlan:
        """Ask for the next round's group (blocks until it forms).

        ``digest``: the SHA-256 (hex) of this peer's state as of last_round ("" unknown); ``min_members``: the
        fewest members its round can run with (the aggregator's minimum); ``round_format``: what this peer's
        contribution is (``collectives.roundformat.round_format``; "" unchecked). Raises FormatMismatch when the run's rounds of this
        tag carry another format.
        """
        if self.coordinator_lost:
            raise CoordinatorUnavailable(f"no sync: {self.coordinator_lost}; training on locally until a heartbeat "
                                         "reaches the coordinator again")
        request = pb.QuorumRequest(
            run_id=self.config.run_id, peer_id=self.peer_id, last_round=last_round, tag=tag, state_digest=digest,
            known_members=self._known_members.digest, min_members=min_members, member_changes=True,
            packed_members=True, step=self.status.step, round_format=round_format,
        )
        try:
            reply = await self._call("Quorum", request, timeout_s, patience_s=self.config.quorum_patience_s)
        except CoordinatorUnavailable as exc:
            self.coordinator_lost = str(exc)
            raise
        except RequestRefused as exc:
            if NO_QUORUM in str(exc):
                raise GroupTooSmall(str(exc)) from None
            if FORMAT_DIFFERS in str(exc):
                raise FormatMismatch(str(exc)) from None
            raise
        if reply.action == pb.QuorumResponse.RESYNC:
            if reply.run_step or reply.round_step:  # an older coordinator leaves them 0: the heartbeats' stand
                # Fresher than the last heartbeat's (a peer back from a cut heard none since): catching up lines
                # this peer's schedule up with the run's from them.
                self.run_step, self.round_step = reply.run_step, reply.round_step
            self._note_commit_time(reply.since_commit_s)
            return RoundPlan(
                action="resync",
                sync_from=reply.sync_from,
                last_committed_round=reply.last_committed_round,
                epoch=reply.epoch,
                missed=_missed(reply.missed),
                state_digest=reply.state_digest,
                sync_sources=tuple(reply.sync_sources),
                pending_tag=reply.pending_tag,
            )
        members, hosts = self._known_members.of(reply)
        # A member that registered again since this peer's last round with it may sit behind a connection that
        # died in the cut that lost it: its calls then open a new one.
        self.transport.note_registrations((e.address, e.registration) for e in self._known_members.entries)
        return RoundPlan(
            action="round",
            round_id=reply.round_id,
            epoch=reply.epoch,
            members=members,
            hosts=hosts,
            rank=reply.rank,
            last_committed_round=reply.last_committed_round,
            policy=reply.policy,
            seed=reply.seed,
            candidates=tuple(reply.candidates),
            members_step=reply.members_step,
        )

    async def commit(
        self, plan: RoundPlan, ok: bool, failed: tuple[str, ...], reason: str, bytes_sent: int, bytes_received: int,
        wall_s: float, timeout_s: float, waited_for: str = "", waited_s: float = 0.0,
    ) -> CommitOutcome:
        """Report this member's outcome of a round (``waited_for``: the member whose data came last, ``waited_s``
        after every other's); return the coordinator's decision."""
        request = pb.CommitRequest(
            run_id=self.config.run_id,
            peer_id=self.peer_id,
            round_id=plan.round_id,
            epoch=plan.epoch,
            ok=ok,
            failed_peers=list(failed),
            reason=reason[:2000],
            report=pb.RoundReport(bytes_sent=bytes_sent, bytes_received=bytes_received, wall_s=wall_s,
                                  waited_for=waited_for, waited_s=waited_s),
        )
        try:
            reply = await self._call("Commit", request, timeout_s)
        except Unregistered as exc:
            # A restarted coordinator knows neither this peer nor the round: nobody can commit it.
            lost = f"round {plan.round_id} (epoch {plan.epoch}): the coordinator lost it ({exc})"
            raise CommitUnknown(lost) from None
        return CommitOutcome(commit=reply.commit, reason=reply.reason, epoch=reply.epoch, dropped=tuple(reply.dropped))

    async def leave(
        self, reason: str = "", timeout_s: float | None = None, last_round: int = 0, digest: str = "",
        traffic: tuple[int, int] | None = None, refusals: dict[str, int] | None = None,
    ) -> None:
        """Tell the coordinator this peer leaves the run, holding the state of last_round with SHA-256 digest
        ("" unknown), with its final figures when traffic is given; best effort, within timeout_s (None: one RPC
        deadline)."""
        if not self.peer_id:
            return
        request = pb.LeaveRequest(
            run_id=self.config.run_id, peer_id=self.peer_id, reason=reason, last_round=last_round, state_digest=digest,
            metrics=None if traffic is None else self._metrics(traffic, refusals or {}),
        )
        timeout = self.config.rpc_timeout_s if timeout_s is None else timeout_s
        try:
            await self._call("Leave", request, timeout, patience_s=timeout)
        except LoconetError as exc:
            log.info("leave not delivered: %s", exc)
