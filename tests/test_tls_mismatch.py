"""A peer whose TLS options do not fit its coordinator's stops in one line saying which to change.

gRPC reports each of these as an unreachable server, and a peer used to retry for its whole patience (five
minutes). Real servers on 127.0.0.1, OS-chosen ports; certificates from ``loconet certs``' own code.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path

import pytest

from collectives.membership.client import MembershipClient, MembershipConfig
from collectives.net.rpc import RpcSecurity, RpcSettings, bind, make_server
from collectives.net.tlsprobe import (
    PLAINTEXT,
    REFUSED_CERTIFICATE,
    TLS,
    UNKNOWN,
    TLSMismatch,
    known_failure,
    probe,
    verdict,
)
from collectives.net.transport import Transport
from collectives.net.transportconfig import TransportConfig
from peer.certs import CertsConfig, make_certs
from peer.coordinator.config import CoordinatorConfig
from peer.coordinator.thread import CoordinatorThread
from support.ports import closed_port_address

pytestmark = pytest.mark.timeout(60)

RUN = "tls-mismatch"
PLAIN = RpcSecurity()
CERT = RpcSecurity(tls_cert="peer.pem", tls_key="peer.key", tls_ca="ca.pem")


def security_of(folder: Path) -> RpcSecurity:
    made = make_certs(CertsConfig(out=str(folder), hosts=("node",)))
    cert, key = made.hosts[0]
    return RpcSecurity(tls_cert=str(cert), tls_key=str(key), tls_ca=str(made.ca_cert))


@pytest.fixture(scope="module")
def run_certs(tmp_path_factory) -> RpcSecurity:
    return security_of(tmp_path_factory.mktemp("run"))


@pytest.fixture(scope="module")
def other_certs(tmp_path_factory) -> RpcSecurity:
    """Certificates of another CA: the run's servers do not take them, and they do not trust the run's."""
    return security_of(tmp_path_factory.mktemp("other"))


# -- what gRPC names, and what a probe found: pure -----------------------------------------------------------


@pytest.mark.parametrize(
    ("details", "security", "says"),
    [
        (
            "Tls handshake failed (TSI_PROTOCOL_FAILURE): SSL_ERROR_SSL: error:1000007d:SSL routines:"
            "OPENSSL_internal:CERTIFICATE_VERIFY_FAILED",
            CERT,
            "presents a certificate that this process's --tls-ca (ca.pem) did not sign",
        ),
        (
            "Tls handshake failed (TSI_PROTOCOL_FAILURE): SSL_ERROR_SSL: error:100000f7:SSL routines:"
            "OPENSSL_internal:WRONG_VERSION_NUM",
            CERT,
            "speaks no TLS and this process dials it with TLS",
        ),
        ("Peer name 10.0.0.1 is not in peer certificate", CERT, "certificate does not name 10.0.0.1"),
        ("failed to connect to all addresses; last error: UNAVAILABLE: ipv4:127.0.0.1:7201: Socket closed", PLAIN,
         None),
        ("failed to connect to all addresses; last error: UNAVAILABLE: ipv4:127.0.0.1:9: Connection refused", CERT,
         None),
    ],
)
def test_a_handshake_failure_grpc_names_says_which_option_to_change(details, security, says):
    found = known_failure(details, security, "the coordinator", "10.0.0.1:7070")
    assert (found is None) if says is None else (says in str(found))


@pytest.mark.parametrize(
    ("found", "security", "says"),
    [
        (TLS, PLAIN, "requires TLS and this process dials it without"),
        (REFUSED_CERTIFICATE, PLAIN, "requires TLS and this process dials it without"),  # it closes on no certificate
        (REFUSED_CERTIFICATE, CERT, "refused this process's certificate (peer.pem)"),
        (PLAINTEXT, CERT, "speaks no TLS and this process dials it with TLS"),
        (PLAINTEXT, PLAIN, None),
        (TLS, CERT, None),
        (UNKNOWN, PLAIN, None),
        (UNKNOWN, CERT, None),
    ],
)
def test_what_a_probe_found_is_a_mismatch_only_where_the_two_ends_cannot_talk(found, security, says):
    mismatch = verdict(found, security, "the coordinator", "10.0.0.1:7070")
    assert (mismatch is None) if says is None else (says in str(mismatch))


# -- the probe, against real servers ---------------------------------------------------------------------------


@pytest.fixture
def server(request) -> Iterator[str]:
    """A gRPC server (health service only) on 127.0.0.1 with the security the test asks for."""
    security = request.getfixturevalue(request.param) if request.param else PLAIN
    loop = asyncio.new_event_loop()
    settings = RpcSettings(security=security)
    grpc_server = loop.run_until_complete(_start(settings))
    try:
        yield grpc_server[1]
    finally:
        loop.run_until_complete(grpc_server[0].stop(0))
        loop.close()


async def _start(settings: RpcSettings):
    s = make_server(settings, role="peer")
    address = bind(s, "127.0.0.1", 0, settings=settings, hint="")
    await s.start()
    return s, address


@pytest.mark.parametrize(
    ("server", "dialer", "found"),
    [
        ("", "", PLAINTEXT),
        ("", "run_certs", PLAINTEXT),
        ("run_certs", "", REFUSED_CERTIFICATE),  # mutual TLS: closed on a client with no certificate
        ("run_certs", "run_certs", TLS),
        ("run_certs", "other_certs", REFUSED_CERTIFICATE),
    ],
    indirect=["server"],
)
def test_a_probe_tells_a_plaintext_server_from_a_tls_one_and_whether_it_takes_our_certificate(
    server, dialer, found, request
):
    security = request.getfixturevalue(dialer) if dialer else PLAIN
    assert probe(server, security) == found


def test_a_probe_of_a_port_nobody_listens_on_finds_nothing():
    assert probe(closed_port_address(), PLAIN, timeout_s=1.0) == UNKNOWN


# -- a peer's join, end to end -----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tls_coordinator(run_certs) -> Iterator[CoordinatorThread]:
    config = CoordinatorConfig(run_id=RUN, port=0, dashboard_port=None, startup_grace_s=0.0, security=run_certs)
    with CoordinatorThread(config) as c:
        yield c


def join_error(address: str, security: RpcSecurity) -> BaseException:
    """What a peer's join to the coordinator at address raises (its patience is longer than the test's timeout)."""

    async def join() -> None:
        client = MembershipClient(Transport(TransportConfig(security=security)),
                                  MembershipConfig(address, RUN, patience_s=600))
        try:
            await client.join("127.0.0.1:9", 0, 0, has_state=True)
        finally:
            await client.close()
            await client.transport.channel(address).close()

    with pytest.raises(TLSMismatch) as caught:
        asyncio.run(join())
    return caught.value


def test_a_peer_without_tls_is_told_the_coordinator_requires_it(tls_coordinator):
    assert "requires TLS and this process dials it without" in str(join_error(tls_coordinator.address, PLAIN))


def test_a_peer_whose_ca_did_not_sign_the_coordinators_certificate_is_told_so(tls_coordinator, other_certs):
    error = join_error(tls_coordinator.address, other_certs)
    assert f"presents a certificate that this process's --tls-ca ({other_certs.tls_ca}) did not sign" in str(error)


def test_a_peer_whose_certificate_the_coordinator_refuses_is_told_so(tls_coordinator, run_certs, other_certs):
    # Trusts the run's CA, so the handshake gets as far as the coordinator's verdict on its certificate.
    mixed = RpcSecurity(tls_cert=other_certs.tls_cert, tls_key=other_certs.tls_key, tls_ca=run_certs.tls_ca)
    assert f"refused this process's certificate ({other_certs.tls_cert})" in str(
        join_error(tls_coordinator.address, mixed)
    )


def test_a_tls_peer_is_told_a_plaintext_coordinator_speaks_no_tls(run_certs):
    config = CoordinatorConfig(run_id=RUN, port=0, dashboard_port=None, startup_grace_s=0.0)
    with CoordinatorThread(config) as plain:
        assert "speaks no TLS and this process dials it with TLS" in str(join_error(plain.address, run_certs))
