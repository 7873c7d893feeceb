"""``loconet bench statesync``: how long a joiner takes to fetch a state of a given size from a peer process.

One process serves a state of ``--mb`` megabytes (one fp32 tensor plus
metadata) from its StateServer; this process fetches it ``--repeat`` times
over gRPC on 127.0.0.1 and verifies it. Reported: the median fetch time, the
rate, and as a baseline measured in the same run, the time to copy the same
bytes in memory (``time_over_memcpy``).
"""

from __future__ import annotations

import argparse
import math
import statistics
import time
from dataclasses import dataclass, field

import torch

from collectives.allocator import tune_malloc
from collectives.net.ratelimit import parse_bandwidth
from collectives.net.transport import Transport
from collectives.net.transportconfig import TransportConfig
from collectives.statesync import StateServer, StateSnapshot, fetch_state
from peer.bench.fields import Fields, describe_report
from peer.bench.kit import add_bench_options, copy_baseline, print_report, require, serving_child
from peer.bench.progress import Progress, progress_for
from peer.options import read_options

RUN = "bench-statesync"

FIELDS: Fields = {
    "state_bytes": "bytes of the state's tensor (--mb as fp32 elements)",
    "repeat": "timed fetches",
    "median_s": "median seconds of one fetch: request, transfer, SHA-256 check and rebuild of the state",
    "times_s": "seconds of every fetch, in order",
    "gbps": "state_bytes / median_s, in GB/s (10^9 bytes)",
    "baseline": "the baseline measured in the same run: an in-memory copy of the same bytes",
    "baseline.method": "what the baseline does",
    "baseline.median_s": "median seconds of the copy",
    "time_over_memcpy": "median_s / baseline.median_s: how many times slower a fetch is than copying in memory",
    "bandwidth_bps": "with --bandwidth: the cap on both ends, bits per second",
    "link_utilization": "with --bandwidth: the fraction of the capped link a fetch kept busy "
    "(state bits / cap / median_s)",
}


def _serve(conn, numel: int, bandwidth_bps: float | None) -> None:
    tune_malloc()
    state = StateSnapshot(round_id=7, tensors={"params": torch.randn(numel)}, meta={"step": 1})
    transport = Transport(TransportConfig(bandwidth_bps=bandwidth_bps))
    server = StateServer(
        transport, RUN, lambda: StateSnapshot(state.round_id, {"params": state.tensors["params"].clone()}, state.meta)
    )
    conn.send(transport.start(server.handlers()))
    conn.recv()  # until the parent is done
    transport.close()


def check_arguments(mb: float, repeat: int, bandwidth: str | None) -> float | None:
    """ConfigError for arguments the benchmark cannot run with; the bandwidth cap in bits per second."""
    # isfinite first: int() of inf fails with a traceback (nan is not > 0).
    require(math.isfinite(mb) and mb > 0 and int(mb * 1e6 / 4) >= 1,
            f"--mb must be a positive size (at least 4e-6), got {mb:g}")
    require(repeat >= 1, f"--repeat must be at least 1, got {repeat}")
    return parse_bandwidth(bandwidth) if bandwidth else None


@dataclass(frozen=True)
class StateSyncBenchConfig:
    """What ``bench statesync`` runs: its options' defaults are these fields'."""

    mb: float = field(default=100.0, metadata={"help": "state size in megabytes"})
    repeat: int = field(default=5, metadata={"help": "timed fetches; the median is reported"})
    bandwidth: str | None = field(
        default=None, metadata={"help": "cap on both ends, e.g. 1gbit (default: uncapped)"}
    )


def run(config: StateSyncBenchConfig | None = None, progress: Progress | None = None) -> dict:
    """Serve a state of mb megabytes in a child process and fetch it repeat times; return the report."""
    config = config or StateSyncBenchConfig()
    mb, repeat = config.mb, config.repeat
    bandwidth_bps = check_arguments(mb, repeat, config.bandwidth)
    tune_malloc()
    progress = progress or Progress("statesync", enabled=False)
    numel = int(mb * 1e6 / 4)
    client = Transport(TransportConfig(bandwidth_bps=bandwidth_bps))
    times = []
    with serving_child(_serve, numel, bandwidth_bps, name="state-server") as (address, _):
        client.start()
        progress.begin(f"{repeat} fetches of {numel * 4 / 1e6:g} MB", lambda: f"fetch {len(times)}/{repeat}")
        try:
            for _ in range(repeat):
                t0 = time.perf_counter()
                snapshot = fetch_state(client, address, RUN, "bench")
                times.append(time.perf_counter() - t0)
                if snapshot.tensors["params"].numel() != numel:
                    raise RuntimeError(f"fetched {snapshot.tensors['params'].numel()} elements, not {numel}")
        finally:
            client.close()
    progress.end()
    median = statistics.median(times)
    report = {
        "state_bytes": numel * 4,
        "repeat": repeat,
        "median_s": median,
        "times_s": times,
        "gbps": numel * 4 / median / 1e9,
        "baseline": copy_baseline(numel * 4, repeat),
    }
    report["time_over_memcpy"] = median / report["baseline"]["median_s"]
    if bandwidth_bps:
        report["bandwidth_bps"] = bandwidth_bps
        report["link_utilization"] = numel * 4 * 8 / bandwidth_bps / median
    return report


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of this benchmark, and what its report's fields mean (the help's epilog)."""
    add_bench_options(parser, StateSyncBenchConfig)
    describe_report(parser, FIELDS)


def main(ns: argparse.Namespace) -> int:
    """Check the arguments, run, and print the report (progress on stderr)."""
    config = read_options(StateSyncBenchConfig, ns)
    check_arguments(config.mb, config.repeat, config.bandwidth)
    with progress_for("statesync", getattr(ns, "quiet", 0)) as progress:
        report = run(config, progress)
    print_report(report, ns.json)
    return 0
