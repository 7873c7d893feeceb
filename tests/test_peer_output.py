"""What ``loconet peer`` prints: a line per committed round and a summary for people, JSON only on stdout with
``--events``, and never "nan"."""

from __future__ import annotations

import io
import json
import math
import re
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
from peer.runtime.display import (
    PeerDisplay,
    RoundFigures,
    Summary,
    bar_info,
    choose_streams,
    format_bytes,
    format_duration,
    joined_line,
    round_line,
    summary_lines,
)
from support.procs import CoordinatorProc, Proc, stop_all

NAN = math.nan
SMALL = ("--d-model", "32", "--layers", "2", "--heads", "2", "--seq-len", "32", "--batch-size", "8")


class Terminal(io.StringIO):
    """A stream that says it is a terminal."""

    def isatty(self) -> bool:
        return True


def figures(**changes) -> RoundFigures:
    base = {"round_id": 3, "step": 150, "total_steps": 1000, "loss": 2.81234, "eval_loss": NAN,
            "bytes_sent": 1_234_567, "wall_s": 1.4234}
    return RoundFigures(**{**base, **changes})


def summary(**changes) -> Summary:
    base = {"peer": "p1-0", "run_id": "demo", "outcome": "finished", "steps": 1000, "total_steps": 1000,
            "rounds_committed": 10, "rounds_missed": 0, "eval_loss": 1.8431, "bytes_sent": 12_300_000,
            "bytes_received": 12_100_000, "bytes_served": 0, "wall_s": 83.2}
    return Summary(**{**base, **changes})


# -- formatting ------------------------------------------------------------------------------------


def test_a_round_line_says_round_step_loss_bytes_and_seconds():
    assert round_line(figures()) == "round 3  step 150/1000  loss 2.812  sent 1.23 MB  took 1.42 s"


def test_a_round_line_shows_the_last_eval_loss_once_there_is_one():
    assert (
        round_line(figures(eval_loss=2.79))
        == "round 3  step 150/1000  loss 2.812  eval 2.790  sent 1.23 MB  took 1.42 s"
    )


def test_a_round_line_leaves_out_what_is_not_known_instead_of_printing_nan():
    line = round_line(figures(loss=NAN, eval_loss=None))
    assert line == "round 3  step 150/1000  sent 1.23 MB  took 1.42 s"


def test_a_round_applied_late_says_so_instead_of_bytes_and_seconds():
    assert round_line(figures(contributed=False, total_steps=None)) == (
        "round 3  step 150  loss 2.812  applied late (went on without this peer)"
    )


def test_the_joined_line_says_which_run_who_where_how_and_how_long():
    assert joined_line("demo", "p1-0", "127.0.0.1:4000", 12, "fetched the run's state", 2.5) == (
        "joined run demo as p1-0 at 127.0.0.1:4000: fetched the run's state (round 12) in 2.50 s"
    )


def test_the_bar_shows_no_nan_before_the_first_loss_eval_and_rate():
    assert bar_info(NAN, NAN, NAN, 0, 0) == "0 rounds · sent 0 B"


def test_the_bar_shows_each_figure_once_known():
    assert bar_info(2.5, 2.61, 12.34, 1, 2_500_000) == "loss 2.500 · eval 2.610 · 12.3 it/s · 1 round · sent 2.50 MB"


def test_the_summary_says_steps_rounds_eval_loss_traffic_time_and_checkpoints():
    assert summary_lines(summary(rounds_missed=2, bytes_served=3_400_000, checkpoint_dir="/tmp/ckpt")) == [
        "peer p1-0 of run demo finished: 1000/1000 steps in 1m 23s",
        "  rounds       10 committed, 2 without a commit",
        "  eval loss    1.843",
        "  traffic      12.3 MB sent, 12.1 MB received (3.40 MB of state served to joiners)",
        "  checkpoints  /tmp/ckpt",
    ]


@pytest.mark.parametrize(("trained", "heading"), [
    (1000, "peer p1-0 of run demo finished: 1000/1000 steps in 1m 23s"),  # all of them here
    (650, "peer p1-0 of run demo finished: 1000/1000 steps, 650 trained here in 1m 23s"),  # resumed at 350
    (None, "peer p1-0 of run demo finished: 1000/1000 steps in 1m 23s"),
])
def test_the_summary_says_how_many_of_the_runs_steps_this_process_trained(trained, heading):
    # Probe K: "1500/1500 steps" from a peer that resumed at step 850, or skipped ahead to the run's step.
    assert summary_lines(summary(trained_steps=trained))[0] == heading


def test_the_summary_shows_a_dash_for_an_eval_loss_never_measured():
    lines = summary_lines(summary(outcome="stopped (SIGINT)", steps=12, eval_loss=NAN))
    assert lines[0] == "peer p1-0 of run demo stopped (SIGINT): 12/1000 steps in 1m 23s"
    assert lines[2] == "  eval loss  —"
    assert not any("nan" in line for line in lines)


@pytest.mark.parametrize("n,text", [(0, "0 B"), (999, "999 B"), (1200, "1.20 kB"), (34_500_000, "34.5 MB"),
                                    (1_100_000_000, "1.10 GB"), (25_000_000_000_000, "25000.0 GB")])
def test_bytes_are_shown_in_decimal_units(n, text):
    assert format_bytes(n) == text


@pytest.mark.parametrize("s,text", [(0.4234, "0.42 s"), (12.34, "12.3 s"), (83.2, "1m 23s"), (7500, "2h 05m"),
                                    (NAN, "—")])
def test_durations_are_shown_in_the_unit_that_reads_best(s, text):
    assert format_duration(s) == text


# -- where output goes ---------------------------------------------------------------------------------


def test_without_events_human_lines_go_to_stdout_and_the_bar_to_stderr_when_it_is_a_terminal():
    out, err = io.StringIO(), Terminal()
    assert choose_streams(False, None, out, err) == (out, err)


def test_with_events_stdout_is_left_to_them_and_human_lines_and_the_bar_go_to_stderr():
    out, err = Terminal(), Terminal()
    assert choose_streams(True, None, out, err) == (err, err)


def test_the_bar_is_off_when_stderr_is_not_a_terminal_unless_asked_for():
    out, err = Terminal(), io.StringIO()
    assert choose_streams(False, None, out, err) == (out, None)
    assert choose_streams(False, True, out, err) == (out, err)
    assert choose_streams(False, False, Terminal(), Terminal())[1] is None


def test_lines_on_a_stream_that_is_not_a_terminal_are_plain_text():
    out = io.StringIO()
    display = PeerDisplay(out, None)
    display.committed(figures())
    display.summary(summary())
    text = out.getvalue()
    assert text.splitlines()[0] == round_line(figures())
    assert text.splitlines()[1:] == summary_lines(summary())
    assert "\x1b" not in text


def test_lines_on_a_terminal_are_styled():
    out = Terminal()
    PeerDisplay(out, None).committed(figures())
    assert "\x1b[1mround 3\x1b[0m" in out.getvalue()


# -- a real peer, its stdout a pipe ------------------------------------------------------------------


@pytest.fixture(scope="module")
def two_peers(tmp_path_factory):
    """Two peers that train 30 steps together (a round every 10): one as a user runs it, one with --events.

    The second also asks for the bar (--progress): with --events it must stay off stdout.
    """
    tmp = tmp_path_factory.mktemp("output")
    coordinator = CoordinatorProc(tmp / "coordinator.log", "out", 0, "--min-peers", "2", "--startup-grace", "0")
    common = [sys.executable, "-m", "peer.cli", "peer", "--coordinator", coordinator.address, "--run", "out", *SMALL,
              "--steps", "30", "--sync-every", "10", "--eval-every", "10"]
    plain = Proc([*common, "--name", "plain"], tmp / "plain.log")
    events = Proc([*common, "--name", "events", "--events", "--progress"], tmp / "events.log")
    try:
        for p in (plain, events):
            p.proc.wait(timeout=120)
            p._reader.join(timeout=10)
        yield plain, events
    finally:
        stop_all([plain, events])
        stop_all([coordinator])


@pytest.mark.timeout(180)
def test_without_a_terminal_the_peer_prints_a_line_per_committed_round_and_a_summary(two_peers):
    plain, _ = two_peers
    assert plain.proc.returncode == 0
    lines = plain.lines
    assert lines[0].startswith("joined run out as ")
    rounds = [line for line in lines if line.startswith("round ")]
    assert [line.split("  ")[:2] for line in rounds] == [["round 1", "step 10/30"], ["round 2", "step 20/30"],
                                                           ["round 3", "step 30/30"]]
    assert "  eval " in rounds[1]  # the eval at step 10 is known by round 2
    heading = next(i for i, line in enumerate(lines) if line.startswith("peer "))
    assert re.fullmatch(r"peer p\S+ \(plain\) of run out finished: 30/30 steps in .+", lines[heading])
    assert [row.split()[0] for row in lines[heading + 1:]] == ["rounds", "eval", "traffic"]
    assert lines[heading + 1] == "rounds     3 committed"  # (the reader strips the rows' indent)
    assert not any("nan" in line for line in lines)


@pytest.mark.timeout(180)
def test_with_events_every_stdout_line_is_json_and_the_human_lines_go_to_stderr(two_peers):
    _, events = two_peers
    assert events.proc.returncode == 0
    assert events.lines and all(isinstance(json.loads(line), dict) for line in events.lines)
    assert [e["event"] for e in events.events if e["event"] in ("joined", "finished")] == ["joined", "finished"]
    stderr = events.log_path.read_text().splitlines()
    assert sum(line.startswith("round ") for line in stderr) == 3
    assert any(line.startswith("peer ") and "of run out finished" in line for line in stderr)
