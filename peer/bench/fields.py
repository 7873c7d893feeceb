"""What every field of a benchmark's report means: one table per benchmark, the single source of its ``--help``
epilog and of docs/benchmarks.md (``python -m peer.bench.fields > docs/benchmarks.md`` writes that page).

A table maps a field's path to its meaning. ``a.b`` is key ``b`` of the dict ``a``; ``a.*.b`` is key
``b`` of every entry of ``a`` when its entries are keyed by name (codecs, methods); ``a[].b`` is key
``b`` of every item of the list ``a``. A path whose value is a dict or a list, with no path documented
under it, is described as a whole (a latency summary, the run's configuration).
"""

from __future__ import annotations

import argparse
import importlib
import re
import shutil
import sys
import textwrap

Fields = dict[str, str]

# The benchmark modules of ``loconet bench`` (peer/cli.py's BENCHMARKS names the same; a test checks it).
BENCH_MODULES = ("allreduce", "codecs", "transport", "statesync", "diloco", "membership", "federated", "coding", "gpu",
                 "hetero")

# Ratios whose names an issue spells out (other checks read them), kept in spite of the convention below.
ISSUE_NAMED_RATIOS = ("ratio_vs_gloo",)

RATIO_CONVENTION = (
    "Every ratio is named <cost>_<A>_over_<B> (or <cost>_over_<B> when A is what the report measures) and is "
    "A's cost divided by B's. Every cost is lower-is-better (time, bytes, loss, CPU), so below 1 means A "
    "does better than B and above 1 worse: bytes_data_parallel_over_diloco 188 means data-parallel sends 188x "
    "the bytes of DiLoCo. One name keeps the older form because the WAN issue and its checks read it: "
    "bench allreduce's ratio_vs_gloo is our time over gloo's, so 0.8 means ours takes 0.8x gloo's time. "
    "Shares are named "
    "*_utilization: link_utilization is the part of a capped link a transfer kept busy (higher is better), "
    "*cpu_utilization the CPU seconds per wall second, in cores (lower is better)."
)

SUMMARY = "a distribution: {p50, p99, max, n} (n samples; null without samples)"


def _has_children(fields: Fields, path: str) -> bool:
    return any(f.startswith((path + ".", path + "[]")) for f in fields)


def undocumented(report: dict, fields: Fields) -> list[str]:
    """The paths of report's fields that ``fields`` does not describe, in report order."""
    missing: list[str] = []

    def walk_dict(d: dict, prefix: str) -> None:
        for key, value in d.items():
            path = f"{prefix}.{key}" if prefix else str(key)
            star = f"{prefix}.*"
            if path in fields:
                check(path, value)
            elif prefix and isinstance(value, dict) and _has_children(fields, star):
                walk_dict(value, star)  # an entry keyed by name: described once for all
            else:
                missing.append(path)

    def check(path: str, value: object) -> None:
        if not _has_children(fields, path):
            return  # described as a whole
        if isinstance(value, dict):
            walk_dict(value, path)
        elif isinstance(value, list):
            for item in value:
                if isinstance(item, dict):
                    walk_dict(item, path + "[]")

    walk_dict(report, "")
    return list(dict.fromkeys(missing))


def epilog(fields: Fields, width: int | None = None) -> str:
    """The fields as an aligned two-column list for a ``--help`` epilog, then the ratio convention."""
    if width is None:  # as wide as argparse draws the options above it
        width = max(60, min(100, shutil.get_terminal_size().columns - 2))
    column = min(max(len(f) for f in fields), 34) + 4
    lines = ["report fields (--json prints them as one JSON object):"]
    for path, meaning in fields.items():
        head = f"  {path}"
        if len(head) + 2 > column:  # a long name: its meaning starts on the next line
            lines.append(head)
            head = ""
        lines += textwrap.wrap(
            meaning, width, initial_indent=head.ljust(column), subsequent_indent=" " * column
        ) or [head]
    lines += ["", *textwrap.wrap("Ratios. " + RATIO_CONVENTION, width)]
    return "\n".join(lines) + "\n"


def _keep_epilog_lines(base: type[argparse.HelpFormatter]) -> type[argparse.HelpFormatter]:
    """base, printing the (already wrapped) description and epilog line by line instead of refilling them."""

    class ReportHelpFormatter(base):  # type: ignore[valid-type, misc]
        def _fill_text(self, text: str, width: int, indent: str) -> str:
            return "".join(indent + line for line in text.splitlines(keepends=True))

    return ReportHelpFormatter


def describe_report(parser: argparse.ArgumentParser, fields: Fields) -> None:
    """Make parser's ``--help`` end with what every field of the report means."""
    parser.formatter_class = _keep_epilog_lines(parser.formatter_class)
    parser.epilog = epilog(fields)


def _cell(text: str) -> str:
    """text inside a Markdown table cell: its pipes and angle brackets escaped."""
    return text.replace("|", "\\|").replace("<", "\\<")


def _code_names(text: str) -> str:
    """text with its field names and name patterns (every word with an underscore) as Markdown code."""
    return re.sub(r"([\w<>*]*_[\w<>*]*)", r"`\1`", text)


def _summary_line(module: object) -> str:
    """The first line of a benchmark module's docstring, without its leading ``loconet bench X``: label."""
    first = (module.__doc__ or "").strip().splitlines()[0]
    text = re.sub(r"^``[^`]+``:\s*", "", first)
    return text[:1].upper() + text[1:]


def render_markdown() -> str:
    """docs/benchmarks.md: the ratio convention, then every benchmark's fields."""
    out = [
        "# Benchmark reports: what every field means",
        "",
        "Generated from the `FIELDS` table of each `peer/bench/<name>.py` by `python -m peer.bench.fields`;",
        "the same tables end each `loconet bench <name> --help`. `tests/test_bench_fields.py` checks that",
        "this page is up to date and that every field a benchmark reports is described here.",
        "Measured figures and how to read them are in `BENCHMARKS.md`.",
        "",
        "Each `loconet bench ...` prints its report on stdout (one JSON object with `--json`); progress goes",
        "to stderr (a live line on a terminal, one line per finished run otherwise; none with `-q`).",
        "",
        "## Ratios",
        "",
        *textwrap.wrap(_code_names(RATIO_CONVENTION), 100, break_on_hyphens=False),
        "",
        "## Paths",
        "",
        "`a.b` is key `b` of the object `a`; `a.*.b` is key `b` of every entry of `a` (entries keyed by",
        "name: codecs, methods); `a[].b` is key `b` of every item of the list `a`.",
    ]
    for name in BENCH_MODULES:
        module = importlib.import_module(f"peer.bench.{name}")
        out += ["", f"## `loconet bench {name}`", "", _summary_line(module), "",
                "| field | meaning |", "| --- | --- |"]
        out += [f"| `{path}` | {_cell(meaning)} |" for path, meaning in module.FIELDS.items()]
    return "\n".join(out) + "\n"


if __name__ == "__main__":
    sys.stdout.write(render_markdown())
