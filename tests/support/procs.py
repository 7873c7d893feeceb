"""Test-only processes: the toy peer (tests/support/toy_peer.py); the rest comes from peer.harness.processes."""

from __future__ import annotations

import pathlib
import sys

from peer.harness.processes import CoordinatorProc, Proc, daemon_peer, stop_all

__all__ = ["CoordinatorProc", "Proc", "daemon_peer", "stop_all", "toy_peer"]

TOY_PEER = pathlib.Path(__file__).with_name("toy_peer.py")


def toy_peer(log_dir: pathlib.Path, coordinator: str, run: str, name: str, *extra: str) -> Proc:
    """Start a toy peer (tests/support/toy_peer.py) named name."""
    args = [sys.executable, str(TOY_PEER), "--coordinator", coordinator, "--run", run, "--name", name, *extra]
    return Proc(args, log_dir / f"{name}.log")


