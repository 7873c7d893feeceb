"""What a long benchmark is doing, on stderr: stdout carries the report alone.

On a terminal, a live line names the run in progress, its detail (a step or
round count) and the time it has taken, redrawn twice a second; each run
that ends leaves one line behind. Elsewhere (a pipe, a CI log) only those
lines are written, one per finished run, so a log does not fill with
redraws.
"""

from __future__ import annotations

import sys
import threading
import time
from collections.abc import Callable
from typing import Self, TextIO

CLEAR_LINE = "\r\x1b[K"


class Progress:
    """Progress of one benchmark command: ``begin`` a run, ``end`` it with a note; ``close`` when done."""

    def __init__(
        self, bench: str, out: TextIO | None = None, live: bool | None = None, enabled: bool = True,
        interval_s: float = 0.5,
    ) -> None:
        self.bench = bench
        self.out = sys.stderr if out is None else out
        self.enabled = enabled
        # A live line only where someone watches it redraw: a terminal.
        self.live = enabled and (self.out.isatty() if live is None else live)
        self.interval_s = interval_s
        self._lock = threading.Lock()
        self._run: str | None = None
        self._detail: Callable[[], str] | None = None
        self._started = 0.0
        self._stop = threading.Event()
        self._ticker: threading.Thread | None = None

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def begin(self, run: str, detail: Callable[[], str] | None = None) -> None:
        """A run starts; ``detail()`` (read at each redraw, from another thread) says how far it is."""
        with self._lock:
            self._run, self._detail, self._started = run, detail, time.monotonic()
        if self.live and self._ticker is None:
            self._ticker = threading.Thread(target=self._tick, name=f"bench-{self.bench}-progress", daemon=True)
            self._ticker.start()
        self._draw()

    def end(self, note: str = "") -> None:
        """The current run finished: one line with its time and ``note`` (e.g. its loss)."""
        with self._lock:
            run, self._run = self._run, None
            elapsed = time.monotonic() - self._started
        if not self.enabled or run is None:
            return
        text = f"loconet bench {self.bench}: {run} done in {elapsed:.1f} s" + (f" ({note})" if note else "")
        self._write((CLEAR_LINE if self.live else "") + text + "\n")

    def close(self) -> None:
        """Stop redrawing and clear the live line."""
        self._stop.set()
        if self._ticker is not None:
            self._ticker.join(timeout=2)
            self._ticker = None
        if self.live:
            self._write(CLEAR_LINE)

    def status(self) -> str:
        """The live line's text: bench, run, detail and elapsed seconds ('' between runs)."""
        with self._lock:
            run, detail, started = self._run, self._detail, self._started
        if run is None:
            return ""
        try:
            what = detail() if detail is not None else ""
        except Exception:  # noqa: BLE001 -- a display must never break the benchmark it shows
            what = ""
        return (
            f"loconet bench {self.bench}: {run}" + (f", {what}" if what else "")
            + f" ({time.monotonic() - started:.0f} s)"
        )

    def _tick(self) -> None:
        while not self._stop.wait(self.interval_s):
            self._draw()

    def _draw(self) -> None:
        if self.live:
            text = self.status()
            if text:
                self._write(CLEAR_LINE + text)

    def _write(self, text: str) -> None:
        with self._lock:
            try:
                self.out.write(text)
                self.out.flush()
            except (OSError, ValueError):  # stderr closed under us: progress is not worth failing for
                pass


def progress_for(bench: str, quiet: int = 0) -> Progress:
    """The progress display of ``loconet bench <bench>`` on stderr; none with -q."""
    return Progress(bench, enabled=not quiet)
