"""A toy member of a run for the membership tests: its state is one vector, each round adds the mean of the
contributions.

Run as a script. It prints one JSON object per line on stdout (joined,
committed, resynced, ...), so a test can follow it. Contribution k of a peer
(k = how many rounds it applied) is a seeded random vector, the same on
every retry of that round, so a test can recompute any round's exact result.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import signal
import sys
import threading
import time

import torch

from collectives.allocator import tune_malloc
from collectives.allreduce import AllReduceConfig
from collectives.codecs import CodecConfig
from collectives.elastic import ElasticCollective, ElasticConfig, Resynced
from collectives.errors import LoconetError
from collectives.net.transportconfig import TransportConfig
from collectives.statesync import StateSnapshot


def contribution(name: str, k: int, numel: int) -> torch.Tensor:
    """What peer `name` contributes to its k-th round."""
    seed = int.from_bytes(hashlib.sha256(f"{name}/{k}".encode()).digest()[:6], "little")
    return torch.randn(numel, generator=torch.Generator().manual_seed(seed))


def digest(t: torch.Tensor) -> str:
    return hashlib.sha256(t.numpy().tobytes()).hexdigest()


def emit(**fields) -> None:
    sys.stdout.write(json.dumps(fields) + "\n")
    sys.stdout.flush()


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--coordinator", required=True)
    ap.add_argument("--run", required=True)
    ap.add_argument("--name", required=True)
    ap.add_argument("--numel", type=int, default=1000)
    ap.add_argument("--codec", default="none")
    ap.add_argument("--rounds", type=int, default=0, help="stop after this many applied rounds (0: forever)")
    ap.add_argument("--interval", type=float, default=0.1, help="'training' time between rounds")
    ap.add_argument("--hold", default="", help="PHASE@K: freeze when the round after k applied rounds reaches PHASE")
    ap.add_argument("--timeout", type=float, default=10.0, help="all-reduce deadline")
    ap.add_argument("--init-seed", type=int, default=0)
    ap.add_argument("--host-id", default="auto", help="the host this peer announces (auto: detected; all share it)")
    ns = ap.parse_args()
    # INFO on stderr (the test's log file): a failing test shows what the peer went through.
    logging.basicConfig(level=logging.INFO, format=f"%(asctime)s {ns.name} %(name)s %(levelname)s %(message)s")
    tune_malloc()
    torch.set_num_threads(1)

    lock = threading.Lock()
    params = torch.randn(ns.numel, generator=torch.Generator().manual_seed(ns.init_seed))
    state = {"round": 0, "applied": 0}
    hold_phase, _, hold_k = ns.hold.partition("@")

    def provider() -> StateSnapshot:
        with lock:
            return StateSnapshot(
                round_id=state["round"], tensors={"params": params.clone()}, meta={"applied": state["applied"]}
            )

    def hook(group, phase: str) -> None:
        if hold_phase == phase and hold_k and state["applied"] == int(hold_k):
            emit(event="held", phase=phase, round=group.round_id)
            while True:
                time.sleep(3600)

    def load(snapshot: StateSnapshot) -> None:
        with lock:
            params.copy_(snapshot.tensors["params"])
            state["round"] = snapshot.round_id
        emit(event="resynced", round=snapshot.round_id, digest=digest(params))

    config = ElasticConfig(
        coordinator=ns.coordinator,
        run_id=ns.run,
        name=ns.name,
        transport=TransportConfig(chunk_bytes=256 * 1024, host_id=ns.host_id),
        allreduce=AllReduceConfig(codec=CodecConfig.parse(ns.codec), timeout_s=ns.timeout),
    )
    peer = ElasticCollective(config, provider, phase_hook=hook)
    stopping = threading.Event()

    def terminate(*_) -> None:
        # Leave at once, even from inside a blocking sync: nothing half-applied can result,
        # since a round is applied only after it returns.
        stopping.set()
        raise SystemExit(0)

    signal.signal(signal.SIGTERM, terminate)
    t0 = time.monotonic()
    snapshot = peer.start(has_state=False)
    if snapshot is not None:
        load(snapshot)
    emit(
        event="joined", peer_id=peer.peer_id, address=peer.address, sync_s=time.monotonic() - t0, digest=digest(params)
    )
    try:
        while not stopping.is_set() and (ns.rounds == 0 or state["applied"] < ns.rounds):
            time.sleep(ns.interval)
            peer.status.step += 1
            # A stand-in "loss" for the dashboard: the state's RMS.
            peer.status.loss = float(params.norm()) / max(ns.numel, 1) ** 0.5
            if peer.status.step % 2 == 0:  # and a stand-in "eval" every other step, for the eval curve
                peer.status.eval_loss = peer.status.loss * 1.05
            peer.status.activity = "training"
            mine = contribution(ns.name, state["applied"], ns.numel)
            try:
                result = peer.sync(mine)
            except Resynced as exc:
                load(exc.snapshot)
                continue
            except LoconetError as exc:
                emit(event="error", type=type(exc).__name__, message=str(exc))
                time.sleep(0.5)
                continue
            with lock:
                params.add_(result.value)
                state["round"] = result.round_id
                state["applied"] += 1
            emit(
                event="committed",
                round=result.round_id,
                epoch=result.epoch,
                members=result.members,
                attempts=result.attempts,
                k=state["applied"] - 1,
                result=digest(result.value),
                digest=digest(params),
                wall_s=result.stats.wall_s,
                t=time.time(),
            )
    finally:
        peer.close(leave=True, reason="done")
        emit(event="left")
    return 0


if __name__ == "__main__":
    from peer.harness.processes import die_with_parent_from_env

    die_with_parent_from_env()
    raise SystemExit(main())
