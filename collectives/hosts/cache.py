"""The shared-memory segments a Collective keeps mapped between hierarchical rounds (``collectives/hosts/round.py``).

A fresh segment per round paid for its tmpfs pages (allocation, zeroing, faults) every round; kept mapped, a round
writes into pages already in place. The cache holds one idle segment per process (the latest key: the run, the
host, its local members, the tensor size and this member's slot), drops it when the key changes or the collective
closes, and lets rounds of one process on the same segment take turns. What makes reuse safe between processes is
in ``HostSegment`` and ``docs/collectives.md`` ("Reuse across rounds").
"""

from __future__ import annotations

import asyncio
import os
import threading
import weakref

from collectives.errors import RoundFailed
from collectives.hosts.identity import SHM_DIR
from collectives.hosts.local import HostSegment


class SegmentCache:
    """The segments a Collective keeps mapped between rounds, so a round writes into pages already faulted in.

    At most one idle segment (the latest host's members and size: taking another key drops it). Rounds of one
    key in one process take turns. ``close`` drops them all; they are also dropped when the cache is garbage
    collected or the interpreter exits. Rounds run on one event loop; ``close`` may come from another thread.
    """

    def __init__(self, shm_dir: str = SHM_DIR) -> None:
        self.shm_dir = shm_dir
        self._idle: dict[tuple, HostSegment] = {}
        self._busy: dict[tuple, asyncio.Future] = {}
        self._closed = False
        self._lock = threading.Lock()
        self._finalizer = weakref.finalize(self, _drop_all, self._idle)

    async def take(self, key: tuple, name: str, n: int, numel: int, index: int, deadline_unix: float) -> HostSegment:
        """This key's segment for one round: the cached one if still the host's, else the one at its path (opened
        or created). Give it back with ``give``."""
        while key in self._busy:  # another round of this process on the same segment: after it
            await asyncio.shield(self._busy[key])
        self._busy[key] = asyncio.get_running_loop().create_future()
        try:
            with self._lock:
                if self._closed:
                    raise RoundFailed("the collective is closed")
                seg = self._idle.pop(key, None)
                others = [self._idle.pop(k) for k in list(self._idle)]
            for old in others:  # the members or the size changed: the old segment is not reused
                old.drop()
            if seg is not None and (seg.index != index or seg.abandoned()):
                seg.drop()
                seg = None
            if seg is None:
                seg = HostSegment(os.path.join(self.shm_dir, name), n, numel, index, deadline_unix)
            return seg
        except BaseException:
            self._release(key)
            raise

    def give(self, key: tuple, seg: HostSegment) -> None:
        """End a round with seg: kept for the next round if still mapped (a round that succeeded), else forgotten."""
        try:
            with self._lock:
                if not seg.closed and not self._closed:
                    self._idle[key] = seg
                    seg = None
            if seg is not None and not seg.closed:
                seg.drop()
        finally:
            self._release(key)

    def reopen(self, key: tuple, seg: HostSegment, name: str, deadline_unix: float) -> HostSegment:
        """Drop seg (no longer the host's) and open the one now at its path."""
        seg.drop()
        return HostSegment(os.path.join(self.shm_dir, name), seg.layout.n, seg.layout.numel, seg.index, deadline_unix)

    def _release(self, key: tuple) -> None:
        done = self._busy.pop(key, None)
        if done is not None and not done.done():
            done.set_result(None)

    def close(self) -> None:
        """Drop every idle segment (a round in progress drops its own when it ends). Idempotent."""
        with self._lock:
            self._closed = True
            idle = list(self._idle.values())
            self._idle.clear()
        for seg in idle:
            seg.drop()

    @property
    def cached(self) -> list[str]:
        """Paths of the segments kept between rounds."""
        with self._lock:
            return [seg.path for seg in self._idle.values()]


def _drop_all(idle: dict) -> None:
    for seg in list(idle.values()):
        seg.drop()
    idle.clear()
