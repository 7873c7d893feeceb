"""Why a connection to a TLS (or plaintext) server fails, said as the option to change.

gRPC reports a TLS misconfiguration as an unreachable server: "Socket closed"
when a server that requires TLS gets a plaintext client, or refuses the
client's certificate; "Tls handshake failed" with an OpenSSL code when the
client does not trust the server's certificate or the server speaks no TLS.
A peer then retried for its whole patience (five minutes) with that line.
``known_failure`` reads the handshake failures gRPC names (a pure function);
``probe`` looks at the server with a handshake of its own, for what gRPC only
calls a closed socket: whether the server speaks TLS at all, and whether it
accepts this process's certificate.
"""

from __future__ import annotations

import socket
import ssl

from collectives.errors import ConfigError
from collectives.net.addresses import split_address
from collectives.net.rpc import RpcSecurity

# What probe() found.
PLAINTEXT = "plaintext"  # the server speaks no TLS
TLS = "tls"  # the server speaks TLS and accepted this process's handshake and certificate (if any)
REFUSED_CERTIFICATE = "refused-certificate"  # the server speaks TLS and refused this process's certificate
UNKNOWN = ""  # nothing learnt (no answer, a reset): the usual "unreachable" stands

# TLS alerts a server sends when it does not accept the client's certificate (or that it sent none).
_CERTIFICATE_ALERTS = ("certificate_required", "unknown_ca", "bad_certificate", "certificate_unknown",
                       "handshake_failure")
# The start of an HTTP/2 connection: its preface and an empty SETTINGS frame.
_HTTP2_PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + b"\x00\x00\x00\x04\x00\x00\x00\x00\x00"
# How long a probe waits for the server, per step.
PROBE_TIMEOUT_S = 3.0


class TLSMismatch(ConfigError):
    """This process and the server it dials disagree on TLS: one speaks it and the other not, or one does not trust
    the other's certificate; the message says which option to change."""


def known_failure(details: str, security: RpcSecurity, what: str, address: str) -> TLSMismatch | None:
    """TLSMismatch for a handshake failure gRPC names in ``details`` (of a call to ``what`` at ``address``), else
    None: the ones it calls a closed socket need ``probe``."""
    lower = details.lower()
    if "certificate_verify_failed" in lower:
        return TLSMismatch(f"{what} at {address} presents a certificate that this process's --tls-ca "
                           f"({security.tls_ca or 'none: the system CAs'}) did not sign: give it the ca.pem of the "
                           "run's `loconet certs` folder, the CA that signed the certificates of the whole run")
    if "is not in peer certificate" in lower:
        return TLSMismatch(f"{what}'s certificate does not name {address.rsplit(':', 1)[0]}: make its certificate "
                           f"with `loconet certs --host NAME=ADDRESS` naming the address this process dials")
    if security.tls and "wrong_version_num" in lower:
        return _plaintext_server(what, address)
    return None


def verdict(found: str, security: RpcSecurity, what: str, address: str) -> TLSMismatch | None:
    """TLSMismatch for what ``probe`` found at ``address`` when this process's ``security`` cannot work with it."""
    if found in (TLS, REFUSED_CERTIFICATE) and not security.tls:  # it closes on a client without a certificate
        return TLSMismatch(f"{what} at {address} requires TLS and this process dials it without: give it --tls-cert, "
                           "--tls-key and --tls-ca from the run's `loconet certs` folder")
    if found == PLAINTEXT and security.tls:
        return _plaintext_server(what, address)
    if found == REFUSED_CERTIFICATE:
        return TLSMismatch(f"{what} at {address} refused this process's certificate ({security.tls_cert or 'none'}): "
                           "it takes only certificates its --tls-ca signed; use one from the run's `loconet certs` "
                           "folder, with that folder's ca.pem")
    return None


def probe(address: str, security: RpcSecurity, timeout_s: float = PROBE_TIMEOUT_S) -> str:
    """Look at the server at ``address`` with a TLS handshake of our own (blocking; run it off the event loop):
    PLAINTEXT, TLS, REFUSED_CERTIFICATE (of ``security``'s certificate), or UNKNOWN."""
    host, port = split_address(address)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    # Only whether the server speaks TLS and takes our certificate is asked here; whether we trust its
    # certificate, gRPC's own handshake says (known_failure).
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    context.set_alpn_protocols(["h2"])
    if security.tls:
        context.load_cert_chain(security.tls_cert, security.tls_key)
    try:
        raw = socket.create_connection((host, port), timeout=timeout_s)
    except OSError:
        return UNKNOWN
    with raw:
        try:
            with context.wrap_socket(raw, server_hostname=host) as tls:
                # Under TLS 1.3 the server judges the client's certificate after the client's handshake ends. A
                # server that accepts it answers HTTP/2's preface with its SETTINGS frame; gRPC's closes the
                # connection without a word (others send an alert) when the certificate is missing or untrusted.
                tls.sendall(_HTTP2_PREFACE)
                return TLS if tls.recv(1) else REFUSED_CERTIFICATE
        except ssl.SSLError as exc:
            reason = (exc.reason or str(exc)).lower()
            if "alert" in reason or any(a in reason for a in _CERTIFICATE_ALERTS):
                return REFUSED_CERTIFICATE if any(a in reason for a in _CERTIFICATE_ALERTS) else TLS
            if "wrong_version_number" in reason or "record_layer_failure" in reason or "packet_length" in reason:
                return PLAINTEXT
            return UNKNOWN
        except (OSError, EOFError):
            return UNKNOWN


def _plaintext_server(what: str, address: str) -> TLSMismatch:
    return TLSMismatch(f"{what} at {address} speaks no TLS and this process dials it with TLS (--tls-cert): start "
                       f"{what} with --tls-cert, --tls-key and --tls-ca too, or drop them here")
