"""``loconet bench transport`` at a small scale: bytes streamed to a real child process and counted there.

Timings and CPU costs are reported, never asserted (shared, noisy machines).
"""

from __future__ import annotations

import math

import pytest

from collectives.errors import ConfigError
from peer.bench import transport as bench_transport
from peer.bench.fields import undocumented

pytestmark = pytest.mark.timeout(120)


def test_every_byte_arrives_and_costs_are_reported():
    report = bench_transport.run(
        bench_transport.TransportBenchConfig(mb=4.0, chunk_bytes=256 * 1024, repeat=2, cores=2)
    )
    # run() raises unless the sink counted exactly this many bytes in every stream.
    assert report["bytes"] == 15 * 256 * 1024
    assert report["chunk_bytes"] == 256 * 1024
    for key in (
        "median_s",
        "gbps",
        "sender_cpu_s_per_gb",
        "receiver_cpu_s_per_gb",
        "allreduce_floor_s",
        "time_over_memcpy",
    ):
        assert math.isfinite(report[key]) and report[key] >= 0, key
    per_peer_gb = 2 * 3 / 4 * 0.1
    expected_floor = 4 * per_peer_gb * (report["sender_cpu_s_per_gb"] + report["receiver_cpu_s_per_gb"]) / 2
    assert report["allreduce_floor_s"] == pytest.approx(expected_floor)
    assert undocumented(report, bench_transport.FIELDS) == []


def test_less_than_one_chunk_is_refused():
    with pytest.raises(ConfigError, match="smaller than one chunk"):
        bench_transport.run(bench_transport.TransportBenchConfig(mb=0.1, chunk_bytes=1 << 20, repeat=1))
