"""A coordinator inside this process, on its own event-loop thread (benchmarks that host their own run, tests)."""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import Coroutine
from typing import Any, TypeVar

from peer.coordinator.config import CoordinatorConfig
from peer.coordinator.server import CoordinatorServer

T = TypeVar("T")
log = logging.getLogger(__name__)
# Starting, stopping and snapshotting a coordinator takes milliseconds; this long means it is stuck.
CALL_TIMEOUT_S = 30.0


class CoordinatorThread:
    """A CoordinatorServer on its own event-loop thread; ``close()`` stops both (use it as a context manager)."""

    def __init__(self, config: CoordinatorConfig) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="coordinator", daemon=True)
        self.thread.start()

        async def make() -> CoordinatorServer:
            server = CoordinatorServer(config)
            await server.start()
            return server

        try:
            self.server = self.call(make())
        except BaseException:
            self._stop_loop()
            raise

    @property
    def address(self) -> str:
        """host:port peers dial."""
        return self.server.address

    def call(self, coro: Coroutine[Any, Any, T]) -> T:
        """Run a coroutine on the coordinator's loop and return its result."""
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout=CALL_TIMEOUT_S)

    def status(self) -> dict:
        """The coordinator's status (what /api/status serves)."""

        async def snapshot() -> dict:
            return self.server.coordinator.status()

        return self.call(snapshot())

    def close(self) -> None:
        """Stop the server, then the loop and its thread."""
        try:
            self.call(self.server.stop())
        finally:
            self._stop_loop()

    def _stop_loop(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(timeout=CALL_TIMEOUT_S)
        if self.thread.is_alive():
            # A loop stuck in a callback: closing it would raise and hide the caller's own error (as __exit__).
            log.warning("the coordinator's event loop did not stop within %.0f s; left to the process's exit",
                        CALL_TIMEOUT_S)
            return
        self.loop.close()

    def __enter__(self) -> CoordinatorThread:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
