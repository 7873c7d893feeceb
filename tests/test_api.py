"""The Python API as the README shows it: what the optimizers report by themselves, and where a peer listens.

The README's example itself runs across two machines (network namespaces) in
tests/test_api_netns.py; here, the parts of it one process can check.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import math
import time

import pytest
import torch

from collectives.elastic import ElasticCollective, ElasticConfig, leave_reason
from collectives.errors import ConfigError
from collectives.membership.client import PeerStatus
from collectives.net import addresses
from collectives.net.transport import Transport
from collectives.net.transportconfig import TransportConfig
from optimizers.diloco import DiLoCo
from optimizers.peers import LocalPeer, takes_keyword
from optimizers.steprate import StepRate
from optimizers.streaming import StreamingDiLoCo
from peer.coordinator.config import CoordinatorConfig
from tests.support.coordinator import CoordinatorThread

# A documentation address (RFC 5737, TEST-NET-2): never one of this machine's.
ELSEWHERE = "198.51.100.1:7070"


def batches(seed: int, count: int, size: int = 4) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(size, 3, generator=g), torch.randn(size, 1, generator=g)) for _ in range(count)]


def make_model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Linear(3, 1)


def diloco(peer, sync_every: int = 100) -> tuple[torch.nn.Module, DiLoCo]:
    model = make_model()
    return model, DiLoCo(model, torch.optim.SGD(model.parameters(), lr=0.1), peer, sync_every=sync_every, codec="none")


# -- what the optimizers report ----------------------------------------------------------------


def test_steps_put_the_step_loss_and_samples_on_the_peers_status():
    peer = LocalPeer(status=PeerStatus())
    model, opt = diloco(peer)
    losses = []
    for x, y in batches(1, 3):
        loss = torch.nn.functional.mse_loss(model(x), y)
        loss.backward()
        opt.step(samples=len(x), loss=loss)
        opt.zero_grad()
        losses.append(loss.item())
    assert (peer.status.step, peer.status.samples) == (3, 12)
    assert peer.status.loss == losses[-1]
    assert peer.status.activity == "training"


def test_step_with_a_closure_returns_and_reports_the_closures_loss():
    peer = LocalPeer(status=PeerStatus())
    model, opt = diloco(peer)
    (x, y), = batches(2, 1)

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = torch.nn.functional.mse_loss(model(x), y)
        loss.backward()
        return loss

    returned = opt.step(closure, samples=4)
    assert isinstance(returned, torch.Tensor)
    assert peer.status.loss == returned.item()
    assert (peer.status.step, peer.status.samples) == (1, 4)


def test_an_explicit_loss_is_reported_rather_than_the_closures():
    peer = LocalPeer(status=PeerStatus())
    model, opt = diloco(peer)
    (x, y), = batches(3, 1)

    def closure() -> torch.Tensor:
        loss = torch.nn.functional.mse_loss(model(x), y)
        loss.backward()
        return loss

    opt.step(closure, loss=0.25)
    assert peer.status.loss == 0.25


def test_a_step_without_a_loss_leaves_the_reported_loss_as_it_was():
    peer = LocalPeer(status=PeerStatus())
    model, opt = diloco(peer)
    (x, y), = batches(4, 1)
    torch.nn.functional.mse_loss(model(x), y).backward()
    opt.step()
    assert peer.status.step == 1 and peer.status.samples == 1
    assert math.isnan(peer.status.loss)


def test_streaming_diloco_reports_as_diloco_does():
    peer = LocalPeer(status=PeerStatus())
    model = make_model()
    opt = StreamingDiLoCo(
        model, torch.optim.SGD(model.parameters(), lr=0.1), peer, fragments=1, sync_every=2, overlap=1
    )
    for x, y in batches(5, 4):
        loss = torch.nn.functional.mse_loss(model(x), y)
        loss.backward()
        opt.step(samples=len(x), loss=loss)
        opt.zero_grad()
    assert (peer.status.step, peer.status.samples, peer.status.loss) == (4, 16, loss.item())


def test_a_peer_without_a_status_trains_unreported():
    peer = LocalPeer()
    model, opt = diloco(peer, sync_every=2)
    for x, y in batches(6, 2):
        torch.nn.functional.mse_loss(model(x), y).backward()
        opt.step(samples=len(x), loss=1.0)
    assert peer.status is None
    assert (opt.inner_steps, opt.samples_trained, opt.committed_rounds) == (2, 8, 1)


@pytest.mark.parametrize(("samples", "error", "match"), [(2.5, TypeError, "an int"), (-1, ValueError, "got -1")])
def test_samples_must_be_a_count_of_examples(samples, error, match):
    _, opt = diloco(LocalPeer())
    with pytest.raises(error, match=match):
        opt.step(samples=samples)
    assert opt.inner_steps == 0


def test_the_samples_since_the_last_round_weight_this_peers_contribution():
    weights = []

    class Recording(LocalPeer):
        def sync(self, tensors, weight=1.0, tag="", codec=None, aggregator=None):
            weights.append(weight)
            return super().sync(tensors, weight, tag, codec, aggregator)

    model, opt = diloco(Recording(), sync_every=2)
    for x, y in batches(7, 4, size=8):
        torch.nn.functional.mse_loss(model(x), y).backward()
        opt.step(samples=len(x))
    assert weights == [16.0, 16.0]


def test_step_rate_is_nan_until_a_window_closes_then_steps_over_seconds():
    rate = StepRate(window_s=1.0)
    assert math.isnan(rate.tick(100.0))  # the first step opens the window
    assert math.isnan(rate.tick(100.5))
    assert rate.tick(101.0) == 2.0
    assert rate.tick(101.25) == 2.0  # the next window is still open
    assert rate.tick(102.0) == 2 / 1.0


# -- where a peer listens and what it tells the others -------------------------------------------


def test_a_loopback_peer_refuses_a_coordinator_on_another_machine_before_listening():
    transport = Transport(TransportConfig())
    with pytest.raises(
        ConfigError, match=r'TransportConfig\(host="0\.0\.0\.0", advertise=".+"\).*--host 0\.0\.0\.0 --advertise'
    ):
        transport.start(coordinator=ELSEWHERE)
    assert transport._thread is None  # nothing was started


@pytest.mark.timeout(30)
def test_elastic_start_refuses_a_loopback_peer_whose_coordinator_is_on_another_machine():
    peer = ElasticCollective(ElasticConfig(coordinator=ELSEWHERE, run_id="r", patience_s=5))
    try:
        with pytest.raises(ConfigError, match="is on another machine"):
            peer.start()
    finally:
        peer.close(leave=False)


def test_a_loopback_peer_with_its_coordinator_on_this_machine_starts():
    with Transport(TransportConfig()) as transport:
        address = transport.start(coordinator="127.0.0.1:1")
        assert address == transport.bound_address and address.startswith("127.0.0.1:")


def test_a_loopback_peer_that_advertises_another_address_only_warns(caplog):
    with (
        Transport(TransportConfig(advertise="10.0.0.7")) as transport,
        caplog.at_level("WARNING", "collectives.net.addresses"),
    ):
        address = transport.start(coordinator=ELSEWHERE)
    assert address == f"10.0.0.7:{addresses.split_address(transport.bound_address)[1]}"
    warnings = [r.getMessage() for r in caplog.records if r.name == "collectives.net.addresses"]
    assert len(warnings) == 1 and "port forwarded to it" in warnings[0]


def test_a_wildcard_peer_advertises_its_address_on_the_route_to_the_coordinator():
    with Transport(TransportConfig(host="0.0.0.0")) as transport:
        address = transport.start(coordinator="127.0.0.1:1")
        port = addresses.split_address(transport.bound_address)[1]
        assert transport.bound_address == f"0.0.0.0:{port}"
        assert address == f"127.0.0.1:{port}"


def test_the_route_to_an_address_of_this_machine_is_that_address():
    assert addresses.route_address("127.0.0.1") == "127.0.0.1"
    assert addresses.is_this_machine("127.0.0.1") and not addresses.is_this_machine("198.51.100.1")


# -- against a real coordinator: the dashboard sees what the optimizers report ---------------------


@pytest.mark.timeout(60)
def test_the_coordinator_sees_each_api_peers_step_loss_samples_and_bytes():
    coordinator = CoordinatorThread(
        CoordinatorConfig(run_id="api", port=0, dashboard_port=None, startup_grace_s=0, min_peers=2, heartbeat_s=0.2)
    )
    # Each its own host, so their rounds cross the data plane and count bytes (on one host they share memory).
    peers = [
        ElasticCollective(
            ElasticConfig(
                coordinator=coordinator.server.address, run_id="api", transport=TransportConfig(host_id=f"h{i}")
            )
        )
        for i in range(2)
    ]

    def train(index: int) -> tuple[str, tuple[int, int, float]]:
        peer = peers[index]
        model, opt = diloco(peer, sync_every=5)
        state = peer.start()
        if state is not None:
            opt.load_snapshot(state)
        for x, y in batches(10 + index, 10):
            loss = torch.nn.functional.mse_loss(model(x), y)
            loss.backward()
            opt.step(samples=len(x), loss=loss)
            opt.zero_grad()
        return peer.peer_id, (opt.inner_steps, opt.samples_trained, loss.item())

    pool = concurrent.futures.ThreadPoolExecutor(2)
    try:
        final = dict(pool.map(train, range(2), timeout=45))
        assert [steps for steps, _, _ in final.values()] == [10, 10]
        # A heartbeat after the last step carries it (heartbeats every 0.2 s).
        deadline = time.monotonic() + 10
        while True:
            rows = {p["peer_id"]: p for p in coordinator.status()["peers"]}
            seen = {pid: (rows[pid]["step"], rows[pid]["samples"], rows[pid]["loss"]) for pid in final if pid in rows}
            if seen == final or time.monotonic() > deadline:
                break
            time.sleep(0.1)
        assert seen == final
        assert all(rows[pid]["bytes_sent"] > 0 and rows[pid]["bytes_received"] > 0 for pid in final)
    finally:
        for peer in peers:
            peer.close()
        pool.shutdown(wait=False, cancel_futures=True)
        coordinator.close()


# -- leaving -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("stopped_by", "failure", "adopted", "reason"),
    [
        (None, None, True, "finished"),
        ("SIGTERM", None, True, "stopped by SIGTERM"),
        ("SIGINT", KeyboardInterrupt(), True, "stopped by SIGINT"),
        (None, ValueError("state holds 3 tensors, this model 5"), False,
         "refused the run's state: state holds 3 tensors, this model 5"),
        (None, RuntimeError("no quorum"), True, "failed: no quorum"),
        (None, KeyboardInterrupt(), True, "failed: KeyboardInterrupt"),
        (None, ValueError("x" * 300), False, ("refused the run's state: " + "x" * 300)[:200]),
    ],
)
def test_a_member_says_why_it_leaves(stopped_by, failure, adopted, reason):
    assert leave_reason(stopped_by, failure, adopted) == reason


@pytest.mark.timeout(60)
@pytest.mark.parametrize(
    ("raised", "detail"), [(None, "finished"), (RuntimeError("out of memory"), "failed: out of memory")]
)
def test_a_peer_used_as_a_context_manager_leaves_the_run_saying_why(raised, detail):
    coordinator = CoordinatorThread(CoordinatorConfig(run_id="api", port=0, dashboard_port=None, startup_grace_s=0))
    try:
        with contextlib.suppress(RuntimeError):
            with ElasticCollective(ElasticConfig(coordinator=coordinator.server.address, run_id="api")) as peer:
                peer.start()
                if raised is not None:
                    raise raised
        leaves = [(e["peer_id"], e["detail"]) for e in coordinator.status()["events"] if e["kind"] == "leave"]
        assert leaves == [(peer.peer_id, detail)]
    finally:
        coordinator.close()


def _sync_with_prepare(tensors, weight=1.0, prepare=None): ...


def _sync_with_kwargs(tensors, **extra): ...


def _sync_without_prepare(tensors, weight=1.0): ...


@pytest.mark.parametrize(
    ("sync", "takes"),
    [(_sync_with_prepare, True), (_sync_with_kwargs, True), (_sync_without_prepare, False), (LocalPeer().sync, True)],
)
def test_a_peers_sync_takes_prepare_when_it_names_it_or_takes_any_keyword(sync, takes):
    assert takes_keyword(sync, "prepare") is takes
