"""The ``loconet`` command: one entry point, one subcommand per process or benchmark.

Every option comes from a configuration dataclass (``peer/options.py``), so
a default is written once, in its field, and the Python API and the command
line agree. This module imports the rest of ``peer/``; nothing imports it.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
from typing import TYPE_CHECKING, NoReturn

from collectives.errors import ConfigError, LoconetError
from peer.plugins import add_plugin_argument, load_plugins, plugins_from

if TYPE_CHECKING:  # for the hint only: each command imports what it runs when it runs
    from peer.harness.harness import HarnessConfig

BENCHMARKS = (
    ("allreduce", "allreduce", "our all-reduce among local processes vs gloo"),
    ("codecs", "codecs", "encode+decode throughput of each codec on one core"),
    ("transport", "transport", "what moving bytes through gRPC costs: the floor under the all-reduce"),
    ("statesync", "statesync", "time for a joiner to fetch a state from a peer"),
    ("diloco", "diloco", "DiLoCo and Streaming DiLoCo vs data-parallel and one peer"),
    ("membership", "membership", "coordinator scalability with simulated peers"),
    ("federated", "federated", "every federated strategy, clean and under byzantine attack"),
    ("coding", "coding", "synchronous SGD under stragglers: gradient coding against waiting, ignoring, backup workers"),
    ("gpu", "gpu", "the GPU check: DiLoCo on CUDA, device encoding parity and speed, sync copies vs inner steps"),
    ("hetero", "hetero", "peers of different speeds: synchronous, time-budget and asynchronous DiLoCo, NoLoCo"),
)


class HelpFormatter(argparse.HelpFormatter):
    """Every option's help ends with its default, unless the help already says it."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if not action.option_strings or "default" in text or action.default is argparse.SUPPRESS:
            return text
        if isinstance(action, (argparse._HelpAction, argparse._VersionAction, argparse._CountAction)):
            return text
        if action.nargs == 0:  # a flag
            shown = "on" if action.default else "off"
        elif action.default is None or action.default == "":
            shown = "none"
        elif isinstance(action.default, (list, tuple)):
            shown = " ".join(map(str, action.default)) or "none"
        else:
            shown = str(action.default)
        return f"{text} (default: {shown})" if text else f"default: {shown}"


class Parser(argparse.ArgumentParser):
    """argparse's parser whose usage errors are one line, as every other error (not the whole usage first)."""

    def error(self, message: str) -> NoReturn:
        """Print 'PROG: error: MESSAGE' and a pointer to --help, exit 2."""
        self.exit(2, f"{self.prog}: error: {message} (see '{self.prog} --help')\n")


def _verbosity_options() -> argparse.ArgumentParser:
    """-v / -q, accepted before and after the subcommand (counted together)."""
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("-v", "--verbose", action="count", default=argparse.SUPPRESS,
                        help="more logging on stderr (-v info, -vv debug; with tracebacks); also after the command")
    common.add_argument("-q", "--quiet", action="count", default=argparse.SUPPRESS,
                        help="less logging (errors only); also after the command")
    return common


VERBOSITY = _verbosity_options()


def subcommand(commands: argparse._SubParsersAction, name: str, text: str) -> argparse.ArgumentParser:
    """A subcommand parser with the shared help formatting and -v/-q."""
    return commands.add_parser(name, help=text, description=text[:1].upper() + text[1:] + ".",
                               formatter_class=HelpFormatter, parents=[VERBOSITY])


def add_benchmarks(bench: argparse.ArgumentParser) -> None:
    """The ``loconet bench ...`` subcommands (imported only when asked for: they pull in torch)."""
    import importlib

    benches = bench.add_subparsers(dest="bench", required=True, metavar="BENCH")
    for name, module_name, text in BENCHMARKS:
        module = importlib.import_module(f"peer.bench.{module_name}")
        sub = subcommand(benches, name, text)
        module.add_arguments(sub)
        sub.set_defaults(handler=module.main)


def build_parser(command: str | None = None, with_benchmarks: bool = True) -> argparse.ArgumentParser:
    """The argument parser of the ``loconet`` command; with ``command``, only that subcommand gets its options.

    Options are generated from the configs (the training ones from the algorithm registry, which
    imports torch), so a coordinator builds only its own and never imports torch.
    """
    parser = Parser(
        prog="loconet", description="Decentralized low-communication training for PyTorch.",
        formatter_class=HelpFormatter, parents=[VERBOSITY],
        epilog="Run 'loconet COMMAND --help' for a command's options. Start with 'loconet demo'.",
    )
    parser.add_argument("--version", action="version", version=f"loconet {_version()}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, text, add, handler in (
        ("coordinator", "run the membership coordinator of a run, with its dashboard", add_coordinator_arguments,
         run_coordinator),
        ("peer", "run one training peer of a run", add_peer_arguments, run_peer_command),
        ("harness", "a whole network on this machine, with fault injection and a report", add_harness_arguments,
         run_harness_command),
        ("demo", "4 local peers train a language model with DiLoCo; dashboard and summary", add_demo_arguments,
         run_demo_command),
        ("certs", "create a CA and per-host certificates for TLS and mutual TLS", add_certs_arguments,
         run_certs_command),
    ):
        sub = subcommand(commands, name, text)
        if command in (None, name):
            add(sub)
        sub.set_defaults(handler=handler)
    bench = subcommand(commands, "bench", f"benchmarks that print JSON ({', '.join(b[0] for b in BENCHMARKS)})")
    if with_benchmarks and command in (None, "bench"):
        add_benchmarks(bench)
    return parser


def _version() -> str:
    from peer.version import package_version

    return package_version()


def add_demo_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``loconet demo`` (every field of DemoConfig, and --json)."""
    from peer.harness.config import DemoConfig
    from peer.options import add_options

    add_options(parser, DemoConfig)
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
    from peer.coordinator.server import CoordinatorServer, tune_gc_for_serving
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
        tune_gc_for_serving()
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
    from collectives.net.transportconfig import TransportConfig
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

    from collectives.net.transportconfig import TransportConfig
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


# -- certs ----------------------------------------------------------------------------------


def add_certs_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``loconet certs``."""
    from peer.certs import add_arguments

    add_arguments(parser)


def run_certs_command(ns: argparse.Namespace) -> int:
    """Create (or extend) a certificate directory."""
    from peer.certs import main as certs_main

    return certs_main(ns)


# -- harness and demo -------------------------------------------------------------------------


def add_harness_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``loconet harness``."""
    from optimizers.syncconfig import SyncConfig
    from peer.coordinator.config import CoordinatorConfig
    from peer.harness.config import DEMO_STEPS
    from peer.harness.harness import COORDINATOR_OPTIONS_SET_BY_HARNESS, HarnessConfig
    from peer.options import add_options
    from peer.runtime.training import LOCAL_SYNC_EVERY, TrainConfig
    from peer.trainoptions import add_task_arguments, add_train_arguments

    defaults = HarnessConfig()
    parser.epilog = (
        f"A run on one machine trains {defaults.train.steps} steps and syncs every {LOCAL_SYNC_EVERY} by default "
        f"(loconet peer: {TrainConfig().steps} and {SyncConfig().sync_every}), so a few minutes show several rounds "
        "and their faults; the demo trains "
        f"{DEMO_STEPS} so its loss nears the floor."
    )
    add_options(parser, HarnessConfig)
    parser.add_argument("--event", action="append", default=[], help="e.g. kill:peer2@round3, join@round5 (repeatable)")
    parser.add_argument("--scenario", default=None, help="a TOML file of [[event]] tables")
    parser.add_argument(
        "--chaos", default=None, metavar="N[,seed=S][,with=straggle+stall]",
        help="N random faults (kills, stops, pauses, joins, coordinator restarts; link cuts with --netns; "
        "stragglers and stuck callers when named in with=) drawn from seed S, on top of any --event",
    )
    parser.add_argument("--json", action="store_true", help="print the report as one JSON object instead of a summary")
    add_plugin_argument(parser)
    add_options(
        parser.add_argument_group("coordinator"), CoordinatorConfig, defaults=defaults.coordinator,
        skip=COORDINATOR_OPTIONS_SET_BY_HARNESS,
    )
    add_task_arguments(parser, defaults.task_config)
    add_train_arguments(parser, defaults.train)


def harness_config(ns: argparse.Namespace) -> HarnessConfig:
    """The HarnessConfig the harness options describe."""
    import dataclasses

    from optimizers.syncconfig import least_members
    from peer.coordinator.config import CoordinatorConfig
    from peer.harness.chaos import ChaosSpec, chaos_events, expected_rounds
    from peer.harness.harness import HarnessConfig
    from peer.harness.scenario import load_scenario, parse_event
    from peer.options import read_options
    from peer.trainoptions import read_task_config, read_train_config

    defaults = HarnessConfig()
    events = [parse_event(e) for e in ns.event] + (load_scenario(ns.scenario) if ns.scenario else [])
    base = read_options(HarnessConfig, ns, base=defaults)
    train = read_train_config(ns, base=defaults.train)
    if ns.chaos is not None:
        events += chaos_events(ChaosSpec.parse(ns.chaos), base.peers, expected_rounds(train), netns=base.netns,
                               least=least_members(train.options))
    return dataclasses.replace(
        base,
        task_config=read_task_config(ns),
        train=train,
        coordinator=read_options(CoordinatorConfig, ns, base=defaults.coordinator),
        events=tuple(events),
        plugins=tuple(ns.plugin),
        progress=ns.progress if ns.progress is not None else sys.stderr.isatty(),
    )


def run_harness_command(ns: argparse.Namespace) -> int:
    """Run a scenario; print a summary, or with --json the whole report as one JSON object."""
    from peer.harness.harness import Harness
    from peer.harness.summary import report_summary
    from peer.jsonout import json_line

    config = harness_config(ns)
    report = _run_harness(Harness(config), "harness", lambda url: sys.stderr.write(f"dashboard: {url}\n"))
    if report is None:
        return 130
    sys.stdout.write((json_line(report) if ns.json else report_summary(report, config.train.steps)) + "\n")
    _fail_on_crashes(report)
    return 0


def _fail_on_crashes(report: dict) -> None:
    """Raise ChildFailed (exit 1, one line) when a peer process of the run ended with an error of its own."""
    from peer.harness.processes import ChildFailed
    from peer.harness.summary import crash_error

    error = crash_error(report)
    if error is not None:
        raise ChildFailed(error)


def _run_harness(harness, command: str, on_start) -> dict | None:
    """harness.run(), or None after saying what Ctrl-C stopped and where its logs are."""
    from peer.harness.summary import interrupted_note

    try:
        return harness.run(on_start=on_start)
    except KeyboardInterrupt:
        sys.stderr.write(interrupted_note(command, len(harness.peers), str(harness.workdir)) + "\n")
        return None


def run_demo_command(ns: argparse.Namespace) -> int:
    """The README's main job: a local DiLoCo run with the dashboard, and a readable summary."""
    import dataclasses

    from peer.device import resolve_device
    from peer.harness.config import DemoConfig
    from peer.harness.harness import Harness, HarnessConfig
    from peer.harness.summary import report_summary
    from peer.jsonout import json_line
    from peer.options import read_options
    from peer.runtime.training import LOCAL_SYNC_EVERY, local_run

    demo = read_options(DemoConfig, ns)
    defaults = HarnessConfig()
    config = dataclasses.replace(
        defaults,
        peers=demo.peers,
        run_id="demo",
        # An eval per round, so the dashboard's eval curve fills in as the demo runs.
        train=dataclasses.replace(local_run("diloco", steps=demo.steps), eval_every=LOCAL_SYNC_EVERY,
                                  **({} if demo.device is None else {"device": demo.device})),
        coordinator=dataclasses.replace(defaults.coordinator, dashboard_port=demo.dashboard_port, min_peers=demo.peers),
        progress=sys.stderr.isatty(),
    )
    resolve_device(config.train.device)  # a device this machine lacks is one line, before the banner
    harness = Harness(config)
    out = sys.stdout
    out.write(f"loconet demo: {demo.peers} peers train a small transformer language model with DiLoCo "
              f"({demo.steps} steps each, syncing every {LOCAL_SYNC_EVERY}).\n")
    out.flush()

    def started(url: str) -> None:
        hint = "  (open it in a browser while the demo runs)" if url != "off" else ""
        out.write(f"Dashboard: {url}{hint}\n")
        out.flush()

    report = _run_harness(harness, "demo", started)
    if report is None:
        return 130
    out.write(report_summary(report, demo.steps) + "\n")
    if ns.json:
        out.write(json_line(report) + "\n")
    _fail_on_crashes(report)
    return 0 if report["survivors_identical"] else 1


# -- main ---------------------------------------------------------------------------------------


def _interrupt(signum, frame) -> None:
    raise KeyboardInterrupt


def _log_level(ns: argparse.Namespace) -> int:
    """WARNING by default; each -v one level more (down to DEBUG), -q errors only."""
    verbose, quiet = getattr(ns, "verbose", 0), getattr(ns, "quiet", 0)
    if quiet and not verbose:
        return logging.ERROR
    return logging.WARNING - 10 * min(verbose, 2)


def _fail(code: int, exc: BaseException, verbose: bool) -> int:
    """One line naming the problem on stderr (the traceback too with -v); return the exit code."""
    if verbose:
        import traceback

        traceback.print_exception(exc, file=sys.stderr)
    sys.stderr.write(f"loconet: error: {exc}\n")
    return code


def main(argv: list[str] | None = None) -> int:
    """Parse arguments, set up logging and run the chosen command.

    Exit codes: 0 done, 1 a runtime error (one line on stderr; -v adds the traceback),
    2 a usage error (bad option or configuration), 130 interrupted.
    """
    from peer.harness.processes import die_with_parent_from_env

    die_with_parent_from_env()  # when a harness, benchmark or test started this process
    args = sys.argv[1:] if argv is None else argv
    verbose = any(a in ("-v", "-vv", "--verbose") for a in args)
    if not verbose:
        # gRPC's C core prints its own lines (a failed bind, a lost channel) next to ours;
        # our errors say it in one line, so its go quiet unless -v asks (read when grpc loads).
        os.environ.setdefault("GRPC_VERBOSITY", "NONE")
    try:
        # Plugins first: they register algorithms whose options the parser offers.
        load_plugins(plugins_from(args))
    except ConfigError as exc:
        return _fail(2, exc, verbose)
    command = next((a for a in args if not a.startswith("-")), None)
    parser = build_parser(command)
    ns = parser.parse_args(args)
    logging.basicConfig(
        level=_log_level(ns), format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr
    )
    verbose = getattr(ns, "verbose", 0) > 0
    # SIGTERM unwinds like Ctrl-C, so every command's cleanup (its child processes) runs;
    # the coordinator and the peer daemon install their own graceful handlers.
    previous = signal.signal(signal.SIGTERM, _interrupt)
    try:
        return int(ns.handler(ns) or 0)
    except ConfigError as exc:
        return _fail(2, exc, verbose)
    except (LoconetError, OSError) as exc:  # OSError: a file or port the user named
        return _fail(1, exc, verbose)
    except KeyboardInterrupt:
        return 130
    finally:
        # The command is done. Run as a program, the process exits now: a SIGTERM then (a harness stopping the peers
        # that finished) raised inside the interpreter's exit handlers, "Exception ignored in atexit callback".
        # Called with arguments (a test, a script), the caller's handler comes back.
        signal.signal(signal.SIGTERM, signal.SIG_IGN if argv is None else previous)


if __name__ == "__main__":
    raise SystemExit(main())
