"""``loconet bench diloco --netns --bandwidth R``: every method's peers behind the same capped links.

Each peer, DDP process and hivemind trainer lives in its own network namespace behind tbf caps; the
coordinator in one of its own. Needs root; the refusals run anywhere. Losses and times are reported,
never asserted against a threshold.
"""

from __future__ import annotations

import math

import pytest

from collectives.errors import ConfigError
from peer.bench import diloco
from peer.bench.fields import undocumented
from peer.cli import build_parser
from peer.harness.netns.availability import NetnsUnavailable, check_available
from peer.harness.netns.shaping import LOSS_BASED_CONTROLS
from tests.support.cli import before_any_process, one_line_error
from tests.support.standins import HIVEMIND_PYTHON

try:
    check_available()
    NETNS = ""
except NetnsUnavailable as _e:  # pragma: no cover - depends on the machine
    NETNS = str(_e)

TINY = ["--peers", "2", "--steps", "8", "--sync-every", "4", "--d-model", "16", "--layers", "1", "--heads", "2",
        "--batch-size", "4", "--seq-len", "16", "--eval-batches", "1"]
needs_netns = pytest.mark.skipif(bool(NETNS), reason=f"network namespaces unavailable: {NETNS}")


def bench_config(*args: str) -> diloco.BenchConfig:
    return diloco.bench_config(build_parser("bench").parse_args(["bench", "diloco", *args]))


def test_without_root_it_says_so_in_one_line_before_any_process(monkeypatch, capsys):
    result = before_any_process(monkeypatch, capsys, "bench", "diloco", "--methods", "diloco", "--netns",
                                "--bandwidth", "100mbit", "--json", uid=1000)
    assert result.returncode == 1
    assert one_line_error(result).startswith("loconet: error: --netns needs root (uid 0; you are uid 1000)")


def test_a_bandwidth_without_namespaces_is_refused_in_one_line(monkeypatch, capsys):
    result = before_any_process(monkeypatch, capsys, "bench", "diloco", "--methods", "diloco", "--bandwidth",
                                "100mbit", "--json")
    assert result.returncode == 2  # a usage error
    assert one_line_error(result) == (
        "loconet: error: --bandwidth caps the links of the network namespaces: give --netns too"
    )


def test_a_bandwidth_that_is_no_rate_is_refused():
    with pytest.raises(ConfigError, match="cannot read bandwidth 'fast'; write a number and a unit such as 100mbit"):
        bench_config("--methods", "diloco", "--netns", "--bandwidth", "fast")


@pytest.fixture(scope="module")
def capped_report() -> dict:
    """diloco, data_parallel and one_peer at the smallest size, two peers behind 20 mbit links."""
    return diloco.run(bench_config("--methods", "diloco,data_parallel,one_peer", *TINY, "--netns",
                                   "--bandwidth", "20mbit"))


@needs_netns
@pytest.mark.timeout(300)
def test_the_methods_meet_the_same_capped_links(capped_report):
    assert capped_report["config"]["netns"] is True and capped_report["config"]["bandwidth"] == "20mbit"
    assert capped_report["congestion_control"] in LOSS_BASED_CONTROLS
    ours = capped_report["methods"]["diloco"]
    assert ours["identical_global_params"] is True
    assert math.isfinite(ours["final_eval_loss"])


@needs_netns
@pytest.mark.timeout(300)
def test_what_crossed_each_link_holds_at_least_what_each_method_says_it_sent(capped_report):
    m = capped_report["methods"]
    # Ours: the rounds' payload, plus the state a joiner fetched, the coordinator's calls and the headers.
    assert m["diloco"]["wire_bytes_per_peer"] >= m["diloco"]["bytes_sent_per_peer"] > 0
    # Data-parallel: gloo's ring, computed, is below what its processes really sent over their links.
    assert m["data_parallel"]["wire_bytes_per_peer"] >= m["data_parallel"]["bytes_sent_per_peer"] > 0
    # One peer alone sends nothing and runs outside the namespaces.
    assert "wire_bytes_per_peer" not in m["one_peer"]


@needs_netns
@pytest.mark.timeout(300)
def test_every_field_of_the_capped_report_is_documented(capped_report):
    assert undocumented(capped_report, diloco.FIELDS) == []


@needs_netns
@pytest.mark.timeout(300)
def test_the_time_ratio_divides_diloco_by_data_parallel(capped_report):
    m = capped_report["methods"]
    assert capped_report["wall_s_diloco_over_data_parallel"] == m["diloco"]["wall_s"] / m["data_parallel"]["wall_s"]


@needs_netns
@pytest.mark.skipif(not HIVEMIND_PYTHON, reason="set LOCONET_HIVEMIND_PYTHON to an interpreter with hivemind")
@pytest.mark.timeout(600)
def test_hivemind_trains_behind_the_same_capped_links():
    config = bench_config("--methods", "diloco", "--peers", "2", "--steps", "100", "--sync-every", "25",
                          "--hivemind", str(HIVEMIND_PYTHON), "--netns", "--bandwidth", "50mbit")
    hivemind = diloco.run(config)["methods"]["hivemind"]
    assert math.isfinite(hivemind["final_eval_loss"])
    assert set(hivemind["group_sizes"]) <= {2}
    # Its DHT's traffic crosses the links too: at least its rounds' payload did.
    assert hivemind["wire_bytes_per_peer"] >= hivemind["bytes_sent_per_peer"]
