"""Test-only processes: the toy peer (tests/support/toy_peer.py), and a coordinator with ``loconet peer`` daemons
(``DaemonRun``); the rest comes from peer.harness.processes."""

from __future__ import annotations

import pathlib
import sys

from peer.harness.processes import CoordinatorProc, Proc, daemon_peer, stop_all

__all__ = ["SMALL", "CoordinatorProc", "DaemonRun", "Proc", "daemon_peer", "stop_all", "toy_peer"]

TOY_PEER = pathlib.Path(__file__).with_name("toy_peer.py")


def toy_peer(log_dir: pathlib.Path, coordinator: str, run: str, name: str, *extra: str) -> Proc:
    """Start a toy peer (tests/support/toy_peer.py) named name."""
    args = [sys.executable, str(TOY_PEER), "--coordinator", coordinator, "--run", run, "--name", name, *extra]
    return Proc(args, log_dir / f"{name}.log")




# A model small enough that a few peers train it on the test machine's two cores in seconds.
SMALL = (
    "--d-model", "32", "--layers", "2", "--heads", "2", "--seq-len", "32", "--batch-size", "8", "--sync-every", "10"
)


class DaemonRun:
    """A coordinator process and the ``loconet peer`` daemons a test adds (all stopped by ``close``).

    The coordinator has short leases, no startup grace and min-peers 2 (no round forms before a second peer
    joined, so a slow start cannot leave one peer training alone); ``coordinator_args`` add to those.
    """

    def __init__(self, tmp: pathlib.Path, run: str, *coordinator_args: str) -> None:
        self.tmp = tmp
        self.run = run
        self.coordinator = CoordinatorProc(
            tmp / "coordinator.log", run, 0, "--join-timeout", "3", "--lease", "3", "--heartbeat", "0.5",
            "--startup-grace", "0", "--min-peers", "2", *coordinator_args,
        )
        self.peers: dict[str, Proc] = {}

    def add(self, name: str, *extra: str) -> Proc:
        """Start a peer named name, training SMALL with extra options."""
        p = daemon_peer(self.tmp, self.coordinator.address, self.run, name, *SMALL, *extra)
        self.peers[name] = p
        return p

    def close(self) -> None:
        """Stop every peer, then the coordinator."""
        stop_all(list(self.peers.values()))
        self.coordinator.stop()
