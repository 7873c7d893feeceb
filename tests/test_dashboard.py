"""The coordinator's HTTP dashboard: routes, JSON, Prometheus metrics, and the page as headless Chromium renders it."""

from __future__ import annotations

import copy
import inspect
import json
import math
import re
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from prometheus_client.parser import text_string_to_metric_families

from peer.coordinator import dashboard
from peer.coordinator.config import CoordinatorConfig
from peer.coordinator.dashboard import DashboardServer

sys.path.insert(0, str(Path(__file__).parent))
from support.browser import NO_CHROMIUM, DomIndex, chromium_path, run_chromium  # noqa: E402
from support.coordinator import CoordinatorThread
from support.procs import stop_all, toy_peer

pytestmark = pytest.mark.timeout(60)

T0 = 1763790000.0


def sample_status() -> dict:
    """A run in progress: 3 named peers, round 11 committed, round 12 aborted at epoch 2 and committed at epoch 3
    (p4, gone and unnamed, took part in the abort), events, loss of 4, 3, 1 points, eval loss of 2, 2, 0 points,
    traffic samples of 6, 4, 0, and the count of peers alive going 0, 1, 2, 3."""
    peers = [
        ("p1", "127.0.0.1:40001", "host-a", "active", 2.134, 3.2, 2.3),
        ("p2", "127.0.0.1:40002", "host-b", "active", 2.201, 3.05, 2.4),
        ("p3", "127.0.0.1:40003", "host-c", "syncing", 2.9, None, None),
    ]
    return {
        "run_id": "demo",
        "coordinator": {"address": "127.0.0.1:7070", "started_at": T0, "uptime_s": 12.5, "version": "0.1.0"},
        "epoch": 3,
        "last_committed_round": 12,
        "min_peers": 2,
        "quorum_policy": "sample:3",
        "summary": {
            "peers_alive": 3,
            "rounds_committed": 12,
            "rounds_aborted": 1,
            "bytes_sent": 123456789,
            "bytes_received": 123450000,
        },
        "peers": [
            {
                "peer_id": pid,
                "address": address,
                "name": name,
                "state": state,
                "last_heartbeat_s_ago": 0.4 + i,
                "step": 1200 - 10 * i,
                "steps_per_s": speed,
                "loss": loss,
                "eval_loss": eval_loss,
                "samples": 38400,
                "bytes_sent": 1234567 * (i + 1),
                "bytes_received": 1234000 * (i + 1),
                "last_round": 12,
                "in_last_round": True,
                "activity": "training",
                "joined_at": T0 + i,
            }
            for i, (pid, address, name, state, loss, speed, eval_loss) in enumerate(peers)
        ],
        "rounds": [
            {
                "round_id": 12,
                "epoch": 3,
                "members": ["p1", "p2", "p3"],
                "started_at": T0 + 10,
                "duration_s": 0.41,
                "bytes": 39846085,
                "status": "committed",
                "reason": "",
                "candidates": ["p1", "p2", "p3"],
            },
            {
                "round_id": 12,
                "epoch": 2,
                "members": ["p1", "p2", "p3", "p4"],
                "started_at": T0 + 8,
                "duration_s": 1.7,
                "bytes": 20000000,
                "status": "aborted",
                "reason": "peer p4 failed: unreachable",
            },
            {
                "round_id": 11,
                "epoch": 2,
                "members": ["p1", "p2", "p3"],
                "started_at": T0 + 6,
                "duration_s": 0.5,
                "bytes": 30000000,
                "status": "committed",
                "reason": "",
            },
        ],
        "events": [
            {"time": T0 + 9, "kind": "abort", "peer_id": "p4", "detail": "round 12 (epoch 2): peer p4 failed"},
            {"time": T0 + 5, "kind": "join", "peer_id": "p3", "detail": "joined from 127.0.0.1:40003"},
            {"time": T0, "kind": "coordinator-start", "peer_id": "", "detail": "listening on 127.0.0.1:7070"},
        ],
        "loss": {
            "p1": [[100, 3.1], [200, 2.9], [300, 2.5], [400, 2.134]],
            "p2": [[100, 3.2], [200, None], [300, 2.201]],
            "p3": [[100, 2.9]],
        },
        "eval_loss": {
            "p1": [[200, 3.0], [400, 2.3]],
            "p2": [[200, 3.1], [300, 2.4]],
        },
        "history": {
            "time": T0 + 12.5,
            "alive": [[T0, 0], [T0 + 1, 1], [T0 + 2, 2], [T0 + 5, 3]],
            "traffic": {
                # Cumulative (time, bytes sent, bytes received): p1 moves 1.5 kB/s; p2 8 kB/s, then restarts
                # (its counters go back: no rate for that interval), then 2 kB/s.
                "p1": [[T0 + 1 + i, 1000 * i, 500 * i] for i in range(6)],
                "p2": [[T0 + 2, 0, 0], [T0 + 3, 4000, 4000], [T0 + 4, 0, 0], [T0 + 5, 1000, 1000]],
            },
        },
    }


@pytest.fixture
def serve() -> Iterator[Callable[..., DashboardServer]]:
    """Factory that starts a DashboardServer on 127.0.0.1, port 0, and closes every one it made."""
    made: list[DashboardServer] = []

    def start(status_fn: Callable[[], dict] = sample_status, **kwargs) -> DashboardServer:
        server = DashboardServer(status_fn, host=kwargs.pop("host", "127.0.0.1"), port=0, **kwargs)
        made.append(server)
        server.start()
        return server

    yield start
    for server in made:
        server.close()


def get(url: str) -> tuple[int, dict[str, str], bytes]:
    """GET url; return (status, headers, body) for success and HTTP errors alike."""
    try:
        with urllib.request.urlopen(url, timeout=10) as resp:
            return resp.status, dict(resp.headers), resp.read()
    except urllib.error.HTTPError as err:
        return err.code, dict(err.headers), err.read()


def metric_samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Prometheus text -> {(sample name, sorted labels): value}."""
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


# ---- HTTP routes ---------------------------------------------------------


def test_healthz_is_ok(serve):
    status, headers, body = get(serve().url + "/healthz")
    assert (status, body) == (200, b"ok\n")
    assert headers["Content-Type"].startswith("text/plain")


def test_the_dashboard_starts_without_looking_up_its_host_s_name(serve, monkeypatch):
    # HTTPServer asks the resolver for the bound host's name; where DNS does not answer that took 10 s, on the
    # coordinator's event loop (every restart of a coordinator in the harness's namespaces).
    def no_lookup(name: str = "") -> str:
        raise AssertionError(f"a reverse lookup of {name!r}")

    monkeypatch.setattr(dashboard.socket, "getfqdn", no_lookup)
    status, _, _ = get(serve().url + "/healthz")
    assert status == 200


def test_unknown_path_is_404(serve):
    status, _, _ = get(serve().url + "/nope")
    assert status == 404


def test_api_status_returns_the_document(serve):
    status, headers, body = get(serve().url + "/api/status")
    assert status == 200
    assert headers["Content-Type"] == "application/json"
    assert headers["Cache-Control"] == "no-store"
    assert json.loads(body) == sample_status()


def test_api_status_turns_non_finite_floats_into_null(serve):
    doc = sample_status()
    doc["peers"][0]["loss"] = math.nan
    doc["peers"][1]["steps_per_s"] = math.inf
    doc["loss"]["p1"].append([500, -math.inf])
    status, _, body = get(serve(lambda: doc).url + "/api/status")
    assert status == 200
    assert b"NaN" not in body and b"Infinity" not in body
    got = json.loads(body)
    assert got["peers"][0]["loss"] is None
    assert got["peers"][1]["steps_per_s"] is None
    assert got["loss"]["p1"][-1] == [500, None]


def test_failing_status_fn_gives_500_and_the_server_keeps_serving(serve, caplog):
    calls = {"n": 0}

    def flaky() -> dict:
        calls["n"] += 1
        if calls["n"] == 1:
            raise RuntimeError("coordinator state unavailable")
        return sample_status()

    server = serve(flaky)
    with caplog.at_level("ERROR", logger="peer.coordinator.dashboard"):
        status, _, body = get(server.url + "/api/status")
    assert status == 500
    assert b"Traceback" not in body and len(body) < 200
    assert any("coordinator state unavailable" in (r.exc_text or "") for r in caplog.records)
    status, _, body = get(server.url + "/api/status")
    assert status == 200 and json.loads(body)["run_id"] == "demo"


def test_failing_status_fn_gives_500_on_metrics_too(serve):
    def broken() -> dict:
        raise ValueError("nope")

    server = serve(broken)
    assert get(server.url + "/metrics")[0] == 500
    assert get(server.url + "/healthz")[0] == 200


def test_metrics_parse_and_carry_run_gauges(serve):
    status, headers, body = get(serve().url + "/metrics")
    assert status == 200
    assert headers["Content-Type"] == CONTENT_TYPE_LATEST
    samples = metric_samples(body.decode())
    assert samples[("loconet_epoch", ())] == 3
    assert samples[("loconet_last_committed_round", ())] == 12
    assert samples[("loconet_peers", (("state", "active"),))] == 2
    assert samples[("loconet_peers", (("state", "syncing"),))] == 1
    assert samples[("loconet_peers", (("state", "lost"),))] == 0


def test_metrics_name_the_run_and_its_quorum_policy(serve):
    samples = metric_samples(get(serve().url + "/metrics")[2].decode())
    labels = (
        ("coordinator_address", "127.0.0.1:7070"),
        ("quorum_policy", "sample:3"),
        ("run_id", "demo"),
        ("version", "0.1.0"),
    )
    assert samples[("loconet_run_info", labels)] == 1


def test_metrics_rounds_are_counters_by_outcome(serve):
    text = get(serve().url + "/metrics")[2].decode()
    families = {f.name: f for f in text_string_to_metric_families(text)}
    assert families["loconet_rounds"].type == "counter"
    samples = metric_samples(text)
    assert samples[("loconet_rounds_total", (("status", "committed"),))] == 12
    assert samples[("loconet_rounds_total", (("status", "aborted"),))] == 1
    assert samples[("loconet_last_round_duration_seconds", ())] == pytest.approx(0.41)


def test_metrics_have_each_peers_loss_and_speed(serve):
    samples = metric_samples(get(serve().url + "/metrics")[2].decode())
    for peer in sample_status()["peers"]:
        labels = (("peer", peer["peer_id"]),)
        assert samples[("loconet_peer_loss", labels)] == pytest.approx(peer["loss"])
        assert samples[("loconet_peer_step", labels)] == peer["step"]
        assert samples[("loconet_peer_bytes_sent_total", labels)] == peer["bytes_sent"]
    # Unknown speed (null) is left out, not exported as NaN.
    assert ("loconet_peer_steps_per_second", (("peer", "p3"),)) not in samples
    assert samples[("loconet_peer_steps_per_second", (("peer", "p1"),))] == pytest.approx(3.2)


def test_metrics_have_each_peers_eval_loss_once_it_has_one(serve):
    samples = metric_samples(get(serve().url + "/metrics")[2].decode())
    assert samples[("loconet_peer_eval_loss", (("peer", "p1"),))] == pytest.approx(2.3)
    assert ("loconet_peer_eval_loss", (("peer", "p3"),)) not in samples


def test_metrics_have_a_replicas_spread_when_it_reports_one(serve):
    doc = sample_status()
    doc["peers"][0]["spread"] = 0.25
    samples = metric_samples(get(serve(lambda: doc).url + "/metrics")[2].decode())
    assert samples[("loconet_peer_spread", (("peer", doc["peers"][0]["peer_id"]),))] == 0.25
    assert ("loconet_peer_spread", (("peer", doc["peers"][1]["peer_id"]),)) not in samples


def test_metrics_read_the_status_at_scrape_time(serve):
    doc = sample_status()
    server = serve(lambda: doc)
    assert metric_samples(get(server.url + "/metrics")[2].decode())[("loconet_epoch", ())] == 3
    doc["epoch"] = 4
    assert metric_samples(get(server.url + "/metrics")[2].decode())[("loconet_epoch", ())] == 4


def test_two_servers_do_not_share_metrics(serve):
    other = sample_status()
    other["epoch"] = 9
    a, b = serve(), serve(lambda: other)
    assert metric_samples(get(a.url + "/metrics")[2].decode())[("loconet_epoch", ())] == 3
    assert metric_samples(get(b.url + "/metrics")[2].decode())[("loconet_epoch", ())] == 9


def test_page_is_html_without_external_references(serve):
    status, headers, body = get(serve().url + "/")
    assert status == 200
    assert headers["Content-Type"].startswith("text/html")
    page = body.decode("utf-8")
    assert 'id="peers"' in page and 'id="loss-chart"' in page
    assert not re.search(r"https?://", page), "the page must work offline"
    assert not re.search(r"""(src|href)\s*=\s*["']?//""", page), "no protocol-relative assets"


def test_binds_loopback_by_default():
    assert inspect.signature(DashboardServer).parameters["host"].default == "127.0.0.1"
    server = DashboardServer(sample_status)
    try:
        url = server.start()
        assert re.fullmatch(r"http://127\.0\.0\.1:\d+", url)
        assert url == server.url
        assert get(url + "/healthz")[0] == 200
    finally:
        server.close()


def test_close_is_idempotent_and_stops_serving():
    server = DashboardServer(sample_status)
    url = server.start()
    server.close()
    server.close()
    assert not any(t.name.startswith("loconet-dashboard") for t in threading.enumerate())
    with pytest.raises(OSError):
        urllib.request.urlopen(url + "/healthz", timeout=5)


# ---- the page in headless Chromium ----------------------------------------


needs_chromium = pytest.mark.skipif(
    chromium_path() is None,
    reason=NO_CHROMIUM,
)


@pytest.fixture(scope="module")
def rendered(tmp_path_factory) -> DomIndex:
    """The sample run's page after Chromium has loaded it and polled the status for 5 s of virtual time."""
    if chromium_path() is None:
        pytest.skip(NO_CHROMIUM)
    server = DashboardServer(sample_status)
    try:
        html = run_chromium(server.start() + "/", tmp_path_factory.mktemp("chromium"), "--dump-dom")
    finally:
        server.close()
    return DomIndex(html)


def displays(page: bytes, ids: tuple[str, ...]) -> bytes:
    """The page with a script that writes each element's computed display into the DOM once the page has polled."""
    probe = "".join(
        f'document.body.setAttribute("data-display-{i}", getComputedStyle(document.getElementById("{i}")).display);'
        for i in ids
    )
    return page.replace(b"</body>", f"<script>setTimeout(() => {{ {probe} }}, 2000);</script></body>".encode())


@needs_chromium
@pytest.mark.parametrize(
    "waiting, shown", [(None, "none"), ({"reason": "no live peer holds round 9", "since": 0, "peers": []}, "flex")]
)
def test_the_waiting_card_is_shown_only_while_peers_wait_for_the_runs_state(tmp_path, monkeypatch, waiting, shown):
    page = dashboard._load_page()
    monkeypatch.setattr(dashboard, "_load_page", lambda: displays(page, ("waiting-card", "s-spread-stat")))
    doc = sample_status()
    doc["waiting"] = waiting
    server = DashboardServer(lambda: doc)
    try:
        dom = DomIndex(run_chromium(server.start() + "/", tmp_path, "--dump-dom"))
    finally:
        server.close()
    (body,) = dom.find("body")
    # The card's own display is flex: the hidden attribute alone left it on every healthy run's page.
    assert (body.attrs["data-display-waiting-card"], body.attrs["data-display-s-spread-stat"]) == (shown, "none")


@needs_chromium
def test_page_says_live_after_a_successful_fetch(rendered):
    assert rendered.by_id("status-line").text == "live"


@needs_chromium
def test_page_lists_every_peer_with_its_address(rendered):
    for peer in sample_status()["peers"]:
        (row,) = rendered.find("tr", cls="peer-row", data_peer_id=peer["peer_id"])
        assert peer["address"] in row.text
        assert peer["state"] in row.text
    assert len(rendered.find("tr", cls="peer-row")) == 3


def cells(dom: DomIndex, row) -> list[str]:
    """The texts of a table row's cells."""
    after = dom.nodes[dom.nodes.index(row) + 1 :]
    end = next((i for i, n in enumerate(after) if n.tag == "tr"), len(after))
    return [n.text for n in after[:end] if n.tag == "td"]


@needs_chromium
def test_page_lists_each_attempt_of_a_round_with_its_epoch(rendered):
    (committed,) = rendered.find("tr", cls="round-row", data_attempt="12.3")
    (aborted,) = rendered.find("tr", cls="round-row", data_attempt="12.2")
    assert cells(rendered, committed)[:3] == ["12", "3", "committed"]
    assert cells(rendered, aborted)[:3] == ["12", "2", "aborted"]
    assert "peer p4 failed: unreachable" in aborted.text


@needs_chromium
def test_page_shows_round_ids_without_digit_grouping(serve, tmp_path):
    doc = sample_status()
    doc["last_committed_round"] = 1234
    dom = DomIndex(run_chromium(serve(lambda: doc).url + "/", tmp_path, "--dump-dom"))
    assert dom.by_id("s-round").text == "1234"


@needs_chromium
def test_page_marks_the_peers_a_sample_drew_for_the_last_round(serve, tmp_path):
    doc = sample_status()
    doc["quorum_policy"] = "sample:0.5,min=2"
    doc["peers"][2]["in_last_round"] = False
    doc["rounds"][0].update(members=["p1", "p2"], candidates=["p1", "p2", "p3"])
    dom = DomIndex(run_chromium(serve(lambda: doc).url + "/", tmp_path, "--dump-dom"))
    round_cells = {
        pid: cells(dom, row)[9]
        for pid in ("p1", "p2", "p3")
        for row in dom.find("tr", cls="peer-row", data_peer_id=pid)
    }
    assert round_cells == {"p1": "12 \u2713", "p2": "12 \u2713", "p3": "12"}
    assert [n.attrs["title"] for n in dom.find("td", cls="in-last")] == ["member of the last committed round"] * 2
    (last,) = dom.find("tr", cls="round-row", data_attempt="12.3")
    members_cell = [n for n in dom.nodes[dom.nodes.index(last) + 1 :] if n.tag == "td"][3]
    assert members_cell.attrs["title"] == "2 members of 3 candidates"
    assert "quorum sample:0.5,min=2" in dom.by_id("coord").text


@needs_chromium
def test_page_names_the_rounds_a_peer_keeps_the_results_of_for_the_run(serve, tmp_path):
    doc = sample_status()
    doc["peers"][2].update(in_last_round=False, kept_results=[11, 12])
    dom = DomIndex(run_chromium(serve(lambda: doc).url + "/", tmp_path, "--dump-dom"))
    (row,) = dom.find("tr", cls="peer-row", data_peer_id="p3")
    assert cells(dom, row)[9] == "12 +r11,r12"
    cell = [n for n in dom.nodes[dom.nodes.index(row) + 1 :] if n.tag == "td"][9]
    assert cell.attrs["title"] == "not in the last committed round; keeps the results of rounds 11, 12 for the run"


@needs_chromium
def test_the_peers_count_says_how_many_rows_are_alive(rendered, serve, tmp_path):
    assert rendered.by_id("peers-count").text == "3"  # every row alive
    doc = sample_status()
    doc["peers"][1]["state"] = "lost"  # its row stays, greyed
    dom = DomIndex(run_chromium(serve(lambda: doc).url + "/", tmp_path, "--dump-dom"))
    assert dom.by_id("peers-count").text == "2 alive of 3"


@needs_chromium
def test_page_names_the_quorum_policy(rendered):
    assert "quorum sample:3" in rendered.by_id("coord").text


@needs_chromium
def test_page_shows_header_summary_with_readable_bytes(rendered):
    assert rendered.by_id("run-id").text == "demo"
    assert rendered.by_id("s-epoch").text == "3"
    assert rendered.by_id("s-round").text == "12"
    assert rendered.by_id("s-sent").text == "123 MB"
    (p1,) = rendered.find("tr", cls="peer-row", data_peer_id="p1")
    assert "1.23 MB" in p1.text


@needs_chromium
def test_page_lists_events(rendered):
    events = rendered.find(cls="event-row")
    assert len(events) == 3
    assert "joined from 127.0.0.1:40003" in events[1].text and "join" in events[1].text


@needs_chromium
def test_page_draws_a_loss_line_per_peer(rendered):
    chart = rendered.by_id("loss-chart")
    assert chart.tag == "svg"
    for peer_id, points in sample_status()["loss"].items():
        (line,) = rendered.find("polyline", cls="loss-line", data_peer_id=peer_id)
        drawn = line.attrs["points"].split()
        finite = [p for p in points if p[1] is not None]
        assert len(drawn) == len(finite), peer_id  # null losses are skipped, not drawn as 0
        assert all(re.fullmatch(r"-?[\d.]+,-?[\d.]+", xy) for xy in drawn)
    # A one-point series still shows a mark.
    assert rendered.find("circle", cls="loss-dot", data_peer_id="p3")
    legend = rendered.find(cls="legend-item", data_chart="loss")
    assert [n.attrs["data-peer-id"] for n in legend] == ["p1", "p2", "p3"]
    assert legend[2].text == "host-c p3 training 2.900 · eval —"


@needs_chromium
def test_page_escapes_strings_from_the_status(serve, tmp_path):
    doc = sample_status()
    doc["peers"][0]["name"] = "<img src=x onerror=alert(1)><b>bold</b>"
    doc["events"][0]["detail"] = "<script>alert(2)</script>"
    dom = DomIndex(run_chromium(serve(lambda: doc).url + "/", tmp_path, "--dump-dom"))
    (row,) = dom.find("tr", cls="peer-row", data_peer_id="p1")
    assert "<b>bold</b>" in row.text  # shown as text ...
    assert not dom.find("img") and not dom.find("b")  # ... never parsed as markup
    assert "<script>alert(2)</script>" in dom.find(cls="event-row")[0].text


@needs_chromium
def test_page_redraws_the_chart_as_loss_grows(serve, tmp_path):
    calls = {"n": 0}
    lock = threading.Lock()

    def growing() -> dict:
        with lock:
            calls["n"] += 1
            n = calls["n"]
        doc = copy.deepcopy(sample_status())
        doc["loss"] = {"p1": [[100 * (i + 1), 3.0 - 0.1 * i] for i in range(n)]}
        return doc

    dom = DomIndex(run_chromium(serve(growing).url + "/", tmp_path, "--dump-dom"))
    assert calls["n"] >= 2, "the page should poll more than once in 5 s"
    (line,) = dom.find("polyline", cls="loss-line", data_peer_id="p1")
    assert len(line.attrs["points"].split()) >= 2


@needs_chromium
def test_page_renders_a_run_with_no_peers_yet(serve, tmp_path):
    doc = sample_status()
    doc.update(peers=[], rounds=[], events=[], loss={}, eval_loss={}, last_committed_round=None)
    doc["history"] = {"time": T0 + 3, "alive": [[T0, 0]], "traffic": {}}
    dom = DomIndex(run_chromium(serve(lambda: doc).url + "/", tmp_path, "--dump-dom"))
    assert dom.by_id("status-line").text == "live"
    assert not dom.find(cls="peer-row") and not dom.find(cls="loss-line") and not dom.find(cls="traffic-line")
    assert [n.text for n in dom.find("text", cls="placeholder")] == [
        "No loss reported yet",
        "No traffic reported yet",
        "No finished rounds yet",
    ]
    assert "No peers yet" in dom.by_id("peers-empty").text


@needs_chromium
def test_page_shows_an_error_when_the_status_fails(serve, tmp_path):
    def broken() -> dict:
        raise RuntimeError("down")

    dom = DomIndex(run_chromium(serve(broken).url + "/", tmp_path, "--dump-dom"))
    line = dom.by_id("status-line")
    assert line.text != "live" and "HTTP 500" in line.text
    assert "error" in line.classes


@needs_chromium
def test_page_screenshot_at_1280x800(serve, tmp_path):
    shot = tmp_path / "dashboard.png"
    run_chromium(serve().url + "/", tmp_path, f"--screenshot={shot}", "--window-size=1280,800", "--hide-scrollbars")
    assert shot.exists()
    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert shot.stat().st_size > 10_000


# ---- one identity per peer -------------------------------------------------


@needs_chromium
def test_page_shows_a_peer_by_its_name_with_its_id_alongside_everywhere(rendered):
    # The peer row, the three rounds it took part in, the loss and traffic legends: all say the same.
    p1 = rendered.find("span", cls="who", data_peer_id="p1")
    assert [n.text for n in p1] == ["host-a p1"] * 6
    # The join event and the rows of its rounds name host-c too, not the bare id.
    p3 = rendered.find("span", cls="who", data_peer_id="p3")
    assert [n.text for n in p3] == ["host-c p3"] * 6
    (joined,) = rendered.find("li", cls="event-row", data_kind="join")
    assert joined.text.endswith("host-c p3 joined from 127.0.0.1:40003")


@needs_chromium
def test_page_shows_the_id_alone_for_a_peer_without_a_name(rendered):
    # p4 is in no roster: the aborted round and the abort event show its id, once each.
    assert [n.text for n in rendered.find("span", cls="who", data_peer_id="p4")] == ["p4", "p4"]


@needs_chromium
def test_chart_lines_are_titled_with_the_peers_identity(rendered):
    (line,) = rendered.find("polyline", cls="loss-line", data_peer_id="p2")
    assert line.text == "host-b (p2) training"
    (line,) = rendered.find("polyline", cls="traffic-line", data_peer_id="p2")
    assert line.text == "host-b (p2)"


# ---- the charts ------------------------------------------------------------


def drawn_points(line) -> int:
    """How many points a polyline draws."""
    return len(line.attrs["points"].split())


@needs_chromium
def test_page_draws_eval_loss_dashed_next_to_training_loss(rendered):
    for peer_id, points in sample_status()["eval_loss"].items():
        (line,) = rendered.find("polyline", cls="eval-line", data_peer_id=peer_id)
        assert drawn_points(line) == len(points)
        assert len(rendered.find("circle", cls="eval-dot", data_peer_id=peer_id)) == len(points)
    assert not rendered.find("polyline", cls="eval-line", data_peer_id="p3")  # no eval yet: no line
    (p1,) = rendered.find(cls="legend-item", data_chart="loss", data_peer_id="p1")
    assert p1.text == "host-a p1 training 2.134 · eval 2.300"
    (row,) = rendered.find("tr", cls="peer-row", data_peer_id="p1")
    assert cells(rendered, row)[8] == "2.300"


@needs_chromium
def test_page_draws_bytes_per_second_per_peer(rendered):
    (p1,) = rendered.find("polyline", cls="traffic-line", data_peer_id="p1")
    assert drawn_points(p1) == 5  # a rate between each two of its 6 samples
    (p2,) = rendered.find("polyline", cls="traffic-line", data_peer_id="p2")
    assert drawn_points(p2) == 2  # the interval over its restart is left out
    legend = {n.attrs["data-peer-id"]: n.text for n in rendered.find(cls="legend-item", data_chart="traffic")}
    assert legend == {"p1": "host-a p1 1.50 kB/s", "p2": "host-b p2 2.00 kB/s"}


@needs_chromium
def test_page_says_a_peer_that_left_moves_no_bytes_now(serve, tmp_path):
    doc = sample_status()
    doc["peers"][1]["state"] = "left"
    dom = DomIndex(run_chromium(serve(lambda: doc).url + "/", tmp_path, "--dump-dom"))
    (p2,) = dom.find(cls="legend-item", data_chart="traffic", data_peer_id="p2")
    assert p2.text == "host-b p2 left"
    assert dom.find("polyline", cls="traffic-line", data_peer_id="p2")  # its past traffic is still drawn


@needs_chromium
def test_page_draws_the_duration_of_each_round(rendered):
    (committed,) = rendered.find("polyline", cls="duration-line")
    assert drawn_points(committed) == 2
    assert len(rendered.find("circle", cls="abort-dot")) == 1
    legend = [n.text for n in rendered.find(cls="legend-item", data_chart="duration")]
    assert legend == ["committed 2 · last 410 ms", "aborted 1"]


@needs_chromium
def test_page_draws_peers_alive_as_steps_up_to_now_with_the_minimum(rendered):
    (alive,) = rendered.find("polyline", cls="alive-line")
    # Four counts (0, 1, 2, 3): a rise at each change, then level up to the status's time.
    assert drawn_points(alive) == 8
    assert len(rendered.find("line", cls="min-line")) == 1
    legend = [n.text for n in rendered.find(cls="legend-item", data_chart="alive")]
    assert legend == ["alive 3", "min peers 2"]


# ---- no value is cut -------------------------------------------------------

# Appended to the page for one test: 3 s (virtual) after load it lists every box whose content is wider than
# the box (cut, spilling over, or scrolled sideways: "scrolls" says which), and every chart label outside its
# chart, in <pre id="overflow-report">.
OVERFLOW_PROBE = b"""<script>
setTimeout(() => {
  const bad = [];
  const name = (e) => e.tagName.toLowerCase() + (e.id ? "#" + e.id : "") + \
(e.className && typeof e.className === "string" ? "." + e.className.trim().split(/\\s+/).join(".") : "");
  for (const e of document.querySelectorAll("body *")) {
    if (e instanceof SVGElement || e.clientWidth === 0) continue;
    if (e.scrollWidth > e.clientWidth + 1) {
      const scrolls = ["auto", "scroll"].includes(getComputedStyle(e).overflowX);
      bad.push({ what: name(e) + " " + e.scrollWidth + ">" + e.clientWidth + " " + \
e.textContent.slice(0, 40), scrolls });
    }
  }
  if (document.documentElement.scrollWidth > window.innerWidth) {
    bad.push({ what: "page " + document.documentElement.scrollWidth, scrolls: false });
  }
  for (const t of document.querySelectorAll("svg text")) {
    const b = t.getBBox(), v = t.ownerSVGElement.viewBox.baseVal;
    if (b.x < v.x - 0.5 || b.y < v.y - 0.5 || \
b.x + b.width > v.x + v.width + 0.5 || b.y + b.height > v.y + v.height + 0.5) {
      bad.push({ what: "svg text " + t.textContent, scrolls: false });
    }
  }
  const report = document.createElement("pre");
  report.id = "overflow-report";
  report.textContent = JSON.stringify(bad);
  document.body.appendChild(report);
}, 3000);
</script></body>"""


def extreme_status() -> dict:
    """The sample run with the widest values each field can hold."""
    doc = sample_status()
    doc["run_id"] = "a-run-id-that-goes-on-" * 8
    doc["epoch"] = doc["rounds"][0]["epoch"] = 2**53 - 1
    doc["last_committed_round"] = doc["rounds"][0]["round_id"] = doc["peers"][0]["last_round"] = 2**53 - 1
    doc["summary"]["bytes_sent"] = doc["peers"][0]["bytes_sent"] = doc["rounds"][0]["bytes"] = 2**64 - 1
    doc["summary"]["rounds_committed"] = 2**53 - 1
    doc["coordinator"]["uptime_s"] = 400 * 86400.0
    doc["peers"][0]["name"] = "a-peer-with-a-long-name-" * 8  # the coordinator keeps 200 characters
    doc["peers"][1]["address"] = "[2001:db8:85a3:1234:5678:8a2e:370:7334]:65535"
    doc["peers"][2]["step"] = 10**12
    doc["peers"][2]["loss"] = 123456.789
    doc["rounds"][1]["reason"] = "peer p4 failed: " + "unreachable " * 40
    doc["loss"]["p1"].append([10**12, 1e-7])
    doc["history"]["traffic"]["p1"].append([T0 + 7, 2**60, 2**60])
    return doc


def overflows(serve, tmp_path, monkeypatch, width: int) -> list[dict]:
    """What OVERFLOW_PROBE finds on the extreme run's page in a window width pixels wide."""
    page = dashboard._load_page()
    monkeypatch.setattr(dashboard, "_load_page", lambda: page.replace(b"</body>", OVERFLOW_PROBE, 1))
    url = serve(extreme_status).url + "/"
    dom = DomIndex(run_chromium(url, tmp_path, "--dump-dom", f"--window-size={width},900"))
    assert dom.by_id("status-line").text == "live"
    assert dom.by_id("s-round").text == str(2**53 - 1)
    return json.loads(dom.by_id("overflow-report").text)


@needs_chromium
def test_page_cuts_no_value_and_needs_no_sideways_scrolling_at_1280_pixels(serve, tmp_path, monkeypatch):
    assert overflows(serve, tmp_path, monkeypatch, 1280) == []


@needs_chromium
def test_page_cuts_no_value_in_a_narrow_window_where_only_the_tables_scroll_sideways(serve, tmp_path, monkeypatch):
    found = overflows(serve, tmp_path, monkeypatch, 700)
    assert [f["what"] for f in found if not f["scrolls"]] == []


# ---- the charts of a real run ----------------------------------------------


@needs_chromium
@pytest.mark.timeout(120)
def test_every_chart_draws_a_real_runs_data(tmp_path):
    config = CoordinatorConfig(
        run_id="charts", port=0, dashboard_port=0, min_peers=2, heartbeat_s=0.2, lease_s=2.0, join_timeout_s=1.0
    )
    coordinator = CoordinatorThread(config)
    peers = [toy_peer(tmp_path, coordinator.server.address, "charts", name, "--interval", "0.3") for name in ("a", "b")]
    try:
        ids = [p.wait_event(lambda e: e["event"] == "joined", 60)["peer_id"] for p in peers]

        def enough(status: dict) -> bool:
            rounds = [r for r in status["rounds"] if r["status"] == "committed"]
            return len(rounds) >= 3 and all(
                len(status["loss"].get(i, [])) >= 2
                and len(status["eval_loss"].get(i, [])) >= 2
                and len(status["history"]["traffic"].get(i, [])) >= 3
                for i in ids
            )

        deadline = time.monotonic() + 60
        while not enough(status := coordinator.status()):
            assert time.monotonic() < deadline, f"the run did not fill the charts in 60 s: {status}"
            time.sleep(0.2)
        dom = DomIndex(run_chromium(coordinator.server.dashboard_url + "/", tmp_path, "--dump-dom"))
    finally:
        stop_all(peers)
        coordinator.close()
    assert dom.by_id("status-line").text == "live"
    for peer_id, name in zip(ids, ("a", "b")):
        for cls in ("loss-line", "eval-line", "traffic-line"):
            (line,) = dom.find("polyline", cls=cls, data_peer_id=peer_id)
            assert drawn_points(line) > 1, (cls, peer_id)
        assert {n.text for n in dom.find("span", cls="who", data_peer_id=peer_id)} == {f"{name} {peer_id}"}
    for cls in ("duration-line", "alive-line"):
        (line,) = dom.find("polyline", cls=cls)
        assert drawn_points(line) > 1, cls
