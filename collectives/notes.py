"""A log line that repeats for as long as its cause does, said at once and then now and then, not on every try."""

from __future__ import annotations

import logging
import math
import time

# A repeated note is logged at warning level this often (the first time at once); the repeats in between at debug.
NOTE_EVERY_S = 30.0


class RepeatNote:
    """Logs a warning when its key is new or was last said ``every_s`` ago; the repeats in between at debug level."""

    def __init__(self, logger: logging.Logger, every_s: float = NOTE_EVERY_S) -> None:
        self._log = logger
        self._every_s = every_s
        self._key = ""
        self._when = -math.inf

    @property
    def key(self) -> str:
        """The key of the latest note ("" before any)."""
        return self._key

    def note(self, key: str, message: str, *args: object) -> None:
        """Log message % args: as a warning if key differs from the last note's or was said long enough ago."""
        now = time.monotonic()
        if key != self._key or now - self._when >= self._every_s:
            self._log.warning(message, *args)
            self._key, self._when = key, now
        else:
            self._log.debug(message, *args)
