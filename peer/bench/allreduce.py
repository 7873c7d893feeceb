"""``loconet bench allreduce``: our all-reduce between local processes, against gloo in the same run.

N worker processes on 127.0.0.1 each reduce a seeded random fp32 tensor with
our collective (K repeats), then with ``torch.distributed`` gloo
``all_reduce`` (fp32, same processes, same tensors). Per repeat the time is
the slowest worker's; the report gives medians and their ratio, the bytes
each peer sent, the error against the exact mean (float64, recomputed from
the seeds), whether every peer ended with the same bits, and with a
bandwidth cap the fraction of the link the round kept busy.

With ``--netns`` (root) every worker lives in its own network namespace behind
``tbf``-capped links (``peer/harness/netns/network.py``), and gloo runs over the same
namespaces, addresses and caps: the comparison is on the link, as on a WAN.
Both sides then also report what their veths carried and the CPU-seconds
their processes spent per round.

With ``--hivemind`` hivemind's all-reduce is measured too, on the same links and tensors, by workers under an
interpreter that has hivemind (``peer/bench/hivemind_baseline.py``).
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import sys
import tempfile
from dataclasses import dataclass, field, replace
from pathlib import Path

from collectives.allreduce import mean_error_bound
from collectives.codecs import CodecConfig, codec_names, needs_feedback
from collectives.errors import RoundFailed
from collectives.net.ratelimit import format_bandwidth, parse_bandwidth
from collectives.net.rpc import RpcSecurity
from collectives.net.transportconfig import TransportConfig, codec_threads_for
from peer.bench import hivemind_baseline
from peer.bench.capped import CappedNetwork, capped_network, link_traffic, on_hosts, peer_names
from peer.bench.fields import Fields, describe_report
from peer.bench.kit import add_bench_options, cpu_per_round, per_round_max, print_report, require
from peer.bench.progress import Progress, progress_for
from peer.harness.netns.availability import check_available
from peer.harness.processes import ChildFailed
from peer.harness.procgroup import AllReduceJob, Placement, ProcessGroup, WorkerConfig, WorkerError, worker_tensor
from peer.harness.security import prepare_security
from peer.options import read_options

FIELDS: Fields = {
    "peers": "worker processes (on 127.0.0.1, or each in its namespace with --netns), each one member of every round",
    "numel": "fp32 elements each peer contributes (a seeded random tensor)",
    "codec": "the codec every part is sent with, as parsed (e.g. int8, int4/128+zstd)",
    "repeat": "timed rounds (after one untimed warm-up round)",
    "chunk_bytes": "bytes per gRPC message",
    "codec_threads": "codec threads per peer (0: the codec runs on the peer's event loop)",
    "median_s": "median over the timed rounds of the slowest peer's seconds per round",
    "times_s": "the slowest peer's seconds of every timed round, in order",
    "bytes_sent_per_peer": "bytes a peer put on the wire in one round (payload and framing; median over peers)",
    "bytes_sent_per_peer_max": "the most bytes any peer sent in one round",
    "fp32_bytes": "bytes of one peer's tensor in fp32 (numel x 4)",
    "max_abs_error": "largest |result - exact mean| over elements and peers (exact mean in float64 from the seeds)",
    "error_bound": "the analytic bound on that error for this codec (collectives.allreduce.mean_error_bound); "
    "null for a sparse codec (topk), which drops entries by design",
    "identical_across_peers": "true when every peer ended with bit-identical results (SHA-256 of the result)",
    "phases_s": "median over peers of the seconds each phase of the last round took",
    "phases_s.scatter_s": "aggregate-scatter: every peer streams part j to its owner j",
    "phases_s.gather_s": "all-gather: every owner streams its reduced part to all",
    "phases_s.encode_s": "time spent encoding (overlaps the phases above)",
    "phases_s.decode_s": "time spent decoding (overlaps the phases above)",
    "phases_s.reduce_s": "time spent reducing the received parts",
    "baseline": "without --no-gloo, the baseline measured in the same run by the same processes",
    "baseline.method": "what the baseline does: torch.distributed gloo all_reduce of the same fp32 tensors",
    "baseline.median_s": "median over its rounds of the slowest process's seconds",
    "ratio_vs_gloo": "median_s / baseline.median_s: below 1 our all-reduce is faster than gloo; null with --bandwidth "
    "without --netns (only ours is capped there, gloo runs at loopback speed)",
    "cpu_s_per_round": (
        "CPU-seconds per timed round, summed over the peers' processes (every thread; median over rounds)"
    ),
    "baseline.cpu_s_per_round": "the same for gloo",
    "baseline.bytes_sent_per_peer": "bytes a gloo process sends per all_reduce: its ring algorithm's "
    "2 (N-1)/N x 4 x numel (gloo exposes no counters)",
    "bandwidth": "with --bandwidth: the per-peer cap on send and on receive",
    "link_utilization": "with --bandwidth: the fraction of the capped link a round kept busy "
    "(bits sent per peer / cap / median_s); a short round may show a little above 1, by the link's burst "
    "(10 ms of the cap, at least 4 KiB)",
    "baseline.link_utilization": "with --bandwidth --netns: the same for gloo (its ring's bits / cap / its median_s)",
    "baseline.capped": "false with --bandwidth without --netns: gloo ran uncapped, so it is no like-for-like baseline",
    "hierarchical": "true with --hierarchical: every peer has one host id, so the peers reduce through shared "
    "memory (collectives/hosts/round.py) and no bytes cross gRPC; the codec applies between hosts only",
    "tls": "true with --tls: our workers' links use mutual TLS (gloo's never do; hivemind's libp2p links are "
    "always encrypted)",
    "netns": "true with --netns: every peer in its own network namespace, links capped with tbf (else the "
    "transport's token buckets cap ours, and gloo runs uncapped on 127.0.0.1)",
    "congestion_control": "with --netns: the TCP congestion control of every namespace, ours and gloo's alike "
    "(--congestion-control; by default the first of cubic, reno the kernel lets a namespace set)",
    "hivemind": "with --hivemind: hivemind's DecentralizedAverager all-reduce of the same tensors, on the same links "
    "(its own processes, after ours and gloo's; matchmaking done before each timed round)",
    "hivemind.method": "what it runs: the averager and its compression (--hivemind-codec; default the counterpart "
    "of --codec: none, fp16 or int8 (Uniform8BitQuantization), else fp32)",
    "hivemind.version": "the hivemind version the workers imported",
    "hivemind.codec": "hivemind's compression, by this benchmark's name for it",
    "hivemind.median_s": "median over its timed rounds of the slowest peer's seconds, release to result",
    "hivemind.times_s": "the slowest peer's seconds of every timed round",
    "hivemind.release_late_s_max": "the latest any peer started a timed round after the common instant (it counts "
    "in that round's time; near 0 when the comparison is fair to hivemind)",
    "hivemind.cpu_s_per_round": "CPU-seconds per round of its processes (worker, DHT, averager, p2pd daemon)",
    "hivemind.bytes_sent_per_peer": "its butterfly's payload per peer: 2 (N-1)/N x numel x bytes per value "
    "(hivemind exposes no counters)",
    "hivemind.max_abs_error": "largest |result - exact mean| over elements, peers and timed rounds",
    "hivemind.max_abs_error_per_round": "the same for each timed round (a round that left a peer's part out "
    "stands out)",
    "hivemind.identical_across_peers": "true when every hivemind peer ended every timed round with bit-identical "
    "results",
    "hivemind.log_warnings": "the warnings and errors its peers logged (hivemind says in its logs, not in the "
    "step's result, when a part was left out of the average), with how many times; the 10 most frequent",
    "hivemind.numpy": "the numpy version its workers imported",
    "hivemind.wire_bytes_per_round": "with --netns: what its veths carried per round (its warm-up round and DHT "
    "traffic included)",
    "hivemind.link_utilization": "with --netns and --bandwidth: its payload bits / cap / its median_s",
    "time_over_hivemind": "median_s / hivemind.median_s: below 1 our all-reduce is faster than hivemind's",
    "wire": "with --netns: what each side's veths carried per round (tx bytes per peer, median over peers, "
    "warm-up and barrier rounds included; Ethernet, IP and TCP headers included)",
}


@dataclass(frozen=True)
class AllReduceBenchConfig:
    """What ``bench allreduce`` runs: its options' defaults are these fields'."""

    peers: int = field(default=4, metadata={"help": "worker processes, each a member of every round"})
    numel: int = field(default=25_000_000, metadata={"help": "fp32 elements each peer contributes"})
    codec: str = field(
        default="int8",
        metadata={
            "help": f"NAME[/N][+zstd]: NAME one of {', '.join(codec_names())} (e.g. int8, int4/128+zstd, topk/64)"
        },
    )
    bandwidth: str | None = field(
        default=None, metadata={"help": "per-peer cap on send and receive, e.g. 1gbit (default: uncapped)"}
    )
    repeat: int = field(default=5, metadata={"help": "timed rounds; the median is reported"})
    chunk_bytes: int = field(default=TransportConfig.chunk_bytes, metadata={"help": "bytes per gRPC message"})
    gloo: bool = field(default=True, metadata={"help": "measure the gloo baseline too (--no-gloo: skip it)"})
    timeout_s: float = field(default=300.0, metadata={"help": "deadline of each round, seconds"})
    # None: codec_threads_for(peers, link_limited=bandwidth is not None).
    codec_threads: int | None = field(
        default=None,
        metadata={"help": "codec threads per peer; 0 encodes on the event loop (default: when peers >= cores, 1 with "
                  "--bandwidth and 0 without, else 2)"},
    )
    netns: bool = field(
        default=False,
        metadata={"help": "root: each peer in its own network namespace, links capped with tbf; gloo runs over the "
                  "same links"},
    )
    hierarchical: bool = field(
        default=False,
        metadata={"help": "every peer on one host id: they reduce through shared memory (the codec applies between "
                  "hosts only)"},
    )
    congestion_control: str | None = field(
        default=None,
        metadata={"help": "with --netns: the namespaces' TCP congestion control, e.g. bbr (default: cubic, else reno)",
                  "metavar": "NAME"},
    )
    # An interpreter with hivemind, to measure its all-reduce too (None: no hivemind baseline).
    hivemind_python: str | None = field(
        default=None,
        metadata={"help": "also measure hivemind's all-reduce, run by PYTHON (an interpreter with hivemind; "
                  "default: this one)", "flag": "hivemind", "const": sys.executable, "metavar": "PYTHON"},
    )
    # parse: "none" is a compression here (NoCompression), not None.
    hivemind_codec: str | None = field(
        default=None,
        metadata={"help": "hivemind's compression (default: the counterpart of --codec, else none)",
                  "choices": hivemind_baseline.HIVEMIND_CODECS, "parse": str, "metavar": "{" + ",".join(
                      hivemind_baseline.HIVEMIND_CODECS) + "}"},
    )
    tls: bool = field(
        default=False,
        metadata={"help": "our workers talk mutual TLS, as a run open to the internet does (gloo stays plaintext; "
                  "hivemind's links are always encrypted)"},
    )


def check_arguments(config: AllReduceBenchConfig) -> float | None:
    """ConfigError for arguments the benchmark cannot run with; the bandwidth cap in bits per second.

    With netns, NetnsUnavailable (not root, no iproute2...) says what is missing, before any process starts.
    """
    peers, numel, codec, bandwidth, repeat = config.peers, config.numel, config.codec, config.bandwidth, config.repeat
    chunk_bytes, codec_threads, timeout_s, netns = (
        config.chunk_bytes, config.codec_threads, config.timeout_s, config.netns
    )
    require(peers >= 1, f"--peers must be at least 1, got {peers}")
    require(numel >= 1, f"--numel must be at least 1, got {numel}")
    require(repeat >= 1, f"--repeat must be at least 1, got {repeat}")
    require(chunk_bytes >= 1024, f"--chunk-bytes must be at least 1024, got {chunk_bytes}")
    require(codec_threads is None or codec_threads >= 0, f"--codec-threads must be 0 or more, got {codec_threads}")
    require(timeout_s > 0, f"--timeout must be positive, got {timeout_s:g}")
    CodecConfig.parse(codec)  # ConfigError naming the valid codecs
    bps = parse_bandwidth(bandwidth) if bandwidth else None
    if netns:
        check_available()
    return bps


def run(config: AllReduceBenchConfig | None = None, progress: Progress | None = None) -> dict:
    """Run the benchmark and return its report as a JSON-ready dict (config None: the defaults)."""
    config = config or AllReduceBenchConfig()
    bandwidth_bps = check_arguments(config)
    peers, numel, codec, bandwidth, repeat = config.peers, config.numel, config.codec, config.bandwidth, config.repeat
    chunk_bytes, gloo, timeout_s, codec_threads = (
        config.chunk_bytes, config.gloo, config.timeout_s, config.codec_threads
    )
    netns, hierarchical, congestion_control, tls = (
        config.netns, config.hierarchical, config.congestion_control, config.tls
    )
    hivemind_python, hivemind_codec = config.hivemind_python, config.hivemind_codec
    # Namespaces stand for separate hosts: one host id would take the bytes off their shaped links.
    require(not (hierarchical and netns), "--hierarchical puts every peer on one host; it cannot go with --netns")
    require(congestion_control is None or netns, "--congestion-control sets the namespaces' TCP; it needs --netns")
    hivemind_job, hivemind_version = None, ""
    if hivemind_python is not None:
        hivemind_job = hivemind_baseline.HivemindJob(
            python=hivemind_python, peers=peers, numel=numel, repeat=repeat, timeout_s=timeout_s,
            codec=hivemind_baseline.counterpart(CodecConfig.parse(codec).name, hivemind_codec),
        )
        # Before any namespace or process: a missing hivemind, or one whose compression fails, is a usage error.
        hivemind_version = hivemind_baseline.probe(hivemind_python, hivemind_job.codec)
    hosts = ("bench-host",) * peers if hierarchical else None
    progress = progress or Progress("allreduce", enabled=False)
    if codec_threads is None:
        codec_threads = codec_threads_for(peers, link_limited=bandwidth is not None)
    TransportConfig(chunk_bytes=chunk_bytes, codec_threads=codec_threads)  # its own checks, before any process
    job = AllReduceJob(
        numel=numel, codec=codec, repeat=repeat, timeout_s=timeout_s, check_error=True, seed=1, barrier=True,
        hosts=hosts,
    )
    wire: dict[str, float] = {}
    try:
        stack = contextlib.ExitStack()  # what lives as long as the run: the TLS files
        names = peer_names(peers)
        no_network = contextlib.nullcontext(None)
        with capped_network(
            names, names, bandwidth_bps, progress, congestion_control, subnet_only=True
        ) if netns else no_network as capped:
            congestion_used = capped.congestion_control if capped is not None else None
            placements = tuple(capped.placement(n) for n in names) if capped is not None else ()
            config = WorkerConfig(
                run_id="bench", chunk_bytes=chunk_bytes, codec_threads=codec_threads,
                # In namespaces tbf caps both sides alike; else ours is capped by its token buckets.
                bandwidth_bps=None if netns else bandwidth_bps, placements=placements,
                security=_security(stack, placements) if tls else RpcSecurity(),
            )
            progress.begin(f"starting {peers} workers")
            with ProcessGroup(peers, config) as group:
                progress.end()
                replies, wire["ours"] = _ours(group, job, capped, names, progress)
                baseline = None
                if gloo:
                    baseline, wire["gloo"] = _gloo(group, job, capped, names, progress)
            hivemind = None
            if hivemind_job is not None:  # after ours and gloo's workers have gone: nothing else runs
                progress.begin(f"hivemind all-reduce ({hivemind_job.codec}), {repeat} rounds")
                hivemind = _hivemind(hivemind_job, hivemind_version, capped, names, bandwidth_bps)
                progress.end(f"median {hivemind['median_s']:.3f} s")
    except WorkerError as exc:  # a worker died or raised: a child's failure, said in one line
        raise ChildFailed(f"all-reduce {exc} (its own messages are above, on stderr)") from exc
    finally:
        stack.close()
    report = _report(job, peers, replies, chunk_bytes, codec_threads, netns, hierarchical, tls)
    if baseline is not None:
        report["baseline"] = baseline
        # Off the namespaces only our transport paces itself to --bandwidth: gloo's time is a loopback race's.
        like_for_like = netns or not bandwidth_bps
        report["ratio_vs_gloo"] = report["median_s"] / baseline["median_s"] if like_for_like else None
        if not like_for_like:
            baseline["capped"] = False
    if hivemind is not None:
        report["hivemind"] = hivemind
        report["time_over_hivemind"] = report["median_s"] / hivemind["median_s"]
    if bandwidth_bps:
        report["bandwidth"] = format_bandwidth(bandwidth_bps)
        report["link_utilization"] = (report["bytes_sent_per_peer"] * 8 / bandwidth_bps) / report["median_s"]
        if baseline is not None and netns:  # off the namespaces gloo runs uncapped: no utilisation to speak of
            baseline["link_utilization"] = (baseline["bytes_sent_per_peer"] * 8 / bandwidth_bps) / baseline["median_s"]
    if netns:
        report["wire"] = wire
        report["congestion_control"] = congestion_used
    return report


def _ours(
    group: ProcessGroup, job: AllReduceJob, capped: CappedNetwork | None, names: list[str], progress: Progress
) -> tuple[list[dict], float | None]:
    """Our all-reduce: one warm-up round, then job's timed rounds; the workers' replies and the veths' bytes per
    round (None off the namespaces)."""
    # The warm-up connects every channel and faults in every buffer; its round ids stay clear of the timed ones.
    progress.begin("our all-reduce, warm-up round")
    warm = replace(job, repeat=1, check_error=False, barrier=False, first_round=1_000)
    _expect_ok(group.allreduce(warm))
    progress.end()
    progress.begin(f"our all-reduce, {job.repeat} rounds")
    with link_traffic(capped, names) as sent:
        replies = _expect_ok(group.allreduce(job))
    wire = _per_round(sent, job.repeat)
    progress.end(f"median {statistics.median(per_round_max(replies)):.3f} s")
    return replies, wire


def _gloo(
    group: ProcessGroup, job: AllReduceJob, capped: CappedNetwork | None, names: list[str], progress: Progress
) -> tuple[dict, float | None]:
    """gloo's fp32 all_reduce of the same tensors by the same processes; its report and the veths' bytes per round."""
    progress.begin(f"gloo all_reduce, {job.repeat} rounds")
    group.gloo_init()
    with link_traffic(capped, names) as sent:
        replies = [r[1] for r in group.run("gloo_allreduce", AllReduceJob(numel=job.numel, repeat=job.repeat, seed=1))]
    wire = _per_round(sent, job.repeat)
    peers = group.size
    baseline = {
        "method": "torch.distributed gloo all_reduce (fp32)",
        "median_s": statistics.median(per_round_max(replies)),
        "cpu_s_per_round": cpu_per_round(replies),
        "bytes_sent_per_peer": 2 * (peers - 1) / peers * 4 * job.numel,
    }
    progress.end(f"median {baseline['median_s']:.3f} s")
    return baseline, wire


def _report(
    job: AllReduceJob, peers: int, replies: list[dict], chunk_bytes: int, codec_threads: int, netns: bool,
    hierarchical: bool, tls: bool,
) -> dict:
    """The report's fields for our side, from the workers' replies to the timed rounds."""
    codec = CodecConfig.parse(job.codec)
    times = per_round_max(replies)
    sent = [r["stats"]["bytes_sent"] for r in replies]
    return {
        "peers": peers,
        "numel": job.numel,
        "codec": str(codec),
        "repeat": job.repeat,
        "chunk_bytes": chunk_bytes,
        "codec_threads": codec_threads,
        "netns": netns,
        "hierarchical": hierarchical,
        "tls": tls,
        "median_s": statistics.median(times),
        "times_s": times,
        "cpu_s_per_round": cpu_per_round(replies),
        "bytes_sent_per_peer": statistics.median(sent),
        "bytes_sent_per_peer_max": max(sent),
        "fp32_bytes": job.numel * 4,
        "max_abs_error": max(r["max_abs_error"] for r in replies),
        # A sparse codec drops entries by design (error feedback carries them in training): it has no bound.
        "error_bound": None if needs_feedback(codec) else mean_error_bound(
            codec, [worker_tensor(job, r) for r in range(peers)]),
        "identical_across_peers": len({r["sha256"] for r in replies}) == 1,
        "phases_s": {
            k: statistics.median(r["stats"][k] for r in replies)
            for k in ("scatter_s", "gather_s", "encode_s", "decode_s", "reduce_s")
        },
    }


def _hivemind(job: hivemind_baseline.HivemindJob, version: str, capped: CappedNetwork | None, names: list[str],
              bandwidth_bps: float | None) -> dict:
    """Run hivemind's workers, in the namespaces of names when there are (capped not None), and summarise them."""
    with link_traffic(capped, names) as sent, on_hosts(capped, names) as (prefixes, ips):
        reports = hivemind_baseline.run_workers(job, prefixes, ips)
    wire = _per_round(sent, job.repeat + 1)  # its warm-up round moved the same bytes
    # Off the namespaces hivemind runs uncapped on 127.0.0.1: no utilisation to speak of, as for gloo.
    return hivemind_baseline.summarise(job, version, reports, wire, bandwidth_bps if capped is not None else None)


def _security(stack: contextlib.ExitStack, placements: tuple[Placement, ...]) -> RpcSecurity:
    """A CA and one certificate for every worker's address, in a folder removed when stack closes (mutual TLS)."""
    folder = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="loconet-bench-tls-")))
    return prepare_security(folder, token=False, tls=True, hosts=tuple(p.ip for p in placements))


def _per_round(sent: list[int], rounds: int) -> float | None:
    """Median over peers of the bytes their veths sent per round (None off the namespaces: nothing measured)."""
    return statistics.median(s / rounds for s in sent) if sent else None


def _expect_ok(replies: list) -> list[dict]:
    bad = [info for kind, info in replies if kind != "ok"]
    if bad:
        raise RoundFailed(f"a benchmark round failed: {bad[0]['type']}: {bad[0]['message']}")
    return [info for _, info in replies]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The command-line options of this benchmark, and what its report's fields mean (the help's epilog)."""
    add_bench_options(parser, AllReduceBenchConfig)
    describe_report(parser, FIELDS)


def bench_config(ns: argparse.Namespace) -> AllReduceBenchConfig:
    """The AllReduceBenchConfig the options describe."""
    return read_options(AllReduceBenchConfig, ns)


def main(ns: argparse.Namespace) -> int:
    """Check the arguments, run, and print the report (progress on stderr)."""
    config = bench_config(ns)
    check_arguments(config)
    with progress_for("allreduce", getattr(ns, "quiet", 0)) as progress:
        report = run(config, progress)
    print_report(report, ns.json)
    return 0
