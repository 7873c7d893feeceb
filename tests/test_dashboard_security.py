"""The dashboard's guards: read-only, loopback by default, Host check, bearer token and session cookie, security
headers on every answer, bounded connections, and TLS."""

from __future__ import annotations

import base64
import hashlib
import http.client
import inspect
import logging
import re
import socket
import ssl
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import fields
from pathlib import Path

import pytest

from collectives.errors import ConfigError
from peer.certs import CertsConfig, make_certs
from peer.coordinator.config import CoordinatorConfig
from peer.coordinator.dashboard import DashboardServer
from peer.coordinator.dashboard_security import (
    API_CSP,
    TokenCheck,
    allowed_names,
    host_allowed,
    page_csp,
    parse_allowed_hosts,
    read_token_file,
)

sys.path.insert(0, str(Path(__file__).parent))
from support.browser import NO_CHROMIUM, DomIndex, chromium_path, run_chromium
from support.coordinator import CoordinatorThread

pytestmark = pytest.mark.timeout(60)

TOKEN = "s3cret-dashboard-token-0123456789"
STATUS = {"run_id": "demo", "epoch": 3, "summary": {}, "peers": [], "rounds": [], "events": []}
# Every answer carries these, whatever its route or status.
COMMON_HEADERS = {
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-store",
    "Cross-Origin-Resource-Policy": "same-origin",
}


class Answer:
    """One HTTP answer: status, headers (first value of each, and every Set-Cookie), body."""

    def __init__(self, response: http.client.HTTPResponse) -> None:
        self.status = response.status
        self.headers = dict(response.getheaders())
        self.cookies = response.headers.get_all("Set-Cookie") or []
        self.body = response.read()


def request(
    url: str, method: str = "GET", path: str = "/api/status", headers: dict[str, str] | None = None,
    tls: ssl.SSLContext | None = None,
) -> Answer:
    """One request to the dashboard at url (http.client sends Host as the URL's host:port unless headers set it)."""
    scheme, _, rest = url.partition("://")
    host, port = rest.rsplit(":", 1)
    if scheme == "https":
        conn = http.client.HTTPSConnection(host, int(port), timeout=10, context=tls)
    else:
        conn = http.client.HTTPConnection(host, int(port), timeout=10)
    try:
        headers = dict(headers or {})
        conn.putrequest(method, path, skip_host="Host" in headers)
        for name, value in headers.items():
            conn.putheader(name, value)
        conn.endheaders()
        return Answer(conn.getresponse())
    finally:
        conn.close()


def bearer(token: str = TOKEN) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


@pytest.fixture
def serve() -> Iterator[Callable[..., DashboardServer]]:
    """Factory that starts a DashboardServer on 127.0.0.1, port 0, and closes every one it made."""
    made: list[DashboardServer] = []

    def start(status_fn: Callable[[], dict] = lambda: STATUS, **kwargs) -> DashboardServer:
        server = DashboardServer(status_fn, host=kwargs.pop("host", "127.0.0.1"), port=0, **kwargs)
        made.append(server)
        server.start()
        return server

    yield start
    for server in made:
        server.close()


# ---- binding -----------------------------------------------------------------------


def test_the_dashboard_and_the_coordinator_option_bind_loopback_by_default():
    assert inspect.signature(DashboardServer).parameters["host"].default == "127.0.0.1"
    assert {f.name: f.default for f in fields(CoordinatorConfig)}["dashboard_host"] == "127.0.0.1"


# ---- security headers ------------------------------------------------------------------


def _answers(url: str) -> dict[str, Answer]:
    return {
        "page": request(url, path="/"),
        "status": request(url),
        "metrics": request(url, path="/metrics"),
        "healthz": request(url, path="/healthz"),
        "not found": request(url, path="/nope"),
        "method not allowed": request(url, method="POST"),
        "wrong host": request(url, headers={"Host": "evil.example"}),
    }


@pytest.mark.parametrize("header", sorted(COMMON_HEADERS))
def test_every_answer_carries_the_security_header(serve, header):
    for route, answer in _answers(serve().url).items():
        assert answer.headers.get(header) == COMMON_HEADERS[header], route


def test_every_answer_but_the_page_forbids_everything_by_csp(serve):
    for route, answer in _answers(serve().url).items():
        if route != "page":
            assert answer.headers["Content-Security-Policy"] == API_CSP, route
    assert "default-src 'none'" in API_CSP and "frame-ancestors 'none'" in API_CSP


def test_the_page_may_run_only_its_own_inline_script_and_style(serve):
    answer = request(serve().url, path="/")
    csp = answer.headers["Content-Security-Policy"]
    page = answer.body.decode("utf-8")
    (script,) = re.findall(r"<script>(.*?)</script>", page, re.DOTALL)
    (style,) = re.findall(r"<style>(.*?)</style>", page, re.DOTALL)

    def sha(text: str) -> str:
        return "'sha256-" + base64.b64encode(hashlib.sha256(text.encode()).digest()).decode() + "'"

    directives = dict(d.strip().split(" ", 1) for d in csp.split(";"))
    assert directives["script-src"] == sha(script)
    assert directives["style-src"] == sha(style)
    assert directives["connect-src"] == "'self'"
    assert directives["default-src"] == directives["base-uri"] == directives["form-action"] == "'none'"
    assert directives["frame-ancestors"] == "'none'"
    assert "unsafe-inline" not in csp and "unsafe-eval" not in csp


def test_page_csp_of_a_page_without_scripts_allows_none():
    assert "script-src 'none'; style-src 'none'" in page_csp("<html><body>hi</body></html>")


def test_the_server_header_names_no_python_version(serve):
    assert request(serve().url).headers["Server"] == "loconet-dashboard"


# ---- read-only ---------------------------------------------------------------------------


@pytest.mark.parametrize("method", ["POST", "PUT", "DELETE", "PATCH", "OPTIONS", "TRACE", "CONNECT", "PROPFIND"])
def test_any_method_but_get_and_head_is_refused_without_reading_the_status(serve, method):
    calls = []
    answer = request(serve(lambda: calls.append(1) or STATUS).url, method=method)
    assert answer.status == 405
    assert answer.headers["Allow"] == "GET, HEAD"
    assert calls == []


def test_head_answers_like_get_without_a_body(serve):
    url = serve().url
    get, head = request(url), request(url, method="HEAD")
    assert (head.status, head.body) == (200, b"")
    assert head.headers["Content-Length"] == str(len(get.body))
    assert head.headers["Content-Type"] == get.headers["Content-Type"] == "application/json"


# ---- the Host header (DNS rebinding) --------------------------------------------------------


@pytest.mark.parametrize(
    ("host", "allowed"),
    [
        (None, True),  # no Host at all: no browser sent it
        ("127.0.0.1:8080", True),
        ("127.0.0.1", True),
        ("localhost:8080", True),
        ("LOCALHOST:8080", True),
        ("localhost.:8080", True),
        ("[::1]:8080", True),
        ("10.0.0.7:8080", True),  # any IP address: an address cannot be re-pointed
        ("[2001:db8::1]", True),
        ("dash.example.org:443", True),  # named by --dashboard-allowed-hosts
        ("Dash.Example.Org", True),
        ("evil.example:8080", False),  # a rebinding page's own name
        ("evil.example", False),
        ("localhost.evil.example:8080", False),
        ("127.0.0.1.evil.example", False),
        ("dash.example.org.evil.example", False),
        ("", False),
        ("localhost:http", False),
        ("::1", False),  # an IPv6 address in Host needs brackets
        ("[::1", False),
        ("[::1]x", False),
    ],
)
def test_host_allowed(host, allowed):
    assert host_allowed(host, allowed_names("127.0.0.1", ["dash.example.org"])) is allowed


def test_the_name_the_dashboard_is_bound_to_is_allowed():
    assert host_allowed("coord.internal:8080", allowed_names("coord.internal"))
    assert not host_allowed("coord.internal:8080", allowed_names("0.0.0.0"))


@pytest.mark.parametrize(
    ("text", "names"),
    [
        ("", ()),
        ("dash.example.org", ("dash.example.org",)),
        (" A.example , b-2.example. ,", ("a.example", "b-2.example")),
    ],
)
def test_parse_allowed_hosts(text, names):
    assert parse_allowed_hosts(text) == names


@pytest.mark.parametrize("text", ["http://dash.example.org", "dash.example.org:8080", "bad_name", "a b", "-x.example"])
def test_an_allowed_host_that_is_not_a_name_is_a_config_error(text):
    with pytest.raises(ConfigError, match="not a host name"):
        parse_allowed_hosts(text)
    with pytest.raises(ConfigError):
        CoordinatorConfig(dashboard_allowed_hosts=text)


@pytest.mark.parametrize("path", ["/", "/api/status", "/metrics"])
def test_a_rebinding_host_is_refused(serve, path):
    calls = []
    url = serve(lambda: calls.append(1) or STATUS).url
    answer = request(url, path=path, headers={"Host": f"evil.example:{url.rsplit(':', 1)[1]}"})
    assert answer.status == 403
    assert b"--dashboard-allowed-hosts" in answer.body
    assert calls == []


def test_an_allowed_name_and_localhost_are_answered(serve):
    url = serve(allowed_hosts=["dash.example.org"]).url
    assert request(url, headers={"Host": "dash.example.org"}).status == 200
    assert request(url, headers={"Host": "localhost:1234"}).status == 200


def test_healthz_answers_any_host_without_a_token(serve):
    url = serve(token=TOKEN).url
    answer = request(url, path="/healthz", headers={"Host": "evil.example"})
    assert (answer.status, answer.body) == (200, b"ok\n")


# ---- the bearer token ------------------------------------------------------------------------


@pytest.mark.parametrize("path", ["/", "/api/status", "/metrics"])
@pytest.mark.parametrize(
    ("headers", "status"),
    [
        ({}, 401),
        (bearer("wrong-token-wrong-token-wrong"), 401),
        (bearer(TOKEN[:-1]), 401),
        (bearer(TOKEN + "x"), 401),
        ({"Authorization": f"Basic {TOKEN}"}, 401),
        ({"Authorization": TOKEN}, 401),
        (bearer(), 200),
        ({"Authorization": f"bearer {TOKEN}"}, 200),  # the scheme is case-insensitive
    ],
)
def test_the_token_guards_every_route(serve, path, headers, status):
    calls = []
    answer = request(serve(lambda: calls.append(1) or STATUS, token=TOKEN).url, path=path, headers=headers)
    assert answer.status == status
    if status == 401:
        assert answer.headers["WWW-Authenticate"] == 'Bearer realm="loconet dashboard"'
        assert calls == []


def test_without_a_token_the_dashboard_is_open(serve):
    assert request(serve().url).status == 200


def test_a_browser_opens_a_session_with_the_token_in_the_url_once(serve):
    url = serve(token=TOKEN).url
    answer = request(url, path=f"/?token={TOKEN}")
    assert answer.status == 303
    assert answer.headers["Location"] == "./"
    (cookie,) = answer.cookies
    name_value, *flags = [part.strip() for part in cookie.split(";")]
    assert set(flags) == {"Path=/", "HttpOnly", "SameSite=Strict"}  # no Secure over plain HTTP
    name, value = name_value.split("=", 1)
    assert name == f"loconet_dashboard_{url.rsplit(':', 1)[1]}"
    assert TOKEN not in cookie  # the cookie holds a digest of the token, never the token
    assert request(url, headers={"Cookie": f"other=1; {name}={value}"}).status == 200
    assert request(url, path="/metrics", headers={"Cookie": name_value}).status == 200


def test_a_wrong_token_in_the_url_opens_no_session(serve):
    answer = request(serve(token=TOKEN).url, path="/?token=wrong-token-wrong-token-wrong")
    assert answer.status == 401
    assert answer.cookies == []


def test_the_token_in_the_url_opens_nothing_but_the_page(serve):
    assert request(serve(token=TOKEN).url, path=f"/api/status?token={TOKEN}").status == 401


def test_a_forged_or_foreign_cookie_is_refused(serve):
    url = serve(token=TOKEN).url
    name = f"loconet_dashboard_{url.rsplit(':', 1)[1]}"
    other = TokenCheck("another-dashboards-token-0123", cookie_name=name)
    assert request(url, headers={"Cookie": f"{name}={other.cookie_value}"}).status == 401
    assert request(url, headers={"Cookie": f"{name}={TOKEN}"}).status == 401  # the raw token is not the cookie


def test_the_token_never_reaches_the_logs(serve, caplog):
    caplog.set_level(logging.DEBUG, logger="peer.coordinator")
    url = serve(token=TOKEN).url
    request(url, path=f"/?token={TOKEN}")
    request(url, headers=bearer())
    assert "dashboard" in caplog.text
    assert TOKEN not in caplog.text


def test_a_short_token_is_a_config_error():
    with pytest.raises(ConfigError, match="at least 16"):
        DashboardServer(lambda: STATUS, token="short")


def test_the_token_file_is_read_stripped(tmp_path):
    path = tmp_path / "token"
    path.write_text(f"  {TOKEN}\n")
    path.chmod(0o600)
    assert read_token_file(str(path)) == TOKEN


@pytest.mark.parametrize(
    ("content", "match"),
    [
        (b"short\n", "at least 16"),
        (b"two words but long enough", "one word"),
        ("t\u00f6ken-0123456789ab".encode(), "ASCII"),
    ],
)
def test_a_bad_token_file_is_a_config_error(tmp_path, content, match):
    path = tmp_path / "token"
    path.write_bytes(content)
    with pytest.raises(ConfigError, match=match):
        read_token_file(str(path))


def test_a_missing_token_file_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match="cannot read the dashboard token file"):
        read_token_file(str(tmp_path / "nope"))


def test_a_token_file_others_can_read_is_warned_about(tmp_path, caplog):
    path = tmp_path / "token"
    path.write_text(TOKEN)
    path.chmod(0o644)
    read_token_file(str(path))
    assert "chmod 600" in caplog.text


def test_the_coordinator_guards_its_dashboard_with_the_token_file(tmp_path):
    path = tmp_path / "token"
    path.write_text(TOKEN)
    path.chmod(0o600)
    config = CoordinatorConfig(run_id="r", port=0, dashboard_port=0, dashboard_token_file=str(path))
    with CoordinatorThread(config) as coordinator:
        url = coordinator.server.dashboard_url
        assert request(url).status == 401
        answer = request(url, headers=bearer())
        assert answer.status == 200
        assert b'"run_id":"r"' in answer.body


def test_a_coordinator_with_a_bad_token_file_does_not_start(tmp_path):
    config = CoordinatorConfig(run_id="r", port=0, dashboard_port=0, dashboard_token_file=str(tmp_path / "nope"))
    with pytest.raises(ConfigError, match="dashboard token file"):
        CoordinatorThread(config)


def test_a_dashboard_token_that_is_the_run_secret_is_refused(tmp_path):
    # The dashboard's token goes into browser URLs and scrapers' configs; the run secret must not go with it.
    from collectives.net.rpc import RpcSecurity

    path = tmp_path / "token"
    path.write_text(TOKEN)
    path.chmod(0o600)
    config = CoordinatorConfig(run_id="r", port=0, dashboard_port=0, dashboard_token_file=str(path),
                               security=RpcSecurity(token_file=str(path)))
    with pytest.raises(ConfigError, match=f"--dashboard-token-file {path} holds the run secret"):
        CoordinatorThread(config)


# ---- bounded connections -----------------------------------------------------------------------


def test_connections_beyond_the_bound_are_closed_at_once(serve):
    url = serve(max_connections=2).url
    port = int(url.rsplit(":", 1)[1])
    idle = [socket.create_connection(("127.0.0.1", port), timeout=10) for _ in range(2)]
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=10) as extra:
            assert extra.recv(100) == b""  # closed at once, unanswered
    finally:
        for s in idle:
            s.close()
    # The slots are free again once those close (their threads notice the close first: wait for it).
    deadline = time.monotonic() + 10
    while True:
        try:
            assert request(url, path="/healthz").status == 200
            break
        except (http.client.HTTPException, OSError):
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)


def _trickle(conn: socket.socket, lines: int) -> bytes | None:
    """Send a request line, then a header line every 0.1 s; what the server sent before closing (None: never closed)."""
    conn.sendall(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n")
    # A read that waits 0.1 s for the server (not select: TLS 1.3 session tickets make a socket readable).
    conn.settimeout(0.1)
    for n in range(lines):
        try:
            conn.sendall(f"X-Slow-{n}: {n}\r\n".encode())
            return conn.recv(1000)  # b"" (closed), or whatever the server said before closing
        except TimeoutError:
            continue  # still open, silent
        except OSError:  # reset, or the TLS session cut without its close_notify
            return b""
    return None


@pytest.mark.parametrize("tls", [False, True], ids=["http", "https"])
def test_a_client_trickling_its_headers_loses_its_slot_at_the_request_deadline(serve, self_signed, tls):
    """The per-read timeout never fires for a client that sends a header line now and then: the deadline does."""
    cert, key, ca = self_signed
    kwargs = {"tls_cert": cert, "tls_key": key} if tls else {}
    url = serve(max_connections=1, request_deadline_s=0.5, **kwargs).url
    client = ssl.create_default_context(cafile=ca) if tls else None
    raw = socket.create_connection(("127.0.0.1", int(url.rsplit(":", 1)[1])), timeout=10)
    with (client.wrap_socket(raw, server_hostname="127.0.0.1") if client else raw) as conn:
        # 60 lines take 6 s: far beyond the deadline, well within the per-read timeout and the 100-header limit.
        said = _trickle(conn, lines=60)
    assert said is not None and b"200" not in said
    # Its slot (the only one) is free again once its thread has ended.
    give_up = time.monotonic() + 10
    while True:
        try:
            assert request(url, path="/healthz", tls=client).status == 200
            break
        except (http.client.HTTPException, OSError):
            if time.monotonic() > give_up:
                raise
            time.sleep(0.05)


@pytest.mark.parametrize("seconds", [0, -1.0])
def test_a_request_deadline_must_be_positive(seconds):
    with pytest.raises(ConfigError, match="request deadline must be positive"):
        DashboardServer(lambda: STATUS, request_deadline_s=seconds)


# ---- TLS -----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def self_signed(tmp_path_factory) -> tuple[str, str, str]:
    """A certificate for localhost and 127.0.0.1, its key, and the CA that signed it (PEM paths; loconet certs)."""
    made = make_certs(CertsConfig(out=str(tmp_path_factory.mktemp("tls")), hosts=("dashboard",), local=True))
    ((cert, key),) = made.hosts
    return str(cert), str(key), str(made.ca_cert)


def test_tls_serves_https_that_verifies_against_the_certificate(serve, self_signed):
    cert, key, ca = self_signed
    url = serve(tls_cert=cert, tls_key=key).url
    assert url.startswith("https://127.0.0.1:")
    answer = request(url, tls=ssl.create_default_context(cafile=ca))
    assert answer.status == 200
    assert answer.headers["X-Frame-Options"] == "DENY"


def test_tls_session_cookie_is_secure(serve, self_signed):
    cert, key, ca = self_signed
    url = serve(tls_cert=cert, tls_key=key, token=TOKEN).url
    answer = request(url, path=f"/?token={TOKEN}", tls=ssl.create_default_context(cafile=ca))
    (cookie,) = answer.cookies
    assert "Secure" in [part.strip() for part in cookie.split(";")]


def test_tls_refuses_a_client_that_does_not_trust_the_certificate(serve, self_signed):
    cert, key, _ = self_signed
    url = serve(tls_cert=cert, tls_key=key).url
    with pytest.raises(ssl.SSLCertVerificationError):
        request(url, tls=ssl.create_default_context())


def test_a_client_that_never_starts_its_handshake_holds_up_nobody(serve, self_signed):
    cert, key, ca = self_signed
    url = serve(tls_cert=cert, tls_key=key).url
    with socket.create_connection(("127.0.0.1", int(url.rsplit(":", 1)[1])), timeout=10):
        assert request(url, tls=ssl.create_default_context(cafile=ca)).status == 200


def test_plain_http_to_a_tls_dashboard_gets_no_answer_and_it_keeps_serving(serve, self_signed):
    cert, key, ca = self_signed
    url = serve(tls_cert=cert, tls_key=key).url
    with pytest.raises((http.client.HTTPException, OSError)):
        request(url.replace("https://", "http://"))
    assert request(url, tls=ssl.create_default_context(cafile=ca)).status == 200


@pytest.mark.parametrize(
    ("cert", "key", "match"),
    [
        ("{cert}", None, "both"),
        (None, "{key}", "both"),
        ("{missing}", "{key}", "cannot load"),
        ("{key}", "{cert}", "cannot load"),
    ],
)
def test_bad_tls_files_are_a_config_error(self_signed, tmp_path, cert, key, match):
    paths = {"cert": self_signed[0], "key": self_signed[1], "missing": str(tmp_path / "missing.pem")}
    with pytest.raises(ConfigError, match=match):
        DashboardServer(
            lambda: STATUS, tls_cert=cert and cert.format(**paths), tls_key=key and key.format(**paths)
        )


# ---- the page in headless Chromium, with a token -------------------------------------------------------


needs_chromium = pytest.mark.skipif(chromium_path() is None, reason=NO_CHROMIUM)


@needs_chromium
def test_the_page_opened_with_its_token_goes_live(serve, tmp_path):
    url = serve(token=TOKEN).url
    dom = DomIndex(run_chromium(f"{url}/?token={TOKEN}", tmp_path, "--dump-dom"))
    assert dom.by_id("status-line").text == "live"
    assert dom.by_id("s-epoch").text == "3"


@needs_chromium
def test_the_page_without_its_token_says_how_to_open_it(serve, tmp_path):
    url = serve(token=TOKEN).url
    # The page itself is refused; what the browser shows is the 401's text.
    text = run_chromium(f"{url}/", tmp_path, "--dump-dom")
    assert "open /?token=" in text
