"""The coordinator's HTTP dashboard: a live HTML page, its JSON feed, Prometheus metrics and a health check.

The server knows nothing of the coordinator's internals. It is fed by one
function, ``status_fn``, that returns the run's status document as a plain
dict (see ``/api/status``); every request reads a fresh document, so the page
and the metrics are always as current as the coordinator's own view.

Routes:

- ``GET /``            the self-contained page ``peer/coordinator/static/dashboard.html``
- ``GET /api/status``  the status document as JSON (non-finite floats become null; its
  fields, and the bounds of the chart history it carries, are in docs/membership.md)
- ``GET /metrics``     Prometheus text exposition, built at scrape time (the families are
  ``peer/coordinator/metrics.py``'s)
- ``GET /healthz``     ``ok`` (open to probes: no token, any Host)

It is read-only (GET and HEAD; anything else is 405) and binds loopback unless
told otherwise. Every answer carries security headers; the Host header must
name this server (against DNS rebinding); an optional bearer token guards all
but ``/healthz``; TLS is optional. Those rules are
``peer/coordinator/dashboard_security.py``'s. Connections are bounded, and
each must deliver its request within a deadline from its accept, so idle or
trickling clients cannot pile up threads or hold every slot. It uses only the standard
library's ``http.server`` and ``ssl`` (plus prometheus-client for the
exposition format).
"""

from __future__ import annotations

import ipaddress
import json
import logging
import math
import socket
import socketserver
import ssl
import sys
import threading
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from importlib import resources
from typing import Any, Self
from urllib.parse import parse_qs, urlsplit

from prometheus_client.exposition import CONTENT_TYPE_LATEST, generate_latest
from prometheus_client.registry import CollectorRegistry

from collectives.errors import ConfigError
from peer.coordinator.dashboard_security import (
    API_CSP,
    MAKE_TOKEN_HINT,
    MIN_TOKEN_BYTES,
    TokenCheck,
    allowed_names,
    host_allowed,
    page_csp,
    parse_allowed_hosts,
    security_headers,
)
from peer.coordinator.metrics import StatusCollector, StatusFn

log = logging.getLogger(__name__)

# Open connections at once (each holds a thread); more are closed at once. The page polls on one.
MAX_CONNECTIONS = 64
# Seconds a connection may stay silent (TLS handshake, request line, headers) before it is dropped.
REQUEST_TIMEOUT_S = 30.0
# Seconds from a connection's accept to the end of its request's headers (TLS handshake included), however it
# trickles them in: REQUEST_TIMEOUT_S bounds each read only, so a client sending a header line every few seconds
# would keep its slot, and MAX_CONNECTIONS of them would shut out everyone, /healthz included.
REQUEST_DEADLINE_S = 30.0


def json_safe(value: Any) -> Any:
    """Return a copy of ``value`` with every non-finite float (NaN, +-Inf) replaced by None."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    return value


class _Server(ThreadingHTTPServer):
    """ThreadingHTTPServer that carries the dashboard's state to its handlers, bounds its connections and logs."""

    daemon_threads = True
    # Closing does not wait for open connections (a silent client would hold it for REQUEST_TIMEOUT_S).
    block_on_close = False
    # Set by DashboardServer.start before serving (it depends on the bound port).
    site: _Site

    def __init__(
        self, address: tuple[str, int], tls: ssl.SSLContext | None, max_connections: int, request_deadline_s: float
    ) -> None:
        # A thread per connection: without a bound, idle connections alone could exhaust the process.
        self._slots = threading.BoundedSemaphore(max_connections)
        self._max_connections = max_connections
        self.request_deadline_s = request_deadline_s
        super().__init__(address, _Handler)
        if tls is not None:
            # The handshake happens on the connection's own thread (first read), so a client that
            # never finishes it holds one slot for REQUEST_TIMEOUT_S, not the accept loop.
            self.socket = tls.wrap_socket(self.socket, server_side=True, do_handshake_on_connect=False)

    def server_bind(self) -> None:
        """Bind, without HTTPServer's reverse lookup of the host's name (``socket.getfqdn``): where DNS does not
        answer (a private network, a namespace) it takes 10 s, on the coordinator's event loop, during which its
        gRPC port accepts connections and answers nothing. Nothing here uses the name."""
        socketserver.TCPServer.server_bind(self)
        host, port = self.server_address[:2]
        self.server_name, self.server_port = str(host), port

    def process_request(self, request: Any, client_address: Any) -> None:
        if not self._slots.acquire(blocking=False):
            log.debug("dashboard: %d connections open, refusing %s", self._max_connections, client_address)
            self.shutdown_request(request)
            return
        try:
            super().process_request(request, client_address)
        except BaseException:
            self._slots.release()
            raise

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            self._slots.release()

    def handle_error(self, request: Any, client_address: Any) -> None:
        # Default prints a traceback to stderr; a client that hangs up early (or fails TLS) is not our error.
        log.debug("dashboard request from %s failed: %r", client_address, sys.exc_info()[1])


class _Server6(_Server):
    address_family = socket.AF_INET6


class _Deadline:
    """Cuts a connection that has not delivered its request's headers within its deadline (a timer thread)."""

    def __init__(self, connection: socket.socket, seconds: float, client: Any) -> None:
        self._connection = connection
        self._client = client
        self._lock = threading.Lock()
        self._done = False
        self.expired = False
        self._timer = threading.Timer(seconds, self._cut)
        self._timer.daemon = True
        self._timer.start()

    def _cut(self) -> None:
        with self._lock:
            if self._done:
                return
            self.expired = True
        log.debug("dashboard: %s did not send its request in time, closing it", self._client)
        try:
            # The plain socket's shutdown (an SSLSocket's own would tear down its TLS state under the reading
            # thread): the handler's blocked read then ends, and it closes the connection.
            socket.socket.shutdown(self._connection, socket.SHUT_RDWR)
        except OSError:
            pass  # already gone

    def stop(self) -> bool:
        """Stop the clock (the headers are in, or the connection is done); True if the deadline had passed."""
        with self._lock:
            self._done = True
        self._timer.cancel()
        return self.expired


@dataclass(frozen=True)
class _Site:
    """What the handlers serve and whom they answer."""

    status_fn: StatusFn
    page: bytes
    page_csp: str
    registry: CollectorRegistry
    hosts: frozenset[str]
    token: TokenCheck | None
    secure: bool


_TEXT = "text/plain; charset=utf-8"
_PAGE_PATHS = ("/", "/index.html")


class _Handler(BaseHTTPRequestHandler):
    """Serves GET and HEAD (everything else is 405) to allowed hosts and token holders; failures become 500s."""

    server: _Server
    server_version = "loconet-dashboard"
    # A client that sends nothing for this long is dropped (it would hold a connection slot).
    timeout = REQUEST_TIMEOUT_S

    def version_string(self) -> str:
        """The Server header: no Python version for a scanner to match against."""
        return self.server_version

    def setup(self) -> None:
        """Set up the connection's streams and start its request deadline."""
        self._deadline = _Deadline(self.request, self.server.request_deadline_s, self.client_address)
        super().setup()

    def finish(self) -> None:
        """Stop the request deadline and flush and close the streams."""
        self._deadline.stop()
        super().finish()

    def parse_request(self) -> bool:
        """Parse the request line and headers (dropping a request cut at its deadline); 405 but for GET and HEAD."""
        parsed = super().parse_request()
        if self._deadline.stop():
            # What was read before the cut is no whole request, and the connection is shut: nothing to answer.
            self.close_connection = True
            return False
        if not parsed:
            return False
        if self.command not in ("GET", "HEAD"):
            self.close_connection = True  # its body, if any, is never read
            self._send(
                HTTPStatus.METHOD_NOT_ALLOWED, b"the dashboard is read-only: use GET or HEAD\n", _TEXT,
                {"Allow": "GET, HEAD"},
            )
            return False
        return True

    def do_GET(self) -> None:
        """Serve one GET request."""
        self._serve()

    def do_HEAD(self) -> None:
        """Serve one HEAD request: a GET's status and headers, without the body."""
        self._serve()

    def _serve(self) -> None:
        site = self.server.site
        url = urlsplit(self.path)
        path = url.path
        try:
            if path == "/healthz":
                # Open to probes (load balancers, Kubernetes): it says "ok" and nothing else.
                self._send(HTTPStatus.OK, b"ok\n", _TEXT)
            elif not host_allowed(self.headers.get("Host"), site.hosts):
                self._send(
                    HTTPStatus.FORBIDDEN,
                    b"this dashboard does not answer to that host name; use its address, or add the name with "
                    b"--dashboard-allowed-hosts\n",
                    _TEXT,
                )
            elif site.token is not None and path in _PAGE_PATHS and "token" in parse_qs(url.query):
                self._open_session(site.token, parse_qs(url.query)["token"][0])
            elif site.token is not None and not site.token.allows(self.headers):
                self._unauthorized()
            elif path in _PAGE_PATHS:
                self._send(HTTPStatus.OK, site.page, "text/html; charset=utf-8", csp=site.page_csp)
            elif path == "/api/status":
                body = json.dumps(json_safe(site.status_fn()), allow_nan=False, separators=(",", ":"))
                self._send(HTTPStatus.OK, body.encode("utf-8"), "application/json")
            elif path == "/metrics":
                self._send(HTTPStatus.OK, generate_latest(site.registry), CONTENT_TYPE_LATEST)
            else:
                self._send(HTTPStatus.NOT_FOUND, b"not found\n", _TEXT)
        except (BrokenPipeError, ConnectionResetError):
            log.debug("dashboard client %s went away", self.client_address)
        except Exception:
            log.exception("dashboard: serving %s failed", path)
            try:
                self._send(HTTPStatus.INTERNAL_SERVER_ERROR, b"status unavailable\n", _TEXT)
            except OSError:
                log.debug("dashboard client %s went away before the error reply", self.client_address)

    def _open_session(self, token: TokenCheck, presented: str) -> None:
        """``/?token=``: the right token gets the session cookie and a redirect that drops it from the URL."""
        if not token.token_matches(presented):
            self._unauthorized()
            return
        # "./" (not "/"): behind a proxy that serves the dashboard under a path, the browser stays there.
        self._send(
            HTTPStatus.SEE_OTHER, b"", _TEXT,
            {"Location": "./", "Set-Cookie": token.set_cookie(secure=self.server.site.secure)},
        )

    def _unauthorized(self) -> None:
        self._send(
            HTTPStatus.UNAUTHORIZED,
            b"this dashboard needs its token (--dashboard-token-file): send 'Authorization: Bearer <token>', "
            b"or open /?token=<token> once in a browser\n",
            _TEXT,
            {"WWW-Authenticate": 'Bearer realm="loconet dashboard"'},
        )

    def send_error(self, code: int, message: str | None = None, explain: str | None = None) -> None:
        """Malformed requests (bad request line, headers too long...): a plain-text answer with the usual headers."""
        self.close_connection = True
        try:
            phrase = HTTPStatus(code).phrase
        except ValueError:
            phrase = "error"
        self._send(code, f"{code} {message or phrase}\n".encode("utf-8", "replace"), _TEXT)

    def _send(
        self, code: int, body: bytes, content_type: str, extra: dict[str, str] | None = None, csp: str = API_CSP
    ) -> None:
        self.send_response(code)
        headers = {"Content-Type": content_type, "Content-Length": str(len(body)), **security_headers(csp)}
        headers.update(extra or {})
        for name, value in headers.items():
            self.send_header(name, value)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def log_request(self, code: int | str = "-", size: int | str = "-") -> None:
        """One debug line per request, without its query (a ``?token=`` must not reach the logs)."""
        path = urlsplit(getattr(self, "path", "") or "").path
        log.debug("dashboard %s %s %s -> %s", self.address_string(), self.command, path, code)

    def log_message(self, format: str, *args: Any) -> None:
        log.debug("dashboard %s - " + format, self.address_string(), *args)


def _is_loopback(host: str) -> bool:
    """Whether host is this machine's loopback only (a name other than localhost counts as not)."""
    if host.strip("[]").lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def _load_page() -> bytes:
    """The dashboard page, shipped as package data of ``peer``."""
    return resources.files("peer.coordinator").joinpath("static", "dashboard.html").read_bytes()


def _tls_context(cert: str | None, key: str | None) -> ssl.SSLContext | None:
    """A server TLS context from a certificate chain and key in PEM files; None without them (None or "")."""
    if not cert and not key:
        return None
    if not cert or not key:
        raise ConfigError("dashboard TLS needs both a certificate and its key (--tls-cert and --tls-key)")
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        context.load_cert_chain(cert, key)
    except (OSError, ssl.SSLError) as exc:
        raise ConfigError(
            f"cannot load the dashboard's TLS certificate {cert} and key {key}: {exc}; check both paths and that "
            "the key belongs to the certificate (PEM)"
        ) from exc
    return context


class DashboardServer:
    """HTTP endpoint of the coordinator: GET / (HTML page), /api/status (JSON), /metrics (Prometheus text), /healthz.

    Read-only (GET and HEAD), loopback unless told otherwise, and guarded as
    ``peer/coordinator/dashboard_security.py`` says: the Host header must name
    this server (DNS rebinding), an optional bearer ``token`` (header, or a
    session cookie for browsers) guards everything but /healthz, and
    ``tls_cert``/``tls_key`` (PEM paths) serve it over HTTPS.
    """

    def __init__(
        self,
        status_fn: Callable[[], dict],
        host: str = "127.0.0.1",
        port: int = 0,
        *,
        token: str | None = None,
        allowed_hosts: Iterable[str] = (),
        tls_cert: str | None = None,
        tls_key: str | None = None,
        max_connections: int = MAX_CONNECTIONS,
        request_deadline_s: float = REQUEST_DEADLINE_S,
    ) -> None:
        if token is not None and len(token) < MIN_TOKEN_BYTES:
            raise ConfigError(f"the dashboard token needs at least {MIN_TOKEN_BYTES} characters; {MAKE_TOKEN_HINT}")
        if max_connections < 1:
            raise ConfigError(f"the dashboard needs at least 1 connection, got max_connections={max_connections}")
        if not request_deadline_s > 0:
            raise ConfigError(f"the dashboard's request deadline must be positive, got {request_deadline_s}")
        self._status_fn = status_fn
        self._host = host
        self._port = port
        self._page = _load_page()
        self._page_csp = page_csp(self._page.decode("utf-8"))
        self._token = token
        self._hosts = allowed_names(host, parse_allowed_hosts(",".join(allowed_hosts)))
        self._tls = _tls_context(tls_cert, tls_key)
        self._max_connections = max_connections
        self._request_deadline_s = request_deadline_s
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
            # The handlers' state is complete only once the port is known (it names the session cookie).
            server = server_cls((self._host, self._port), self._tls, self._max_connections, self._request_deadline_s)
            port = server.server_address[1]
            # Cookies are shared by every port of a host: one per dashboard, so two on one machine do not collide.
            token = TokenCheck(self._token, cookie_name=f"loconet_dashboard_{port}") if self._token else None
            server.site = _Site(
                self._status_fn, self._page, self._page_csp, self._registry, self._hosts, token, self._tls is not None
            )
            host = f"[{self._host}]" if ":" in self._host else self._host
            self._url = f"{'https' if self._tls else 'http'}://{host}:{port}"
            self._thread = threading.Thread(
                target=server.serve_forever, name=f"loconet-dashboard-{port}", daemon=True
            )
            self._thread.start()
            self._server = server
        if self._token is None and not _is_loopback(self._host):
            log.warning(
                "the dashboard on %s has no token: anyone who reaches it reads the run's status; "
                "give the coordinator --dashboard-token-file", self._url,
            )
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

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
