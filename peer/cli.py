"""The ``loconet`` command: one entry point, one subcommand per process or benchmark."""

from __future__ import annotations

import argparse
import logging
import signal
import sys

from collectives.errors import ConfigError


def add_benchmarks(bench: argparse.ArgumentParser) -> None:
    """The ``loconet bench ...`` subcommands (imported only when asked for: they pull in torch)."""
    benches = bench.add_subparsers(dest="bench", required=True, metavar="BENCH")

    from peer.bench import allreduce as bench_allreduce, codecs as bench_codecs, diloco as bench_diloco
    from peer.bench import membership as bench_membership, statesync as bench_statesync, transport as bench_transport

    for name, module, text in (
        ("allreduce", bench_allreduce, "our all-reduce among local processes vs gloo"),
        ("codecs", bench_codecs, "encode+decode throughput of each codec on one core"),
        ("transport", bench_transport, "what moving bytes through gRPC costs: the floor under the all-reduce"),
        ("statesync", bench_statesync, "time for a joiner to fetch a state from a peer"),
        ("diloco", bench_diloco, "DiLoCo and Streaming DiLoCo vs data-parallel and one peer"),
        ("membership", bench_membership, "coordinator scalability with simulated peers"),
    ):
        sub = benches.add_parser(name, help=text)
        module.add_arguments(sub)
        sub.set_defaults(handler=module.main)


def build_parser(with_benchmarks: bool = True) -> argparse.ArgumentParser:
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

    harness = commands.add_parser("harness", help="a whole network on this machine, with fault injection and a report")
    add_harness_arguments(harness)
    harness.set_defaults(handler=run_harness_command)

    demo = commands.add_parser("demo", help="4 local peers train a language model with DiLoCo; dashboard and summary")
    demo.add_argument("--peers", type=int, default=4)
    demo.add_argument("--steps", type=int, default=600)
    demo.add_argument("--dashboard-port", type=int, default=8080, help="0: any free port")
    demo.add_argument("--json", action="store_true", help="also print the full report as JSON")
    demo.set_defaults(handler=run_demo_command)

    bench = commands.add_parser("bench", help="benchmarks that print JSON (allreduce, codecs, statesync, diloco, membership)")
    if with_benchmarks:
        add_benchmarks(bench)
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
    parser.add_argument("--no-probe", action="store_true", help="do not check that peers a quorum waits for still listen")
    parser.add_argument(
        "--state-file", default=None,
        help="remember here that the run was founded, so a restarted coordinator never lets a new peer found it again",
    )


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


def task_args(c) -> list[str]:
    """The task options that task_config reads back into c (the reverse of task_config, without --task)."""
    args = ["--seed", str(c.seed), "--batch-size", str(c.batch_size), "--seq-len", str(c.seq_len), "--split", c.split,
            "--d-model", str(c.d_model), "--layers", str(c.n_layers), "--heads", str(c.n_heads),
            "--vocab-size", str(c.vocab_size)]
    return args + (["--data", c.data] if c.data else [])


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
    g.add_argument("--outer-momentum", type=float, default=0.7, help="0.7: best measured at our scale (the paper uses 0.9)")
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
    from peer.runtime.training import TrainConfig

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


def train_args(t) -> list[str]:
    """The training options that train_config reads back into t (the reverse of train_config)."""
    args = ["--algorithm", t.algorithm, "--steps", str(t.steps), "--sync-every", str(t.sync_every),
            "--inner-lr", str(t.inner_lr), "--outer-lr", str(t.outer_lr), "--outer-momentum", str(t.outer_momentum),
            "--fragments", str(t.fragments), "--overlap", str(t.overlap), "--alpha", str(t.alpha),
            "--fragment-split", t.split, "--eval-every", str(t.eval_every), "--round-timeout", str(t.round_timeout_s)]
    if t.duration_s is not None:
        args += ["--duration", str(t.duration_s)]
    if t.sync_seconds is not None:
        args += ["--sync-seconds", str(t.sync_seconds)]
    if not t.nesterov:
        args.append("--no-nesterov")
    if t.codec:
        args += ["--codec", t.codec]
    return args


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
    parser.add_argument(
        "--codec-threads", type=int, default=None,
        help="threads that encode and decode off the event loop (default: TransportConfig.codec_threads); "
        "0 when peers on this machine fill its cores",
    )
    parser.add_argument("--events", action="store_true", help="print JSON events on stdout")
    parser.add_argument("--control", default=None, help="a JSON file the harness writes to slow this peer down")
    parser.add_argument("--start-when", default=None, help="wait until this file exists before joining")
    parser.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None)
    add_task_arguments(parser)
    add_train_arguments(parser)


def run_peer_command(ns: argparse.Namespace) -> int:
    """Run a peer from parsed arguments."""
    from collectives.ratelimit import parse_bandwidth
    from collectives.transport import TransportConfig
    from peer.runtime.daemon import PeerConfig, run_peer

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
            host=ns.host,
            port=ns.port,
            bandwidth_bps=parse_bandwidth(ns.bandwidth) if ns.bandwidth else None,
            codec_threads=TransportConfig.codec_threads if ns.codec_threads is None else ns.codec_threads,
        ),
        checkpoint_dir=ns.checkpoint_dir,
        keep_checkpoints=ns.keep,
        checkpoint_every=ns.checkpoint_every,
        shard=shard,
        shards=shards,
        events=ns.events,
        control_file=ns.control,
        start_when=ns.start_when,
        progress=ns.progress,
        threads=ns.threads,
    )
    return run_peer(config)


def add_harness_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``loconet harness``."""
    parser.add_argument("--peers", type=int, default=4)
    parser.add_argument("--run", default="harness")
    parser.add_argument("--event", action="append", default=[], help="e.g. kill:peer2@round3, join@round5 (repeatable)")
    parser.add_argument("--scenario", default=None, help="a TOML file of [[event]] tables")
    parser.add_argument("--bandwidth", default=None, help="per-peer cap on send and receive, e.g. 100mbit")
    parser.add_argument("--uplink", default=None, help="--netns: cap of what a peer sends (default --bandwidth)")
    parser.add_argument("--downlink", default=None, help="--netns: cap of what a peer receives (default --bandwidth)")
    parser.add_argument("--netns", action="store_true", help="each process in its own network namespace (root)")
    parser.add_argument("--lease", type=float, default=3.0)
    parser.add_argument("--heartbeat", type=float, default=0.5)
    parser.add_argument("--join-timeout", type=float, default=5.0)
    parser.add_argument("--min-peers", type=int, default=1)
    parser.add_argument("--dashboard-port", type=int, default=0)
    parser.add_argument("--workdir", default=None, help="logs and checkpoints (default: a new temporary folder)")
    parser.add_argument("--timeout", type=float, default=1800.0, help="give up after this many seconds")
    parser.add_argument("--json", action="store_true", help="print one JSON report at the end")
    parser.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None)
    add_task_arguments(parser)
    add_train_arguments(parser)
    parser.set_defaults(steps=400)


def harness_config(ns: argparse.Namespace):
    """The HarnessConfig the harness options describe."""
    from pathlib import Path

    from peer.harness.harness import HarnessConfig
    from peer.harness.scenario import load_scenario, parse_event

    events = [parse_event(e) for e in ns.event] + (load_scenario(ns.scenario) if ns.scenario else [])
    return HarnessConfig(
        peers=ns.peers,
        run_id=ns.run,
        task=ns.task,
        task_config=task_config(ns),
        train=train_config(ns),
        events=tuple(events),
        bandwidth=ns.bandwidth,
        uplink=ns.uplink,
        downlink=ns.downlink,
        netns=ns.netns,
        lease_s=ns.lease,
        heartbeat_s=ns.heartbeat,
        join_timeout_s=ns.join_timeout,
        min_peers=ns.min_peers,
        dashboard_port=ns.dashboard_port,
        workdir=Path(ns.workdir) if ns.workdir else None,
        timeout_s=ns.timeout,
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
    import json

    from peer.harness.harness import Harness, HarnessConfig
    from peer.tasks.base import TaskConfig
    from peer.runtime.training import TrainConfig

    config = HarnessConfig(
        peers=ns.peers,
        run_id="demo",
        task="synthetic-lm",
        task_config=TaskConfig(),
        train=TrainConfig(algorithm="diloco", steps=ns.steps, sync_every=50),
        dashboard_port=ns.dashboard_port,
        progress=sys.stderr.isatty(),
        min_peers=ns.peers,
    )
    out = sys.stdout
    out.write(f"loconet demo: {ns.peers} peers train a small transformer language model with DiLoCo "
              f"({ns.steps} steps each, syncing every 50).\n")

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


def run_coordinator(ns: argparse.Namespace) -> int:
    """Serve a coordinator until SIGINT/SIGTERM."""
    import asyncio

    from collectives.allocator import tune_malloc
    from peer.coordinator.service import CoordinatorConfig
    from peer.coordinator.server import CoordinatorServer

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
        probe_peers=not ns.no_probe,
        state_file=ns.state_file,
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


def _interrupt(signum, frame) -> None:
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    """Parse arguments, set up logging and run the chosen command."""
    args = sys.argv[1:] if argv is None else argv
    # The coordinator and peers should not import torch-heavy benchmark modules.
    parser = build_parser(with_benchmarks="bench" in args)
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
