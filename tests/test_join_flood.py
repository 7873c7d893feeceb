"""A flood of joins from one client leaves a running run committing, and the coordinator's memory bounded
(issue 13: "100,000 Join calls made the coordinator know 100,002 peers").

A real coordinator process and two toy peers train; the test, one client on 127.0.0.1, sends 1,000 Join calls
as fast as it can. The per-client rate limit refuses all but a burst (RESOURCE_EXHAUSTED, counted), the few
made-up peers it let in never heartbeat and are dropped and then forgotten, and rounds keep committing. The
coordinator's RSS before and after is printed (BENCHMARKS.md), never asserted: memory is bounded by what the
status says it holds.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import grpc
import pytest

from collectives.net.rpc import blocking_channel
from protos import membership_pb2 as pb
from protos import membership_pb2_grpc as pb_grpc

sys.path.insert(0, str(Path(__file__).parent))
from support.procs import CoordinatorProc, stop_all, toy_peer

pytestmark = pytest.mark.timeout(240)

RUN = "flood"
JOINS = 1000


def rss_kb(pid: int) -> int:
    """Resident memory of a process (kB), from /proc."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError(f"no VmRSS for process {pid}")


def status(stub: pb_grpc.CoordinatorStub) -> dict:
    return json.loads(stub.Status(pb.StatusRequest(run_id=RUN), timeout=10).json)


def wait_for(stub, condition, what: str, timeout_s: float = 60.0) -> dict:
    give_up = time.monotonic() + timeout_s
    while True:
        try:
            doc = status(stub)
        except grpc.RpcError as exc:  # a connection still being made is not what this test is about
            if exc.code() != grpc.StatusCode.UNAVAILABLE:
                raise
            doc = None
        if doc is not None and condition(doc):
            return doc
        assert time.monotonic() < give_up, f"timed out waiting for {what}"
        time.sleep(0.2)


def test_a_thousand_joins_from_one_client_leave_the_run_committing_and_the_coordinator_small(tmp_path, capsys):
    coordinator = CoordinatorProc(
        tmp_path / "coordinator.log", RUN, 0, "--lease", "2", "--heartbeat", "0.3", "--join-timeout", "2",
        "--min-peers", "2", "--dashboard-port", "-1",
    )
    procs = [coordinator]
    try:
        for name in ("a", "b"):
            procs.append(toy_peer(tmp_path, coordinator.address, RUN, name, "--numel", "5000", "--interval", "0.05"))
        with blocking_channel(coordinator.address) as channel:
            stub = pb_grpc.CoordinatorStub(channel)
            before = wait_for(stub, lambda d: d["last_committed_round"] >= 2, "the run's first rounds")
            rss_before = rss_kb(coordinator.proc.pid)
            started = time.monotonic()
            calls = [
                stub.Join.future(pb.JoinRequest(run_id=RUN, address=f"10.9.{i // 250}.{i % 250}:1", has_state=False),
                                 timeout=30)
                for i in range(JOINS)
            ]
            codes = []
            for call in calls:
                try:
                    call.result()
                    codes.append("OK")
                except grpc.RpcError as exc:
                    codes.append(exc.code().name)
            flood_s = time.monotonic() - started
            after = wait_for(
                stub, lambda d: d["last_committed_round"] >= before["last_committed_round"] + 3,
                "rounds to go on committing after the flood",
            )
            # The made-up peers never heartbeat: dropped at their lease, then forgotten.
            settled = wait_for(stub, lambda d: len(d["peers"]) <= 2 + 64, "the made-up peers to be forgotten")
            rss_after = rss_kb(coordinator.proc.pid)
        admitted = codes.count("OK")
        assert codes.count("RESOURCE_EXHAUSTED") == JOINS - admitted and admitted < 100
        assert sum(after["rate_limited"].values()) == JOINS - admitted
        assert len(json.dumps(settled)) < 1 << 20
        with capsys.disabled():
            print(json.dumps({
                "joins": JOINS, "flood_s": round(flood_s, 2), "admitted": admitted,
                "refused": JOINS - admitted, "rss_kb_before": rss_before, "rss_kb_after": rss_after,
                "rounds_before": before["last_committed_round"], "rounds_after": after["last_committed_round"],
                "peers_known_after": len(settled["peers"]),
            }))
    finally:
        stop_all(procs[1:])
        stop_all(procs[:1])
