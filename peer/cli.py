"""The ``loconet`` command: one entry point, one subcommand per process or benchmark."""

from __future__ import annotations

import argparse
import logging
import sys

from collectives.errors import ConfigError


def build_parser() -> argparse.ArgumentParser:
    """The full argument parser of the ``loconet`` command."""
    parser = argparse.ArgumentParser(prog="loconet", description="Decentralized low-communication training for PyTorch.")
    parser.add_argument("-v", "--verbose", action="count", default=0, help="more logging (-v info, -vv debug)")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    coordinator = commands.add_parser("coordinator", help="run the membership coordinator of a run, with its dashboard")
    add_coordinator_arguments(coordinator)
    coordinator.set_defaults(handler=run_coordinator)

    peer = commands.add_parser("peer", help="run one training peer of a run")
    add_peer_arguments(peer)
    peer.set_defaults(handler=run_peer_command)

    bench = commands.add_parser("bench", help="benchmarks that print JSON")
    benches = bench.add_subparsers(dest="bench", required=True, metavar="BENCH")

    from peer import bench_allreduce, bench_codecs, bench_statesync

    allreduce = benches.add_parser("allreduce", help="our all-reduce among local processes vs gloo")
    bench_allreduce.add_arguments(allreduce)
    allreduce.set_defaults(handler=bench_allreduce.main)

    codecs = benches.add_parser("codecs", help="encode+decode throughput of each codec on one core")
    bench_codecs.add_arguments(codecs)
    codecs.set_defaults(handler=bench_codecs.main_ns)

    statesync = benches.add_parser("statesync", help="time for a joiner to fetch a state from a peer")
    bench_statesync.add_arguments(statesync)
    statesync.set_defaults(handler=bench_statesync.main)
    return parser


def add_coordinator_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``loconet coordinator``."""
    parser.add_argument("--run", default="demo", help="run id this coordinator serves")
    parser.add_argument("--host", default="127.0.0.1", help="interface for gRPC (default loopback only)")
    parser.add_argument("--port", type=int, default=7070, help="gRPC port (0: any free port)")
    parser.add_argument("--dashboard-host", default="127.0.0.1")
    parser.add_argument("--dashboard-port", type=int, default=8080, help="HTTP dashboard port (0: any, -1: off)")
    parser.add_argument("--min-peers", type=int, default=1)
    parser.add_argument("--join-timeout", type=float, default=5.0, help="seconds a quorum waits for missing live peers")
    parser.add_argument("--lease", type=float, default=5.0, help="seconds without heartbeat before a peer is out")
    parser.add_argument("--heartbeat", type=float, default=1.0, help="heartbeat interval peers are told to use")
    parser.add_argument("--commit-timeout", type=float, default=30.0)
    parser.add_argument("--quorum-timeout", type=float, default=120.0)
    parser.add_argument("--startup-grace", type=float, default=None, help="after a start, wait this long for peers to re-register (default: one lease)")


def add_task_arguments(parser: argparse.ArgumentParser) -> None:
    """Options that choose and size a training task."""
    g = parser.add_argument_group("task")
    g.add_argument("--task", default="synthetic-lm", help="synthetic-lm, text-lm, or package.module:function")
    g.add_argument("--data", default=None, help="text-lm: a UTF-8 text file or a folder of them")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--batch-size", type=int, default=16)
    g.add_argument("--seq-len", type=int, default=64)
    g.add_argument("--split", default="iid", choices=["iid", "non-iid"])
    g.add_argument("--d-model", type=int, default=64)
    g.add_argument("--layers", type=int, default=2)
    g.add_argument("--heads", type=int, default=4)
    g.add_argument("--vocab-size", type=int, default=64, help="synthetic-lm vocabulary")


def task_config(ns: argparse.Namespace):
    """The TaskConfig the task options describe."""
    from peer.tasks.base import TaskConfig

    return TaskConfig(
        seed=ns.seed,
        batch_size=ns.batch_size,
        seq_len=ns.seq_len,
        split=ns.split,
        d_model=ns.d_model,
        n_layers=ns.layers,
        n_heads=ns.heads,
        vocab_size=ns.vocab_size,
        data=ns.data,
    )


def add_train_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of the training algorithm."""
    g = parser.add_argument_group("training")
    g.add_argument("--algorithm", default="diloco", choices=["diloco", "streaming"])
    g.add_argument("--steps", type=int, default=1000, help="inner steps to train")
    g.add_argument("--duration", type=float, default=None, help="train for this many seconds instead")
    g.add_argument("--inner-lr", type=float, default=3e-3)
    g.add_argument("--sync-every", type=int, default=50, help="inner steps between syncs (H)")
    g.add_argument("--sync-seconds", type=float, default=None, help="sync on a time budget instead (DiLoCo)")
    g.add_argument("--outer-lr", type=float, default=0.7)
    g.add_argument("--outer-momentum", type=float, default=0.9)
    g.add_argument("--no-nesterov", action="store_true")
    g.add_argument("--codec", default=None, help="pseudo-gradient codec (default int8; int4 for streaming)")
    g.add_argument("--fragments", type=int, default=4, help="streaming: number of fragments (P)")
    g.add_argument("--overlap", type=int, default=5, help="streaming: inner steps a fragment round overlaps (tau)")
    g.add_argument("--alpha", type=float, default=0.5, help="streaming: weight of the local side when mixing")
    g.add_argument("--fragment-split", default="strided", choices=["strided", "balanced"])
    g.add_argument("--eval-every", type=int, default=0)
    g.add_argument("--round-timeout", type=float, default=60.0, help="deadline of one all-reduce attempt")


def train_config(ns: argparse.Namespace):
    """The TrainConfig the training options describe."""
    from peer.training import TrainConfig

    return TrainConfig(
        algorithm=ns.algorithm,
        steps=ns.steps,
        duration_s=ns.duration,
        inner_lr=ns.inner_lr,
        sync_every=ns.sync_every,
        sync_seconds=ns.sync_seconds,
        outer_lr=ns.outer_lr,
        outer_momentum=ns.outer_momentum,
        nesterov=not ns.no_nesterov,
        codec=ns.codec,
        fragments=ns.fragments,
        overlap=ns.overlap,
        alpha=ns.alpha,
        split=ns.fragment_split,
        eval_every=ns.eval_every,
        round_timeout_s=ns.round_timeout,
    )


def add_peer_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``loconet peer``."""
    parser.add_argument("--coordinator", default="127.0.0.1:7070", help="host:port of the run's coordinator")
    parser.add_argument("--run", default="demo", help="run id")
    parser.add_argument("--name", default="", help="label shown on the dashboard")
    parser.add_argument("--host", default="127.0.0.1", help="interface of this peer's data-plane server")
    parser.add_argument("--port", type=int, default=0, help="data-plane port (0: any free port)")
    parser.add_argument("--bandwidth", default=None, help="cap this peer's send and receive rate, e.g. 100mbit")
    parser.add_argument("--checkpoint-dir", default=None)
    parser.add_argument("--keep", type=int, default=3, help="checkpoints to keep")
    parser.add_argument("--checkpoint-every", type=int, default=1, help="committed rounds between checkpoints")
    parser.add_argument("--shard", default="0/1", help="this peer's data shard I/N")
    parser.add_argument("--threads", type=int, default=1, help="torch threads for training")
    parser.add_argument("--events", action="store_true", help="print JSON events on stdout")
    parser.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None)
    add_task_arguments(parser)
    add_train_arguments(parser)


def run_peer_command(ns: argparse.Namespace) -> int:
    """Run a peer from parsed arguments."""
    from collectives.ratelimit import parse_bandwidth
    from collectives.transport import TransportConfig
    from peer.daemon import PeerConfig, run_peer

    try:
        shard, shards = (int(x) for x in ns.shard.split("/"))
    except ValueError:
        raise ConfigError(f"--shard must look like I/N, got {ns.shard!r}") from None
    config = PeerConfig(
        coordinator=ns.coordinator,
        run_id=ns.run,
        task=ns.task,
        task_config=task_config(ns),
        train=train_config(ns),
        name=ns.name,
        transport=TransportConfig(
            host=ns.host, port=ns.port, bandwidth_bps=parse_bandwidth(ns.bandwidth) if ns.bandwidth else None
        ),
        checkpoint_dir=ns.checkpoint_dir,
        keep_checkpoints=ns.keep,
        checkpoint_every=ns.checkpoint_every,
        shard=shard,
        shards=shards,
        events=ns.events,
        progress=ns.progress,
        threads=ns.threads,
    )
    return run_peer(config)


def run_coordinator(ns: argparse.Namespace) -> int:
    """Serve a coordinator until SIGINT/SIGTERM."""
    import asyncio
    import signal

    from collectives.buffers import tune_malloc
    from peer.coordinator import CoordinatorConfig, CoordinatorServer

    tune_malloc()
    config = CoordinatorConfig(
        run_id=ns.run,
        host=ns.host,
        port=ns.port,
        dashboard_host=ns.dashboard_host,
        dashboard_port=None if ns.dashboard_port < 0 else ns.dashboard_port,
        min_peers=ns.min_peers,
        join_timeout_s=ns.join_timeout,
        lease_s=ns.lease,
        heartbeat_s=ns.heartbeat,
        commit_timeout_s=ns.commit_timeout,
        quorum_timeout_s=ns.quorum_timeout,
        startup_grace_s=ns.startup_grace,
    )

    async def serve() -> None:
        server = CoordinatorServer(config)
        await server.start()
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        sys.stdout.write(
            f"loconet coordinator: run {config.run_id} at {server.address}, dashboard {server.dashboard_url or 'off'}\n"
        )
        sys.stdout.flush()
        try:
            await stop.wait()
        finally:
            await server.stop()

    asyncio.run(serve())
    return 0


def main(argv: list[str] | None = None) -> int:
    """Parse arguments, set up logging and run the chosen command."""
    parser = build_parser()
    ns = parser.parse_args(argv)
    level = logging.WARNING - 10 * min(ns.verbose, 2)
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    try:
        return int(ns.handler(ns) or 0)
    except ConfigError as exc:
        parser.exit(2, f"loconet: error: {exc}\n")
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
