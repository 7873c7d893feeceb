"""``loconet bench diloco``: DiLoCo and Streaming DiLoCo against data-parallel training and one peer alone.

In one invocation, on the same task, data and inner steps per peer:

- every registered algorithm named in ``--methods`` (``diloco``,
  ``streaming``, a plugin's): a real coordinator and N real ``loconet peer``
  processes on 127.0.0.1, talking through our collective;
- ``data_parallel``: N processes of torch DDP on gloo, same per-peer batch,
  every step's gradients all-reduced (the synchronous baseline);
- ``one_peer``: one process training alone on peer 0's data.

Per method: ``final_eval_loss`` (the held-out loss after training),
``bytes_sent_per_peer``, ``peak_bytes_per_sync`` and ``wall_s``; for synthetic
tasks the ``entropy_floor``. Our methods' bytes are counted by the transport;
data-parallel's are a ring all-reduce's: 2 (N-1)/N x 4 bytes x parameters
per step (gloo's ring algorithm; it exposes no counters). The state a
joiner fetches at start (once per peer, like DDP's initial broadcast) is
reported apart as ``state_sync_bytes_per_peer``.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import statistics
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from collectives.errors import ConfigError
from optimizers.registry import algorithm_names
from peer.bench.kit import print_report
from peer.runtime.training import TrainConfig, local_run
from peer.tasks.base import TaskConfig
from peer.tasks.registry import make_task

BASELINES = ("data_parallel", "one_peer")
DEFAULT_TRAIN = local_run("diloco")


@dataclass(frozen=True)
class BenchConfig:
    """What to compare, at which size: one TrainConfig per algorithm (same loop settings), and the baselines."""

    peers: int = 4
    task: str = "synthetic-lm"
    task_config: TaskConfig = field(default_factory=TaskConfig)
    runs: tuple[TrainConfig, ...] = (DEFAULT_TRAIN, local_run("streaming"))
    baselines: tuple[str, ...] = BASELINES

    def __post_init__(self) -> None:
        unknown = [b for b in self.baselines if b not in BASELINES]
        if unknown:
            raise ConfigError(f"unknown baseline {unknown[0]!r}: use {', '.join(BASELINES)}")

    @property
    def loop(self) -> TrainConfig:
        """The loop settings the baselines share with the algorithms (steps, inner lr, weight decay)."""
        return self.runs[0] if self.runs else DEFAULT_TRAIN


def run_ours(config: BenchConfig, train: TrainConfig) -> dict:
    """Train with a coordinator and N ``loconet peer`` processes; collect their events."""
    from peer.harness.processes import CoordinatorProc, Proc, stop_all
    from peer.trainoptions import task_args, train_args

    algorithm = train.algorithm
    tmp = Path(tempfile.mkdtemp(prefix=f"loconet-bench-{algorithm}-"))
    run = f"bench-{algorithm}"
    coordinator = CoordinatorProc(tmp / "coordinator.log", run, 0, "--join-timeout", "10", "--min-peers", str(config.peers),
                                  "--startup-grace", "0", "--dashboard-port", "-1")
    peers = []
    started = time.monotonic()
    try:
        for rank in range(config.peers):
            args = [sys.executable, "-m", "peer.cli", "peer", "--coordinator", coordinator.address, "--run", run,
                    "--name", f"peer{rank}", "--events", "--no-progress", "--task", config.task,
                    *task_args(config.task_config), "--shard", f"{rank}/{config.peers}", *train_args(train)]
            peers.append(Proc(args, tmp / f"peer{rank}.log"))
        finished = [p.wait_event(lambda e: e["event"] == "finished", 3600) for p in peers]
        wall = time.monotonic() - started
        per_sync = [e["bytes"] for p in peers for e in p.events if e["event"] == "committed" and e.get("contributed", True)]
    finally:
        stop_all(peers)
        coordinator.stop()
    return {
        "final_eval_loss": statistics.mean(f["eval_loss"] for f in finished),
        "final_eval_loss_per_peer": [f["eval_loss"] for f in finished],
        # Training traffic: what peers sent in rounds (all attempts), without the state served to joiners.
        "bytes_sent_per_peer": statistics.mean(f["bytes_sent"] - f["bytes_served"] for f in finished),
        "state_sync_bytes_per_peer": statistics.mean(f["bytes_served"] for f in finished),
        "peak_bytes_per_sync": max(per_sync) if per_sync else 0,
        "rounds": statistics.mean(f["rounds"] for f in finished),
        "identical_final_state": len({f["digest"] for f in finished}) == 1,
        "wall_s": wall,
    }


def _ddp_worker(rank: int, world: int, port: int, config: BenchConfig, out) -> None:
    import datetime
    import os

    import torch
    import torch.distributed as dist

    from collectives.allocator import tune_malloc

    tune_malloc()
    torch.set_num_threads(1)
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    store = dist.TCPStore("127.0.0.1", port, world, is_master=False, timeout=datetime.timedelta(seconds=120))
    dist.init_process_group("gloo", store=store, rank=rank, world_size=world)
    task = make_task(config.task, config.task_config)
    model = torch.nn.parallel.DistributedDataParallel(task.build_model())
    loop = config.loop
    opt = torch.optim.AdamW(model.parameters(), lr=loop.inner_lr, weight_decay=loop.weight_decay)
    batches = task.batches(rank, world)
    started = time.monotonic()
    for _ in range(loop.steps):
        task.loss(model, next(batches)).backward()
        opt.step()
        opt.zero_grad()
    wall = time.monotonic() - started
    numel = sum(p.numel() for p in model.parameters())
    result = {"wall_s": wall, "numel": numel}
    if rank == 0:
        result["final_eval_loss"] = task.evaluate(model.module)
    dist.destroy_process_group()
    out.put((rank, result))


def run_data_parallel(config: BenchConfig) -> dict:
    """Synchronous data-parallel training: torch DDP on gloo over N local processes."""
    import datetime

    import torch.distributed as dist

    ctx = mp.get_context("spawn")
    store = dist.TCPStore("127.0.0.1", 0, config.peers + 1, is_master=True, timeout=datetime.timedelta(seconds=120),
                          wait_for_workers=False)
    out = ctx.Queue()
    started = time.monotonic()
    procs = [ctx.Process(target=_ddp_worker, args=(r, config.peers, store.port, config, out)) for r in range(config.peers)]
    for p in procs:
        p.start()
    try:
        results = dict(out.get(timeout=3600) for _ in procs)
    finally:
        for p in procs:
            p.join(timeout=30)
            if p.is_alive():
                p.kill()
    wall = time.monotonic() - started
    numel = results[0]["numel"]
    per_step = 2 * (config.peers - 1) / config.peers * 4 * numel
    return {
        "final_eval_loss": results[0]["final_eval_loss"],
        "bytes_sent_per_peer": per_step * config.loop.steps,
        "peak_bytes_per_sync": per_step,
        "bytes_method": "ring all-reduce of fp32 gradients every step: 2(N-1)/N x 4 B x parameters",
        "wall_s": wall,
    }


def run_one_peer(config: BenchConfig) -> dict:
    """One peer training alone (AdamW) on peer 0's data for the same number of steps."""
    import torch

    torch.set_num_threads(1)
    task = make_task(config.task, config.task_config)
    model = task.build_model()
    loop = config.loop
    opt = torch.optim.AdamW(model.parameters(), lr=loop.inner_lr, weight_decay=loop.weight_decay)
    batches = task.batches(0, config.peers)
    started = time.monotonic()
    for _ in range(loop.steps):
        task.loss(model, next(batches)).backward()
        opt.step()
        opt.zero_grad()
    return {"final_eval_loss": task.evaluate(model), "bytes_sent_per_peer": 0, "peak_bytes_per_sync": 0,
            "wall_s": time.monotonic() - started}


def run(config: BenchConfig) -> dict:
    """Run every algorithm of config.runs and every baseline; return the report."""
    from collectives.allocator import tune_malloc

    tune_malloc()
    baselines = {"data_parallel": run_data_parallel, "one_peer": run_one_peer}
    report: dict = {"config": asdict(config), "methods": {}}
    report["entropy_floor"] = make_task(config.task, config.task_config).entropy_floor
    for train in config.runs:
        report["methods"][train.algorithm] = run_ours(config, train)
    for name in config.baselines:
        report["methods"][name] = baselines[name](config)
    m = report["methods"]
    if "diloco" in m and "data_parallel" in m:
        report["diloco_loss_vs_data_parallel"] = m["diloco"]["final_eval_loss"] / m["data_parallel"]["final_eval_loss"]
        report["data_parallel_bytes_vs_diloco"] = m["data_parallel"]["bytes_sent_per_peer"] / max(m["diloco"]["bytes_sent_per_peer"], 1)
    if "diloco" in m and "streaming" in m:
        report["streaming_peak_vs_diloco"] = m["streaming"]["peak_bytes_per_sync"] / max(m["diloco"]["peak_bytes_per_sync"], 1)
        report["streaming_loss_vs_diloco"] = m["streaming"]["final_eval_loss"] / m["diloco"]["final_eval_loss"]
    return report


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of this benchmark: the training options apply to every algorithm that has them."""
    from peer.trainoptions import add_task_arguments, add_train_arguments

    parser.add_argument("--peers", type=int, default=BenchConfig.peers)
    parser.add_argument("--task", default=BenchConfig.task, help="synthetic-lm, text-lm, or package.module:function")
    parser.add_argument(
        "--methods", default=",".join(["diloco", "streaming", *BASELINES]),
        help=f"comma-separated: registered algorithms ({', '.join(algorithm_names())}) and {', '.join(BASELINES)}",
    )
    parser.add_argument("--json", action="store_true")
    add_task_arguments(parser)
    add_train_arguments(parser, DEFAULT_TRAIN)


def bench_config(ns: argparse.Namespace) -> BenchConfig:
    """The BenchConfig the options describe; ConfigError for an unknown method."""
    from peer.trainoptions import read_task_config, read_train_config

    methods = [m.strip() for m in ns.methods.split(",") if m.strip()]
    known = [*algorithm_names(), *BASELINES]
    unknown = [m for m in methods if m not in known]
    if unknown or not methods:
        raise ConfigError(f"unknown method {unknown[0] if unknown else ns.methods!r} in --methods: use {', '.join(known)}")
    base = {t.algorithm: t for t in BenchConfig.runs}
    runs = tuple(
        read_train_config(ns, base=base.get(m, DEFAULT_TRAIN), algorithm=m, strict=False)
        for m in methods if m not in BASELINES
    )
    return BenchConfig(
        peers=ns.peers, task=ns.task, task_config=read_task_config(ns), runs=runs,
        baselines=tuple(m for m in methods if m in BASELINES),
    )


def main(ns: argparse.Namespace) -> int:
    """Run from parsed arguments and print the report."""
    report = run(bench_config(ns))
    # config and methods are nested dicts: their values are printed as indented JSON, one line per field.
    print_report(report, ns.json, fmt=lambda value: json.dumps(value, indent=2))
    return 0
