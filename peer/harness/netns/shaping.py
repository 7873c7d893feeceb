"""How a host's link is shaped: its caps in bit/s, the tbf qdisc that holds it to them, its TCP congestion control.

Shaping (``tbf_parameters``): rate = the cap; burst = max(rate x 10 ms,
4096 bytes); queue limit = burst + rate x 100 ms (clamped to 16 KiB .. 64 MiB: about ten
full frames at least, so a slow link still takes a few in a row; before
2026-12-06 the floor was 64 KiB, 2.6 s of queue at 200 kbit/s, and the
heartbeats queued behind a round's bytes lapsed the harness's 3 s leases).
10 ms of burst is at least rate/HZ for any kernel HZ >= 100 (so the bucket
can always refill between timer ticks and the full rate is reachable) yet lets
through at most 1 % more than the cap over one second, from 10 Mbit/s to
10 Gbit/s. The 100 ms queue absorbs TCP's bursts without turning every
overshoot into a loss (a drop-tail queue like a home router's). tbf counts
Ethernet frames, so TCP goodput is about 1448/1514 = 96 % of the cap.

Congestion control (``NetnsNetwork.set_congestion_control``): a new namespace starts with
the host's default algorithm, which may be bbr. Through 100 Mbit/s tbf links
our all-reduce rounds used 0.84-0.89 of the cap under bbr and 0.94 under reno
(BENCHMARKS.md, issue 18), so ``bench allreduce --netns`` gives each namespace the
loss-based control most Linux hosts run (``LOSS_BASED_CONTROLS``: cubic, the
kernel's default, else reno where cubic is not allowed), the same for gloo and
for us.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from collectives.net.ratelimit import burst_bytes

# tbf: see the module docstring (its burst: collectives.net.ratelimit.burst_bytes).
QUEUE_SECONDS = 0.100
MIN_QUEUE_BYTES = 16 * 1024
MAX_QUEUE_BYTES = 64 * 1024 * 1024

# Loss-based TCP congestion controls in order of preference: cubic is Linux's default; a namespace may set
# only those in net.ipv4.tcp_allowed_congestion_control, where reno always is.
LOSS_BASED_CONTROLS = ("cubic", "reno")


@dataclass(frozen=True)
class LinkSpec:
    """Caps of one host's link in bits/s; None: no cap in that direction."""

    up_bps: float | None = None  # egress of the host (namespace -> bridge)
    down_bps: float | None = None  # ingress of the host (bridge -> namespace)

    def __post_init__(self) -> None:
        for field_name in ("up_bps", "down_bps"):
            v = getattr(self, field_name)
            if v is not None and not (math.isfinite(v) and v >= 8000):
                raise ValueError(f"LinkSpec.{field_name} must be None or a rate of at least 8000 bit/s, got {v!r}")


def tbf_parameters(bps: float) -> tuple[int, int, int]:
    """(rate in bit/s, burst in bytes, queue limit in bytes) of the tbf qdisc that caps a link at bps."""
    rate_bytes = bps / 8.0
    burst = burst_bytes(rate_bytes)
    queue = min(MAX_QUEUE_BYTES, max(MIN_QUEUE_BYTES, math.ceil(rate_bytes * QUEUE_SECONDS)))
    return round(bps), burst, burst + queue
