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
import os
import statistics
import time

from collectives.allocator import tune_malloc
from collectives.transport import Transport, TransportConfig, method_handlers, raw_stream_unary
from peer.bench.kit import copy_baseline, print_report, proc_cpu_s, serving_child

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


def run(mb: float = 400.0, chunk_bytes: int = 1 << 20, repeat: int = 5, cores: int | None = None) -> dict:
    """Stream mb megabytes to a child process repeat times; return the report."""
    tune_malloc()
    total = int(mb * 1e6) // chunk_bytes * chunk_bytes
    if total <= 0:
        raise ValueError(f"--mb {mb} is smaller than one chunk of {chunk_bytes} bytes")
    message = os.urandom(chunk_bytes)
    count = total // chunk_bytes
    sender = Transport(TransportConfig(chunk_bytes=chunk_bytes))
    walls, send_cpu, recv_cpu = [], [], []
    with serving_child(_sink) as (address, sink_pid):
        sender.start()
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
    report["ratio_vs_memcpy"] = median / report["baseline"]["median_s"]
    return report


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of this benchmark."""
    parser.add_argument("--mb", type=float, default=400.0, help="megabytes per stream")
    parser.add_argument("--chunk-bytes", type=int, default=1 << 20, help="bytes per message")
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--json", action="store_true")


def main(ns: argparse.Namespace) -> int:
    """Run from parsed arguments and print the report."""
    report = run(mb=ns.mb, chunk_bytes=ns.chunk_bytes, repeat=ns.repeat)
    print_report(report, ns.json)
    return 0
