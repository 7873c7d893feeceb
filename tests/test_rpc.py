"""collectives.net.rpc: the one factory of gRPC servers and channels, and --advertise, over real sockets on
127.0.0.1."""

from __future__ import annotations

import asyncio
import dataclasses
import logging

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from collectives.elastic import ElasticCollective, ElasticConfig
from collectives.errors import ConfigError
from collectives.net import addresses
from collectives.net.addresses import advertised_address, parse_advertise, split_address
from collectives.net.rpc import (
    COORDINATOR_SETTINGS,
    RpcSecurity,
    RpcSettings,
    bind,
    blocking_channel,
    health_check,
    make_server,
    server_options,
)
from collectives.net.transportconfig import TransportConfig
from peer.coordinator.service import CoordinatorConfig
from tests.support.coordinator import CoordinatorThread

# -- --advertise values ---------------------------------------------------------------------


@pytest.mark.parametrize(
    "value, expected",
    [
        ("127.0.0.1", ("127.0.0.1", None)),
        ("127.0.0.1:7070", ("127.0.0.1", 7070)),
        ("peer-1.example.org", ("peer-1.example.org", None)),
        ("peer-1.example.org:65535", ("peer-1.example.org", 65535)),
        ("[::1]", ("::1", None)),
        ("[2001:db8::7]:8080", ("2001:db8::7", 8080)),
    ],
)
def test_advertise_values_are_parsed(value, expected):
    assert parse_advertise(value) == expected


@pytest.mark.parametrize(
    "value, why",
    [
        ("a:b:c", "too many ':'"),
        ("::1", "too many ':'"),
        ("host:0", "1..65535"),
        ("host:65536", "1..65535"),
        ("host:", "1..65535"),
        ("host:port", "1..65535"),
        ("[::1", "unclosed"),
        ("[::1]8080", "after ']'"),
        ("[not-v6]:1", "not an IPv6 address"),
        ("", "not a host name"),
        ("bad host", "not a host name"),
        ("http://peer:80", "not a URL"),
        ("10.0.0.256", "not a host name"),
        ("0.0.0.0", "nobody can connect"),
        ("[::]:7070", "nobody can connect"),
    ],
)
def test_bad_advertise_values_are_refused_with_the_reason(value, why):
    with pytest.raises(ConfigError, match="--advertise") as info:
        parse_advertise(value)
    assert why in str(info.value)


def test_advertise_host_alone_takes_the_bound_port():
    assert advertised_address("0.0.0.0", 4321, "10.1.2.3", role="peer") == "10.1.2.3:4321"
    assert advertised_address("::", 4321, "[fd00::5]", role="peer") == "[fd00::5]:4321"


def test_advertise_with_a_port_is_taken_verbatim():
    assert advertised_address("0.0.0.0", 4321, "gateway.example:7000", role="peer") == "gateway.example:7000"


def test_binding_every_interface_without_advertise_warns_once(monkeypatch, caplog):
    monkeypatch.setattr(addresses, "_warned_wildcard", set())
    with caplog.at_level(logging.WARNING, logger="collectives.net.addresses"):
        assert advertised_address("0.0.0.0", 1234, None, role="peer") == "0.0.0.0:1234"
        assert advertised_address("::", 1234, None, role="peer") == "[::]:1234"
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "--advertise" in warnings[0]


def test_a_loopback_bind_does_not_warn(monkeypatch, caplog):
    monkeypatch.setattr(addresses, "_warned_wildcard", set())
    with caplog.at_level(logging.WARNING, logger="collectives.net.addresses"):
        assert advertised_address("127.0.0.1", 1234, None, role="peer") == "127.0.0.1:1234"
    assert not caplog.records


# -- settings and the credentials hook -------------------------------------------------------


def test_without_tls_files_servers_and_channels_are_plaintext():
    assert RpcSecurity().server_credentials() is None and RpcSecurity().channel_credentials() is None


def test_a_tls_certificate_needs_its_key_and_a_ca_needs_a_certificate():
    with pytest.raises(ConfigError, match="go together"):
        RpcSecurity(tls_cert="a.pem")
    with pytest.raises(ConfigError, match="mutual TLS"):
        RpcSecurity(tls_ca="ca.pem")


def test_settings_are_checked():
    with pytest.raises(ConfigError, match="max_receive_bytes"):
        RpcSettings(max_receive_bytes=0)
    with pytest.raises(ConfigError, match="keepalive_s"):
        RpcSettings(keepalive_s=0)


def test_the_coordinator_keeps_its_measured_server_limits():
    options = dict(server_options(COORDINATOR_SETTINGS))
    assert COORDINATOR_SETTINGS.max_concurrent_rpcs == 10_000
    assert options["grpc.server.max_pending_requests"] == 20_000
    assert options["grpc.server.max_pending_requests_hard_limit"] == 20_000
    assert options["grpc.max_receive_message_length"] == 1 << 20
    assert options["grpc.max_send_message_length"] == 64 << 20
    assert options["grpc.so_reuseport"] == 0


def test_a_peer_transport_shares_its_limits_with_its_channels():
    settings = TransportConfig(chunk_bytes=8 << 20).rpc_settings()
    assert settings.max_receive_bytes == settings.max_send_bytes == TransportConfig(chunk_bytes=8 << 20).message_limit
    # The peer's caps are its handlers' own (collectives.net.admission): a server-wide gRPC cap would shed health
    # checks.
    assert settings.max_concurrent_rpcs is None
    assert TransportConfig().admission_limits().total == TransportConfig().max_concurrent_rpcs


def test_an_unknown_server_role_is_refused():
    with pytest.raises(ValueError, match="role"):
        make_server(RpcSettings(), role="dashboard")


# -- servers and channels ----------------------------------------------------------------------


async def _serve(settings: RpcSettings = RpcSettings(), port: int = 0, hint: str = "choose another port"):
    server = make_server(settings, role="peer")
    address = bind(server, "127.0.0.1", port, settings=settings, hint=hint)
    await server.start()
    return server, address


def _blocking_health(address: str) -> int:
    with blocking_channel(address) as channel:
        return health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5).status


@pytest.mark.timeout(60)
def test_a_factory_server_answers_health_checks_on_async_and_blocking_channels():
    async def main():
        server, address = await _serve()
        try:
            assert await health_check(address, timeout_s=5)
            # A blocking call would stall this loop, which serves it: make it from a thread.
            assert await asyncio.to_thread(_blocking_health, address) == health_pb2.HealthCheckResponse.SERVING
        finally:
            await server.stop(0)

    asyncio.run(main())


@pytest.mark.timeout(60)
def test_a_health_check_of_a_stopped_server_fails_unavailable():
    async def main():
        server, address = await _serve()
        await server.stop(0)
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await health_check(address, timeout_s=5)
        assert info.value.code() == grpc.StatusCode.UNAVAILABLE

    asyncio.run(main())


@pytest.mark.timeout(60)
def test_a_second_bind_of_a_port_in_use_fails_with_the_hint():
    async def main():
        first, address = await _serve()
        try:
            second = make_server(RpcSettings(), role="coordinator")
            with pytest.raises(OSError, match="cannot listen on 127.0.0.1:.*; is another coordinator running"):
                bind(second, "127.0.0.1", split_address(address)[1], settings=RpcSettings(),
                     hint="is another coordinator running?")
        finally:
            await first.stop(0)

    asyncio.run(main())


# -- advertise end to end: a coordinator and a peer bound to every interface ----------------------


def coordinator_config(host: str = "127.0.0.1") -> CoordinatorConfig:
    return CoordinatorConfig(run_id="advertise", host=host, port=0, dashboard_port=None, startup_grace_s=0)


def test_a_bad_coordinator_advertise_is_refused_by_its_config():
    with pytest.raises(ConfigError, match="--advertise"):
        dataclasses.replace(coordinator_config(), advertise="a:b:c")


@pytest.mark.timeout(60)
def test_a_coordinator_bound_to_every_interface_gives_its_advertised_address():
    coordinator = CoordinatorThread(dataclasses.replace(coordinator_config(host="0.0.0.0"), advertise="127.0.0.1"))
    try:
        port = split_address(coordinator.server.bound_address)[1]
        assert coordinator.server.bound_address == f"0.0.0.0:{port}"
        assert coordinator.server.address == f"127.0.0.1:{port}"
        assert coordinator.status()["coordinator"]["address"] == f"127.0.0.1:{port}"
        assert _blocking_health(coordinator.server.address) == health_pb2.HealthCheckResponse.SERVING
    finally:
        coordinator.close()


@pytest.mark.timeout(60)
def test_a_peer_bound_to_every_interface_registers_its_advertised_address():
    coordinator = CoordinatorThread(coordinator_config())
    peer = ElasticCollective(
        ElasticConfig(
            coordinator=coordinator.server.address,
            run_id="advertise",
            transport=TransportConfig(host="0.0.0.0", advertise="127.0.0.1"),
            patience_s=20,
        )
    )
    try:
        peer.start()
        port = split_address(peer.transport.bound_address)[1]
        assert peer.transport.bound_address == f"0.0.0.0:{port}"
        peers = coordinator.status()["peers"]
        assert [p["address"] for p in peers] == [f"127.0.0.1:{port}"]
        # What the coordinator hands out (probes, state sync sources) answers there.
        assert _blocking_health(peers[0]["address"]) == health_pb2.HealthCheckResponse.SERVING
    finally:
        peer.close()
        coordinator.close()
