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
