"""Bandwidth strings and the token bucket's pacing arithmetic."""

import pytest

from collectives.errors import ConfigError
from collectives.net.ratelimit import TokenBucket, format_bandwidth, parse_bandwidth


@pytest.mark.parametrize(
    "text,bits", [("100mbit", 100e6), ("1gbit", 1e9), ("1.5Gbit", 1.5e9), ("800kbit", 8e5), ("12.5MB", 100e6)]
)
def test_parse_bandwidth(text, bits):
    assert parse_bandwidth(text) == pytest.approx(bits)


@pytest.mark.parametrize("text", ["fast", "100 furlongs", "-5mbit", "0mbit", ""])
def test_bad_bandwidth_is_a_config_error(text):
    with pytest.raises(ConfigError):
        parse_bandwidth(text)


@pytest.mark.parametrize(("text", "advice"), [("100mbps", "100mbit for bits or 100mb for bytes"),
                                              ("2Gbps", "2gbit for bits or 2gb for bytes")])
def test_a_rate_in_bps_is_refused_as_ambiguous_with_both_readings(text, advice):
    # tc, which --netns drives, reads mbps as megabytes per second; loconet read it as megabits: 8x apart.
    with pytest.raises(ConfigError, match="ambiguous") as info:
        parse_bandwidth(text)
    assert advice in str(info.value)


def test_format_round_trips_through_parse():
    for bits in (1e9, 2.5e8, 1e5):
        assert parse_bandwidth(format_bandwidth(bits)) == pytest.approx(bits)


def test_bucket_lets_a_burst_through_then_charges_the_debt():
    bucket = TokenBucket(bytes_per_s=1000.0, burst_bytes=500.0)
    assert bucket.reserve(500) == 0.0
    # The bucket is empty: 1000 more bytes must wait about one second.
    assert bucket.reserve(1000) == pytest.approx(1.0, abs=0.01)


def test_concurrent_reservations_queue_behind_each_other():
    bucket = TokenBucket(bytes_per_s=1000.0, burst_bytes=1.0)
    first = bucket.reserve(1000)
    second = bucket.reserve(1000)
    assert second == pytest.approx(first + 1.0, abs=0.01)
