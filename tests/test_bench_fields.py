"""Every field a benchmark reports is described, in one place that feeds its ``--help`` and docs/benchmarks.md,
and every ratio's name says which way it points."""

from __future__ import annotations

import importlib
import pathlib

import pytest

from peer.bench import allreduce, codecs, statesync
from peer.bench.fields import (
    BENCH_MODULES,
    ISSUE_NAMED_RATIOS,
    RATIO_CONVENTION,
    epilog,
    render_markdown,
    undocumented,
)
from peer.cli import BENCHMARKS, build_parser

ROOT = pathlib.Path(__file__).resolve().parents[1]
OLD_NAMES = (
    "ratio_vs_memcpy", "bytes_ratio", "diloco_loss_vs_data_parallel", "data_parallel_bytes_vs_diloco",
    "streaming_peak_vs_diloco", "streaming_loss_vs_diloco", "cpu_per_heartbeat_ratio_vs_10_peers",
    "identical_final_state",
)


def fields_of(name: str) -> dict[str, str]:
    return importlib.import_module(f"peer.bench.{name}").FIELDS


def test_the_docs_page_is_generated_from_the_tables():
    # To update it: python -m peer.bench.fields > docs/benchmarks.md
    assert (ROOT / "docs" / "benchmarks.md").read_text() == render_markdown()


def test_every_benchmark_of_the_command_has_a_table():
    assert BENCH_MODULES == tuple(module for _, module, _ in BENCHMARKS)


@pytest.mark.parametrize("name", BENCH_MODULES)
def test_the_help_of_each_benchmark_ends_with_what_every_field_means(name):
    parser = build_parser("bench")
    (bench,) = [a for a in parser._actions if a.dest == "command"]
    (benches,) = [a for a in bench.choices["bench"]._actions if a.dest == "bench"]
    text = benches.choices[name].format_help()
    assert text.endswith(epilog(fields_of(name)))
    for path in fields_of(name):
        assert f"  {path}" in text


@pytest.mark.parametrize("name", BENCH_MODULES)
def test_every_ratio_is_named_a_over_b(name):
    fields = fields_of(name)
    named = [p for p in fields if p in ISSUE_NAMED_RATIOS]
    assert [p for p in fields if ("ratio" in p or "_vs_" in p) and p not in named] == []
    ratios = [p for p in fields if "_over_" in p] + named
    assert ratios, name  # every benchmark compares with a baseline
    for path in ratios:
        assert " / " in fields[path], path  # and says what it divides by what


def test_the_convention_is_written_down():
    assert RATIO_CONVENTION.startswith("Every ratio is named <cost>_<A>_over_<B>")
    assert "## Ratios" in render_markdown()


def test_no_old_ratio_name_is_left_in_the_code_or_the_docs():
    files = [*ROOT.glob("peer/**/*.py"), *ROOT.glob("docs/*.md"), ROOT / "BENCHMARKS.md", ROOT / "README.md",
             *ROOT.glob("tests/*.py")]
    found = [
        f"{f.relative_to(ROOT)}: {old}" for f in files if f.name != "test_bench_fields.py"
        for old in OLD_NAMES if old in f.read_text()
    ]
    assert found == []


def test_undocumented_names_every_path_the_table_misses():
    fields = {"a": "", "b": "", "b.c": "", "m": "", "m.*.x": "", "l": "", "l[].y": "", "whole": ""}
    report = {
        "a": 1, "b": {"c": 2, "d": 3}, "m": {"diloco": {"x": 1, "z": 2}}, "l": [{"y": 1, "w": 2}],
        "whole": {"anything": {"goes": 1}}, "e": 4,
    }
    assert undocumented(report, fields) == ["b.d", "m.*.z", "l[].w", "e"]


def test_the_codecs_report_is_documented():
    report = codecs.run(codecs.CodecsBenchConfig(numel=2048, repeat=1, codecs=("int8", "none")))
    assert undocumented(report, codecs.FIELDS) == []


@pytest.mark.timeout(120)
def test_the_statesync_report_is_documented():
    report = statesync.run(statesync.StateSyncBenchConfig(mb=0.1, repeat=1, bandwidth="10gbit"))
    assert "link_utilization" in report
    assert undocumented(report, statesync.FIELDS) == []


@pytest.mark.timeout(180)
def test_the_allreduce_report_is_documented():
    report = allreduce.run(allreduce.AllReduceBenchConfig(
        peers=2, numel=4096, codec="int8", bandwidth="10gbit", repeat=1, chunk_bytes=4096))
    assert {"baseline", "ratio_vs_gloo", "link_utilization"} <= set(report)
    assert undocumented(report, allreduce.FIELDS) == []


@pytest.mark.timeout(180)
def test_off_the_namespaces_a_capped_run_has_no_ratio_to_an_uncapped_gloo():
    # It reported ratio_vs_gloo 33.4: ours paced to --bandwidth, gloo at loopback speed.
    report = allreduce.run(allreduce.AllReduceBenchConfig(
        peers=2, numel=4096, codec="int8", bandwidth="10gbit", repeat=1, chunk_bytes=4096))
    assert report["ratio_vs_gloo"] is None and report["baseline"]["capped"] is False


@pytest.mark.timeout(180)
def test_uncapped_the_ratio_to_gloo_is_the_ratio_of_the_medians():
    report = allreduce.run(
        allreduce.AllReduceBenchConfig(peers=2, numel=4096, codec="int8", repeat=1, chunk_bytes=4096)
    )
    assert report["ratio_vs_gloo"] == report["median_s"] / report["baseline"]["median_s"]
    assert "capped" not in report["baseline"]


@pytest.mark.timeout(180)
def test_the_allreduce_benchmark_times_a_sparse_codec_with_no_error_bound():
    # It refused topk ("no per-element error bound"), so the sparse codec could not be timed there.
    report = allreduce.run(allreduce.AllReduceBenchConfig(peers=2, numel=4096, codec="topk/64", repeat=1, gloo=False))
    assert report["error_bound"] is None and report["identical_across_peers"]
    assert report["bytes_sent_per_peer"] < report["fp32_bytes"] / 8
