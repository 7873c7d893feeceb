"""Bounded time series the coordinator keeps for its dashboard's charts.

Memory is bounded twice. A ``Series`` holds at most ``points`` points: when
it is full, every other point of its older half is dropped, so the series
still spans the whole run, just coarser in the past (a curve of cumulative
counters stays exact: the rate between two kept points is the average over
the dropped ones). A ``SeriesBook`` holds the series of at most ``peers``
peers: a new peer takes the place of the series updated least recently among
those its ``evictable`` test allows (the coordinator allows peers that left
or were lost), and gets no series while every place is held by a peer that
must stay (so a run with more live peers than places keeps steady curves for
the first ones instead of churning through all). A book therefore holds at
most ``points * peers`` points.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Iterator


class Series:
    """At most ``points`` points, oldest first; thinned (not cut) when full."""

    def __init__(self, points: int) -> None:
        if points < 4:
            raise ValueError(f"a series needs room for at least 4 points, got {points}")
        self.points = points
        self._items: list[tuple] = []

    def append(self, point: tuple) -> None:
        """Add the newest point; thin the older half when over the bound."""
        self._items.append(point)
        if len(self._items) > self.points:
            half = self.points // 2
            # Keep every other point of the older half: the curve stays whole, just coarser.
            self._items = self._items[:half:2] + self._items[half:]

    @property
    def last(self) -> tuple | None:
        """The newest point, or None when empty."""
        return self._items[-1] if self._items else None

    def as_lists(self) -> list[list]:
        """The points as JSON-ready lists, oldest first."""
        return [list(p) for p in self._items]

    def __len__(self) -> int:
        return len(self._items)

    def __iter__(self) -> Iterator[tuple]:
        return iter(self._items)


def _always(peer_id: str) -> bool:
    return True


class SeriesBook:
    """A ``Series`` per peer, for at most ``peers`` peers (a new one replaces the stalest evictable one)."""

    def __init__(
        self, points: int, peers: int, evictable: Callable[[str], bool] = _always,
        generation: Callable[[], int] | None = None,
    ) -> None:
        """``generation()``, if given, changes whenever ``evictable`` may say yes to a peer it said no to: a full
        book then skips the search for a place until it does (at 1,000 peers and 64 places, every heartbeat of
        a peer without a place would otherwise test all 64)."""
        if peers < 1:
            raise ValueError(f"a series book needs room for at least 1 peer, got {peers}")
        self.points = points
        self.peers = peers
        self._evictable = evictable
        self._generation = generation
        # The generation at which a search found no evictable place (None: search next time).
        self._no_place_at: int | None = None
        self._series: OrderedDict[str, Series] = OrderedDict()

    def get(self, peer_id: str) -> Series | None:
        """The peer's series, or None; reading does not count as an update."""
        return self._series.get(peer_id)

    def append(self, peer_id: str, point: tuple) -> bool:
        """Add a point to the peer's series (created on first use); False if every place is held by one that stays."""
        series = self._series.get(peer_id)
        if series is None:
            if len(self._series) >= self.peers:
                generation = self._generation() if self._generation is not None else None
                if generation is not None and generation == self._no_place_at:
                    return False  # nothing became evictable since the last search
                # The dict is in update order: the first evictable one is the stalest.
                stale = next((p for p in self._series if self._evictable(p)), None)
                if stale is None:
                    self._no_place_at = generation
                    return False
                del self._series[stale]
            series = self._series[peer_id] = Series(self.points)
        else:
            self._series.move_to_end(peer_id)
        series.append(point)
        return True

    def as_dict(self) -> dict[str, list[list]]:
        """{peer id: points as lists}, JSON-ready."""
        return {peer_id: series.as_lists() for peer_id, series in self._series.items()}

    def __len__(self) -> int:
        return len(self._series)
