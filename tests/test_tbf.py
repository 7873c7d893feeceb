"""The tbf qdisc the harness and `bench allreduce --netns` cap links with: its burst and queue, per rate."""

from __future__ import annotations

import pytest

from peer.harness.netns.shaping import tbf_parameters


@pytest.mark.parametrize(
    ("bps", "burst", "limit"),
    [
        # 10 ms of burst (at least 4096 B), then 100 ms of queue...
        (100e6, 125_000, 125_000 + 1_250_000),
        (20e6, 25_000, 25_000 + 250_000),
        # ...but at least 16 KiB of queue: at 200 kbit/s that is 0.65 s of standing queue, where the 64 KiB floor
        # before it made 2.6 s, and heartbeats queued behind a round's bytes lapsed 3 s leases.
        (200e3, 4096, 4096 + 16384),
        (10e3, 4096, 4096 + 16384),
        # ...and at most 64 MiB.
        (10e9, 12_500_000, 12_500_000 + 64 * 1024 * 1024),
    ],
)
def test_a_links_tbf_has_10_ms_of_burst_and_100_ms_of_queue_within_bounds(bps, burst, limit):
    assert tbf_parameters(bps) == (round(bps), burst, limit)
