"""Simulated peers for ``loconet bench membership``: the membership protocol and nothing else.

Each simulated peer joins (a fresh peer, ``has_state=False``, with a fake
unique address ``10.x.y.z:port`` -- the coordinator never dials peers), then
heartbeats every ``heartbeat_s`` with plausible, changing metrics (fixed-rate
schedule, random phase, so the load is spread evenly) and, as a real peer
does, the results of its last two rounds it keeps (``held_results``, with a
digest every member of a round agrees on), and on command takes
part in rounds: ``Quorum(last_round)`` -> (``allreduce_s``, the round's data
exchange) -> ``Commit(ok=True)`` with the round id and epoch it got -> (a
random delay below ``spread_s``, its training until the next sync) -> the next
quorum with the committed round id. With ``--churn``, between rounds some of
them leave and join again under a new peer id (holding the run's last round),
so that every round's member list differs from the last one. Many of
them live as asyncio tasks in one process (``client_main``), driven by the
benchmark through a pipe.
"""

from __future__ import annotations

import asyncio
import hashlib
import math
import random
import signal
import time
from collections import deque
from collections.abc import Iterable
from multiprocessing.connection import Connection
from typing import NamedTuple

import grpc
from google.protobuf.message import Message

from collectives.asynctasks import cancel_and_wait
from collectives.membership.client import MembershipConfig
from collectives.membership.coordinatorerrors import RETRY_CODES
from collectives.membership.memberlists import BadMemberChange, BadPackedList, changed_list, entries_of, unpack_list
from collectives.membership.roundformat import round_format
from collectives.membership.roundplan import heartbeat_interval
from collectives.membership.session import SESSION_RPCS, CoordinatorSession
from collectives.net.rpc import RpcSettings, make_channel
from optimizers.diloco import DiLoCoConfig
from protos import membership_pb2 as pb
from protos import membership_pb2_grpc as pb_grpc

# Generous limits: a QuorumResponse carries the whole member list (~30 bytes per member).
# Channels are made with own_connection=True: one TCP connection each, as many real peers would have.
CLIENT_SETTINGS = RpcSettings(max_receive_bytes=64 << 20, max_send_bytes=16 << 20)


class RoundRecord(NamedTuple):
    """One simulated peer's round, as the benchmark reads it (times in unix seconds)."""

    index: int  # the simulated peer's
    k: int  # the benchmark's round number
    round_id: int
    epoch: int
    members: int
    quorum_first_sent: float  # the Quorum call's first attempt
    quorum_answered: float
    commit_first_sent: float
    commit_answered: float
    committed: bool
    quorum_sent: float  # the attempt that was answered (a retried call counts from its retry)
    commit_sent: float
    answer_bytes: int
    list_form: str  # how the answer carried the member list (list_form)


def _result_digest(round_id: int) -> str:
    """The digest every simulated member of a round reports of its result (the members of a real round agree)."""
    return hashlib.sha256(f"result of round {round_id}".encode()).hexdigest()


def fake_address(index: int) -> str:
    """A unique, plausible data-plane address for simulated peer ``index`` (never dialled)."""
    return f"10.{(index >> 16) & 255}.{(index >> 8) & 255}.{index & 255}:{20000 + index % 20000}"


# Calls are retried on the real client's RETRY_CODES (the call may never have reached the
# coordinator's handler, e.g. shed by gRPC's pending-request limit while its loop was busy),
# with its backoff (MembershipConfig's defaults).
JOIN_ATTEMPT_S = 10.0
# Member lists a client process keeps for its peers (by digest): a peer names only its last one.
SHARED_LISTS = 8
# What every simulated peer's contribution is, named in its Quorum as a real DiLoCo peer's (the coordinator checks it).
SIM_FORMAT = round_format("int8", "mean", 25_000_000, DiLoCoConfig().round_settings())


class CallFailed(Exception):
    """A membership call that failed for good (a refusal, or no answer within the patience)."""


class SimPeer:
    """One simulated peer: join, heartbeat, quorum and commit; nothing else.

    Like the real client (``MembershipClient``), Join/Quorum/Commit retry with backoff after
    UNAVAILABLE / DEADLINE_EXCEEDED / CANCELLED for at most ``patience_s`` in all, and every retry
    is counted. A Join attempt has a deadline of ``JOIN_ATTEMPT_S``; Quorum and Commit attempts
    wait the whole patience (the real client waits 600 s / 120 s): they legitimately block until
    the group is complete, and shorter deadlines would make every peer retry at once. Heartbeats
    have a deadline of max(interval, 1 s) and are not retried (the next one is due anyway).
    """

    def __init__(self, index: int, channel: grpc.aio.Channel, job: dict, lists: dict | None = None) -> None:
        self.index = index
        self.channel = channel
        self.stub = pb_grpc.CoordinatorStub(channel)
        # Heartbeat, Quorum and Commit on one Session stream per peer, as the real client sends them
        # (collectives/membership/session.py); with job["unary"], one gRPC call each, as before Session streams.
        self.session = None if job.get("unary") else CoordinatorSession(lambda: channel)
        self.job = job
        self.peer_id = ""
        self.last_round = 0
        # (round id, epoch, digest) of the results it keeps, as a real peer's ElasticConfig.keep_results (2).
        self.kept: deque[tuple[int, int, str]] = deque(maxlen=2)
        # The member list of this peer's last ROUND answer, by digest (QuorumRequest.known_members), as the real
        # client keeps it (collectives.membership.roundplan.KnownMembers). The lists themselves are shared by the peers
        # of this process: each real peer reads its list in its own process, not 500 of them on one loop.
        self.known_digest = b""
        self.lists: dict[bytes, tuple[tuple, list[str]]] = {} if lists is None else lists
        self.epoch = 0
        self.rng = random.Random(index)
        self.step = 0
        self.interval = job["heartbeat_s"]
        self.steps_per_s = self.rng.uniform(5.0, 15.0)
        self.bytes_sent = 0
        self.bytes_received = 0
        self.activity = "joining"
        # (send time, latency s, ok); kept for the parent to count in any window.
        self.heartbeats: list[tuple[float, float, bool]] = []
        self.heartbeat_errors: dict[str, int] = {}
        self.retries: dict[str, int] = {}
        self.unknown = 0

    async def call(self, method: str, request: Message) -> tuple[Message, float, float]:
        """One RPC to the coordinator, retried with backoff on a retryable refusal within the job's patience: (reply,
        send time of the first attempt, send time of the answered attempt); CallFailed when it cannot be had."""
        patience = self.job["patience_s"]
        attempt_s = JOIN_ATTEMPT_S if method == "Join" else patience
        first = time.time()
        give_up = time.monotonic() + patience
        delay = MembershipConfig.backoff_initial_s
        while True:
            sent = time.time()
            try:
                return await self._send(method, request, attempt_s), first, sent
            except grpc.aio.AioRpcError as exc:
                code = exc.code()
                if code not in RETRY_CODES:
                    raise CallFailed(f"{method} {code.name}: {exc.details()}") from None
                key = f"{method}:{code.name}"
                self.retries[key] = self.retries.get(key, 0) + 1
                if time.monotonic() + delay > give_up:
                    raise CallFailed(f"{method}: no answer in {patience:g} s (last {code.name})") from None
                await asyncio.sleep(delay)
                delay = min(delay * 2, MembershipConfig.backoff_max_s)

    async def _send(self, method: str, request: Message, timeout_s: float) -> Message:
        if self.session is not None and method in SESSION_RPCS:
            return await self.session.call(method, request, timeout_s)
        return await getattr(self.stub, method)(request, timeout=timeout_s)

    async def join(self) -> float:
        """Join (again, after rejoin's Leave: as a peer holding the run's last round); the latency in seconds."""
        request = pb.JoinRequest(
            run_id=self.job["run_id"],
            address=fake_address(self.index),
            has_state=self.last_round > 0,
            last_round=self.last_round,
            name=f"sim-{self.index}",
            codecs=["none", "fp16", "int8"],
        )
        reply, first, _ = await self.call("Join", request)
        latency = time.time() - first
        self.peer_id = reply.peer_id
        self.epoch = reply.epoch
        # Heartbeat as told, like a real peer (the coordinator slows heartbeats as the run grows).
        self.interval = max(self.job["heartbeat_s"], reply.heartbeat_s)
        self.activity = "training"
        return latency

    async def rejoin(self) -> None:
        """Leave the run and join it again, as a new peer id (``--churn``): the next round's list changes."""
        self.activity = "rejoining"  # no heartbeats meanwhile: the coordinator no longer knows the old id
        await self.call("Leave", pb.LeaveRequest(run_id=self.job["run_id"], peer_id=self.peer_id, reason="churn",
                                                 last_round=self.last_round))
        if self.session is not None:  # a Session stream belongs to the peer id it opened with
            await self.session.close()
            self.session = CoordinatorSession(lambda: self.channel)
        await self.join()

    def _metrics(self) -> pb.PeerMetrics:
        self.step += max(1, int(self.steps_per_s * self.interval))
        loss = 2.0 + 3.0 * math.exp(-self.step / 2000.0) + self.rng.uniform(-0.05, 0.05)
        return pb.PeerMetrics(
            step=self.step,
            steps_per_s=self.steps_per_s,
            loss=loss,
            bytes_sent=self.bytes_sent,
            bytes_received=self.bytes_received,
            activity=self.activity,
            samples=self.step * 16,
        )

    async def heartbeat_forever(self) -> None:
        """Heartbeat on a fixed-rate schedule with a random phase until cancelled."""
        interval = self.interval
        timeout = max(interval, 1.0)  # as the real client
        next_at = time.monotonic() + self.rng.uniform(0.0, interval)
        while True:
            delay = next_at - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
            if self.activity == "rejoining":
                next_at += interval
                continue
            request = pb.HeartbeatRequest(
                run_id=self.job["run_id"], peer_id=self.peer_id, last_round=self.last_round, metrics=self._metrics(),
                holds_results=True,
                held_results=[pb.HeldResult(round_id=r, epoch=e, digest=d) for r, e, d in self.kept],
            )
            t0 = time.time()
            try:
                reply = await self._send("Heartbeat", request, timeout)
                self.heartbeats.append((t0, time.time() - t0, True))
                if not reply.known:
                    self.unknown += 1
                # As the real client: the interval the coordinator says now (it grows with the run).
                told = heartbeat_interval(interval, reply.heartbeat_s)
                if told != interval:
                    next_at += told - interval
                    interval = self.interval = told
                    timeout = max(interval, 1.0)
            except grpc.aio.AioRpcError as exc:
                self.heartbeats.append((t0, time.time() - t0, False))
                name = exc.code().name
                self.heartbeat_errors[name] = self.heartbeat_errors.get(name, 0) + 1
            next_at += interval
            now = time.monotonic()
            if next_at < now - interval:  # fell far behind: do not burst to catch up
                next_at = now

    def _members(self, q: pb.QuorumResponse) -> list[str]:
        """The member ids of a ROUND answer: its own list, the held one changed as it says, or the held one when
        it was left out (as the real client's KnownMembers, including the digest check of a changed list)."""
        if q.members:
            if q.members_digest not in self.lists:
                self._share(q.members_digest, entries_of(q.members))
        elif q.members_packed:
            if q.members_digest not in self.lists:  # else another peer of this process unpacked it already
                try:
                    self._share(q.members_digest, unpack_list(q.members_packed, q.members_digest))
                except BadPackedList as exc:
                    self.known_digest = b""
                    raise CallFailed(f"round {q.round_id}: {exc}") from None
        elif q.members_base:
            if q.members_base != self.known_digest or q.members_base not in self.lists:
                self.known_digest = b""
                raise CallFailed(f"round {q.round_id}: the answer changes a member list this peer does not hold")
            if q.members_digest not in self.lists:  # else another peer of this process rebuilt it already
                try:
                    self._share(q.members_digest, changed_list(self.lists[q.members_base][0], q))
                except BadMemberChange as exc:
                    self.known_digest = b""
                    raise CallFailed(f"round {q.round_id}: {exc}") from None
        elif q.members_digest != self.known_digest or q.members_digest not in self.lists:
            self.known_digest = b""
            raise CallFailed(f"round {q.round_id}: the answer left out a member list this peer does not hold")
        self.known_digest = q.members_digest
        return self.lists[q.members_digest][1]

    def _share(self, digest: bytes, entries: tuple) -> None:
        """Keep a list for this process's peers (the last SHARED_LISTS of them: older ones are nobody's any more)."""
        self.lists[digest] = (entries, [e.peer_id for e in entries])
        while len(self.lists) > SHARED_LISTS:
            del self.lists[next(iter(self.lists))]

    async def rounds(self, count: int, expected_members: int, first: int = 0) -> tuple[list[RoundRecord], list[str]]:
        """Take part in count rounds (numbered from first in the records); one record per round, and the problems."""
        records: list[RoundRecord] = []
        problems: list[str] = []
        spread = self.job["spread_s"]
        for k in range(first, first + count):
            if spread > 0:  # peers reach the sync point at different times (compute jitter, stragglers)
                await asyncio.sleep(self.rng.uniform(0.0, spread))
            self.activity = "in-round"
            try:
                request = pb.QuorumRequest(
                    run_id=self.job["run_id"], peer_id=self.peer_id, last_round=self.last_round,
                    known_members=self.known_digest, member_changes=True, packed_members=True,
                    round_format=SIM_FORMAT,
                )
                q, t_q0, t_qs = await self.call("Quorum", request)
                members = self._members(q)
            except CallFailed as exc:
                problems.append(f"{self.peer_id} round {k}: {exc}")
                break
            t_q1 = time.time()
            if q.action != pb.QuorumResponse.ROUND:
                problems.append(f"{self.peer_id} round {k}: Quorum answered action {q.action}, not ROUND")
                break
            n = len(members)
            if n != expected_members:
                problems.append(f"{self.peer_id} round {k}: {n} members, expected {expected_members}")
            if q.rank >= n or members[q.rank] != self.peer_id:
                problems.append(f"{self.peer_id} round {k}: rank {q.rank} does not point at this peer")
            if self.job.get("allreduce_s", 0.0) > 0:
                # The round's data exchange, as a member spends it between its plan and its report.
                await asyncio.sleep(self.job["allreduce_s"])
            sent = self.rng.randrange(1 << 20, 4 << 20)
            self.bytes_sent += sent
            self.bytes_received += sent
            request = pb.CommitRequest(
                run_id=self.job["run_id"],
                peer_id=self.peer_id,
                round_id=q.round_id,
                epoch=q.epoch,
                ok=True,
                report=pb.RoundReport(bytes_sent=sent, bytes_received=sent, wall_s=0.0),
            )
            try:
                c, t_c0, t_cs = await self.call("Commit", request)
            except CallFailed as exc:
                problems.append(f"{self.peer_id} round {k}: {exc}")
                break
            t_c1 = time.time()
            if c.commit:
                self.last_round = q.round_id
                self.kept.append((q.round_id, q.epoch, _result_digest(q.round_id)))
            else:
                problems.append(f"{self.peer_id} round {q.round_id}: not committed: {c.reason}")
            self.epoch = c.epoch
            records.append(RoundRecord(self.index, k, q.round_id, q.epoch, n, t_q0, t_q1, t_c0, t_c1, bool(c.commit),
                                       t_qs, t_cs, q.ByteSize(), list_form(q)))
        self.activity = "training"
        return records, problems


def list_form(q: pb.QuorumResponse) -> str:
    """How a ROUND answer carried its member list: "whole", "packed", "change" or "left_out"."""
    if q.members:
        return "whole"
    if q.members_packed:
        return "packed"
    return "change" if q.members_base else "left_out"


def merge_counts(counters: Iterable[dict[str, int]]) -> dict[str, int]:
    """The counts of several counters (key -> n) added up, key by key."""
    out: dict[str, int] = {}
    for c in counters:
        for k, n in c.items():
            out[k] = out.get(k, 0) + n
    return out


async def _recv(conn):
    """The next command from the parent (EOF, i.e. the parent is gone: stop)."""
    loop = asyncio.get_running_loop()
    try:
        return await loop.run_in_executor(None, conn.recv)
    except (EOFError, OSError):
        return {"cmd": "stop", "orphaned": True}


async def _client(job: dict, conn) -> None:
    channels = [make_channel(job["address"], CLIENT_SETTINGS, own_connection=True) for _ in range(job["channels"])]
    indexes = range(job["first"], job["first"] + job["count"])
    lists: dict[bytes, tuple[tuple, list[str]]] = {}
    peers = [SimPeer(i, channels[j % len(channels)], job, lists) for j, i in enumerate(indexes)]
    tasks: list[asyncio.Task] = []
    try:
        async with asyncio.timeout(30):
            await asyncio.gather(*(ch.channel_ready() for ch in channels))
        conn.send({"type": "ready"})
        if (await _recv(conn))["cmd"] != "join":
            return
        results = await asyncio.gather(*(p.join() for p in peers), return_exceptions=True)
        join_s = [r for r in results if isinstance(r, float)]
        join_errors = [f"sim-{p.index}: {r!r}"[:300] for p, r in zip(peers, results) if not isinstance(r, float)]
        tasks = [asyncio.get_running_loop().create_task(p.heartbeat_forever()) for p in peers if p.peer_id]
        conn.send({"type": "joined", "join_s": join_s, "errors": join_errors})
        while True:
            cmd = await _recv(conn)
            if cmd["cmd"] == "churn":
                mine = [p for p in peers if p.peer_id and p.index in set(cmd["indexes"])]
                results = await asyncio.gather(*(p.rejoin() for p in mine), return_exceptions=True)
                conn.send({"type": "churned",
                           "errors": [f"sim-{p.index}: {r!r}"[:300] for p, r in zip(mine, results) if r is not None]})
            elif cmd["cmd"] == "rounds":
                live = [p for p in peers if p.peer_id]
                outcomes = await asyncio.gather(
                    *(p.rounds(cmd["rounds"], cmd["expected_members"], cmd.get("first", 0)) for p in live)
                )
                conn.send(
                    {
                        "type": "rounds",
                        "records": [r for recs, _ in outcomes for r in recs],
                        "problems": [x for _, probs in outcomes for x in probs],
                    }
                )
            elif cmd["cmd"] == "stop":
                await cancel_and_wait(tasks)
                if cmd.get("orphaned"):
                    return
                conn.send(
                    {
                        "type": "final",
                        "heartbeats": [hb for p in peers for hb in p.heartbeats],
                        "heartbeat_errors": merge_counts(p.heartbeat_errors for p in peers),
                        "retries": merge_counts(p.retries for p in peers),
                        "unknown": sum(p.unknown for p in peers),
                    }
                )
                return
    finally:
        await cancel_and_wait(tasks)
        await asyncio.gather(*(p.session.close() for p in peers if p.session is not None), return_exceptions=True)
        await asyncio.gather(*(ch.close() for ch in channels), return_exceptions=True)


def client_main(job: dict, conn: Connection) -> None:
    """Entry point of a client process (spawned): run its simulated peers until told to stop."""
    # Ctrl-C reaches the whole foreground process group: the parent stops us in order.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        asyncio.run(_client(job, conn))
    except BaseException as exc:  # tell the parent why, then die
        try:
            conn.send({"type": "error", "error": f"{type(exc).__name__}: {exc}"[:2000]})
        except (OSError, ValueError):  # the parent is gone: nobody to tell
            pass
        raise
