"""``loconet bench transport``: the floor under the all-reduce, i.e. what moving bytes through gRPC costs.

One process streams ``--mb`` megabytes to another through our ``Transport``
(raw pre-framed messages of ``--chunk-bytes``, exactly as the all-reduce
sends them, with no encoding or reduction), ``--repeat`` times. Reported:
the median wall time and rate, and the CPU seconds per GB that the sending
and the receiving process spent (``/proc`` accounting). Baseline, measured
in the same run: an in-memory copy of the same bytes.

With these costs, an all-reduce in which every peer sends and receives B
bytes, run by N processes on C cores, cannot take less than about
``N * B * (send + receive CPU-s per byte) / C`` however well it overlaps
(``allreduce_floor_s`` for the butterfly on the 4 x 100 MB case of
``bench allreduce``).
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
import time
from dataclasses import dataclass, field

from collectives.allocator import tune_malloc
from collectives.net.rpc import method_handlers, raw_stream_unary
from collectives.net.transport import Transport
from collectives.net.transportconfig import TransportConfig
from peer.bench.fields import Fields, describe_report
from peer.bench.kit import add_bench_options, copy_baseline, print_report, proc_cpu_s, require, serving_child
from peer.bench.progress import Progress, progress_for
from peer.options import read_options

FIELDS: Fields = {
    "bytes": "bytes streamed per repeat (--mb rounded down to whole chunks)",
    "chunk_bytes": "bytes per gRPC message",
    "repeat": "timed streams (after one untimed warm-up stream)",
    "median_s": "median wall seconds of one stream, from the first message sent to the sink's reply",
    "gbps": "bytes / median_s, in GB/s (10^9 bytes)",
    "sender_cpu_s_per_gb": "CPU seconds (user + system, all threads) this process spent sending, per GB; median",
    "receiver_cpu_s_per_gb": "CPU seconds the receiving child spent, per GB; median",
    "baseline": "the baseline measured in the same run: an in-memory copy of the same bytes",
    "baseline.method": "what the baseline does",
    "baseline.median_s": "median seconds of the copy",
    "cores": "cores the floor below divides the work among",
    "allreduce_floor_s": "the least time, in seconds, bench allreduce's 4 x 100 MB case (codec none) can take with "
    "these CPU costs: 4 peers x 0.15 GB each way x (send + receive CPU-s per GB) / cores",
    "time_over_memcpy": "median_s / baseline.median_s: how many times slower streaming is than copying in memory",
}

SERVICE = "loconet.bench.v1.Sink"
METHOD = f"/{SERVICE}/Push"


def _sink(conn) -> None:
    """Child process: count the bytes of every Push stream; stop when the parent says so."""
    tune_malloc()

    async def push(request_iterator, context) -> bytes:
        received = 0
        async for message in request_iterator:
            received += len(message)
        return str(received).encode()

    transport = Transport(TransportConfig())
    conn.send(transport.start([method_handlers(SERVICE, {"Push": raw_stream_unary(push)})]))
    conn.recv()
    transport.close()


def check_arguments(mb: float, chunk_bytes: int, repeat: int) -> None:
    """ConfigError for sizes the benchmark cannot run with."""
    require(chunk_bytes >= 1024, f"--chunk-bytes must be at least 1024, got {chunk_bytes}")
    require(repeat >= 1, f"--repeat must be at least 1, got {repeat}")
    # Before int(mb * 1e6) below, which fails on nan and inf with a traceback.
    require(math.isfinite(mb) and mb > 0, f"--mb must be a positive number of megabytes, got {mb:g}")
    require(
        int(mb * 1e6) >= chunk_bytes,
        f"--mb {mb:g} is smaller than one chunk of {chunk_bytes} bytes; give a larger --mb or a smaller --chunk-bytes",
    )


@dataclass(frozen=True)
class TransportBenchConfig:
    """What ``bench transport`` runs: its options' defaults are these fields'."""

    mb: float = field(default=400.0, metadata={"help": "megabytes per stream"})
    chunk_bytes: int = field(default=TransportConfig.chunk_bytes, metadata={"help": "bytes per message"})
    repeat: int = field(default=5, metadata={"help": "timed streams; the median is reported"})
    # Cores the all-reduce floor is worked out for (None: this machine's); not an option: tests set it.
    cores: int | None = field(default=None, metadata={"cli": False})


def run(config: TransportBenchConfig | None = None, progress: Progress | None = None) -> dict:
    """Stream mb megabytes to a child process repeat times; return the report."""
    config = config or TransportBenchConfig()
    mb, chunk_bytes, repeat, cores = config.mb, config.chunk_bytes, config.repeat, config.cores
    check_arguments(mb, chunk_bytes, repeat)
    tune_malloc()
    progress = progress or Progress("transport", enabled=False)
    total = int(mb * 1e6) // chunk_bytes * chunk_bytes
    message = os.urandom(chunk_bytes)
    count = total // chunk_bytes
    sender = Transport(TransportConfig(chunk_bytes=chunk_bytes))
    walls, send_cpu, recv_cpu = [], [], []
    with serving_child(_sink, name="sink") as (address, sink_pid):
        sender.start()
        progress.begin(f"{repeat} streams of {total / 1e6:g} MB", lambda: f"stream {len(walls)}/{repeat}")
        try:

            async def stream() -> int:
                reply = await sender.stream_call(address, METHOD, (message for _ in range(count)), 600.0)
                return int(reply)

            for k in range(repeat + 1):  # the first stream connects and warms up
                s0, r0, t0 = proc_cpu_s(os.getpid()), proc_cpu_s(sink_pid), time.perf_counter()
                got = sender.submit(stream()).result()
                wall = time.perf_counter() - t0
                if got != total:
                    raise RuntimeError(f"the sink counted {got} bytes of {total}")
                if k:
                    walls.append(wall)
                    send_cpu.append(proc_cpu_s(os.getpid()) - s0)
                    recv_cpu.append(proc_cpu_s(sink_pid) - r0)
        finally:
            sender.close()
    progress.end()
    gb = total / 1e9
    median = statistics.median(walls)
    send_per_gb = statistics.median(send_cpu) / gb
    recv_per_gb = statistics.median(recv_cpu) / gb
    cores = cores or os.cpu_count() or 1
    # bench allreduce's default case: 4 peers, 100 MB each, codec none; each peer sends
    # and receives 2 x (N-1)/N x 100 MB (aggregate-scatter, then all-gather).
    per_peer_gb = 2 * 3 / 4 * 0.1
    report = {
        "bytes": total,
        "chunk_bytes": chunk_bytes,
        "repeat": repeat,
        "median_s": median,
        "gbps": gb / median,
        "sender_cpu_s_per_gb": send_per_gb,
        "receiver_cpu_s_per_gb": recv_per_gb,
        "baseline": copy_baseline(total, repeat),
        "cores": cores,
        "allreduce_floor_s": 4 * per_peer_gb * (send_per_gb + recv_per_gb) / cores,
    }
    report["time_over_memcpy"] = median / report["baseline"]["median_s"]
    return report


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of this benchmark, and what its report's fields mean (the help's epilog)."""
    add_bench_options(parser, TransportBenchConfig)
    describe_report(parser, FIELDS)


def main(ns: argparse.Namespace) -> int:
    """Check the arguments, run, and print the report (progress on stderr)."""
    config = read_options(TransportBenchConfig, ns)
    check_arguments(config.mb, config.chunk_bytes, config.repeat)
    with progress_for("transport", getattr(ns, "quiet", 0)) as progress:
        report = run(config, progress)
    print_report(report, ns.json)
    return 0
