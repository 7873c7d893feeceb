"""``loconet bench codecs``: single-thread encode/decode throughput of every codec.

Timings on shared machines are noisy, so each figure is the median of
``repeat`` runs, and every codec is also reported relative to a memcpy of the
same tensor measured in the same run (``ratio_vs_memcpy``).
"""

from __future__ import annotations

import argparse
import sys

import torch

from collectives.codecs import make_codec
from collectives.errors import ConfigError
from peer.bench.kit import median_seconds, print_report

DEFAULT_CODECS = ["none", "fp16", "bf16", "int8", "int4", "int8+zstd", "int4+zstd"]


def run(numel: int = 16_000_000, repeat: int = 5, codecs: list[str] | None = None) -> dict:
    """Benchmark codecs on one thread; return a JSON-serialisable dict of medians and ratios."""
    names = list(codecs) if codecs else list(DEFAULT_CODECS)
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
            "baseline": {"memcpy_s": memcpy_s, "memcpy_gbps": fp32_bytes / memcpy_s / 1e9},
            "codecs": {},
        }
        for name in names:
            codec = make_codec(name)
            payload = codec.encode(x)
            out = torch.empty_like(x)
            enc_s = median_seconds(lambda: codec.encode(x), repeat)
            dec_s = median_seconds(lambda: codec.decode(payload, numel, out=out), repeat)
            round_s = enc_s + dec_s
            result["codecs"][name] = {
                "encode_s": enc_s,
                "decode_s": dec_s,
                "encode_gbps": fp32_bytes / enc_s / 1e9,
                "decode_gbps": fp32_bytes / dec_s / 1e9,
                "roundtrip_gbps": fp32_bytes / round_s / 1e9,
                "bytes_ratio": len(payload) / fp32_bytes,
                "max_abs_error": float((out - x).abs().max()) if numel else 0.0,
                "ratio_vs_memcpy": round_s / memcpy_s,
            }
        return result
    finally:
        torch.set_num_threads(prev_threads)


def _table(result: dict) -> str:
    base = result["baseline"]
    lines = [
        f"numel={result['numel']} repeat={result['repeat']} threads=1  "
        f"memcpy {base['memcpy_s'] * 1e3:.2f} ms ({base['memcpy_gbps']:.2f} GB/s)",
        f"{'codec':<14}{'enc GB/s':>10}{'dec GB/s':>10}{'rt GB/s':>10}{'bytes':>8}{'x memcpy':>10}{'max err':>12}",
    ]
    for name, r in result["codecs"].items():
        lines.append(
            f"{name:<14}{r['encode_gbps']:>10.2f}{r['decode_gbps']:>10.2f}{r['roundtrip_gbps']:>10.2f}"
            f"{r['bytes_ratio']:>8.3f}{r['ratio_vs_memcpy']:>10.1f}{r['max_abs_error']:>12.3g}"
        )
    return "\n".join(lines)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The command-line options of this benchmark (shared by ``loconet bench codecs`` and ``main``)."""
    parser.add_argument("--numel", type=int, default=16_000_000, help="fp32 elements per tensor (default 16M)")
    parser.add_argument("--repeat", type=int, default=5, help="timed runs per measurement; the median is reported")
    parser.add_argument("--codecs", default=",".join(DEFAULT_CODECS), help="comma-separated codec specs")
    parser.add_argument("--json", action="store_true", help="print the result as one JSON object")


def main(ns: argparse.Namespace) -> int:
    """Run from parsed options; print a table, or one JSON object with --json."""
    if ns.numel < 0 or ns.repeat < 1:
        raise ConfigError(f"--numel must be >= 0 and --repeat >= 1, got {ns.numel} and {ns.repeat}")
    codecs = [c.strip() for c in ns.codecs.split(",") if c.strip()]
    for spec in codecs:
        make_codec(spec)  # ConfigError on a bad spec before anything is timed
    result = run(numel=ns.numel, repeat=ns.repeat, codecs=codecs)
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
