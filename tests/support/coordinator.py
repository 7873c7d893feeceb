"""An in-process coordinator on its own event-loop thread, for tests of peers against a real Coordinator service."""

from peer.coordinator.thread import CoordinatorThread

__all__ = ["CoordinatorThread"]
