"""TLS files that do not fit are refused where they are read, naming the option: never reported as a taken port.

Certificates come from ``loconet certs``' own code; servers bind 127.0.0.1 on OS-chosen ports.
"""

from __future__ import annotations

import asyncio
import datetime
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from collectives.errors import AddressInUse, ConfigError
from collectives.net.rpc import RpcSecurity, RpcSettings, bind, make_server
from peer.certs import CertsConfig, make_certs
from tests.support.cli import one_line_error

pytestmark = pytest.mark.timeout(60)

NOW = datetime.datetime.now(datetime.UTC)


@pytest.fixture(scope="module")
def certs(tmp_path_factory) -> Path:
    """A CA and hosts a, b (valid now), old (expired) and new (valid from the day after tomorrow), in one folder."""
    out = tmp_path_factory.mktemp("certs")
    make_certs(CertsConfig(out=str(out), hosts=("a", "b")))
    make_certs(CertsConfig(out=str(out), hosts=("old",), days=1), now=NOW - datetime.timedelta(days=3))
    make_certs(CertsConfig(out=str(out), hosts=("new",), days=1), now=NOW + datetime.timedelta(days=3))
    return out


def security(folder: Path, cert: str, key: str, ca: str = "") -> RpcSecurity:
    return RpcSecurity(tls_cert=str(folder / cert), tls_key=str(folder / key), tls_ca=str(folder / ca) if ca else "")


@pytest.mark.parametrize(
    ("cert", "key", "ca", "says"),
    [
        ("a.pem", "b.key", "ca.pem", "--tls-key {d}/b.key is not the key of --tls-cert {d}/a.pem"),
        ("a.key", "a.key", "ca.pem", "--tls-cert {d}/a.key holds no PEM certificate"),
        ("a.pem", "a.pem", "ca.pem", "--tls-key {d}/a.pem holds no PEM private key"),
        ("a.pem", "a.key", "a.key", "--tls-ca {d}/a.key holds no PEM certificate"),
        ("old.pem", "old.key", "ca.pem", "--tls-cert {d}/old.pem expired (valid from"),
        ("new.pem", "new.key", "ca.pem", "--tls-cert {d}/new.pem is not valid yet (valid from"),
    ],
)
def test_tls_files_that_do_not_fit_are_refused_naming_the_option(certs, cert, key, ca, says):
    files = security(certs, cert, key, ca)
    for credentials in (files.server_credentials, files.channel_credentials):
        with pytest.raises(ConfigError) as info:
            credentials()
        assert says.format(d=certs) in str(info.value)


def test_an_expired_certificate_names_its_dates(certs):
    with pytest.raises(ConfigError, match=r"valid from \d{4}-\d\d-\d\d \d\d:\d\d to \d{4}-\d\d-\d\d \d\d:\d\d UTC"):
        security(certs, "old.pem", "old.key", "ca.pem").server_credentials()


def test_fitting_tls_files_make_credentials(certs):
    files = security(certs, "a.pem", "a.key", "ca.pem")
    assert files.server_credentials() is not None and files.channel_credentials() is not None


def _bind(settings: RpcSettings, port: int = 0) -> str:
    async def main() -> str:
        server = make_server(settings, role="coordinator")
        try:
            return bind(server, "127.0.0.1", port, settings=settings, hint="choose another --port")
        finally:
            await server.stop(0)

    return asyncio.run(main())


def test_a_key_that_does_not_fit_is_not_reported_as_a_taken_port(certs):
    with pytest.raises(ConfigError, match="--tls-key .* is not the key of --tls-cert"):
        _bind(RpcSettings(security=security(certs, "a.pem", "b.key", "ca.pem")))


def test_files_grpc_refuses_on_a_free_port_are_named_not_the_port(certs, monkeypatch):
    """Whatever the checks miss and gRPC refuses: the address is free, so the files are to blame."""
    mismatched = ((certs / "a.pem").read_bytes(), (certs / "b.key").read_bytes(), None)
    monkeypatch.setattr(RpcSecurity, "tls_files", lambda self: mismatched)
    with pytest.raises(ConfigError, match="gRPC refused --tls-cert .*a.pem and --tls-key .*a.key"):
        _bind(RpcSettings(security=security(certs, "a.pem", "a.key")))


def test_a_taken_port_with_tls_is_still_a_taken_port(certs):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        with pytest.raises(AddressInUse, match="the port is taken"):
            _bind(RpcSettings(security=security(certs, "a.pem", "a.key", "ca.pem")), taken.getsockname()[1])


def test_a_coordinator_given_another_hosts_key_exits_2_in_one_line(certs):
    result = subprocess.run(
        [sys.executable, "-m", "peer.cli", "coordinator", "--port", "0", "--dashboard-port", "none",
         "--tls-cert", str(certs / "a.pem"), "--tls-key", str(certs / "b.key"), "--tls-ca", str(certs / "ca.pem")],
        check=False, capture_output=True, text=True, timeout=50,
    )
    assert result.returncode == 2
    assert "is not the key of --tls-cert" in one_line_error(result)


def test_a_tls_key_every_user_may_read_is_warned_of_and_a_private_one_is_not(certs, tmp_path, caplog):
    shared = tmp_path / "a.key"
    shared.write_bytes((certs / "a.key").read_bytes())
    shared.chmod(0o644)
    security(certs, "a.pem", "a.key").server_credentials()
    assert not [r for r in caplog.records if "readable by every user" in r.getMessage()]
    RpcSecurity(tls_cert=str(certs / "a.pem"), tls_key=str(shared)).server_credentials()
    assert [r.getMessage() for r in caplog.records if "readable by every user" in r.getMessage()] == [
        f"the TLS key {shared} is readable by every user; chmod 600 (or 640) it"
    ]
