"""An in-process coordinator on its own event-loop thread, for tests of peers against a real Coordinator service."""

from __future__ import annotations

import asyncio
import threading

from peer.coordinator.config import CoordinatorConfig
from peer.coordinator.server import CoordinatorServer


class CoordinatorThread:
    """An in-process CoordinatorServer on its own event-loop thread."""

    def __init__(self, config: CoordinatorConfig) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="test-coordinator", daemon=True)
        self.thread.start()

        async def make() -> CoordinatorServer:
            server = CoordinatorServer(config)
            await server.start()
            return server

        self.server = self.call(make())

    def call(self, coro):
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout=30)

    def status(self) -> dict:
        async def snapshot() -> dict:
            return self.server.coordinator.status()

        return self.call(snapshot())

    def close(self) -> None:
        try:
            self.call(self.server.stop())
        finally:
            self.loop.call_soon_threadsafe(self.loop.stop)
            self.thread.join(timeout=10)
            self.loop.close()
