"""The processes of ``loconet bench membership``: a real coordinator and the simulated peers that drive it.

The coordinator is ``loconet coordinator`` exec'ed with ``--min-peers N``; the simulated peers are asyncio tasks
in spawned client processes (``peer/bench/simpeers.py``), commanded through pipes. ``SimSession`` starts both,
sends the clients their commands, gathers their replies and reaps everything on close.
"""

from __future__ import annotations

import json
import math
import multiprocessing as mp
import pathlib
import time

from collectives.net.rpc import blocking_channel
from peer.bench.kit import child_failed, proc_cpu_ns_s, proc_cpu_s, spawned_entry
from peer.bench.simpeers import CLIENT_SETTINGS, client_main
from peer.coordinator.limits import CoordinatorLimits
from peer.harness.processes import ChildFailed, CoordinatorProc
from protos import membership_pb2 as pb
from protos import membership_pb2_grpc as pb_grpc

RUN = "bench-membership"


def bench_rate_limits(peers: int) -> list[str]:
    """The coordinator's rate-limit options for ``peers`` simulated peers calling from one address.

    Each limit is the product's per-client default multiplied by the peers sharing the address (what as many
    real peers, each from its own address, would be allowed together), so the limiter checks every call and a
    runaway client would still be refused; nothing is exempt.
    """
    d = CoordinatorLimits()
    return [
        "--join-rate", f"{d.join_rate_per_s * peers:g}", "--join-burst", str(d.join_burst * peers),
        "--call-rate", f"{d.call_rate_per_s * peers:g}", "--call-burst", str(d.call_burst * peers),
        "--sessions-per-client", str(d.sessions_per_client * peers),
    ]


class SimSession:
    """A real coordinator process and the client processes whose simulated peers drive it; all reaped on close."""

    def __init__(self, peers: int, client_procs: int, heartbeat_s: float, lease_s: float, channels: int,
                 log_dir: pathlib.Path, tag: str, quorum_timeout_s: float, spread_s: float = 0.0,
                 allreduce_s: float = 0.0, unary: bool = False) -> None:
        self.peers = peers
        self.clients: list[tuple[mp.Process, object]] = []
        self.client_logs: list[pathlib.Path] = []
        self.coordinator: CoordinatorProc | None = None
        try:
            # CoordinatorProc stops its process itself if it is interrupted while starting.
            self.coordinator = CoordinatorProc(
                log_dir / f"coordinator-{tag}.log", RUN, 0,
                "--min-peers", str(peers), "--join-timeout", str(quorum_timeout_s), "--lease", str(lease_s),
                "--heartbeat", str(heartbeat_s), "--startup-grace", "0", "--dashboard-port", "-1",
                "--quorum-timeout", str(quorum_timeout_s), "--commit-timeout", str(quorum_timeout_s),
                # Simulated peers have no server to probe.
                "--no-probe",
                # They all call from one address: the per-client limits are the product's defaults times the
                # peers behind it (bench_rate_limits), so the limiter still runs on every call and its cost counts.
                *bench_rate_limits(peers), "--max-peers", str(max(peers, 1)),
                # Exec'ed: a coordinator forked from the fork server would carry torch's objects and pages, which
                # its CPU and memory figures must not include.
                fork=False,
            )
            self.pid = self.coordinator.proc.pid
            ctx = mp.get_context("spawn")
            procs = max(1, min(client_procs, peers))
            first = 0
            for i in range(procs):
                count = peers // procs + (1 if i < peers % procs else 0)
                job = {
                    "run_id": RUN, "address": self.coordinator.address, "first": first, "count": count,
                    "channels": max(1, min(channels, count)), "heartbeat_s": heartbeat_s,
                    "patience_s": quorum_timeout_s, "spread_s": spread_s, "allreduce_s": allreduce_s,
                    "unary": unary,
                }
                first += count
                parent, child = ctx.Pipe()
                log = log_dir / f"client-{tag}-{i}.log"
                proc = ctx.Process(
                    target=spawned_entry, args=(str(log), client_main, job, child), daemon=True,
                    name=f"client-{tag}-{i}",
                )
                proc.start()
                child.close()
                self.clients.append((proc, parent))
                self.client_logs.append(log)
        except BaseException:
            self.close()
            raise

    def send(self, message: dict) -> None:
        """Send a command to every client process."""
        for _, conn in self.clients:
            conn.send(message)

    def gather(self, kind: str, timeout_s: float) -> list[dict]:
        """One message of this kind from every client (ChildFailed on an error, a death or the timeout)."""
        replies: list[dict | None] = [None] * len(self.clients)
        deadline = time.monotonic() + timeout_s
        while any(r is None for r in replies):
            if time.monotonic() > deadline:
                late = [self.client_logs[i].stem for i, r in enumerate(replies) if r is None]
                raise ChildFailed(
                    f"{', '.join(late)} sent no {kind!r} within {timeout_s:g} s (logs in {self.client_logs[0].parent})"
                )
            if not self.coordinator.alive:
                raise ChildFailed(self.coordinator.exit_message("during the benchmark"))
            for i, (proc, conn) in enumerate(self.clients):
                if replies[i] is not None:
                    continue
                if conn.poll(0.05):
                    try:
                        msg = conn.recv()
                    except (EOFError, OSError):
                        proc.join(timeout=5)
                        raise child_failed(proc.name, proc.exitcode, self.client_logs[i]) from None
                    if msg.get("type") == "error":
                        raise ChildFailed(f"{proc.name} failed: {msg['error']} (log: {self.client_logs[i]})")
                    if msg.get("type") != kind:
                        raise ChildFailed(f"{proc.name} sent {msg.get('type')!r}, expected {kind!r}")
                    replies[i] = msg
                elif not proc.is_alive():
                    raise child_failed(proc.name, proc.exitcode, self.client_logs[i])
        return replies  # type: ignore[return-value]

    def cpu_s(self) -> float:
        """The coordinator's CPU-seconds so far (utime + stime, every thread)."""
        return proc_cpu_s(self.pid)

    def cpu_ns_s(self) -> float:
        """The same from its threads' nanosecond clocks (schedstat)."""
        return proc_cpu_ns_s(self.pid)

    def client_cpu_s(self) -> list[float]:
        """Each client process's CPU-seconds so far (NaN for one already gone)."""
        out = []
        for proc, _ in self.clients:
            try:
                out.append(proc_cpu_s(proc.pid))
            except (OSError, ValueError):
                out.append(math.nan)
        return out

    def status(self) -> dict:
        """The coordinator's Status reply, parsed."""
        with blocking_channel(self.coordinator.address, CLIENT_SETTINGS) as channel:
            reply = pb_grpc.CoordinatorStub(channel).Status(pb.StatusRequest(run_id=RUN), timeout=60)
        return json.loads(reply.json)

    def close(self) -> None:
        """Stop the clients (politely, then by force) and the coordinator."""
        for proc, conn in self.clients:
            try:
                if proc.is_alive():
                    conn.send({"cmd": "stop"})
            except (OSError, BrokenPipeError):
                pass
        deadline = time.monotonic() + 10
        for proc, conn in self.clients:
            proc.join(timeout=max(0.1, deadline - time.monotonic()))
            if proc.is_alive():
                proc.kill()
                proc.join(timeout=10)
            conn.close()
        self.clients = []
        coordinator, self.coordinator = self.coordinator, None
        if coordinator is not None:
            coordinator.stop()
