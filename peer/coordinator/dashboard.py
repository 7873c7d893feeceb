"""The coordinator's HTTP dashboard: a live HTML page, its JSON feed, Prometheus metrics and a health check.

The server knows nothing of the coordinator's internals. It is fed by one
function, ``status_fn``, that returns the run's status document as a plain
dict (see ``/api/status``); every request reads a fresh document, so the page
and the metrics are always as current as the coordinator's own view.

Routes:

- ``GET /``            the self-contained page ``peer/coordinator/static/dashboard.html``
- ``GET /api/status``  the status document as JSON (non-finite floats become null; its
  fields, and the bounds of the chart history it carries, are in docs/membership.md)
- ``GET /metrics``     Prometheus text exposition, built at scrape time
- ``GET /healthz``     ``ok``

It uses only the standard library's ``http.server`` (plus prometheus-client
for the exposition format) and binds loopback unless told otherwise.
"""

from __future__ import annotations

import json
import logging
import math
import socket
import threading
from collections.abc import Callable, Iterator
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from importlib import resources
from typing import Any
from urllib.parse import urlsplit

from prometheus_client.exposition import CONTENT_TYPE_LATEST, generate_latest
from prometheus_client.metrics_core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    InfoMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector, CollectorRegistry

from peer.coordinator.runstate import PEER_STATES

log = logging.getLogger(__name__)

StatusFn = Callable[[], dict]

ROUND_STATUSES = ("committed", "aborted")

# The page is inline-only (no CDN, no fonts, no images); a strict CSP makes the
# browser enforce that and limits what a malicious status string could do.
_HTML_CSP = (
    "default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; "
    "connect-src 'self'; img-src data:; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
)


def json_safe(value: Any) -> Any:
    """Return a copy of ``value`` with every non-finite float (NaN, +-Inf) replaced by None."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    return value


def _number(value: Any) -> float | None:
    """A finite float from a status field, or None when it is missing, null, non-numeric or non-finite."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    number = float(value)
    return number if math.isfinite(number) else None


class StatusCollector(Collector):
    """Prometheus collector that turns the status document into metric families at scrape time."""

    def __init__(self, status_fn: StatusFn) -> None:
        self._status_fn = status_fn

    def describe(self) -> list[Metric]:
        """Nothing up front: the registry must not call status_fn at registration time."""
        return []

    def collect(self) -> Iterator[Metric]:
        """Yield the run-, peer- and round-level metric families of one fresh status document."""
        status = self._status_fn()
        yield from self._run_metrics(status)
        yield from self._peer_metrics(status.get("peers") or [])
        yield from self._round_metrics(status.get("rounds") or [])

    @staticmethod
    def _run_metrics(status: dict) -> Iterator[Metric]:
        coordinator = status.get("coordinator") or {}
        summary = status.get("summary") or {}

        info = InfoMetricFamily("loconet_run", "The run this coordinator serves.")
        info.add_metric(
            [],
            {
                "run_id": str(status.get("run_id", "")),
                "coordinator_address": str(coordinator.get("address", "")),
                "version": str(coordinator.get("version", "")),
                "quorum_policy": str(status.get("quorum_policy", "")),
            },
        )
        yield info

        for name, doc, value in (
            ("loconet_epoch", "Current membership epoch.", status.get("epoch")),
            ("loconet_last_committed_round", "Id of the last committed round.", status.get("last_committed_round")),
            ("loconet_min_peers", "Minimum number of peers a round needs.", status.get("min_peers")),
            ("loconet_peers_alive", "Peers the coordinator considers alive.", summary.get("peers_alive")),
            ("loconet_coordinator_uptime_seconds", "Seconds since the coordinator started.", coordinator.get("uptime_s")),
            ("loconet_coordinator_start_time_seconds", "Unix time the coordinator started.", coordinator.get("started_at")),
        ):
            number = _number(value)
            if number is not None:
                yield GaugeMetricFamily(name, doc, value=number)

        # Every state is always exported (0 when empty) so that queries and alerts
        # see a series drop to zero instead of disappearing.
        counts = dict.fromkeys(PEER_STATES, 0)
        for peer in status.get("peers") or []:
            state = str(peer.get("state", "unknown"))
            counts[state] = counts.get(state, 0) + 1
        peers = GaugeMetricFamily("loconet_peers", "Peers known to the coordinator, by state.", labels=["state"])
        for state, count in counts.items():
            peers.add_metric([state], count)
        yield peers

        rounds = CounterMetricFamily("loconet_rounds", "Rounds finished, by outcome.", labels=["status"])
        for round_status in ROUND_STATUSES:
            number = _number(summary.get(f"rounds_{round_status}"))
            if number is not None:
                rounds.add_metric([round_status], number)
        yield rounds

        for name, doc, value in (
            ("loconet_bytes_sent", "Bytes sent by all peers of the run.", summary.get("bytes_sent")),
            ("loconet_bytes_received", "Bytes received by all peers of the run.", summary.get("bytes_received")),
        ):
            number = _number(value)
            if number is not None:
                yield CounterMetricFamily(name, doc, value=number)

    @staticmethod
    def _peer_metrics(peers: list[dict]) -> Iterator[Metric]:
        info = InfoMetricFamily("loconet_peer", "Who each peer is and its state.", labels=["peer"])
        families: dict[str, tuple[type, str, str]] = {
            # status field -> (family type, metric name, help)
            "loss": (GaugeMetricFamily, "loconet_peer_loss", "Last training loss a peer reported."),
            "eval_loss": (GaugeMetricFamily, "loconet_peer_eval_loss", "Loss of a peer's last evaluation."),
            "epsilon": (GaugeMetricFamily, "loconet_peer_privacy_epsilon",
                        "Differential privacy: the epsilon the run has spent, as a peer reports it."),
            "spread": (GaugeMetricFamily, "loconet_peer_spread",
                       "NoLoCo: distance of a replica's outer weights from the replicas' mean at its last evaluation."),
            "steps_per_s": (GaugeMetricFamily, "loconet_peer_steps_per_second", "Training speed of a peer."),
            "step": (GaugeMetricFamily, "loconet_peer_step", "Local training step of a peer."),
            "last_round": (GaugeMetricFamily, "loconet_peer_last_round", "Last round a peer took part in."),
            "last_heartbeat_s_ago": (
                GaugeMetricFamily,
                "loconet_peer_last_heartbeat_age_seconds",
                "Seconds since the coordinator last heard from a peer.",
            ),
            "samples": (CounterMetricFamily, "loconet_peer_samples", "Training samples a peer has processed."),
            "bytes_sent": (CounterMetricFamily, "loconet_peer_bytes_sent", "Bytes a peer has sent."),
            "bytes_received": (CounterMetricFamily, "loconet_peer_bytes_received", "Bytes a peer has received."),
        }
        built = {field: kind(name, doc, labels=["peer"]) for field, (kind, name, doc) in families.items()}
        for peer in peers:
            peer_id = str(peer.get("peer_id", ""))
            info.add_metric(
                [peer_id],
                {
                    "address": str(peer.get("address", "")),
                    "name": str(peer.get("name", "")),
                    "state": str(peer.get("state", "")),
                    "activity": str(peer.get("activity", "")),
                },
            )
            for field, family in built.items():
                # Unknown values (null / NaN) are left out rather than exported as NaN.
                number = _number(peer.get(field))
                if number is not None:
                    family.add_metric([peer_id], number)
        yield info
        yield from built.values()

    @staticmethod
    def _round_metrics(rounds: list[dict]) -> Iterator[Metric]:
        # One gauge for the most recent finished round keeps cardinality fixed;
        # a label per round id would create a new series every round.
        finished = next((r for r in rounds if r.get("status") in ROUND_STATUSES), None)
        if finished is None:
            return
        for name, doc, value in (
            ("loconet_last_round_id", "Id of the most recent finished round.", finished.get("round_id")),
            (
                "loconet_last_round_duration_seconds",
                "Wall time of the most recent finished round.",
                finished.get("duration_s"),
            ),
            ("loconet_last_round_bytes", "Bytes moved by the most recent finished round.", finished.get("bytes")),
            (
                "loconet_last_round_members",
                "Members of the most recent finished round.",
                len(finished.get("members") or []),
            ),
        ):
            number = _number(value)
            if number is not None:
                yield GaugeMetricFamily(name, doc, value=number)


class _Server(ThreadingHTTPServer):
    """ThreadingHTTPServer that carries the dashboard's state to its handlers and logs instead of printing."""

    daemon_threads = True

    def __init__(
        self,
        address: tuple[str, int],
        status_fn: StatusFn,
        page: bytes,
        registry: CollectorRegistry,
    ) -> None:
        self.status_fn = status_fn
        self.page = page
        self.registry = registry
        super().__init__(address, _Handler)

    def handle_error(self, request: Any, client_address: Any) -> None:
        # Default prints a traceback to stderr; a client that hangs up early is not our error.
        log.debug("dashboard request from %s failed", client_address, exc_info=True)


class _Server6(_Server):
    address_family = socket.AF_INET6


class _Handler(BaseHTTPRequestHandler):
    """Routes GET requests; any failure becomes a 500 response, never a dead server thread."""

    server: _Server
    server_version = "loconet-dashboard"

    def do_GET(self) -> None:  # noqa: N802 - name fixed by BaseHTTPRequestHandler
        """Serve one GET request."""
        path = urlsplit(self.path).path
        try:
            if path in ("/", "/index.html"):
                self._send(HTTPStatus.OK, self.server.page, "text/html; charset=utf-8", {"Content-Security-Policy": _HTML_CSP})
            elif path == "/api/status":
                body = json.dumps(json_safe(self.server.status_fn()), allow_nan=False, separators=(",", ":"))
                self._send(HTTPStatus.OK, body.encode("utf-8"), "application/json")
            elif path == "/metrics":
                self._send(HTTPStatus.OK, generate_latest(self.server.registry), CONTENT_TYPE_LATEST)
            elif path == "/healthz":
                self._send(HTTPStatus.OK, b"ok\n", "text/plain; charset=utf-8")
            else:
                self._send(HTTPStatus.NOT_FOUND, b"not found\n", "text/plain; charset=utf-8")
        except (BrokenPipeError, ConnectionResetError):
            log.debug("dashboard client %s went away", self.client_address)
        except Exception:
            log.exception("dashboard: serving %s failed", path)
            try:
                self._send(HTTPStatus.INTERNAL_SERVER_ERROR, b"status unavailable\n", "text/plain; charset=utf-8")
            except OSError:
                log.debug("dashboard client %s went away before the error reply", self.client_address)

    def _send(self, code: HTTPStatus, body: bytes, content_type: str, extra: dict[str, str] | None = None) -> None:
        self.send_response(code)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        # Every answer is live data (or a page that polls it): never cache.
        self.send_header("Cache-Control", "no-store")
        self.send_header("X-Content-Type-Options", "nosniff")
        for name, value in (extra or {}).items():
            self.send_header(name, value)
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - signature fixed by the base class
        log.debug("dashboard %s - " + format, self.address_string(), *args)


def _load_page() -> bytes:
    """The dashboard page, shipped as package data of ``peer``."""
    return resources.files("peer.coordinator").joinpath("static", "dashboard.html").read_bytes()


class DashboardServer:
    """HTTP endpoint of the coordinator: GET / (HTML page), /api/status (JSON), /metrics (Prometheus text), /healthz."""

    def __init__(self, status_fn: Callable[[], dict], host: str = "127.0.0.1", port: int = 0) -> None:
        self._status_fn = status_fn
        self._host = host
        self._port = port
        self._page = _load_page()
        # A registry per instance: two dashboards in one process (tests) must not share metrics.
        self._registry = CollectorRegistry(auto_describe=False)
        self._registry.register(StatusCollector(status_fn))
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None
        self._url: str | None = None
        self._lock = threading.Lock()

    def start(self) -> str:
        """Bind host:port (port 0 = OS-chosen), serve on a daemon thread and return the base URL."""
        with self._lock:
            if self._server is not None:
                raise RuntimeError("dashboard already started")
            server_cls = _Server6 if ":" in self._host else _Server
            server = server_cls((self._host, self._port), self._status_fn, self._page, self._registry)
            port = server.server_address[1]
            host = f"[{self._host}]" if ":" in self._host else self._host
            self._url = f"http://{host}:{port}"
            self._thread = threading.Thread(
                target=server.serve_forever, name=f"loconet-dashboard-{port}", daemon=True
            )
            self._thread.start()
            self._server = server
        log.info("dashboard serving at %s", self._url)
        return self._url

    def close(self) -> None:
        """Stop serving, join the thread and close the socket; safe to call more than once."""
        with self._lock:
            server, thread = self._server, self._thread
            self._server = self._thread = None
        if server is None:
            return
        server.shutdown()
        if thread is not None:
            thread.join()
        server.server_close()
        log.info("dashboard at %s closed", self._url)

    @property
    def url(self) -> str:
        """Base URL (``http://host:port``) of the running server."""
        if self._url is None:
            raise RuntimeError("dashboard not started")
        return self._url

    def __enter__(self) -> DashboardServer:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
