"""One hivemind peer of ``loconet bench diloco --hivemind``: a standalone script, run by hivemind's interpreter.

It trains the benchmark's task with ``hivemind.Optimizer`` in its local-updates mode, hivemind's own counterpart of
DiLoCo: each peer steps its inner optimizer on every batch, and once the peers together have processed
``target_batch_size`` samples (an epoch: the syncing interval of loconet's run) they average their parameters in
the background. It is run as ``python -m peer.bench.hivemind_trainer`` with loconet's folder on ``PYTHONPATH`` and
imports the standard library, torch, hivemind, loconet's task code (``peer.tasks``: torch and numpy), its device
placement (``peer.device``) and the all-reduce worker's file helpers, nothing of loconet's collective or peer.
The peers meet through files in a shared folder: rank 0 writes its DHT addresses, and every peer starts training
once all are ready. The report is one JSON object in the shared folder (``report-<rank>.json``).
"""

from __future__ import annotations

import argparse
import json
import logging
import re
import sys
import time
from pathlib import Path

from peer.bench.hivemind_worker import check_compression, compression_of, stop_and_report, wait_for, write_file

# Seconds a peer gathers its averaging group; hivemind's default (15 s) is meant for peers across the internet.
_MATCH_S = 2.0
# hivemind logs each background averaging round at INFO ("Averaged parameters with K peers").
_AVERAGED = re.compile(r"Averaged parameters with (\d+) peers")
_FAILED = re.compile(r"Averaging failed|Background update failed")
_OUT_OF_SYNC = re.compile(r"Peer is out of sync")


class RoundCounter(logging.Handler):
    """Counts hivemind's log lines about its averaging rounds: the groups it averaged in, failures, state loads."""

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.groups: list[int] = []
        self.failures = 0
        self.state_loads = 0

    def emit(self, record: logging.LogRecord) -> None:
        message = record.getMessage()
        averaged = _AVERAGED.search(message)
        if averaged:
            self.groups.append(int(averaged.group(1)))
        elif _FAILED.search(message):
            self.failures += 1
        elif _OUT_OF_SYNC.search(message):
            self.state_loads += 1


def _probe(task: str, task_config: dict, codec: str) -> int:
    """Build the task's model and round-trip a tensor through the compression; print hivemind's version."""
    from peer.tasks.base import TaskConfig
    from peer.tasks.registry import make_task

    make_task(task, TaskConfig(**task_config)).build_model()
    print(check_compression(codec))
    return 0


def _barrier(meet: Path, rank: int, peers: int) -> None:
    """Return once every peer has written that it is ready."""
    write_file(meet / f"ready-{rank}", "")
    for other in range(peers):
        wait_for(meet / f"ready-{other}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--probe", action="store_true", help="only check hivemind, the task and the compression")
    parser.add_argument("--task", required=True)
    parser.add_argument("--task-config", required=True, help="the TaskConfig's fields as a JSON object")
    parser.add_argument("--codec", choices=("none", "fp16", "int8", "quantile8"), required=True)
    parser.add_argument("--rank", type=int)
    parser.add_argument("--peers", type=int)
    parser.add_argument("--steps", type=int)
    parser.add_argument("--sync-every", type=int, help="steps per peer in one epoch (hivemind's averaging interval)")
    parser.add_argument("--inner", choices=("adamw", "sgd"), default="adamw")
    parser.add_argument("--inner-lr", type=float, default=0.003)
    parser.add_argument("--weight-decay", type=float, default=0.01)
    parser.add_argument("--device", default="cpu", help="the torch device to train on, as loconet's peers do")
    parser.add_argument("--meet", type=Path, help="a folder every peer can read and write")
    parser.add_argument("--timeout", type=float, default=60.0, help="seconds an averaging round may take")
    parser.add_argument("--host", default="127.0.0.1", help="the address its DHT and averager serve on")
    ns = parser.parse_args(argv)
    task_config = json.loads(ns.task_config)
    if ns.probe:
        return _probe(ns.task, task_config, ns.codec)
    missing = [f"--{k.replace('_', '-')}" for k in ("rank", "peers", "steps", "sync_every", "meet")
               if getattr(ns, k) is None]
    if missing:
        parser.error(f"missing {', '.join(missing)}")

    import hivemind
    import torch

    from peer.device import move_batch, place_model
    from peer.tasks.base import TaskConfig
    from peer.tasks.registry import make_task

    torch.set_num_threads(1)
    counter = RoundCounter()
    logging.getLogger("hivemind").addHandler(counter)
    task = make_task(ns.task, TaskConfig(**task_config))
    device = torch.device(ns.device)
    # The same seeded initial weights on every peer, as loconet's peers start from.
    model = place_model(task.build_model(), device)
    batch = task.config.batch_size
    inner = torch.optim.AdamW if ns.inner == "adamw" else torch.optim.SGD
    initial = [] if ns.rank == 0 else json.loads(wait_for(ns.meet / "dht.json"))
    dht = hivemind.DHT(start=True, initial_peers=initial, host_maddrs=[f"/ip4/{ns.host}/tcp/0"])
    if ns.rank == 0:
        write_file(ns.meet / "dht.json", json.dumps([str(a) for a in dht.get_visible_maddrs()]))
    opt = hivemind.Optimizer(
        dht=dht, run_id="bench", params=model.parameters(),
        optimizer=lambda params: inner(params, lr=ns.inner_lr, weight_decay=ns.weight_decay),
        # An epoch is sync_every steps of every peer: hivemind averages as often as loconet's run syncs.
        target_batch_size=ns.peers * batch * ns.sync_every, batch_size_per_step=batch, use_local_updates=True,
        matchmaking_time=_MATCH_S, averaging_timeout=ns.timeout,
        averager_opts={"request_timeout": _MATCH_S / 2},
        state_averaging_compression=compression_of(ns.codec), verbose=True,
    )
    batches = task.batches(ns.rank, ns.peers)
    _barrier(ns.meet, ns.rank, ns.peers)
    started = time.monotonic()
    for _ in range(ns.steps):
        opt.zero_grad()
        task.loss(model, move_batch(next(batches), device)).backward()
        opt.step()
    loop_s = time.monotonic() - started
    # The last epoch's averaging may still run in the background: its result is part of the training.
    opt.state_averager.step(wait_for_delayed_updates=True, apply_delayed_updates=True)
    wall = time.monotonic() - started
    report = {
        "rank": ns.rank,
        "final_eval_loss": task.evaluate(model),
        "epochs": opt.local_epoch,
        "averaged_groups": counter.groups,
        "averaging_failures": counter.failures,
        "state_loads": counter.state_loads,
        "numel": sum(p.numel() for p in model.parameters() if p.requires_grad),
        "train_s": wall,
        "loop_s": loop_s,
        "hivemind": hivemind.__version__,
    }
    stop_and_report(ns.meet, ns.rank, report, opt, dht)
    return 0


if __name__ == "__main__":
    sys.exit(main())
