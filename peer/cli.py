"""The ``loconet`` command: one entry point, one subcommand per process or benchmark.

Every option comes from a configuration dataclass (``peer/options.py``), so
a default is written once, in its field, and the Python API and the command
line agree. This module imports the rest of ``peer/``; nothing imports it.
"""

from __future__ import annotations

import argparse
import logging
import signal
import sys

from collectives.errors import ConfigError
from peer.plugins import add_plugin_argument, load_plugins, plugins_from

BENCHMARKS = (
    ("allreduce", "allreduce", "our all-reduce among local processes vs gloo"),
    ("codecs", "codecs", "encode+decode throughput of each codec on one core"),
    ("transport", "transport", "what moving bytes through gRPC costs: the floor under the all-reduce"),
    ("statesync", "statesync", "time for a joiner to fetch a state from a peer"),
    ("diloco", "diloco", "DiLoCo and Streaming DiLoCo vs data-parallel and one peer"),
    ("membership", "membership", "coordinator scalability with simulated peers"),
)


def add_benchmarks(bench: argparse.ArgumentParser) -> None:
    """The ``loconet bench ...`` subcommands (imported only when asked for: they pull in torch)."""
    import importlib

    benches = bench.add_subparsers(dest="bench", required=True, metavar="BENCH")
    for name, module_name, text in BENCHMARKS:
        module = importlib.import_module(f"peer.bench.{module_name}")
        sub = benches.add_parser(name, help=text)
        module.add_arguments(sub)
        sub.set_defaults(handler=module.main)


def build_parser(command: str | None = None, with_benchmarks: bool = True) -> argparse.ArgumentParser:
    """The argument parser of the ``loconet`` command; with ``command``, only that subcommand gets its options.

    Options are generated from the configs (the training ones from the algorithm registry, which
    imports torch), so a coordinator builds only its own and never imports torch.
    """
    parser = argparse.ArgumentParser(prog="loconet", description="Decentralized low-communication training for PyTorch.")
    parser.add_argument("-v", "--verbose", action="count", default=0, help="more logging (-v info, -vv debug)")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, text, add, handler in (
        ("coordinator", "run the membership coordinator of a run, with its dashboard", add_coordinator_arguments,
         run_coordinator),
        ("peer", "run one training peer of a run", add_peer_arguments, run_peer_command),
        ("harness", "a whole network on this machine, with fault injection and a report", add_harness_arguments,
         run_harness_command),
        ("demo", "4 local peers train a language model with DiLoCo; dashboard and summary", add_demo_arguments,
         run_demo_command),
    ):
        sub = commands.add_parser(name, help=text)
        if command in (None, name):
            add(sub)
        sub.set_defaults(handler=handler)
    bench = commands.add_parser("bench", help="benchmarks that print JSON (allreduce, codecs, statesync, diloco, membership)")
    if with_benchmarks and command in (None, "bench"):
        add_benchmarks(bench)
    return parser


def add_demo_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``loconet demo``."""
    parser.add_argument("--peers", type=int, default=4)
    parser.add_argument("--steps", type=int, default=600)
    parser.add_argument("--dashboard-port", type=int, default=8080, help="0: any free port")
    parser.add_argument("--json", action="store_true", help="also print the full report as JSON")


# -- coordinator ---------------------------------------------------------------------------


def add_coordinator_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``loconet coordinator`` (every field of CoordinatorConfig)."""
    from peer.coordinator.config import CoordinatorConfig
    from peer.options import add_options

    add_options(parser, CoordinatorConfig)
    add_plugin_argument(parser)


def run_coordinator(ns: argparse.Namespace) -> int:
    """Serve a coordinator until SIGINT/SIGTERM."""
    import asyncio

    from collectives.allocator import tune_malloc
    from peer.coordinator.config import CoordinatorConfig
    from peer.coordinator.server import CoordinatorServer
    from peer.options import read_options

    tune_malloc()
    config = read_options(CoordinatorConfig, ns)

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


# -- peer ---------------------------------------------------------------------------------


def _shard(text: str) -> tuple[int, int]:
    try:
        shard, shards = (int(x) for x in text.split("/"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"must look like I/N, got {text!r}") from None
    if not 0 <= shard < shards:
        raise argparse.ArgumentTypeError(f"shard I/N needs 0 <= I < N, got {text!r}")
    return shard, shards


def add_peer_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``loconet peer``."""
    from collectives.transport import TransportConfig
    from peer.harness.control import add_control_arguments
    from peer.options import add_options
    from peer.runtime.daemon import PeerConfig
    from peer.trainoptions import add_task_arguments, add_train_arguments

    add_options(parser, PeerConfig)
    add_options(parser.add_argument_group("network"), TransportConfig)
    parser.add_argument("--shard", type=_shard, default=(0, 1), help="this peer's data shard I/N (default: 0/1)")
    add_plugin_argument(parser)
    add_control_arguments(parser)
    add_task_arguments(parser)
    add_train_arguments(parser)


def run_peer_command(ns: argparse.Namespace) -> int:
    """Run a peer from parsed arguments."""
    import dataclasses

    from collectives.transport import TransportConfig
    from peer.harness.control import control_from
    from peer.options import read_options
    from peer.runtime.daemon import PeerConfig, run_peer
    from peer.trainoptions import read_task_config, read_train_config

    shard, shards = ns.shard
    config = dataclasses.replace(
        read_options(PeerConfig, ns),
        task_config=read_task_config(ns),
        train=read_train_config(ns),
        transport=read_options(TransportConfig, ns),
        shard=shard,
        shards=shards,
    )
    return run_peer(config, hooks=control_from(ns))


# -- harness and demo -------------------------------------------------------------------------


def add_harness_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``loconet harness``."""
    from peer.coordinator.config import CoordinatorConfig
    from peer.harness.harness import COORDINATOR_OPTIONS_SET_BY_HARNESS, HarnessConfig
    from peer.options import add_options
    from peer.trainoptions import add_task_arguments, add_train_arguments

    defaults = HarnessConfig()
    add_options(parser, HarnessConfig)
    parser.add_argument("--event", action="append", default=[], help="e.g. kill:peer2@round3, join@round5 (repeatable)")
    parser.add_argument("--scenario", default=None, help="a TOML file of [[event]] tables")
    parser.add_argument("--json", action="store_true", help="print one JSON report at the end")
    add_plugin_argument(parser)
    add_options(
        parser.add_argument_group("coordinator"), CoordinatorConfig, defaults=defaults.coordinator,
        skip=COORDINATOR_OPTIONS_SET_BY_HARNESS,
    )
    add_task_arguments(parser, defaults.task_config)
    add_train_arguments(parser, defaults.train)


def harness_config(ns: argparse.Namespace):
    """The HarnessConfig the harness options describe."""
    import dataclasses

    from peer.coordinator.config import CoordinatorConfig
    from peer.harness.harness import HarnessConfig
    from peer.harness.scenario import load_scenario, parse_event
    from peer.options import read_options
    from peer.trainoptions import read_task_config, read_train_config

    defaults = HarnessConfig()
    events = [parse_event(e) for e in ns.event] + (load_scenario(ns.scenario) if ns.scenario else [])
    return dataclasses.replace(
        read_options(HarnessConfig, ns, base=defaults),
        task_config=read_task_config(ns),
        train=read_train_config(ns, base=defaults.train),
        coordinator=read_options(CoordinatorConfig, ns, base=defaults.coordinator),
        events=tuple(events),
        plugins=tuple(ns.plugin),
        progress=ns.progress if ns.progress is not None else sys.stderr.isatty(),
    )


def run_harness_command(ns: argparse.Namespace) -> int:
    """Run a scenario and print its report."""
    import json

    from peer.harness.harness import Harness

    harness = Harness(harness_config(ns))
    report = harness.run(on_start=lambda url: sys.stderr.write(f"dashboard: {url}\n"))
    sys.stdout.write((json.dumps(report) if ns.json else json.dumps(report, indent=2)) + "\n")
    return 0


def run_demo_command(ns: argparse.Namespace) -> int:
    """The README's main job: a local DiLoCo run with the dashboard, and a readable summary."""
    import dataclasses
    import json

    from peer.harness.harness import Harness, HarnessConfig
    from peer.runtime.training import LOCAL_SYNC_EVERY, local_run

    defaults = HarnessConfig()
    config = dataclasses.replace(
        defaults,
        peers=ns.peers,
        run_id="demo",
        train=local_run("diloco", steps=ns.steps),
        coordinator=dataclasses.replace(defaults.coordinator, dashboard_port=ns.dashboard_port, min_peers=ns.peers),
        progress=sys.stderr.isatty(),
    )
    out = sys.stdout
    out.write(f"loconet demo: {ns.peers} peers train a small transformer language model with DiLoCo "
              f"({ns.steps} steps each, syncing every {LOCAL_SYNC_EVERY}).\n")

    def started(url: str) -> None:
        out.write(f"Dashboard: {url}  (open it in a browser while the demo runs)\n")
        out.flush()

    report = Harness(config).run(on_start=started)
    out.write(demo_summary(report, ns.peers, ns.steps) + "\n")
    if ns.json:
        out.write(json.dumps(report) + "\n")
    return 0 if report["survivors_identical"] else 1


def demo_summary(report: dict, peers: int, steps: int) -> str:
    """A short summary a person can read."""
    mb = report["bytes_sent_per_peer"] / 1e6
    dp = report["data_parallel_bytes_per_peer"] / 1e6
    floor = report.get("entropy_floor")
    lines = [
        "",
        "Summary",
        f"  eval loss      {report['initial_eval_loss']:.3f} before -> {report['final_eval_loss']:.3f} after"
        + (f" (best possible {floor:.3f})" if floor else ""),
        f"  rounds         {report['rounds_committed']} committed, {report['rounds_aborted']} aborted",
        f"  sent per peer  {mb:.2f} MB; synchronous data-parallel would have sent {dp:.1f} MB "
        f"for the same {steps} steps ({dp / mb:.0f}x more)" if mb else "  sent per peer  0 MB",
        f"  peers          {report['peers_alive']} of {peers} finished with "
        + ("identical parameters" if report["survivors_identical"] else "DIFFERENT parameters"),
        f"  wall time      {report['wall_s']:.0f} s; logs in {report['workdir']}",
    ]
    return "\n".join(lines)


# -- main ---------------------------------------------------------------------------------------


def _interrupt(signum, frame) -> None:
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    """Parse arguments, set up logging and run the chosen command."""
    args = sys.argv[1:] if argv is None else argv
    try:
        # Plugins first: they register algorithms whose options the parser offers.
        load_plugins(plugins_from(args))
    except ConfigError as exc:
        sys.stderr.write(f"loconet: error: {exc}\n")
        return 2
    command = next((a for a in args if not a.startswith("-")), None)
    parser = build_parser(command)
    ns = parser.parse_args(args)
    level = logging.WARNING - 10 * min(ns.verbose, 2)
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    # SIGTERM unwinds like Ctrl-C, so every command's cleanup (its child processes) runs;
    # the coordinator and the peer daemon install their own graceful handlers.
    signal.signal(signal.SIGTERM, _interrupt)
    try:
        return int(ns.handler(ns) or 0)
    except ConfigError as exc:
        parser.exit(2, f"loconet: error: {exc}\n")
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
