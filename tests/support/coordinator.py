"""An in-process coordinator on its own event-loop thread, for tests of peers against a real Coordinator service."""

from __future__ import annotations

import threading
from collections.abc import Callable

from peer.coordinator.config import CoordinatorConfig
from peer.coordinator.thread import CoordinatorThread

__all__ = ["CoordinatorThread", "run_workers"]


def run_workers(config: CoordinatorConfig, worker: Callable[[int, str], None], n: int, timeout_s: float = 90.0) -> None:
    """Run worker(rank, coordinator address) for ranks 0..n-1 in threads around a coordinator; fail if one is stuck."""
    with CoordinatorThread(config) as coord:
        threads = [threading.Thread(target=worker, args=(r, coord.address), daemon=True) for r in range(n)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=timeout_s)
        assert not any(t.is_alive() for t in threads), "a worker is stuck"
