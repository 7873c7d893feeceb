"""``loconet certs``: a CA and host certificates that verify, and serve a real mutual-TLS gRPC connection."""

from __future__ import annotations

import asyncio
import datetime
import ipaddress
import stat
from pathlib import Path

import grpc
import pytest
from cryptography import x509
from cryptography.x509 import verification as v
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from peer.certs import CertsConfig, CertsError, make_certs, parse_host
from peer.cli import main

NOW = datetime.datetime(2030, 1, 1, tzinfo=datetime.UTC)


def load(path: Path) -> x509.Certificate:
    return x509.load_pem_x509_certificate(path.read_bytes())


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def sans(path: Path) -> tuple[list[str], list[str]]:
    ext = load(path).extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    return ext.get_values_for_type(x509.DNSName), [str(a) for a in ext.get_values_for_type(x509.IPAddress)]


def verifier_builder(ca: Path, at: datetime.datetime = NOW) -> v.PolicyBuilder:
    return v.PolicyBuilder().store(v.Store([load(ca)])).time(at)


@pytest.mark.parametrize(
    ("spec", "dns", "ips"),
    [
        ("peer1", ("peer1",), ()),
        ("Peer1.Example.org", ("peer1.example.org",), ()),
        ("10.0.0.5", (), ("10.0.0.5",)),
        ("::1", (), ("::1",)),
        ("[2001:db8::7]", (), ("2001:db8::7",)),
        ("peer1=peer1.example.org,10.0.0.5", ("peer1", "peer1.example.org"), ("10.0.0.5",)),
        ("peer1=*.peers.svc,peer1", ("peer1", "*.peers.svc"), ()),
    ],
)
def test_a_host_names_its_dns_names_and_addresses(spec, dns, ips):
    host = parse_host(spec)
    assert host.dns == dns and host.ips == tuple(ipaddress.ip_address(a) for a in ips)


@pytest.mark.parametrize("spec", ["", "-peer", "peer/1", "../x", "peer1=bad name", "peer1=é.example", "a b"])
def test_a_host_that_is_no_name_or_address_is_refused(spec):
    with pytest.raises(CertsError):
        parse_host(spec)


@pytest.mark.parametrize("spec", ["x=10.0.0.300", "10.0.0.256", "x=10.0.0", "x=1.2.3.4.5"])
def test_a_mistyped_ipv4_address_is_refused_not_taken_as_a_dns_name(spec):
    # 10.0.0.300 is a valid DNS name: the certificate named a host nobody dials, and TLS failed far from the cause.
    with pytest.raises(CertsError, match="looks like an IPv4 address but is not one"):
        parse_host(spec)


def test_the_ca_and_each_host_get_a_certificate_and_a_private_key(tmp_path):
    out = tmp_path / "certs"
    make_certs(CertsConfig(out=str(out), hosts=("coord", "peer1")), now=NOW)
    assert sorted(p.name for p in out.iterdir()) == [
        "ca.key", "ca.pem", "coord.key", "coord.pem", "peer1.key", "peer1.pem"
    ]
    assert {p.name: mode(p) for p in out.iterdir()} == {
        "ca.key": 0o600,
        "ca.pem": 0o644,
        "coord.key": 0o600,
        "coord.pem": 0o644,
        "peer1.key": 0o600,
        "peer1.pem": 0o644,
    }
    assert mode(out) == 0o700


def test_a_key_file_that_already_exists_readable_by_all_becomes_private(tmp_path):
    (tmp_path / "peer1.key").write_text("old")
    (tmp_path / "peer1.key").chmod(0o644)
    make_certs(CertsConfig(out=str(tmp_path), hosts=("peer1",)), now=NOW)
    assert mode(tmp_path / "peer1.key") == 0o600


def test_a_host_certificate_verifies_against_the_ca_as_a_server_by_name_and_address_and_as_a_client(tmp_path):
    make_certs(CertsConfig(out=str(tmp_path), hosts=("peer1=peer1.example.org,10.0.0.5",)), now=NOW)
    leaf = load(tmp_path / "peer1.pem")
    for name in (v.DNSName("peer1"), v.DNSName("peer1.example.org"), v.DNSName("localhost"),
                 v.IPAddress(ipaddress.ip_address("10.0.0.5")), v.IPAddress(ipaddress.ip_address("127.0.0.1"))):
        verifier_builder(tmp_path / "ca.pem").build_server_verifier(name).verify(leaf, [])
    verifier_builder(tmp_path / "ca.pem").build_client_verifier().verify(leaf, [])


def test_a_host_certificate_does_not_verify_for_a_name_it_does_not_hold(tmp_path):
    make_certs(CertsConfig(out=str(tmp_path), hosts=("peer1",)), now=NOW)
    with pytest.raises(v.VerificationError):
        verifier_builder(tmp_path / "ca.pem").build_server_verifier(v.DNSName("peer2")).verify(
            load(tmp_path / "peer1.pem"), []
        )


def test_without_local_names_a_certificate_holds_only_its_own(tmp_path):
    make_certs(CertsConfig(out=str(tmp_path), hosts=("peer1=10.0.0.5",), local=False), now=NOW)
    assert sans(tmp_path / "peer1.pem") == (["peer1"], ["10.0.0.5"])


def test_with_local_names_a_certificate_also_holds_the_loopback_names(tmp_path):
    make_certs(CertsConfig(out=str(tmp_path), hosts=("peer1",)), now=NOW)
    assert sans(tmp_path / "peer1.pem") == (["peer1", "localhost"], ["127.0.0.1", "::1"])


def test_a_host_certificate_is_valid_for_its_days_and_a_new_ca_for_its_own(tmp_path):
    make_certs(CertsConfig(out=str(tmp_path), hosts=("peer1",), days=30, ca_days=100), now=NOW)
    assert load(tmp_path / "peer1.pem").not_valid_after_utc == NOW + datetime.timedelta(days=30)
    assert load(tmp_path / "ca.pem").not_valid_after_utc == NOW + datetime.timedelta(days=100)
    with pytest.raises(v.VerificationError):  # expired
        verifier_builder(tmp_path / "ca.pem", NOW + datetime.timedelta(days=31)).build_client_verifier().verify(
            load(tmp_path / "peer1.pem"), []
        )


def test_a_host_certificate_ends_no_later_than_its_ca(tmp_path):
    make_certs(CertsConfig(out=str(tmp_path), hosts=("peer1",), days=365, ca_days=10), now=NOW)
    assert load(tmp_path / "peer1.pem").not_valid_after_utc == load(tmp_path / "ca.pem").not_valid_after_utc


def test_a_ca_already_in_the_directory_is_reused_for_a_host_added_later(tmp_path):
    first = make_certs(CertsConfig(out=str(tmp_path), hosts=("peer1",)), now=NOW)
    ca_bytes = (tmp_path / "ca.pem").read_bytes()
    second = make_certs(CertsConfig(out=str(tmp_path), hosts=("peer2",)), now=NOW)
    assert (first.ca_created, second.ca_created) == (True, False)
    assert (tmp_path / "ca.pem").read_bytes() == ca_bytes
    for name in ("peer1", "peer2"):
        verifier_builder(tmp_path / "ca.pem").build_client_verifier().verify(load(tmp_path / f"{name}.pem"), [])


@pytest.mark.parametrize("missing", ["ca.pem", "ca.key"])
def test_half_a_ca_is_refused_rather_than_replaced(tmp_path, missing):
    make_certs(CertsConfig(out=str(tmp_path)), now=NOW)
    (tmp_path / missing).unlink()
    with pytest.raises(CertsError, match="restore it, or delete"):
        make_certs(CertsConfig(out=str(tmp_path), hosts=("peer1",)), now=NOW)


def test_a_ca_whose_key_is_not_its_own_is_refused(tmp_path):
    make_certs(CertsConfig(out=str(tmp_path / "a")), now=NOW)
    make_certs(CertsConfig(out=str(tmp_path / "b")), now=NOW)
    (tmp_path / "a" / "ca.key").write_bytes((tmp_path / "b" / "ca.key").read_bytes())
    with pytest.raises(CertsError, match="is not the key of"):
        make_certs(CertsConfig(out=str(tmp_path / "a"), hosts=("peer1",)), now=NOW)


def test_an_expired_ca_is_refused(tmp_path):
    make_certs(CertsConfig(out=str(tmp_path), ca_days=10), now=NOW)
    with pytest.raises(CertsError, match="expired"):
        make_certs(CertsConfig(out=str(tmp_path), hosts=("peer1",)), now=NOW + datetime.timedelta(days=11))


@pytest.mark.parametrize(
    ("hosts", "message"),
    [(("ca",), "overwrite the CA"), (("peer1=a.example", "peer1=b.example"), "given twice")],
)
def test_hosts_that_would_clash_are_refused(tmp_path, hosts, message):
    with pytest.raises(CertsError, match=message):
        make_certs(CertsConfig(out=str(tmp_path), hosts=hosts), now=NOW)


def test_the_command_writes_the_files_and_a_bad_host_is_a_usage_error(tmp_path, capsys):
    assert main(["certs", "--out", str(tmp_path), "--host", "coord", "--host", "10.0.0.5"]) == 0
    assert {"ca.pem", "ca.key", "coord.pem", "coord.key", "10.0.0.5.pem", "10.0.0.5.key"} <= {
        p.name for p in tmp_path.iterdir()
    }
    assert f"--tls-ca {tmp_path / 'ca.pem'}" in capsys.readouterr().out
    assert main(["certs", "--out", str(tmp_path), "--host", "a b"]) == 2


# -- a real mutual-TLS gRPC connection ------------------------------------------------------


async def health_check(port: int, credentials: grpc.ChannelCredentials, target: str = "localhost") -> int:
    """The health status the server at target:port reports over TLS with these credentials."""
    async with grpc.aio.secure_channel(f"{target}:{port}", credentials) as channel:
        reply = await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=10)
    return reply.status


def mtls(tmp_path: Path, client: str | None):
    """Serve health over mutual TLS with server.pem; check it as client (None: no client certificate)."""

    def read(name: str) -> bytes:
        return (tmp_path / name).read_bytes()

    async def run(target: str) -> int:
        server = grpc.aio.server()
        health_pb2_grpc.add_HealthServicer_to_server(health.aio.HealthServicer(), server)
        server_credentials = grpc.ssl_server_credentials(
            [(read("server.key"), read("server.pem"))], root_certificates=read("ca.pem"), require_client_auth=True
        )
        port = server.add_secure_port("127.0.0.1:0", server_credentials)
        await server.start()
        try:
            if client is None:
                credentials = grpc.ssl_channel_credentials(root_certificates=read("ca.pem"))
            else:
                credentials = grpc.ssl_channel_credentials(
                    root_certificates=read("ca.pem"), private_key=read(f"{client}.key"),
                    certificate_chain=read(f"{client}.pem"),
                )
            return await health_check(port, credentials, target)
        finally:
            await server.stop(None)

    return run


@pytest.mark.parametrize("target", ["localhost", "127.0.0.1"])
def test_a_client_with_a_certificate_completes_a_health_check_over_mutual_tls(tmp_path, target):
    make_certs(CertsConfig(out=str(tmp_path), hosts=("server", "client")))
    status = asyncio.run(mtls(tmp_path, "client")(target))
    assert status == health_pb2.HealthCheckResponse.SERVING


def test_a_client_without_a_certificate_is_refused(tmp_path):
    make_certs(CertsConfig(out=str(tmp_path), hosts=("server",)))
    with pytest.raises(grpc.aio.AioRpcError) as failed:
        asyncio.run(mtls(tmp_path, None)("localhost"))
    assert failed.value.code() == grpc.StatusCode.UNAVAILABLE


def test_a_client_certified_by_another_ca_is_refused(tmp_path):
    make_certs(CertsConfig(out=str(tmp_path), hosts=("server",)))
    make_certs(CertsConfig(out=str(tmp_path / "other"), hosts=("client",)))
    for suffix in (".pem", ".key"):
        (tmp_path / f"client{suffix}").write_bytes((tmp_path / "other" / f"client{suffix}").read_bytes())
    with pytest.raises(grpc.aio.AioRpcError) as failed:
        asyncio.run(mtls(tmp_path, "client")("localhost"))
    assert failed.value.code() == grpc.StatusCode.UNAVAILABLE
