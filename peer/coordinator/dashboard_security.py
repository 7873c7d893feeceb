"""The dashboard's access rules: who may read it, from which host name, and the headers every answer carries.

Pure decisions (no sockets), used by ``peer/coordinator/dashboard.py``:

- **Host header** (against DNS rebinding). A page on ``evil.example`` whose
  name the attacker re-points at 127.0.0.1 can make the victim's browser read
  ``http://evil.example:8080/api/status`` "same-origin"; the only trace is the
  ``Host: evil.example`` header. So a request is answered only when its Host
  names ``localhost``, an IP address (an address is never re-pointed: a page
  whose origin is this server's address is this server's own page), the name
  the dashboard is bound to, or a name the operator allowed
  (``--dashboard-allowed-hosts``). The port is not compared: port forwards
  (``ssh -L``, ``kubectl port-forward``) change it, and rebinding is stopped by
  the name alone.
- **Bearer token** (``--dashboard-token-file``). Scripts and Prometheus send
  ``Authorization: Bearer <token>``. A browser cannot add a header to a page it
  navigates to, so it opens ``/?token=<token>`` once: the answer sets a cookie
  (HttpOnly, SameSite=Strict, Secure under TLS) and redirects to ``/`` so the
  token leaves the address bar; the page's own requests then carry the cookie.
  The cookie holds an HMAC of the token, not the token, so a leaked cookie
  never reveals the secret (cookies are shared by every port of a host). Both
  are compared in constant time, on fixed-length digests.
- **Headers**: a Content-Security-Policy that lets the page run only its own
  inline script and style (by hash), fetch only its own origin and be framed by
  nobody; nosniff, no referrer, no caching, same-origin resources only.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import ipaddress
import logging
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from collectives.errors import ConfigError
from collectives.net.credentials import read_secret_file

log = logging.getLogger(__name__)

# A token shorter than this could be guessed by trying.
MIN_TOKEN_BYTES = 16
MAKE_TOKEN_HINT = "make one with: python -c 'import secrets; print(secrets.token_urlsafe(32))' > FILE; chmod 600 FILE"
# Names the dashboard always answers to (with any port), besides IP addresses.
LOOPBACK_NAMES = frozenset({"localhost"})
# RFC 1123 host names: letters, digits, hyphens, dots; at most 253 characters.
_HOST_NAME = re.compile(
    r"^(?=.{1,253}$)[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?"
    r"(?:\.[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?)*$"
)
_COOKIE_CONTEXT = b"loconet dashboard session v1"

# Everything but the page: nothing may run, load, or frame it.
API_CSP = "default-src 'none'; frame-ancestors 'none'; base-uri 'none'; form-action 'none'"
_BLOCK = re.compile(r"<(script|style)>(.*?)</\1>", re.DOTALL)


def _csp_hash(text: str) -> str:
    digest = base64.b64encode(hashlib.sha256(text.encode("utf-8")).digest()).decode("ascii")
    return f"'sha256-{digest}'"


def page_csp(page: str) -> str:
    """The page's Content-Security-Policy: its inline scripts and styles by hash, fetches to its own origin only.

    Hashes rather than 'unsafe-inline': markup injected through a status string
    could not run a script even if the page's escaping failed.
    """
    hashes: dict[str, list[str]] = {"script": [], "style": []}
    for tag, body in _BLOCK.findall(page):
        hashes[tag].append(_csp_hash(body))
    scripts = " ".join(hashes["script"]) or "'none'"
    styles = " ".join(hashes["style"]) or "'none'"
    return (
        f"default-src 'none'; script-src {scripts}; style-src {styles}; connect-src 'self'; img-src data:; "
        "base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
    )


def security_headers(csp: str) -> dict[str, str]:
    """The headers every dashboard answer carries (error answers too)."""
    return {
        "Content-Security-Policy": csp,
        "X-Content-Type-Options": "nosniff",
        "X-Frame-Options": "DENY",
        "Referrer-Policy": "no-referrer",
        # Every answer is live data (or a page that polls it): never cache, never share through a proxy.
        "Cache-Control": "no-store",
        # Other sites may neither embed these answers (even as opaque loads) nor keep a handle on the page.
        "Cross-Origin-Resource-Policy": "same-origin",
        "Cross-Origin-Opener-Policy": "same-origin",
    }


# -- Host header -------------------------------------------------------------------------


def _host_name(value: str) -> str | None:
    """The host part of a Host header value, lower-case, without port or trailing dot; None when malformed."""
    value = value.strip().lower()
    if value.startswith("["):
        end = value.find("]")
        rest = value[end + 1:]
        if end < 0 or (rest and not re.fullmatch(r":\d{1,5}", rest)):
            return None
        return value[1:end]
    name, colon, port = value.partition(":")
    if colon and not re.fullmatch(r"\d{1,5}", port):
        return None
    return name.rstrip(".") or None


def _is_ip(name: str) -> bool:
    try:
        ipaddress.ip_address(name)
    except ValueError:
        return False
    return True


def parse_allowed_hosts(text: str) -> tuple[str, ...]:
    """Host names from a comma-separated list (``--dashboard-allowed-hosts``); ConfigError for one that is not a
    name."""
    names = []
    for raw in text.split(","):
        name = raw.strip().lower().rstrip(".")
        if not raw.strip():
            continue
        if not _HOST_NAME.fullmatch(name) and not _is_ip(name.strip("[]")):
            raise ConfigError(
                f"dashboard allowed host {raw.strip()!r} is not a host name: give names like dash.example.org, "
                "comma-separated, without scheme or port"
            )
        names.append(name)
    return tuple(names)


def allowed_names(bound_host: str, extra: Iterable[str] = ()) -> frozenset[str]:
    """The host names a dashboard bound to bound_host answers to (IP addresses are always answered)."""
    names = set(LOOPBACK_NAMES) | {n.lower().rstrip(".") for n in extra}
    bound = bound_host.strip("[]").lower().rstrip(".")
    if bound and not _is_ip(bound):
        names.add(bound)
    return frozenset(names)


def host_allowed(host_header: str | None, names: frozenset[str]) -> bool:
    """Whether a request with this Host header may be answered (see the module docstring)."""
    if host_header is None:
        # Every browser sends Host, so a request without one is no rebinding page (HTTP/1.0 tools).
        return True
    name = _host_name(host_header)
    if name is None:
        return False
    return _is_ip(name) or name in names


# -- the bearer token --------------------------------------------------------------------


def read_token_file(path: str) -> str:
    """The dashboard token in path (surrounding whitespace stripped); ConfigError when unreadable, short or odd."""
    raw = read_secret_file(path, "the dashboard token file")
    try:
        token = raw.decode("ascii")
    except UnicodeDecodeError:
        raise ConfigError(f"the dashboard token in {path} must be printable ASCII; {MAKE_TOKEN_HINT}") from None
    if not token.isprintable() or any(c.isspace() for c in token):
        raise ConfigError(f"the dashboard token in {path} must be one word of printable ASCII; {MAKE_TOKEN_HINT}")
    if len(token) < MIN_TOKEN_BYTES:
        raise ConfigError(
            f"the dashboard token in {path} has {len(token)} characters, it needs at least {MIN_TOKEN_BYTES}; "
            f"{MAKE_TOKEN_HINT}"
        )
    return token


def _digest(value: str) -> bytes:
    # Header values arrive as latin-1 text: every byte maps back, so any value can be compared.
    return hashlib.sha256(value.encode("latin-1", "replace")).digest()


@dataclass(frozen=True)
class TokenCheck:
    """Checks a request's bearer token or session cookie against the dashboard's token."""

    token: str
    cookie_name: str = "loconet_dashboard"

    @property
    def cookie_value(self) -> str:
        """What the session cookie holds: an HMAC of the token (never the token itself)."""
        return hmac.new(self.token.encode("ascii"), _COOKIE_CONTEXT, hashlib.sha256).hexdigest()

    def token_matches(self, presented: str) -> bool:
        """Whether presented is the token (constant time: fixed-length digests compared)."""
        return hmac.compare_digest(_digest(presented), _digest(self.token))

    def allows(self, headers: Mapping[str, str]) -> bool:
        """Whether the request proves the token: ``Authorization: Bearer <token>`` or the session cookie."""
        scheme, _, presented = (headers.get("Authorization") or "").strip().partition(" ")
        if scheme.lower() == "bearer" and self.token_matches(presented.strip()):
            return True
        cookie = _cookie(headers.get("Cookie") or "", self.cookie_name)
        return cookie is not None and hmac.compare_digest(_digest(cookie), _digest(self.cookie_value))

    def set_cookie(self, secure: bool) -> str:
        """The Set-Cookie value that opens a browser session: script cannot read it, other sites never send it."""
        flags = "; Secure" if secure else ""
        return f"{self.cookie_name}={self.cookie_value}; Path=/; HttpOnly; SameSite=Strict{flags}"


def _cookie(header: str, name: str) -> str | None:
    """The value of the first cookie called name in a Cookie header, or None."""
    for part in header.split(";"):
        key, eq, value = part.strip().partition("=")
        if eq and key == name:
            return value.strip().strip('"')
    return None
