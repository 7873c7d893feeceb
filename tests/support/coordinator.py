"""An in-process coordinator on its own event-loop thread, for tests of peers against a real Coordinator service."""

from __future__ import annotations

import contextlib
import hashlib
import threading
from collections.abc import Callable, Iterator

import grpc

from collectives.net.rpc import blocking_channel
from peer.coordinator.config import CoordinatorConfig
from peer.coordinator.thread import CoordinatorThread
from protos import membership_pb2 as pb
from protos import membership_pb2_grpc as pb_grpc

__all__ = ["RUN", "CoordinatorThread", "Live", "digest", "live_coordinators", "run_workers"]

# The run of a Live coordinator's made-up peers.
RUN = "durable"


def run_workers(config: CoordinatorConfig, worker: Callable[[int, str], None], n: int, timeout_s: float = 90.0) -> None:
    """Run worker(rank, coordinator address) for ranks 0..n-1 in threads around a coordinator; fail if one is stuck."""
    with CoordinatorThread(config) as coord:
        threads = [threading.Thread(target=worker, args=(r, coord.address), daemon=True) for r in range(n)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=timeout_s)
        assert not any(t.is_alive() for t in threads), "a worker is stuck"


def digest(round_id: int) -> str:
    """The state digest of round round_id in these tests."""
    return hashlib.sha256(f"state of round {round_id}".encode()).hexdigest()


class Live:
    """A coordinator on its own thread and a blocking stub to it (run RUN; peers report digest(r) of round r)."""

    def __init__(self, config: CoordinatorConfig) -> None:
        self.thread = CoordinatorThread(config)
        self.address = self.thread.address
        self.channel = blocking_channel(self.address)
        self.stub = pb_grpc.CoordinatorStub(self.channel)
        self.closed = False

    def status(self) -> dict:
        return self.thread.status()

    def events(self, kind: str) -> list[dict]:
        return [e for e in self.status()["events"] if e["kind"] == kind]

    def join(self, address: str, **fields) -> pb.JoinResponse:
        return self.stub.Join(pb.JoinRequest(run_id=RUN, address=address, **fields), timeout=5)

    def ask(self, peer_id: str, last_round: int, state: str | None = None) -> grpc.Future:
        """A peer's quorum request, reporting the digest of its last round (state overrides it)."""
        reported = (digest(last_round) if last_round else "") if state is None else state
        request = pb.QuorumRequest(run_id=RUN, peer_id=peer_id, last_round=last_round, state_digest=reported)
        return self.stub.Quorum.future(request, timeout=20)

    def play(self, peers: list[str], last_round: int) -> pb.QuorumResponse:
        """Every peer asks, every one reports success: the round commits. The first peer's plan."""
        plans = [f.result() for f in [self.ask(p, last_round) for p in peers]]
        assert all(p.action == pb.QuorumResponse.ROUND for p in plans)
        reports = [
            self.stub.Commit.future(
                pb.CommitRequest(run_id=RUN, peer_id=p, round_id=plan.round_id, epoch=plan.epoch, ok=True), timeout=20
            )
            for p, plan in zip(peers, plans)
        ]
        assert all(f.result().commit for f in reports)
        return plans[0]

    def leave(self, peer_id: str, last_round: int = 0) -> None:
        """A peer leaves; with last_round, reporting digest(last_round) as its state's."""
        reported = digest(last_round) if last_round else ""
        request = pb.LeaveRequest(
            run_id=RUN, peer_id=peer_id, reason="stopped", last_round=last_round, state_digest=reported
        )
        self.stub.Leave(request, timeout=5)

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            self.channel.close()
            self.thread.close()


# A coordinator for peers played by hand: rounds form at once, from one peer on, and leases outlast a test.
BY_HAND = {"run_id": RUN, "port": 0, "dashboard_port": None, "startup_grace_s": 0.0, "min_peers": 1,
           "join_timeout_s": 0.5, "heartbeat_s": 0.5, "lease_s": 30.0}


@contextlib.contextmanager
def live_coordinators(defaults: dict) -> Iterator[Callable[..., Live]]:
    """A factory of Live coordinators (defaults overridden by keywords); all are stopped on leaving."""
    made: list[Live] = []

    def start(**settings) -> Live:
        made.append(Live(CoordinatorConfig(**{**defaults, **settings})))
        return made[-1]

    try:
        yield start
    finally:
        for c in reversed(made):
            c.close()
