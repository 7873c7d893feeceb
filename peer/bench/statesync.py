"""``loconet bench statesync``: how long a joiner takes to fetch a state of a given size from a peer process.

One process serves a state of ``--mb`` megabytes (one fp32 tensor plus
metadata) from its StateServer; this process fetches it ``--repeat`` times
over gRPC on 127.0.0.1 and verifies it. Reported: the median fetch time, the
rate, and as a baseline measured in the same run, the time to copy the same
bytes in memory (``ratio_vs_memcpy``).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from collectives.allocator import tune_malloc
from collectives.ratelimit import parse_bandwidth
from collectives.statesync import StateServer, StateSnapshot, fetch_state
from collectives.transport import Transport, TransportConfig
from peer.bench.kit import copy_baseline, print_report, serving_child

RUN = "bench-statesync"


def _serve(conn, numel: int, bandwidth_bps: float | None) -> None:
    tune_malloc()
    state = StateSnapshot(round_id=7, tensors={"params": torch.randn(numel)}, meta={"step": 1})
    transport = Transport(TransportConfig(bandwidth_bps=bandwidth_bps))
    server = StateServer(transport, RUN, lambda: StateSnapshot(state.round_id, {"params": state.tensors["params"].clone()}, state.meta))
    conn.send(transport.start(server.handlers()))
    conn.recv()  # until the parent is done
    transport.close()


def run(mb: float = 100.0, repeat: int = 5, bandwidth: str | None = None) -> dict:
    """Serve a state of mb megabytes in a child process and fetch it repeat times; return the report."""
    tune_malloc()
    numel = int(mb * 1e6 / 4)
    bandwidth_bps = parse_bandwidth(bandwidth) if bandwidth else None
    client = Transport(TransportConfig(bandwidth_bps=bandwidth_bps))
    times = []
    with serving_child(_serve, numel, bandwidth_bps) as (address, _):
        client.start()
        try:
            for _ in range(repeat):
                t0 = time.perf_counter()
                snapshot = fetch_state(client, address, RUN, "bench")
                times.append(time.perf_counter() - t0)
                if snapshot.tensors["params"].numel() != numel:
                    raise RuntimeError(f"fetched {snapshot.tensors['params'].numel()} elements, not {numel}")
        finally:
            client.close()
    median = statistics.median(times)
    report = {
        "state_bytes": numel * 4,
        "repeat": repeat,
        "median_s": median,
        "times_s": times,
        "gbps": numel * 4 / median / 1e9,
        "baseline": copy_baseline(numel * 4, repeat),
    }
    report["ratio_vs_memcpy"] = median / report["baseline"]["median_s"]
    if bandwidth_bps:
        report["bandwidth_bps"] = bandwidth_bps
        report["link_utilization"] = numel * 4 * 8 / bandwidth_bps / median
    return report


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of this benchmark."""
    parser.add_argument("--mb", type=float, default=100.0, help="state size in megabytes")
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--bandwidth", default=None, help="cap on both ends, e.g. 1gbit")
    parser.add_argument("--json", action="store_true")


def main(ns: argparse.Namespace) -> int:
    """Run from parsed arguments and print the report."""
    report = run(mb=ns.mb, repeat=ns.repeat, bandwidth=ns.bandwidth)
    print_report(report, ns.json)
    return 0
