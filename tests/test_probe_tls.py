"""The coordinator's probe of a peer a quorum waits for, in a run with TLS.

A quorum that waits for a peer probes its port with a health check: refused means its process is gone, and it
is dropped at once. In a TLS run the probe must speak TLS: a plaintext probe of a live TLS peer fails as if
nothing listened ("Socket closed"), and the live peer was dropped (seen in `loconet harness --tls`, where every
killed or joining peer's neighbours were dropped and joined again). Real servers on 127.0.0.1, OS-chosen ports.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from collectives.net.rpc import RpcSecurity, RpcSettings, bind, make_channel, make_server
from peer.certs import CertsConfig, make_certs
from peer.coordinator.config import CoordinatorConfig
from peer.coordinator.thread import CoordinatorThread
from protos import membership_pb2 as pb
from protos import membership_pb2_grpc as pb_grpc

pytestmark = pytest.mark.timeout(60)

RUN = "tls-probe"


@pytest.fixture
def security(tmp_path: Path) -> RpcSecurity:
    made = make_certs(CertsConfig(out=str(tmp_path), hosts=("node",)))
    cert, key = made.hosts[0]
    return RpcSecurity(tls_cert=str(cert), tls_key=str(key), tls_ca=str(made.ca_cert))


@pytest.fixture
def coordinator(security: RpcSecurity) -> Iterator[CoordinatorThread]:
    config = CoordinatorConfig(
        run_id=RUN, port=0, dashboard_port=None, probe_peers=True, startup_grace_s=0.0, lease_s=30.0,
        min_peers=2, join_timeout_s=0.5, security=security,
    )
    with CoordinatorThread(config) as c:
        yield c


def test_a_live_tls_peer_that_a_quorum_waits_for_is_probed_over_tls_and_kept(coordinator, security):
    async def scenario() -> tuple[dict[str, str], str]:
        # The waited-for peer: a live TLS server (the health service every peer serves), which never asks.
        peer_server = make_server(RpcSettings(security=security), role="peer")
        address = bind(peer_server, "127.0.0.1", 0, settings=RpcSettings(security=security), hint="")
        await peer_server.start()
        settings = RpcSettings(security=security)
        channel = make_channel(coordinator.address, settings)
        stub = pb_grpc.CoordinatorStub(channel)
        try:
            asker = (await stub.Join(pb.JoinRequest(run_id=RUN, address="127.0.0.1:9", has_state=True))).peer_id
            silent = (await stub.Join(pb.JoinRequest(run_id=RUN, address=address, has_state=True))).peer_id
            waiting = asyncio.ensure_future(stub.Quorum(pb.QuorumRequest(run_id=RUN, peer_id=asker), timeout=10))
            # The quorum probes the silent peer after 0.1 s; give the probe a second to answer.
            await asyncio.sleep(1.5)
            waiting.cancel()
            return {p["peer_id"]: p["state"] for p in coordinator.status()["peers"]}, silent
        finally:
            await channel.close()
            await peer_server.stop(0)

    states, silent = asyncio.run(scenario())
    assert states[silent] not in ("lost", "left")
    assert not [e for e in coordinator.status()["events"] if e["kind"] == "lost"]


def test_a_tls_peer_whose_process_is_gone_is_still_dropped_at_once(coordinator, security):
    async def scenario() -> str:
        settings = RpcSettings(security=security)
        channel = make_channel(coordinator.address, settings)
        stub = pb_grpc.CoordinatorStub(channel)
        try:
            asker = (await stub.Join(pb.JoinRequest(run_id=RUN, address="127.0.0.1:9", has_state=True))).peer_id
            gone = (await stub.Join(pb.JoinRequest(run_id=RUN, address="127.0.0.1:1", has_state=True))).peer_id
            waiting = asyncio.ensure_future(stub.Quorum(pb.QuorumRequest(run_id=RUN, peer_id=asker), timeout=10))
            started = time.monotonic()
            while time.monotonic() - started < 5:
                states = {p["peer_id"]: p["state"] for p in coordinator.status()["peers"]}
                if states[gone] == "lost":
                    break
                await asyncio.sleep(0.05)
            waiting.cancel()
            return states[gone]
        finally:
            await channel.close()

    assert asyncio.run(scenario()) == "lost"
