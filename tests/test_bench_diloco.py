"""``loconet bench diloco`` end to end at the smallest size: every method, its report and its progress.

One run of the real command (2 peers, 8 steps, a tiny model) serves every test here. Losses and
times are reported, never asserted against a threshold (shared, noisy machines).
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time

import pytest

from peer.bench import diloco
from peer.bench.fields import undocumented
from peer.cli import build_parser

pytestmark = pytest.mark.timeout(600)

TINY = [
    "--peers", "2", "--steps", "8", "--sync-every", "4", "--fragments", "2", "--overlap", "1",
    "--d-model", "16", "--layers", "1", "--heads", "2", "--batch-size", "4", "--seq-len", "16", "--eval-batches", "1",
]
METHODS = ["diloco", "streaming", "data_parallel", "one_peer"]


@pytest.fixture(scope="module")
def bench_run() -> subprocess.CompletedProcess:
    """``loconet bench diloco --json`` at the smallest size, stdout and stderr captured (not a terminal)."""
    return subprocess.run(
        [sys.executable, "-m", "peer.cli", "bench", "diloco", "--methods", ",".join(METHODS), *TINY, "--json"],
        capture_output=True, text=True, timeout=580, check=False,
    )


@pytest.fixture(scope="module")
def report(bench_run) -> dict:
    assert bench_run.returncode == 0, bench_run.stderr
    return json.loads(bench_run.stdout)


def test_stdout_is_the_report_alone(bench_run, report):
    assert bench_run.stdout.count("\n") == 1 and bench_run.stdout.endswith("}\n")
    assert list(report["methods"]) == METHODS


def test_stderr_has_one_line_per_finished_method_in_order(bench_run):
    assert "Traceback" not in bench_run.stderr
    notes = [line for line in bench_run.stderr.splitlines() if line.startswith("loconet bench diloco: ")]
    assert [re.sub(r" done in .*", "", line) for line in notes] == [
        f"loconet bench diloco: {name} [{i}/4]" for i, name in enumerate(METHODS, 1)
    ]
    assert "\r" not in bench_run.stderr  # no live line when stderr is not a terminal


def test_every_field_of_the_report_is_documented(report):
    assert undocumented(report, diloco.FIELDS) == []


def test_ours_compare_the_global_parameters_and_report_the_local_models_spread(report):
    for name in ("diloco", "streaming"):
        method = report["methods"][name]
        assert method["identical_global_params"] is True
        losses = method["final_eval_loss_per_peer"]
        assert len(losses) == 2
        assert method["local_eval_loss_spread"] == max(losses) - min(losses)
    # 8 steps, syncing every 4: DiLoCo's peers end on the global parameters, so their local models agree.
    assert report["methods"]["diloco"]["local_eval_loss_spread"] == 0.0


def test_ratios_divide_the_first_named_cost_by_the_second(report):
    m = report["methods"]
    assert (
        report["loss_diloco_over_data_parallel"]
        == m["diloco"]["final_eval_loss"] / m["data_parallel"]["final_eval_loss"]
    )
    assert report["bytes_data_parallel_over_diloco"] == (
        m["data_parallel"]["bytes_sent_per_peer"] / m["diloco"]["bytes_sent_per_peer"]
    )
    assert report["peak_bytes_streaming_over_diloco"] == (
        m["streaming"]["peak_bytes_per_sync"] / m["diloco"]["peak_bytes_per_sync"]
    )
    assert report["loss_streaming_over_diloco"] == m["streaming"]["final_eval_loss"] / m["diloco"]["final_eval_loss"]
    assert report["wall_s_diloco_over_data_parallel"] == m["diloco"]["wall_s"] / m["data_parallel"]["wall_s"]
    # Data-parallel sends its per-step all-reduce once per step.
    assert m["data_parallel"]["bytes_sent_per_peer"] == m["data_parallel"]["peak_bytes_per_sync"] * 8


@pytest.mark.timeout(300)
def test_an_interrupted_data_parallel_run_leaves_no_worker_behind(monkeypatch):
    # Workers that would train for a long while; the interrupt comes once they run.
    config = diloco.bench_config(build_parser("bench").parse_args(
        ["bench", "diloco", "--methods", "data_parallel", "--peers", "2", "--steps", "100000", "--d-model", "16",
         "--layers", "1", "--heads", "2", "--batch-size", "4", "--seq-len", "16", "--eval-batches", "1"]))
    started: list = []

    def interrupted(procs, logs, out, timeout_s):
        started.extend(procs)
        while not all(p.is_alive() for p in procs):
            time.sleep(0.05)
        raise KeyboardInterrupt

    monkeypatch.setattr(diloco, "_gather_results", interrupted)
    with pytest.raises(KeyboardInterrupt):
        diloco.run_data_parallel(config)
    assert len(started) == 2
    assert [p.is_alive() for p in started] == [False, False]
