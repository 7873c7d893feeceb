"""``loconet bench codecs``: single-thread encode/decode throughput of every codec.

Timings on shared machines are noisy, so each figure is the median of
``repeat`` runs, and every codec is also reported relative to a memcpy of the
same tensor measured in the same run (``roundtrip_time_over_memcpy``).
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass, field

import torch

from collectives.codecs import make_codec
from collectives.codecs.kernels import kernels_status
from collectives.errors import ConfigError
from peer.bench.fields import Fields, describe_report
from peer.bench.kit import COMMA_LIST, add_bench_options, median_seconds, print_report, require
from peer.bench.progress import Progress, progress_for
from peer.options import read_options

DEFAULT_CODECS = ("none", "fp16", "bf16", "int8", "int4", "int8+zstd", "int4+zstd")


@dataclass(frozen=True)
class CodecsBenchConfig:
    """What ``bench codecs`` runs: its options' defaults are these fields'."""

    numel: int = field(default=16_000_000, metadata={"help": "fp32 elements per tensor (default 16M)"})
    repeat: int = field(default=5, metadata={"help": "timed runs per measurement; the median is reported"})
    # Codec specs, timed in this order (empty: DEFAULT_CODECS).
    codecs: tuple[str, ...] = field(
        default=DEFAULT_CODECS, metadata={"help": "comma-separated codec specs", **COMMA_LIST}
    )

FIELDS: Fields = {
    "numel": "fp32 elements of the tensor every codec encodes (seeded N(0, 1) values)",
    "repeat": "timed runs per figure; every time is their median",
    "threads": "torch threads (always 1: the throughput of one core)",
    "native_kernels": (
        "true if int8 and int4 ran on the C kernels (collectives/codecs/kernels.py), false on their torch path"
    ),
    "native_kernels_detail": "the kernels' library, or why they are not in use (no compiler, LOCONET_NATIVE_KERNELS=0)",
    "baseline": "the baseline measured in the same run: a memcpy of the same tensor",
    "baseline.memcpy_s": "median seconds of the copy",
    "baseline.memcpy_gbps": "fp32 bytes / memcpy_s, in GB/s (10^9 bytes)",
    "codecs": "one entry per codec spec of --codecs, keyed by the spec",
    "codecs.*.encode_s": "median seconds to encode the tensor",
    "codecs.*.decode_s": "median seconds to decode it into a preallocated tensor",
    "codecs.*.encode_gbps": "fp32 bytes / encode_s, in GB/s",
    "codecs.*.decode_gbps": "fp32 bytes / decode_s, in GB/s",
    "codecs.*.roundtrip_gbps": "fp32 bytes / (encode_s + decode_s), in GB/s",
    "codecs.*.bytes_over_fp32": "encoded bytes / fp32 bytes (int8 with blocks of 64: 0.2656)",
    "codecs.*.max_abs_error": "largest |decoded - original| over the tensor",
    "codecs.*.roundtrip_time_over_memcpy": "(encode_s + decode_s) / baseline.memcpy_s",
}


# fp32 tensors of numel elements the run holds at once, at most: the input, the memcpy's copy, a decode's output,
# an encoded payload (at most the input's size, for codec none) and the two temporaries of max_abs_error.
TENSORS_HELD = 6


def available_memory_bytes() -> int | None:
    """Memory the system can give without swapping (MemAvailable of /proc/meminfo); None where unknown."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def check_arguments(numel: int, repeat: int, codecs: list[str]) -> None:
    """ConfigError for a size, a repeat count or a codec spec the benchmark cannot run with."""
    # At least one element: every figure divides by the tensor's bytes.
    require(numel >= 1 and repeat >= 1, f"--numel and --repeat must be at least 1, got {numel} and {repeat}")
    # Bounded by the memory available now, not by catching torch's allocation error: an allocation the kernel
    # overcommits can succeed and then get the process OOM-killed while randn or a copy touches its pages, and a
    # failure in a later codec's buffers would come after the others were timed.
    needed, available = TENSORS_HELD * 4 * numel, available_memory_bytes()
    require(
        available is None or needed <= available,
        f"--numel {numel} needs about {needed / 1e9:.3g} GB ({TENSORS_HELD} fp32 tensors of it), more than the "
        f"{(available or 0) / 1e9:.3g} GB of memory available; give a smaller --numel",
    )
    require(bool(codecs), "--codecs is empty; give comma-separated codec specs such as int8,int4+zstd")
    for spec in codecs:
        make_codec(spec)  # ConfigError on a bad spec, naming the valid ones


def run(config: CodecsBenchConfig | None = None, progress: Progress | None = None) -> dict:
    """Benchmark codecs on one thread; return a JSON-serialisable dict of medians and ratios."""
    config = config or CodecsBenchConfig()
    numel, repeat = config.numel, config.repeat
    names = list(config.codecs) if config.codecs else list(DEFAULT_CODECS)
    check_arguments(numel, repeat, names)
    progress = progress or Progress("codecs", enabled=False)
    prev_threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        x = torch.randn(numel, generator=torch.Generator().manual_seed(1234))
        fp32_bytes = 4 * numel
        dst = torch.empty_like(x)
        memcpy_s = median_seconds(lambda: dst.copy_(x), repeat)
        result: dict = {
            "numel": numel,
            "repeat": repeat,
            "threads": 1,
            "native_kernels": kernels_status().available,
            "native_kernels_detail": kernels_status().detail,
            "baseline": {"memcpy_s": memcpy_s, "memcpy_gbps": fp32_bytes / memcpy_s / 1e9},
            "codecs": {},
        }
        for name in names:
            progress.begin(name)
            codec = make_codec(name)
            payload = codec.encode(x)
            out = torch.empty_like(x)
            # Timed at once, inside this iteration: the lambdas see this codec's values.
            enc_s = median_seconds(lambda: codec.encode(x), repeat)  # noqa: B023
            dec_s = median_seconds(lambda: codec.decode(payload, numel, out=out), repeat)  # noqa: B023
            round_s = enc_s + dec_s
            result["codecs"][name] = {
                "encode_s": enc_s,
                "decode_s": dec_s,
                "encode_gbps": fp32_bytes / enc_s / 1e9,
                "decode_gbps": fp32_bytes / dec_s / 1e9,
                "roundtrip_gbps": fp32_bytes / round_s / 1e9,
                "bytes_over_fp32": len(payload) / fp32_bytes,
                "max_abs_error": float((out - x).abs().max()),
                "roundtrip_time_over_memcpy": round_s / memcpy_s,
            }
            progress.end(f"round trip {result['codecs'][name]['roundtrip_gbps']:.2f} GB/s")
        return result
    finally:
        torch.set_num_threads(prev_threads)


def _table(result: dict) -> str:
    base = result["baseline"]
    lines = [
        (
            f"numel={result['numel']} repeat={result['repeat']} threads=1  "
            f"memcpy {base['memcpy_s'] * 1e3:.2f} ms ({base['memcpy_gbps']:.2f} GB/s)"
        ),
        f"{'codec':<14}{'enc GB/s':>10}{'dec GB/s':>10}{'rt GB/s':>10}{'bytes':>8}{'x memcpy':>10}{'max err':>12}",
    ]
    for name, r in result["codecs"].items():
        lines.append(
            f"{name:<14}{r['encode_gbps']:>10.2f}{r['decode_gbps']:>10.2f}{r['roundtrip_gbps']:>10.2f}"
            f"{r['bytes_over_fp32']:>8.3f}{r['roundtrip_time_over_memcpy']:>10.1f}{r['max_abs_error']:>12.3g}"
        )
    return "\n".join(lines)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The command-line options of this benchmark (shared by ``loconet bench codecs`` and ``main``)."""
    add_bench_options(parser, CodecsBenchConfig)
    describe_report(parser, FIELDS)


def main(ns: argparse.Namespace) -> int:
    """Run from parsed options; print a table, or one JSON object with --json (progress on stderr)."""
    config = read_options(CodecsBenchConfig, ns)
    check_arguments(config.numel, config.repeat, list(config.codecs))  # before anything is timed
    with progress_for("codecs", getattr(ns, "quiet", 0)) as progress:
        result = run(config, progress)
    if ns.json:
        print_report(result, as_json=True)
    else:  # not print_report's "key: value" lines: the per-codec figures are nested dicts, which read as a table
        sys.stdout.write(_table(result) + "\n")
    return 0


def _main_argv(argv: list[str] | None) -> int:
    """``python -m peer.bench.codecs``: parse the options, then run."""
    parser = argparse.ArgumentParser(prog="loconet bench codecs", description=__doc__.splitlines()[0])
    add_arguments(parser)
    ns = parser.parse_args(argv)
    try:
        return main(ns)
    except ConfigError as exc:
        parser.error(str(exc))


if __name__ == "__main__":
    sys.exit(_main_argv(None))
