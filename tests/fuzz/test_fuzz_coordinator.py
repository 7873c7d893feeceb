"""Fuzzing every Coordinator request handler (peer/coordinator/service.py), called in-process.

Each example starts a coordinator on a fresh event loop (its tick running,
short timeouts) and makes a few steps of calls, the calls of a step at once,
with generated requests: ids of peers it joined or any text (empty, huge),
rounds and epochs near the run's or up to 2**64-1, NaN and infinite metrics,
digests of any form, repeated fields of thousands of entries. The handlers
get a minimal servicer context whose ``abort`` raises, as gRPC's does.

What must hold: every call answers with its response type, or is refused with
``context.abort`` and a specific status code, within its bounded wait (never
another exception, never a hang); the run's state stays within bounds (no more
peers than were admitted, round ids and epochs that still fit a uint64 after
the next round, a status document that is strict JSON); and afterwards an
honest peer that joins still gets a round committed.
"""

from __future__ import annotations

import asyncio
import itertools
import json
from dataclasses import dataclass

import grpc
import pytest
from fuzzgen import U64_MAX, absurd_floats, long_texts, texts, uint64s
from hypothesis import strategies as st

from peer.coordinator.service import Coordinator, CoordinatorConfig
from protos import membership_pb2 as pb

RUN = "fuzz-run"
# Short waits, so that blocked calls end within an example: a quorum waits join_timeout_s for live
# peers that have not asked, a Quorum call gives up after quorum_timeout_s, a round's members have
# commit_timeout_s to report after the first report, a silent peer is out after its lease.
CONFIG = {
    "run_id": RUN, "port": 0, "dashboard_port": None, "probe_peers": False, "startup_grace_s": 0.0, "min_peers": 1,
    "join_timeout_s": 0.02, "quorum_timeout_s": 0.2, "commit_timeout_s": 0.05, "lease_s": 1.0, "heartbeat_s": 0.2,
    "max_peers": 6,
}
# Longest any one call may take (its waits are bounded by the timeouts above): beyond it, the call hangs.
CALL_TIMEOUT_S = 5.0
# How long the honest peer at the end keeps trying: leases of the peers the fuzzer left behind expire first.
PROBE_S = 6.0
REFUSALS = frozenset({
    grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.FAILED_PRECONDITION, grpc.StatusCode.NOT_FOUND,
    grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.UNAUTHENTICATED,
    grpc.StatusCode.PERMISSION_DENIED, grpc.StatusCode.OUT_OF_RANGE, grpc.StatusCode.ALREADY_EXISTS,
    grpc.StatusCode.ABORTED,
})
RESPONSES = {"Join": pb.JoinResponse, "Heartbeat": pb.HeartbeatResponse, "Leave": pb.LeaveResponse,
             "Quorum": pb.QuorumResponse, "Commit": pb.CommitResponse, "Status": pb.StatusResponse}
REQUESTS = {"Join": pb.JoinRequest, "Heartbeat": pb.HeartbeatRequest, "Leave": pb.LeaveRequest,
            "Quorum": pb.QuorumRequest, "Commit": pb.CommitRequest, "Status": pb.StatusRequest}




class Aborted(Exception):
    """What FakeContext.abort raises (gRPC's raises too): the call ended with this status."""

    def __init__(self, code: grpc.StatusCode, details: str) -> None:
        super().__init__(f"{code.name}: {details[:300]}")
        self.code = code


class FakeContext:
    """The servicer context a handler sees, minus the network: abort raises Aborted."""

    def __init__(self, peer: str = "ipv4:127.0.0.1:40000") -> None:
        self._peer = peer

    async def abort(self, code: grpc.StatusCode, details: str = "", trailing_metadata=()) -> None:
        raise Aborted(code, details)

    def peer(self) -> str:
        return self._peer

    def invocation_metadata(self) -> tuple:
        return ()

    def time_remaining(self) -> float | None:
        return None

    def auth_context(self) -> dict:
        return {}

    def set_code(self, code) -> None:
        pass

    def set_details(self, details) -> None:
        pass

    def set_trailing_metadata(self, metadata) -> None:
        pass

    async def send_initial_metadata(self, metadata) -> None:
        pass


# -- requests, with references to what the run holds, resolved when the call is made -----------------------


@dataclass(frozen=True)
class PeerRef:
    """The id of the i-th peer this example joined (mod their number); "" before any."""

    i: int


@dataclass(frozen=True)
class Near:
    """A value near the run's: its last committed round ("round"), next round ("next") or epoch ("epoch"), plus k;
    or ("digest") the digest it recorded for its last committed round."""

    what: str
    k: int


def mostly(good: st.SearchStrategy, bad: st.SearchStrategy) -> st.SearchStrategy:
    """A plausible value seven times in eight, else an absurd one: most calls get past the first checks."""
    return st.integers(0, 7).flatmap(lambda k: bad if k == 0 else good)


def peer_ids() -> st.SearchStrategy:
    return mostly(st.builds(PeerRef, st.integers(0, 7)), st.one_of(st.just(""), texts()))


def rounds(what: str) -> st.SearchStrategy:
    near = st.builds(Near, st.just(what), st.one_of(st.just(0), st.integers(-2, 2)))
    return mostly(near, uint64s())


def digests() -> st.SearchStrategy:
    recorded = st.builds(Near, st.just("digest"), st.just(0))
    valid = st.one_of(st.just(""), recorded, st.binary(min_size=32, max_size=32).map(bytes.hex))
    return mostly(valid, st.one_of(st.just("AB" * 32), st.just("g" * 64), texts()))


def many(strategy: st.SearchStrategy) -> st.SearchStrategy[list]:
    """A few entries, or one entry repeated up to 20,000 times."""
    return mostly(st.lists(strategy, max_size=4), st.builds(lambda x, n: [x] * n, strategy, st.integers(0, 20_000)))


RUN_IDS = mostly(st.just(RUN), texts())
ADDRESSES = mostly(st.sampled_from(["h1:1", "h2:2", "h3:3", "h4:4", "h5:5", "h6:6", "h7:7", " h1:1 "]),
                   st.one_of(texts(), long_texts("h:1")))
CALLS = {
    "Join": st.fixed_dictionaries({
        "run_id": RUN_IDS, "address": ADDRESSES, "peer_id": mostly(st.just(""), peer_ids()),
        "last_round": rounds("round"), "epoch": rounds("epoch"), "has_state": st.booleans(),
        "name": mostly(st.text(max_size=8), texts()), "codecs": many(st.text(max_size=40)),
        "state_digest": digests(), "public_key": mostly(st.just(b""), st.binary(max_size=40)),
    }),
    "Heartbeat": st.fixed_dictionaries({
        "run_id": RUN_IDS, "peer_id": peer_ids(), "last_round": rounds("round"), "state_digest": digests(),
        "metrics": st.fixed_dictionaries({
            "step": uint64s(), "steps_per_s": absurd_floats(), "loss": absurd_floats(), "bytes_sent": uint64s(),
            "bytes_received": uint64s(), "activity": texts(), "samples": uint64s(), "eval_loss": absurd_floats(),
            "privacy_epsilon": absurd_floats(), "spread": absurd_floats(),
        }),
        "holds_results": st.booleans(),
        "held_results": many(st.fixed_dictionaries(
            {"round_id": rounds("round"), "epoch": rounds("epoch"), "digest": digests()}
        )),
    }),
    "Leave": st.fixed_dictionaries({"run_id": RUN_IDS, "peer_id": peer_ids(), "reason": texts()}),
    "Quorum": st.fixed_dictionaries({
        "run_id": RUN_IDS, "peer_id": peer_ids(), "last_round": rounds("round"),
        "tag": mostly(st.just(""), texts()), "state_digest": digests(),
    }),
    "Commit": st.fixed_dictionaries({
        "run_id": RUN_IDS, "peer_id": peer_ids(), "round_id": rounds("next"), "epoch": rounds("epoch"),
        "ok": st.booleans(), "failed_peers": mostly(st.just([]), many(peer_ids())), "reason": texts(),
        "report": st.fixed_dictionaries({"bytes_sent": uint64s(), "bytes_received": uint64s(),
                                         "wall_s": absurd_floats()}),
    }),
    "Status": st.fixed_dictionaries({"run_id": RUN_IDS}),
    # Not an RPC: a peer's round as a member plays it, Quorum then (if given a round) Commit of that round.
    "Cycle": st.fixed_dictionaries({
        "peer_id": peer_ids(), "last_round": rounds("round"), "tag": mostly(st.just(""), st.text(max_size=3)),
        "state_digest": digests(), "ok": mostly(st.just(True), st.just(False)),
        "failed_peers": mostly(st.just([]), st.lists(peer_ids(), max_size=3)),
    }),
}
# Joins and whole rounds more often than the other calls: they are what gets a run to deep states.
METHODS = ("Join", "Join", "Join", "Cycle", "Cycle", "Heartbeat", "Leave", "Quorum", "Commit", "Status")
# A call: its method, its fields, and how long after the step's previous call it starts (a Commit
# started a little after a Quorum call finds the round that call formed).
CALL = st.sampled_from(METHODS).flatmap(
    lambda method: st.tuples(st.just(method), CALLS[method], st.sampled_from([0.0, 0.0, 0.0, 0.06]))
)
STEPS = st.lists(st.lists(CALL, min_size=1, max_size=4), min_size=1, max_size=6)


class Run:
    """One coordinator under fuzzing, and what the calls made of it."""

    def __init__(self) -> None:
        self.coordinator = Coordinator(CoordinatorConfig(**CONFIG))
        self.joined: list[str] = []  # peer ids handed out by Join, in order
        self.joins = 0  # Join calls made

    def resolve(self, value):
        s = self.coordinator.state
        if isinstance(value, PeerRef):
            return self.joined[value.i % len(self.joined)] if self.joined else ""
        if isinstance(value, Near):
            if value.what == "digest":
                return s.last_digest
            base = {"round": s.last_committed_round, "next": s.next_round_id, "epoch": s.epoch}[value.what]
            return min(max(base + value.k, 0), U64_MAX)
        if isinstance(value, dict):
            return {k: self.resolve(v) for k, v in value.items()}
        if isinstance(value, list):
            return [self.resolve(v) for v in value]
        return value

    async def call(self, method: str, fields: dict, delay_s: float = 0.0):
        """Make one call (after delay_s); its response, or the Aborted it was refused with."""
        await asyncio.sleep(delay_s)
        if method == "Cycle":
            return await self.cycle(fields)
        request = REQUESTS[method](**self.resolve(fields))
        if method == "Join":
            self.joins += 1
        try:
            async with asyncio.timeout(CALL_TIMEOUT_S):
                response = await getattr(self.coordinator, method)(request, FakeContext())
        except Aborted as refused:
            assert refused.code in REFUSALS, f"{method} refused with {refused.code}: {refused}"
            return refused
        except TimeoutError:
            raise AssertionError(f"{method} did not answer within {CALL_TIMEOUT_S} s: it hangs") from None
        assert isinstance(response, RESPONSES[method]), f"{method} answered {type(response).__name__}"
        response.SerializeToString()
        if method == "Join" and not response.wait and response.peer_id not in self.joined:
            self.joined.append(response.peer_id)
        return response

    async def cycle(self, fields: dict):
        """A member's round: Quorum, then Commit of the round it was given (its decision, or the refusal)."""
        peer_id = self.resolve(fields["peer_id"])
        ask = {k: fields[k] for k in ("last_round", "tag", "state_digest")}
        plan = await self.call("Quorum", {"run_id": RUN, "peer_id": peer_id, **ask})
        if not isinstance(plan, pb.QuorumResponse) or plan.action != pb.QuorumResponse.ROUND:
            return plan
        report = {"run_id": RUN, "peer_id": peer_id, "round_id": plan.round_id, "epoch": plan.epoch, "ok": fields["ok"],
                  "failed_peers": [] if fields["ok"] else fields["failed_peers"]}
        return await self.call("Commit", report)

    def check_bounds(self) -> None:
        """The run's state after a step: within what was admitted, and able to go on."""
        s = self.coordinator.state
        assert len(s.peers) <= len(self.joined) <= self.joins, "more peers are known than were admitted"
        assert s.live <= set(s.peers) and len(s.live) <= CONFIG["max_peers"]
        assert set(s.by_address.values()) <= s.live
        assert len(s.waiting.waiters) <= self.joins
        assert len(self.coordinator.quorums.commits) <= 1, "more than one attempt in flight"
        # The next round's id and a bumped epoch still fit the protocol's uint64 fields.
        assert s.next_round_id <= U64_MAX, f"the next round id {s.next_round_id} does not fit a uint64"
        assert s.epoch < U64_MAX, f"the epoch {s.epoch} cannot be bumped within a uint64"
        document = json.dumps(self.coordinator.status(), allow_nan=False)  # strict JSON, as browsers parse it
        assert json.loads(document)["run_id"] == RUN

    async def honest_round(self) -> None:
        """A new, honest peer joins with the run's state and gets a round committed (retrying refusals a while)."""
        outcomes: list[str] = []
        try:
            async with asyncio.timeout(PROBE_S):
                while not await self._honest_attempt(outcomes):
                    await asyncio.sleep(0.1)
        except TimeoutError:
            raise AssertionError(f"an honest peer got no round committed in {PROBE_S} s: {outcomes[-5:]}") from None

    async def _honest_attempt(self, outcomes: list[str]) -> bool:
        """One try of honest_round's peer: join (again) at the run's round, ask, commit; True once committed."""
        s = self.coordinator.state
        join = pb.JoinRequest(run_id=RUN, address="honest:1", has_state=True, last_round=s.last_committed_round,
                              epoch=s.epoch, state_digest=s.last_digest)
        self.joins += 1
        try:
            joined = await self.coordinator.Join(join, FakeContext())
            if joined.wait:
                outcomes.append(f"wait: {joined.wait_reason}")
                return False
            if joined.peer_id not in self.joined:
                self.joined.append(joined.peer_id)
            ask = pb.QuorumRequest(run_id=RUN, peer_id=joined.peer_id, last_round=join.last_round,
                                   state_digest=join.state_digest)
            plan = await self.coordinator.Quorum(ask, FakeContext())
            if plan.action != pb.QuorumResponse.ROUND:
                outcomes.append(f"quorum answered {pb.QuorumResponse.Action.Name(plan.action)}")
                return False
            report = pb.CommitRequest(run_id=RUN, peer_id=joined.peer_id, round_id=plan.round_id, epoch=plan.epoch,
                                      ok=True)
            decision = await self.coordinator.Commit(report, FakeContext())
        except Aborted as refused:  # e.g. the run is full until the silent peers' leases end
            outcomes.append(str(refused))
            return False
        if not decision.commit:
            outcomes.append(f"round {plan.round_id} not committed: {decision.reason}")
        return decision.commit


async def play(steps: list[list[tuple[str, dict, float]]]) -> None:
    run = Run()
    run.coordinator.start_ticking()
    try:
        for step in steps:
            delays = itertools.accumulate(delay for _, _, delay in step)
            await asyncio.gather(*(run.call(method, fields, delay) for (method, fields, _), delay in zip(step, delays)))
            run.check_bounds()
        await run.honest_round()
        run.check_bounds()
    finally:
        await run.coordinator.stop()


@pytest.mark.fuzz_weight(6)  # an example takes ~0.2 s (the coordinator's tick and timeouts), others ~1 ms
def test_coordinator_answers_or_refuses_every_call_and_keeps_committing(fuzz):
    fuzz.quick_examples = 15
    fuzz.run(lambda steps: asyncio.run(play(steps)), STEPS)

