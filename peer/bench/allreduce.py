"""``loconet bench allreduce``: our all-reduce between local processes, against gloo in the same run.

N worker processes on 127.0.0.1 each reduce a seeded random fp32 tensor with
our collective (K repeats), then with ``torch.distributed`` gloo
``all_reduce`` (fp32, same processes, same tensors). Per repeat the time is
the slowest worker's; the report gives medians and their ratio, the bytes
each peer sent, the error against the exact mean (float64, recomputed from
the seeds), whether every peer ended with the same bits, and with a
bandwidth cap the fraction of the link the round kept busy.
"""

from __future__ import annotations

import argparse
import statistics

from collectives.allreduce import mean_error_bound
from collectives.codecs import CodecConfig
from collectives.ratelimit import format_bandwidth, parse_bandwidth
from collectives.transport import codec_threads_for
from peer.bench.kit import print_report
from peer.harness.procgroup import AllReduceJob, ProcessGroup, WorkerConfig, worker_tensor


def _per_repeat_max(replies: list[dict]) -> list[float]:
    return [max(times) for times in zip(*(r["times_s"] for r in replies))]


def run(
    peers: int = 4,
    numel: int = 25_000_000,
    codec: str = "int8",
    bandwidth: str | None = None,
    repeat: int = 5,
    chunk_bytes: int = 1 << 20,
    gloo: bool = True,
    timeout_s: float = 300.0,
    codec_threads: int | None = None,
) -> dict:
    """Run the benchmark and return its report as a JSON-ready dict (codec_threads None: codec_threads_for)."""
    bandwidth_bps = parse_bandwidth(bandwidth) if bandwidth else None
    if codec_threads is None:
        codec_threads = codec_threads_for(peers)
    config = WorkerConfig(
        run_id="bench", chunk_bytes=chunk_bytes, bandwidth_bps=bandwidth_bps, codec_threads=codec_threads
    )
    job = AllReduceJob(
        numel=numel, codec=codec, repeat=repeat, timeout_s=timeout_s, check_error=True, seed=1, barrier=True
    )
    with ProcessGroup(peers, config) as group:
        # One warm-up round connects every channel and faults in every buffer.
        warm = AllReduceJob(numel=numel, codec=codec, repeat=1, timeout_s=timeout_s, first_round=1_000)
        _expect_ok(group.allreduce(warm))
        replies = _expect_ok(group.allreduce(job))
        baseline = None
        if gloo:
            group.gloo_init()
            gloo_replies = [r[1] for r in group.run("gloo_allreduce", AllReduceJob(numel=numel, repeat=repeat, seed=1))]
            baseline = {"method": "torch.distributed gloo all_reduce (fp32)", "median_s": statistics.median(_per_repeat_max(gloo_replies))}
    times = _per_repeat_max(replies)
    median = statistics.median(times)
    sent = [r["stats"]["bytes_sent"] for r in replies]
    report = {
        "peers": peers,
        "numel": numel,
        "codec": str(CodecConfig.parse(codec)),
        "repeat": repeat,
        "chunk_bytes": chunk_bytes,
        "codec_threads": codec_threads,
        "median_s": median,
        "times_s": times,
        "bytes_sent_per_peer": statistics.median(sent),
        "bytes_sent_per_peer_max": max(sent),
        "fp32_bytes": numel * 4,
        "max_abs_error": max(r["max_abs_error"] for r in replies),
        "error_bound": mean_error_bound(CodecConfig.parse(codec), [worker_tensor(job, r) for r in range(peers)]),
        "identical_across_peers": len({r["sha256"] for r in replies}) == 1,
        "phases_s": {
            k: statistics.median(r["stats"][k] for r in replies)
            for k in ("scatter_s", "gather_s", "encode_s", "decode_s", "reduce_s")
        },
    }
    if baseline is not None:
        report["baseline"] = baseline
        report["ratio_vs_gloo"] = median / baseline["median_s"]
    if bandwidth_bps:
        report["bandwidth"] = format_bandwidth(bandwidth_bps)
        report["link_utilization"] = (report["bytes_sent_per_peer"] * 8 / bandwidth_bps) / median
    return report


def _expect_ok(replies: list) -> list[dict]:
    bad = [info for kind, info in replies if kind != "ok"]
    if bad:
        raise RuntimeError(f"a benchmark round failed: {bad[0]}")
    return [info for _, info in replies]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The command-line options of this benchmark."""
    parser.add_argument("--peers", type=int, default=4)
    parser.add_argument("--numel", type=int, default=25_000_000)
    parser.add_argument("--codec", default="int8", help="none, fp16, bf16, int8, int4 (+zstd, /block)")
    parser.add_argument("--bandwidth", default=None, help="per-peer cap on send and receive, e.g. 1gbit")
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--chunk-bytes", type=int, default=1 << 20)
    parser.add_argument(
        "--codec-threads", type=int, default=None,
        help="codec threads per peer; 0 encodes on the event loop (default: 0 when peers >= cores, else 2)",
    )
    parser.add_argument("--no-gloo", action="store_true", help="skip the gloo baseline")
    parser.add_argument("--timeout", type=float, default=300.0, help="deadline of each round, seconds")
    parser.add_argument("--json", action="store_true", help="print one JSON object")


def main(ns: argparse.Namespace) -> int:
    """Run from parsed arguments and print the report."""
    report = run(
        peers=ns.peers,
        numel=ns.numel,
        codec=ns.codec,
        bandwidth=ns.bandwidth,
        repeat=ns.repeat,
        chunk_bytes=ns.chunk_bytes,
        gloo=not ns.no_gloo,
        timeout_s=ns.timeout,
        codec_threads=ns.codec_threads,
    )
    print_report(report, ns.json)
    return 0
