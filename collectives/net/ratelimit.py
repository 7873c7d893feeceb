"""Bandwidth caps: parse "100mbit"-style rates and pace bytes with a token bucket.

The transport uses one bucket for what a peer sends and one for what it
receives, so a wide-area link can be emulated on loopback.
"""

from __future__ import annotations

import asyncio
import math
import re
import time

from collectives.errors import ConfigError

_UNITS = {
    "bit": 1,
    "kbit": 1e3,
    "mbit": 1e6,
    "gbit": 1e9,
    "tbit": 1e12,
    "b": 8,
    "kb": 8e3,
    "mb": 8e6,
    "gb": 8e9,
}
_RATE = re.compile(r"^\s*([0-9]*\.?[0-9]+(?:e[0-9]+)?)\s*([a-z]*)\s*$")


# Read as bits by some and as bytes by tc (which --netns drives): refused rather than guessed (probe K).
_AMBIGUOUS = ("bps", "kbps", "mbps", "gbps")


def parse_bandwidth(text: str) -> float:
    """Parse a rate such as "100mbit", "1gbit", "12.5MB" (bytes) into bits per second."""
    m = _RATE.match(text.lower())
    if m and m.group(2) in _AMBIGUOUS:
        unit = m.group(2)
        raise ConfigError(
            f"bandwidth {text!r} is ambiguous: tc reads {unit} as bytes per second, many people as bits; write "
            f"{m.group(1)}{unit[:-3]}bit for bits or {m.group(1)}{unit[:-3]}b for bytes per second"
        )
    if not m or m.group(2) not in _UNITS:
        units = ", ".join(sorted(_UNITS))
        raise ConfigError(f"cannot read bandwidth {text!r}; write a number and a unit such as 100mbit ({units})")
    bits = float(m.group(1)) * _UNITS[m.group(2)]
    if bits <= 0:
        raise ConfigError(f"bandwidth must be positive, got {text!r}")
    return bits


def format_bandwidth(bits_per_s: float) -> str:
    """Render bits per second the way parse_bandwidth reads it."""
    for unit, scale in (("gbit", 1e9), ("mbit", 1e6), ("kbit", 1e3)):
        if bits_per_s >= scale:
            return f"{bits_per_s / scale:g}{unit}"
    return f"{bits_per_s:g}bit"


# A link's burst, as a kernel's tbf qdisc has it: 10 ms of the rate (at least rate/HZ for any HZ >= 100), at least a
# page. The harness's capped links (peer/harness/netns/shaping.py) and the transport's own buckets share it.
BURST_SECONDS = 0.010
MIN_BURST_BYTES = 4096


def burst_bytes(bytes_per_s: float) -> int:
    """The burst of a link capped at bytes_per_s: what may pass at once after it idled."""
    return max(MIN_BURST_BYTES, math.ceil(bytes_per_s * BURST_SECONDS))


class TokenBucket:
    """Paces byte counts to a rate; callers await ``acquire`` before (or after) moving bytes.

    The bucket may go into debt for one large message and then makes its
    callers wait the debt off, so concurrent senders share the rate fairly
    and the long-run rate never exceeds the cap. Not thread-safe: use it from
    one event loop.
    """

    def __init__(self, bytes_per_s: float, burst_bytes: float) -> None:
        if bytes_per_s <= 0 or burst_bytes <= 0:
            raise ConfigError("token bucket rate and burst must be positive")
        self.rate = float(bytes_per_s)
        self.burst = float(burst_bytes)
        self._tokens = self.burst
        self._last = time.monotonic()

    def _refill(self) -> None:
        now = time.monotonic()
        self._tokens = min(self.burst, self._tokens + (now - self._last) * self.rate)
        self._last = now

    def reserve(self, nbytes: int) -> float:
        """Take nbytes of tokens now; return how many seconds the caller must wait."""
        self._refill()
        self._tokens -= nbytes
        return max(0.0, -self._tokens / self.rate)

    async def acquire(self, nbytes: int) -> None:
        """Wait until nbytes may pass."""
        delay = self.reserve(nbytes)
        if delay > 0:
            await asyncio.sleep(delay)
