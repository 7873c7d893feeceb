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

    bench = commands.add_parser("bench", help="benchmarks that print JSON")
    benches = bench.add_subparsers(dest="bench", required=True, metavar="BENCH")

    from peer import bench_allreduce, bench_codecs

    allreduce = benches.add_parser("allreduce", help="our all-reduce among local processes vs gloo")
    bench_allreduce.add_arguments(allreduce)
    allreduce.set_defaults(run=bench_allreduce.main)

    codecs = benches.add_parser("codecs", help="encode+decode throughput of each codec on one core")
    bench_codecs.add_arguments(codecs)
    codecs.set_defaults(run=bench_codecs.main_ns)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Parse arguments, set up logging and run the chosen command."""
    parser = build_parser()
    ns = parser.parse_args(argv)
    level = logging.WARNING - 10 * min(ns.verbose, 2)
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    try:
        return int(ns.run(ns) or 0)
    except ConfigError as exc:
        parser.exit(2, f"loconet: error: {exc}\n")
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
