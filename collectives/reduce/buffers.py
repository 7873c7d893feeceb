"""Reusing big buffers between rounds.

A round of a 100 MB tensor touches several hundred MB of fresh memory; when
every round allocates it anew, the OS has to supply and zero those pages again
and page faults cost more than the copies themselves. A ``BufferPool`` hands
the same buffers to the next round of the same size (see also
``collectives.allocator.tune_malloc``).
"""

from __future__ import annotations

import threading

import torch


class BufferPool:
    """Flat fp32 buffers by size, taken for a round and given back after it; thread-safe."""

    def __init__(self, keep_per_size: int = 4) -> None:
        self.keep_per_size = keep_per_size
        self._free: dict[int, list[torch.Tensor]] = {}
        self._lock = threading.Lock()

    def take(self, numel: int) -> torch.Tensor:
        """A 1-D fp32 tensor of numel elements with undefined contents."""
        with self._lock:
            free = self._free.get(numel)
            if free:
                return free.pop()
        return torch.empty(numel, dtype=torch.float32)

    def give(self, buf: torch.Tensor) -> None:
        """Return a buffer taken from this pool; the caller must not use it afterwards."""
        with self._lock:
            free = self._free.setdefault(buf.numel(), [])
            if len(free) < self.keep_per_size:
                free.append(buf)

    def clear(self) -> None:
        """Drop every pooled buffer."""
        with self._lock:
            self._free.clear()
