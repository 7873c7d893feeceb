"""Steps per second, as a peer's status reports them (the optimizer's, and the training loop's)."""

from __future__ import annotations

import math


class StepRate:
    """Steps per second, measured over windows of at least window_s seconds (NaN until the first one closes)."""

    def __init__(self, window_s: float = 1.0) -> None:
        self.window_s = window_s
        self.rate = math.nan
        self._start: float | None = None
        self._steps = 0

    def tick(self, now: float) -> float:
        """Count a step finished at now (seconds, monotonic); return the rate of the last closed window."""
        if self._start is None:  # the first step opens the window: the time before it (joining) is not training
            self._start = now
            return self.rate
        self._steps += 1
        elapsed = now - self._start
        if elapsed >= self.window_s:
            self.rate = self._steps / elapsed
            self._start, self._steps = now, 0
        return self.rate
