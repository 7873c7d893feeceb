"""``loconet bench allreduce --hivemind``: hivemind's all-reduce as a second baseline, run by its own interpreter.

hivemind is not a dependency: these tests drive the launcher with stand-in interpreters (shell scripts), and the
one end-to-end test runs only when LOCONET_HIVEMIND_PYTHON names an interpreter that has hivemind.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch

from collectives.errors import ConfigError
from collectives.hosts.identity import process_start
from peer.bench import hivemind_baseline as hb
from peer.cli import main
from peer.harness.processes import ChildFailed
from peer.harness.procgroup import AllReduceJob, worker_tensor
from tests.support.standins import HIVEMIND_PYTHON, fake_python


@pytest.mark.parametrize(
    ("codec", "chosen", "expected"),
    [
        ("int8", None, "int8"),
        ("none", None, "none"),
        ("fp16", None, "fp16"),
        ("bf16", None, "none"),
        ("int4", None, "none"),
        ("topk", None, "none"),
        ("int8", "quantile8", "quantile8"),
        ("int4", "int8", "int8"),
    ],
)
def test_the_compression_compared_is_the_chosen_one_else_the_codecs_counterpart_else_fp32(codec, chosen, expected):
    assert hb.counterpart(codec, chosen) == expected


def test_an_unknown_hivemind_compression_is_refused():
    with pytest.raises(ConfigError, match="--hivemind-codec must be one of none, fp16, int8, quantile8"):
        hb.counterpart("int8", "int4")


def test_an_interpreter_without_hivemind_is_refused_with_how_to_install_it(tmp_path):
    python = fake_python(tmp_path, "echo \"ModuleNotFoundError: No module named 'hivemind'\" >&2; exit 1")
    with pytest.raises(ConfigError) as caught:
        hb.probe(python, "int8")
    message = str(caught.value)
    assert (
        f"{python} cannot run hivemind's int8 all-reduce (ModuleNotFoundError: No module named 'hivemind')" in message
    )
    assert "pip install torch==2.13.0 hivemind==1.1.12 'numpy<2'" in message


def test_an_interpreter_that_does_not_run_is_refused(tmp_path):
    with pytest.raises(ConfigError, match=f"--hivemind {tmp_path / 'nothing'} does not run"):
        hb.probe(str(tmp_path / "nothing"), "none")


def test_the_probe_runs_the_worker_script_for_the_compression_and_returns_the_version_it_prints(tmp_path):
    python = fake_python(tmp_path, 'echo "$@" > ' + str(tmp_path / "args") + "; echo 1.1.12")
    assert hb.probe(python, "fp16") == "1.1.12"
    script, *options = (tmp_path / "args").read_text().split()
    assert Path(script).name == "hivemind_worker.py"
    assert options == ["--probe", "--codec", "fp16"]


def test_a_compression_that_fails_its_round_trip_is_refused(tmp_path):
    # hivemind 1.1.12's 8-bit codecs under numpy 2: the averager would leave the failed parts out of the average.
    python = fake_python(tmp_path, 'echo "TypeError: only 0-dimensional arrays can be converted" >&2; exit 1')
    with pytest.raises(ConfigError, match=r"cannot run hivemind's int8 all-reduce \(TypeError: only 0-dim"):
        hb.probe(python, "int8")


def test_the_cli_refuses_a_missing_hivemind_in_one_line_before_any_worker(tmp_path, monkeypatch, capsys):
    def forbidden(*args, **kwargs):
        raise AssertionError("a worker was started before hivemind was found")

    monkeypatch.setattr("peer.harness.procgroup.ProcessGroup.__init__", forbidden)
    python = fake_python(tmp_path, "echo 'No module named hivemind' >&2; exit 1")
    code = main(["bench", "allreduce", "--numel", "1000", "--hivemind", python, "--json"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2  # a usage error, as every bad argument
    assert len(err) == 1
    assert err[0].startswith(f"loconet: error: --hivemind: {python} cannot run hivemind's int8 all-reduce")


def test_a_worker_that_fails_is_named_with_its_last_error_line(tmp_path):
    python = fake_python(tmp_path, 'echo "warming up" >&2; echo "RuntimeError: no group" >&2; exit 3')
    job = hb.HivemindJob(python=python, peers=2, numel=10, repeat=1, codec="int8", timeout_s=5.0)
    with pytest.raises(ChildFailed, match=r"hivemind worker 0 exited with 3: RuntimeError: no group"):
        hb.run_workers(job, [[], []], ["127.0.0.1", "127.0.0.1"])


def test_a_worker_that_writes_no_report_fails_the_baseline(tmp_path):
    job = hb.HivemindJob(python=fake_python(tmp_path, "exit 0"), peers=1, numel=10, repeat=1, codec="none",
                         timeout_s=5.0)
    with pytest.raises(ChildFailed, match="hivemind worker 0 wrote no report"):
        hb.run_workers(job, [[]], ["127.0.0.1"])


@pytest.mark.timeout(60)
def test_workers_get_their_rank_address_and_the_job_and_leave_no_process_behind(tmp_path):
    # The stand-in leaves a child of its own running in its session, then reports its arguments.
    children = tmp_path / "children"
    report = "a = sys.argv[1:]; o = dict(zip(a[1::2], a[2::2]))\n" \
        "Path(o['--meet'], 'report-' + o['--rank'] + '.json').write_text(json.dumps({'argv': a}))"
    body = f'sleep 300 & echo $! >> {children}\npython3 -c "import json, sys; from pathlib import Path\n{report}" "$@"'
    job = hb.HivemindJob(python=fake_python(tmp_path, body), peers=2, numel=7, repeat=3, codec="fp16", timeout_s=9.0)
    reports = hb.run_workers(job, [[], ["env"]], ["10.0.0.1", "10.0.0.2"])
    for rank, report in enumerate(reports):
        argv = report["argv"]
        assert report["log_warnings"] == []
        options = dict(zip(argv[1::2], argv[2::2]))
        assert Path(argv[0]).name == "hivemind_worker.py"
        assert options == {
            "--rank": str(rank), "--peers": "2", "--numel": "7", "--repeat": "3", "--codec": "fp16",
            "--ip": f"10.0.0.{rank + 1}", "--meet": str(Path(argv[0]).parent), "--seed": "1", "--timeout": "9.0",
        }
    pids = children.read_text().split()
    assert len(pids) == 2
    assert [p for p in pids if process_start(int(p)) is not None] == []  # gone, or a zombie holding nothing


def worker_report(times, cpus, errors, digests, warnings=()) -> dict:
    """A worker's report, as hivemind_worker.py writes it."""
    return {"times_s": times, "release_late_s": [0.001 * t for t in times], "cpu_s": cpus,
            "max_abs_error_per_round": errors, "max_abs_error": max(errors), "sha256_per_round": digests,
            "log_warnings": list(warnings)}


def test_the_summary_takes_the_slowest_peer_per_round_and_medians_over_rounds():
    job = hb.HivemindJob(python="python", peers=4, numel=1000, repeat=2, codec="int8", timeout_s=5.0)
    reports = [
        worker_report([1.0, 3.0], [0.5, 0.25], [0.25, 0.125], ["a", "c"]),
        worker_report([2.0, 1.0], [1.0, 0.75], [0.0625, 0.5], ["b", "c"]),
    ]
    summary = hb.summarise(job, "1.1.12", reports, wire_per_round=2000.0, bandwidth_bps=8000.0)
    assert summary["times_s"] == [2.0, 3.0]
    assert summary["release_late_s_max"] == 0.003
    assert summary["median_s"] == 2.5
    assert summary["cpu_s_per_round"] == 1.25  # rounds sum 1.5 and 1.0
    assert summary["bytes_sent_per_peer"] == 1500.0  # 2 x 3/4 x 1000 values x 1 byte
    assert summary["link_utilization"] == 1500.0 * 8 / 8000.0 / 2.5
    assert summary["wire_bytes_per_round"] == 2000.0
    assert summary["max_abs_error"] == 0.5
    assert summary["max_abs_error_per_round"] == [0.25, 0.5]
    assert summary["identical_across_peers"] is False  # round 1 differs, round 2 not
    assert summary["method"] == "hivemind DecentralizedAverager all-reduce, Uniform8BitQuantization"


def test_without_a_cap_or_namespaces_the_summary_has_no_utilisation_or_wire():
    job = hb.HivemindJob(python="python", peers=2, numel=10, repeat=1, codec="none", timeout_s=5.0)
    reports = [worker_report([1.0], [0.1], [0.0], ["a"])] * 2
    summary = hb.summarise(job, "1.1.12", reports, wire_per_round=None, bandwidth_bps=None)
    assert "link_utilization" not in summary and "wire_bytes_per_round" not in summary
    assert summary["identical_across_peers"] is True


@pytest.mark.skipif(not HIVEMIND_PYTHON, reason="set LOCONET_HIVEMIND_PYTHON to an interpreter with hivemind")
@pytest.mark.timeout(240)
def test_hivemind_averages_the_peers_tensors_in_fp32_within_rounding():
    job = hb.HivemindJob(python=HIVEMIND_PYTHON, peers=2, numel=10_000, repeat=1, codec="none", timeout_s=60.0)
    reports = hb.run_workers(job, [[], []], ["127.0.0.1", "127.0.0.1"])
    assert [len(r["times_s"]) for r in reports] == [1, 1]
    assert max(r["max_abs_error"] for r in reports) < 1e-6


def test_the_worker_script_imports_nothing_of_loconet():
    source = Path(hb.WORKER).read_text()
    for package in ("collectives", "optimizers", "peer", "protos"):
        assert f"from {package}" not in source and f"import {package}" not in source


def test_hivemind_warnings_are_read_from_its_log_without_times_or_line_numbers():
    log = (
        "Dec 05 04:20:35.355 [WARN] [hivemind.averaging.allreduce.run:123] peer x sent nothing\n"
        "Dec 05 04:20:35.400 [INFO] [hivemind.dht.dht.run:9] started\n"
        "a traceback line\n"
        "Dec 05 04:20:36.000 [ERROR] [hivemind.averaging.averager._step:301] Caught TimeoutError()\n"
    )
    assert hb.log_warnings(log) == [
        "WARN hivemind.averaging.allreduce.run: peer x sent nothing",
        "ERROR hivemind.averaging.averager._step: Caught TimeoutError()",
    ]


def test_the_summary_counts_the_same_warning_of_every_peer_together():
    job = hb.HivemindJob(python="python", peers=2, numel=10, repeat=1, codec="none", timeout_s=5.0)
    late = "WARN hivemind.averaging.allreduce.run: peer x sent nothing"
    reports = [
        worker_report([1.0], [0.1], [0.0], ["a"], warnings=[late, late]),
        worker_report([1.0], [0.1], [0.0], ["a"], warnings=[late, "ERROR m: x"]),
    ]
    summary = hb.summarise(job, "1.1.12", reports, wire_per_round=None, bandwidth_bps=None)
    assert summary["log_warnings"] == {late: 3, "ERROR m: x": 1}


def test_the_worker_averages_the_same_tensors_as_loconets_workers():
    spec = importlib.util.spec_from_file_location("hivemind_worker", hb.WORKER)
    worker = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(worker)  # its imports at the top are the standard library's only
    for rank in range(3):
        ours = worker_tensor(AllReduceJob(numel=1000, seed=1), rank)
        assert torch.equal(worker._tensor(1, rank, 1000), ours)
