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

The answers as plain data (``Joined``, ``RoundPlan``, ``MissedRound``,
``CommitOutcome``, the kept member list) are in
collectives/membership/roundplan.py; the errors and how a failed call is read,
in collectives/membership/coordinatorerrors.py; the Session stream that
carries heartbeats, quorums and commits, in collectives/membership/session.py.
Its calls go over the member's transport's event loop and channels
(collectives/net/transport.py).
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import grpc

from collectives.errors import FormatMismatch, LoconetError, NotThisRun
from collectives.membership.coordinatorerrors import (
    NO_QUORUM,
    NOT_THIS_RUN,
    RETRY_CODES,
    CommitUnknown,
    CoordinatorUnavailable,
    GroupTooSmall,
    RequestRefused,
    Unregistered,
    failure_reason,
    not_a_coordinator,
    rate_limited_for,
)
from collectives.membership.roundformat import FORMAT_DIFFERS, FORMAT_SEPARATOR
from collectives.membership.roundplan import (
    CommitOutcome,
    Joined,
    KnownMembers,
    MissedRound,
    RoundPlan,
    commit_time,
    heartbeat_interval,
    missed_rounds,
)
from collectives.membership.session import SESSION_RPCS, CoordinatorSession, SessionUnsupported
from collectives.net.addresses import coordinator_address
from collectives.net.rpc import call_metadata
from collectives.net.tlsprobe import REFUSED_CERTIFICATE, TLSMismatch, known_failure, probe, verdict
from collectives.net.transport import Transport
from protos import membership_pb2 as pb
from protos import membership_pb2_grpc as pb_grpc

log = logging.getLogger(__name__)

# How long calls keep retrying an unreachable coordinator, and how long a Quorum call does (the defaults of
# MembershipConfig and ElasticConfig).
PATIENCE_S = 300.0
QUORUM_PATIENCE_S = 30.0
# A call that keeps failing says so after this long, then again every NOTE_EVERY_S with the time left:
# a wrong address shows at once, a blip of a moment stays quiet.
FIRST_NOTE_S = 0.5
NOTE_EVERY_S = 5.0
# A TLS coordinator that closed the connection on this peer's certificate is asked again after this long before
# the peer stops (collectives/net/tlsprobe.py).
PROBE_AGAIN_S = 0.5


@dataclass(frozen=True)
class MembershipConfig:
    """Where the coordinator is and how patiently to talk to it."""

    coordinator: str
    run_id: str
    name: str = ""
    # The host this peer runs on, sent at join (collectives/hosts/identity.py; "": a host of its own).
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
        # Heartbeat, Quorum and Commit go as messages on one stream (collectives/membership/session.py), when the
        # coordinator has it; the other calls, and every call to an older coordinator, are calls of their own.
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
                limited = rate_limited_for(exc)
                if limited is not None and time.monotonic() + limited <= give_up:
                    log.debug("%s: the coordinator rate-limits this client; retrying in %.2f s", method, limited)
                    await asyncio.sleep(limited)
                    continue
                wrong = not_a_coordinator(address, exc) or await self._tls_mismatch(exc, probe_closed=not probed)
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
        the coordinator closed, looked into with a handshake of our own (collectives/net/tlsprobe.py)."""
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
            missed=() if reply.wait else missed_rounds(reply.missed),
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
        """Send heartbeats with the peer's status every interval_s (or as the coordinator's answers say) until
        cancelled.

        ``digest()``: the state's digest as of ``last_round()`` if already computed ("" otherwise; never computes).
        ``held()``: (round id, epoch, digest) of the results this peer keeps, or None when it does not offer to keep
        others';
        ``hold(rounds)``: the coordinator asks it to fetch and keep these rounds' results (called on the loop), in
        an answer or unasked on the Session stream as a round commits.
        """

        def take_hold(answer: pb.HeartbeatResponse) -> None:
            # The rounds an answer (or a push) asks this peer to keep, if it offers to.
            if answer.hold and held() is not None:
                hold(missed_rounds(answer.hold))

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

        ``digest``: the SHA-256 (hex) of this peer's state as of last_round ("" unknown); ``min_members``: the fewest
        members its round can run with (the aggregator's minimum); ``round_format``: what this peer's contribution is
        (``collectives.membership.roundformat.round_format``; "" unchecked). Raises FormatMismatch when the run's rounds
        of this tag carry another format.
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
                missed=missed_rounds(reply.missed),
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
