"""The help teaches: every option says what it does and its default, and the usual conventions hold."""

from __future__ import annotations

import argparse
import logging
import subprocess
import sys

import pytest

from peer.cli import BENCHMARKS, _log_level, build_parser
from peer.harness.summary import report_summary

HELP_ONLY = (argparse._HelpAction, argparse._VersionAction, argparse._SubParsersAction)


def every_parser(parser: argparse.ArgumentParser, path: str = "loconet"):
    """(command path, parser) for the parser and every subcommand under it."""
    yield path, parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield from every_parser(sub, f"{path} {name}")


def test_every_option_of_every_command_has_help_that_shows_its_default():
    parser = build_parser()
    missing = []
    for path, sub in every_parser(parser):
        formatter = sub._get_formatter()
        for action in sub._actions:
            if isinstance(action, HELP_ONLY) or not action.option_strings or action.dest in ("verbose", "quiet"):
                continue
            text = formatter._get_help_string(action)
            if not action.help or "default" not in text:
                missing.append(f"{path} {action.option_strings[0]}: {text!r}")
    assert missing == []


def test_help_never_shows_internal_names():
    parser = build_parser()
    for path, sub in every_parser(parser):
        text = sub.format_help()
        assert "Config." not in text and "Config(" not in text, path


def test_the_top_level_help_lists_every_benchmark():
    text = build_parser().format_help()
    for name, _, _ in BENCHMARKS:
        assert name in text.split("bench", 1)[1].split("\n")[0] + text.split("benchmarks that print JSON", 1)[1]


def test_verbosity_is_accepted_after_the_command_too():
    ns = build_parser("peer").parse_args(["peer", "-vv"])
    assert _log_level(ns) == logging.DEBUG
    ns = build_parser("coordinator").parse_args(["coordinator", "-q"])
    assert _log_level(ns) == logging.ERROR
    ns = build_parser("coordinator").parse_args(["-v", "coordinator"])
    assert _log_level(ns) == logging.INFO
    assert _log_level(build_parser("demo").parse_args(["demo"])) == logging.WARNING


@pytest.mark.timeout(60)
def test_version_prints_the_installed_version():
    from importlib.metadata import version

    result = subprocess.run(
        [sys.executable, "-m", "peer.cli", "--version"], capture_output=True, text=True, timeout=30, check=False
    )
    assert result.returncode == 0 and result.stdout.strip() == f"loconet {version('loconet')}"


def test_the_harness_help_says_what_it_prints_with_and_without_json():
    sub = dict(every_parser(build_parser("harness")))["loconet harness"]
    (json_option,) = [a for a in sub._actions if a.dest == "json"]
    assert json_option.help == "print the report as one JSON object instead of a summary"


REPORT = {
    "peers": 4, "joined": 1, "rounds_committed": 12, "rounds_aborted": 1,
    "events": [{"event": "kill:peer2@round3", "time_s": 10.04, "recovery_s": 1.954, "detail": ""},
               {"event": "join@round5", "time_s": 20.0, "recovery_s": None, "detail": ""}],
    "initial_eval_loss": 4.1616, "final_eval_loss": None, "entropy_floor": 1.7121,
    "bytes_sent_per_peer": 2_150_000, "data_parallel_bytes_per_peer": 404_600_000,
    "survivors_identical": True, "peers_alive": 4, "wall_s": 61.6, "workdir": "/tmp/run",
}


def test_the_harness_summary_reads_as_lines_with_each_event_and_its_recovery():
    assert report_summary(REPORT, steps=600).splitlines() == [
        "",
        "Summary",
        "  eval loss      4.162 before -> — after (best possible 1.712)",
        "  rounds         12 committed, 1 aborted",
        "  sent per peer  2.15 MB; "
        "synchronous data-parallel would have sent 404.6 MB for the same 600 steps (188x more)",
        "  event          kill:peer2@round3 at 10.0 s; next commit 1.95 s later",
        "  event          join@round5 at 20.0 s; no commit after it",
        "  peers          4 of 5 finished with identical parameters",
        "  wall time      62 s; logs in /tmp/run",
    ]


def test_replicas_averaged_in_groups_are_summarised_by_their_spread_not_as_different():
    report = {
        **REPORT,
        "survivors_identical": False,
        "largest_group": 3,
        "spread_per_peer": {"peer0": 0.44, "peer1": 0.5},
    }
    assert report_summary(report, steps=600).splitlines()[-2] == (
        "  peers          4 of 5 finished with parameters of their own (averaged in groups of up to 3), "
        "spread 0.5 at the end"
    )


def test_survivors_that_should_agree_and_do_not_are_said_to_differ():
    report = {**REPORT, "survivors_identical": False}
    assert (
        report_summary(report, steps=600).splitlines()[-2]
        == "  peers          4 of 5 finished with DIFFERENT parameters"
    )


def test_survivors_that_ended_at_different_rounds_are_said_identical_only_at_the_round_compared():
    # Asynchronous rounds: the summary said "identical parameters" of peers whose final models differed.
    report = {**REPORT, "identical_at_round": 3, "last_round_per_peer": {"peer0": 3, "peer1": 5, "peer2": 4}}
    assert report_summary(report, steps=600).splitlines()[-2] == (
        "  peers          4 of 5 finished with identical parameters at round 3, the last they all hold (they ended "
        "at rounds 3-5)"
    )
    together = {**REPORT, "identical_at_round": 5, "last_round_per_peer": {"peer0": 5, "peer1": 5}}
    assert (
        report_summary(together, steps=600).splitlines()[-2]
        == "  peers          4 of 5 finished with identical parameters"
    )


def test_survivors_that_committed_no_round_are_said_to_hold_the_initial_parameters():
    # It said "DIFFERENT parameters" of a demo with fewer steps than a sync interval.
    report = {**REPORT, "identical_at_round": 0, "last_round_per_peer": {"peer0": 0, "peer1": 0}}
    assert report_summary(report, steps=40).splitlines()[-2] == (
        "  peers          4 of 5 finished with identical parameters (the run's initial ones: no round committed, "
        "fewer steps than a sync interval?)"
    )


def test_a_survivor_left_behind_is_named_apart_from_the_identical_others():
    # It said "4 of 5 finished with identical parameters; peer0 left behind ... with parameters of its own", and
    # the rounds the others ended at counted the one left behind.
    report = {**REPORT, "left_behind": ["peer0"], "identical_at_round": 8,
              "last_round_per_peer": {"peer0": 3, "peer1": 8, "peer2": 7, "peer3": 8}}
    assert report_summary(report, steps=600).splitlines()[-2] == (
        "  peers          4 of 5 finished; 3 of them with identical parameters at round 8, the last they all hold "
        "(they ended at rounds 7-8); peer0 left behind (its syncs found nobody holding the run's state, the others "
        "gone: it trained on alone, with parameters of its own)"
    )


def test_a_method_that_sends_more_than_data_parallel_is_said_to_send_more():
    report = {**REPORT, "bytes_sent_per_peer": 47.37e6, "data_parallel_bytes_per_peer": 24.0e6}
    assert report_summary(report, steps=40).splitlines()[4] == (
        "  sent per peer  47.37 MB; "
        "synchronous data-parallel would have sent 24.0 MB for the same 40 steps (1.97x less)"
    )


def test_a_run_without_survivors_compares_nothing_and_names_each_crashed_peer():
    crash = {"peer": "peer1", "exit_code": 1, "error": "RuntimeError: my data is gone", "log": "/tmp/run/peer1.log"}
    report = {**REPORT, "peers_alive": 0, "survivors_identical": False, "crashed": [crash]}
    assert report_summary(report, steps=600).splitlines()[-3:] == [
        "  peers          0 of 5 finished",
        "  crashed        peer1 exited (1): RuntimeError: my data is gone (log: /tmp/run/peer1.log)",
        "  wall time      62 s; logs in /tmp/run",
    ]


def test_the_harness_summary_says_whether_a_peer_taken_out_came_back():
    events = [{"event": "cut:peer2@round3,for=8s", "time_s": 52.6, "recovery_s": 9.0, "lost_s": 0.16,
               "target": "peer2", "back_s": None, "detail": ""},
              {"event": "pause:peer1@round6,for=2s", "time_s": 70.0, "recovery_s": 1.0, "lost_s": 0.5,
               "target": "peer1", "back_s": 4.25, "detail": ""}]
    lines = report_summary({**REPORT, "events": events}, steps=600).splitlines()
    assert [line for line in lines if line.startswith("  event")] == [
        "  event          cut:peer2@round3,for=8s at 52.6 s; next commit 9.00 s later, 0.16 s lost; peer2 never "
        "contributed to a committed round again",
        "  event          pause:peer1@round6,for=2s at 70.0 s; next commit 1.00 s later, 0.50 s lost; peer1 "
        "contributed again 4.2 s after it",
    ]
