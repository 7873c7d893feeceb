"""``loconet bench diloco --hivemind``: hivemind.Optimizer (local updates) trains the same task as a baseline.

hivemind is not a dependency: these tests drive the launcher with stand-in interpreters (shell scripts), and the
one end-to-end test runs only when LOCONET_HIVEMIND_PYTHON names an interpreter that has hivemind.
"""

from __future__ import annotations

import json
import logging
import math
import os
from pathlib import Path

import pytest

from collectives.errors import ConfigError
from peer.bench import diloco
from peer.bench import hivemind_training as ht
from peer.bench.hivemind_trainer import RoundCounter
from peer.cli import build_parser, main
from peer.tasks.base import TaskConfig
from tests.support.standins import HIVEMIND_PYTHON, fake_python


def bench_config(*args: str) -> diloco.BenchConfig:
    return diloco.bench_config(build_parser("bench").parse_args(["bench", "diloco", *args]))


def job(**changes) -> ht.HivemindTraining:
    base = {"python": "python", "peers": 2, "task": "synthetic-lm", "task_config": TaskConfig(), "steps": 40,
            "sync_every": 10, "inner": "adamw", "inner_lr": 0.003, "weight_decay": 0.01, "codec": "int8"}
    return ht.HivemindTraining(**{**base, **changes})


def test_hivemind_averages_as_often_as_diloco_syncs_with_the_counterpart_of_its_codec():
    config = bench_config("--methods", "diloco", "--steps", "60", "--sync-every", "20", "--codec", "fp16",
                          "--inner-lr", "0.01", "--hivemind", "/opt/hm/python")
    made = diloco.hivemind_job(config)
    assert (made.python, made.peers, made.steps, made.sync_every, made.codec) == ("/opt/hm/python", 4, 60, 20, "fp16")
    assert (made.inner, made.inner_lr, made.weight_decay, made.device) == ("adamw", 0.01, 0.01, "cpu")


@pytest.mark.parametrize(
    ("codec", "chosen", "expected"), [("topk/64", None, "none"), ("int8", "quantile8", "quantile8")]
)
def test_a_codec_hivemind_lacks_is_compared_with_fp32_unless_one_is_chosen(codec, chosen, expected):
    extra = ["--hivemind-codec", chosen] if chosen else []
    config = bench_config("--methods", "diloco", "--codec", codec, "--hivemind", "py", *extra)
    assert diloco.hivemind_job(config).codec == expected


def test_a_hivemind_codec_without_hivemind_is_refused():
    with pytest.raises(ConfigError, match="--hivemind-codec chooses hivemind's compression: give --hivemind too"):
        bench_config("--methods", "diloco", "--hivemind-codec", "int8")


def test_a_trainer_gets_the_task_the_loop_and_its_rank():
    argv = ht.trainer_argv(job(), 1, Path("/meet"))
    assert argv[:3] == ["python", "-m", "peer.bench.hivemind_trainer"]
    options = dict(zip(argv[3::2], argv[4::2]))
    assert json.loads(options.pop("--task-config")) == json.loads(json.dumps(TaskConfig().__dict__))
    assert options == {
        "--task": "synthetic-lm", "--codec": "int8", "--rank": "1", "--peers": "2", "--steps": "40",
        "--sync-every": "10", "--inner": "adamw", "--inner-lr": "0.003", "--weight-decay": "0.01",
        "--device": "cpu", "--meet": "/meet", "--timeout": "60.0", "--host": "127.0.0.1",
    }


def test_the_trainers_find_loconets_task_code_first_on_their_path(monkeypatch):
    monkeypatch.setenv("PYTHONPATH", "/elsewhere")
    assert ht.trainer_env()["PYTHONPATH"].split(os.pathsep) == [str(ht.ROOT), "/elsewhere"]
    assert (ht.ROOT / "peer" / "bench" / "hivemind_trainer.py").exists()


def test_the_bytes_of_a_round_are_its_butterflys_payload_and_nothing_alone():
    assert ht.round_bytes(4, 1000, "int8") == 1500.0  # 2 x 3/4 x 1 B x 1000
    assert ht.round_bytes(2, 1000, "none") == 4000.0  # 2 x 1/2 x 4 B x 1000
    assert ht.round_bytes(1, 1000, "none") == 0.0  # a peer alone sends nothing


def trainer_report(loss: float, groups: list[int], train_s: float = 5.0, **extra) -> dict:
    return {"final_eval_loss": loss, "averaged_groups": groups, "averaging_failures": 0, "state_loads": 0,
            "epochs": 4, "numel": 1000, "train_s": train_s, "loop_s": train_s - 1, "log_warnings": [], **extra}


def test_the_summary_counts_each_peers_rounds_at_their_group_size():
    reports = [trainer_report(2.0, [2, 2, 2], train_s=5.0), trainer_report(2.5, [2, 2], train_s=6.0,
                                                                          averaging_failures=1, state_loads=1)]
    summary = ht.summarise(job(codec="none"), "1.1.12", reports, wall_s=9.0)
    assert summary["final_eval_loss"] == 2.25
    assert summary["final_eval_loss_per_peer"] == [2.0, 2.5]
    assert summary["local_eval_loss_spread"] == 0.5
    assert summary["bytes_sent_per_peer"] == (3 * 4000 + 2 * 4000) / 2
    assert summary["peak_bytes_per_sync"] == 4000
    assert summary["rounds"] == 2.5
    assert summary["group_sizes"] == {2: 5}
    assert (summary["averaging_failures"], summary["state_loads"]) == (1, 1)
    assert (summary["wall_s"], summary["train_s"], summary["loop_s"]) == (9.0, 6.0, 5.0)


def test_hiveminds_log_lines_are_counted_as_rounds_failures_and_state_loads():
    counter = RoundCounter()
    logger = logging.getLogger("hivemind.optim.state_averager.test")
    logger.addHandler(counter)
    logger.setLevel(logging.INFO)
    try:
        for message in (
            "Averaged parameters with 4 peers",
            "Averaged parameters with 3 peers",
            "Averaging failed with <class 'TimeoutError'>",
            "Peer is out of sync",
            "Transitioning to epoch 2",
        ):
            logger.info(message)
    finally:
        logger.removeHandler(counter)
    assert (counter.groups, counter.failures, counter.state_loads) == ([4, 3], 1, 1)


def test_a_stand_in_trainers_reports_make_the_method(tmp_path):
    # The stand-in writes a report for its rank, as hivemind_trainer.py does.
    write = ("a = sys.argv[3:]; o = dict(zip(a[0::2], a[1::2])); Path(o['--meet'], 'report-' + o['--rank'] + '.json')"
             ".write_text(json.dumps({'final_eval_loss': 1.5, 'averaged_groups': [2], 'averaging_failures': 0, "
             "'state_loads': 0, 'epochs': 1, 'numel': 10, 'train_s': 1.0, 'loop_s': 0.5}))")
    python = fake_python(tmp_path, f'python3 -c "import json, sys; from pathlib import Path\n{write}" "$@"')
    summary = ht.run(job(python=python, codec="none"), "stand-in", [[], []], ["127.0.0.1", "127.0.0.1"])
    assert summary["rounds"] == 1 and summary["bytes_sent_per_peer"] == 40.0
    assert summary["version"] == "stand-in"


def test_each_trainer_runs_behind_its_prefix_and_serves_on_its_host(tmp_path):
    # The stand-in notes the host it was given and the variable its prefix set, then reports as a trainer does.
    seen = tmp_path / "seen"
    seen.mkdir()
    write = ("a = sys.argv[3:]; o = dict(zip(a[0::2], a[1::2])); "
             f"Path({str(seen)!r}, o['--rank']).write_text(o['--host'] + ' ' + os.environ['BEHIND']); "
             "Path(o['--meet'], 'report-' + o['--rank'] + '.json').write_text(json.dumps({'final_eval_loss': 1.5, "
             "'averaged_groups': [2], 'averaging_failures': 0, 'state_loads': 0, 'epochs': 1, 'numel': 10, "
             "'train_s': 1.0, 'loop_s': 0.5}))")
    python = fake_python(tmp_path, f'python3 -c "import json, os, sys; from pathlib import Path\n{write}" "$@"')
    prefixes = [["env", "BEHIND=ns0"], ["env", "BEHIND=ns1"]]
    ht.run(job(python=python, codec="none"), "stand-in", prefixes, ["10.0.0.2", "10.0.0.3"])
    assert [(seen / str(r)).read_text() for r in range(2)] == ["10.0.0.2 ns0", "10.0.0.3 ns1"]


def test_the_cli_refuses_a_hivemind_that_cannot_train_in_one_line_before_any_run(tmp_path, monkeypatch, capsys):
    def forbidden(*args, **kwargs):
        raise AssertionError("a method ran before hivemind was found")

    monkeypatch.setattr(diloco, "run_ours", forbidden)
    python = fake_python(tmp_path, "echo \"ModuleNotFoundError: No module named 'hivemind'\" >&2; exit 1")
    code = main(["bench", "diloco", "--methods", "diloco", "--hivemind", python, "--json"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2
    assert len(err) == 1
    assert err[0].startswith(f"loconet: error: --hivemind: {python} cannot run hivemind's training of synthetic-lm "
                             "(int8 averaging) (ModuleNotFoundError: No module named 'hivemind')")


@pytest.mark.skipif(not HIVEMIND_PYTHON, reason="set LOCONET_HIVEMIND_PYTHON to an interpreter with hivemind")
@pytest.mark.timeout(600)
def test_hivemind_trains_the_task_and_its_bytes_are_its_logged_rounds():
    config = bench_config("--methods", "diloco", "--peers", "2", "--steps", "100", "--sync-every", "25",
                          "--hivemind", str(HIVEMIND_PYTHON))
    report = diloco.run(config)
    hivemind = report["methods"]["hivemind"]
    assert math.isfinite(hivemind["final_eval_loss"])
    assert hivemind["epochs"] >= 1
    # Short runs on a busy machine may average fewer times than they have epochs (hivemind's matchmaking): the
    # bytes are what the rounds it did carry, in groups of the two peers.
    assert set(hivemind["group_sizes"]) <= {2}
    assert hivemind["bytes_sent_per_peer"] == hivemind["rounds"] * ht.round_bytes(2, hivemind_numel(), "int8")
    assert report["loss_diloco_over_hivemind"] > 0


def hivemind_numel() -> int:
    from peer.tasks.registry import make_task

    return sum(p.numel() for p in make_task("synthetic-lm", TaskConfig()).build_model().parameters())
