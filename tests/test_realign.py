"""A peer whose state is not the run's is told to fetch the run's state (peer/coordinator/digests.py).

Here the README's joiner forgets `opt.load_snapshot(state)`: it trains on its own initial state, and
every round it applies leaves it as far from the others as before. Its state digest loses to the
founder's, the coordinator answers its next quorum request with RESYNC, and from then on both peers
hold the same state at every round.
"""

from __future__ import annotations

import concurrent.futures
import threading
import time

import torch

from collectives.elastic import ElasticCollective, ElasticConfig
from collectives.net.transportconfig import TransportConfig
from optimizers.diloco import DiLoCo
from peer.coordinator.config import CoordinatorConfig
from peer.coordinator.thread import CoordinatorThread

RUN = "realign"


def batches(seed: int, count: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(4, 3, generator=g), torch.randn(4, 1, generator=g)) for _ in range(count)]


def test_a_joiner_that_never_loads_the_runs_state_is_made_to_fetch_it_and_then_holds_the_runs_state():
    coordinator = CoordinatorThread(
        CoordinatorConfig(run_id=RUN, port=0, dashboard_port=None, startup_grace_s=0, min_peers=1, heartbeat_s=0.2)
    )
    peers = [
        ElasticCollective(
            ElasticConfig(
                coordinator=coordinator.server.address, run_id=RUN, transport=TransportConfig(host_id=f"h{i}")
            )
        )
        for i in range(2)
    ]
    founded = threading.Event()
    # Round id -> the digest of each peer's state as of that round (the first it held).
    digests: list[dict[int, str]] = [{}, {}]

    def train(index: int) -> None:
        peer = peers[index]
        torch.manual_seed(0)
        model = torch.nn.Linear(3, 1)
        opt = DiLoCo(model, torch.optim.SGD(model.parameters(), lr=0.1), peer, sync_every=5, codec="none")
        if index == 1:
            assert founded.wait(30)
        peer.start()  # the joiner's state is dropped here: the mistake under test
        for step, (x, y) in enumerate(batches(10 + index, 40)):
            torch.nn.functional.mse_loss(model(x), y).backward()
            opt.step(samples=len(x))
            opt.zero_grad()
            round_id, digest = opt.state_digest()
            digests[index].setdefault(round_id, digest)
            if index == 0 and round_id >= 1:
                founded.set()
            if index == 0 and step == 5:
                time.sleep(1.0)  # the joiner joins after round 1 and fetches its state

    pool = concurrent.futures.ThreadPoolExecutor(2)
    try:
        list(pool.map(train, range(2), timeout=60))
        realigned = [
            e for e in coordinator.status()["events"] if e["kind"] == "resync" and "not the run's" in e["detail"]
        ]
        assert [e["peer_id"] for e in realigned] == [peers[1].peer_id]
        shared = sorted(set(digests[0]) & set(digests[1]))
        before = [r for r in shared if digests[0][r] != digests[1][r]]
        after = [r for r in shared if r > max(before, default=0)]
        assert before and after, (before, after)
        assert all(digests[0][r] == digests[1][r] for r in after)
    finally:
        for peer in peers:
            peer.close()
        pool.shutdown(wait=False, cancel_futures=True)
        coordinator.close()
