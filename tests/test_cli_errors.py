"""A user's mistake ends in one line naming the problem and the fix: exit 2 for usage, 1 at runtime, no traceback.

Cases that need a process of their own (a peer, the demo's children, Ctrl-C) run the real
``loconet`` command in a child process, as a user would; the parent's own checks run
``peer.cli.main`` in this process.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.support.cli import in_process, one_line_error

pytestmark = pytest.mark.timeout(120)


def loconet(*args: str, timeout: float = 90, cwd: Path | None = None) -> subprocess.CompletedProcess:
    """Run ``loconet ARGS`` to completion; its output as text."""
    return subprocess.run(
        [sys.executable, "-m", "peer.cli", *args],
        check=False,
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=cwd,
    )


@pytest.fixture
def taken_port():
    """A port some other program listens on."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        yield s.getsockname()[1]


@pytest.fixture
def coordinator(tmp_path):
    """A running coordinator of run 'myrun': (its address, its dashboard URL)."""
    sys.path.insert(0, str(Path(__file__).parent))
    from support.procs import CoordinatorProc

    proc = CoordinatorProc(tmp_path / "coordinator.log", "myrun", 0)
    yield proc.address
    proc.stop()


def test_a_peer_whose_checkpoint_dir_is_a_file_stops_before_it_joins(coordinator, tmp_path):
    # It trained, committed a round, then died writing its first checkpoint: the round's holder gone with it.
    afile = tmp_path / "afile"
    afile.write_text("not a folder")
    result = loconet("peer", "--coordinator", coordinator, "--run", "myrun", "--steps", "20",
                     "--checkpoint-dir", str(afile))
    assert result.returncode == 2
    assert f"--checkpoint-dir {afile} is a file, not a folder" in one_line_error(result)


# -- ports -------------------------------------------------------------------------------------------


def test_a_taken_coordinator_port_names_the_port_and_the_option(taken_port):
    result = loconet("coordinator", "--port", str(taken_port), "--dashboard-port", "none")
    line = one_line_error(result)
    assert result.returncode == 1
    assert f"127.0.0.1:{taken_port}" in line and "--port" in line


def test_a_taken_dashboard_port_names_the_port_and_the_option(taken_port, capsys):
    result = in_process(capsys, "coordinator", "--port", "0", "--dashboard-port", str(taken_port))
    line = one_line_error(result)
    assert result.returncode == 1
    assert f"127.0.0.1:{taken_port}" in line and "--dashboard-port" in line


def test_a_taken_peer_port_names_the_port_and_the_option(taken_port, coordinator):
    result = loconet("peer", "--coordinator", coordinator, "--run", "myrun", "--port", str(taken_port))
    line = one_line_error(result)
    assert result.returncode == 1
    assert f"127.0.0.1:{taken_port}" in line and "--host/--port" in line


def test_the_demo_with_its_dashboard_port_taken_says_so_in_one_line(taken_port):
    result = loconet("demo", "--dashboard-port", str(taken_port))
    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    (line,) = [x for x in result.stderr.splitlines() if x.strip()]
    assert line.startswith("loconet: error: coordinator exited (1) before serving: cannot serve the dashboard")
    assert f":{taken_port}" in line and "--dashboard-port" in line


# -- the run -----------------------------------------------------------------------------------------


def test_a_wrong_run_says_which_run_the_coordinator_serves(coordinator):
    result = loconet("peer", "--coordinator", coordinator, "--run", "other", "--steps", "5")
    line = one_line_error(result)
    assert result.returncode == 1
    assert "serves run 'myrun', not 'other'" in line and "--run myrun" in line


# -- arguments checked in the parent, before any process starts ----------------------------------


@pytest.mark.parametrize(
    "args, says",
    [
        (("--task", "nope"), "unknown task 'nope'"),
        (("--task", "text-lm"), "text-lm needs a corpus"),
        (("--task", "text-lm", "--data", "/no/such/corpus"), "'/no/such/corpus' does not exist"),
        (("--codec", "int9"), "codec spec 'int9' is invalid"),
        (("--aggregator", "krum:f=x"), "krum parameter f must be a number"),
        # Each of these started the network and failed in a peer, or after the run, losing its report.
        (("--bandwidth", "0mbit"), "--bandwidth: bandwidth must be positive"),
        (("--netns", "--uplink", "abc"), "--uplink: cannot read bandwidth 'abc'"),
        (("--uplink", "10mbit"), "--uplink and --downlink cap each direction of a namespace's link and need --netns"),
        (("--keep-results", "-1"), "--keep-results must be >= 0"),
        (("--timeout", "0"), "--timeout must be a positive number of seconds"),
        (("--duration", "-5"), "--duration must be a positive number of seconds"),
        (
            ("--peers", "3", "--event", "kill:peer9@round2"),
            "no peer is called peer9; the scenario's peers are peer0..peer2",
        ),
        (("--peers", "3", "--event", "join@round2", "--event", "kill:peer4@round3"), "no peer is called peer4"),
        (
            ("--peers", "3", "--event", "straggle:persistent@0s,worker=9,x=3"),
            "the straggler pattern's worker 9 is none of the 3 (workers 0..2)",
        ),
        (("--peers", "3", "--max-peers", "2"), "--max-peers 2 is fewer than the 3 peers the scenario starts"),
        # Each of these ran every peer alone to its end: 0 rounds, exit 0.
        (
            ("--peers", "3", "--aggregator", "krum:f=5"),
            "no round can form: krum needs at least 2f+3 = 13 contributions (f=5), got 3",
        ),
        (
            ("--peers", "5", "--event", "join@round9", "--aggregator", "bulyan:f=1"),
            "bulyan needs at least 4f+3 = 7 contributions (f=1), got 6; "
            "lower f or add peers (the scenario has at most 6",
        ),
        (
            ("--peers", "3", "--algorithm", "async-diloco", "--buffer", "2", "--quorum", "buffer:3"),
            "async-diloco --buffer 2 needs the coordinator's --quorum buffer:2, and the run's is 'buffer:3'",
        ),
        (
            ("--peers", "2", "--algorithm", "fedavg", "--task", "digits", "--dp-clip", "1", "--dp-min-members", "3"),
            "no round can form: the rounds need 3 members (the aggregator's minimum, or --dp-min-members) and the "
            "scenario has at most 2 peers",
        ),
    ],
)
def test_the_harness_checks_its_arguments_before_starting_any_process(tmp_path, capsys, args, says):
    result = in_process(capsys, "harness", "--workdir", str(tmp_path / "run"), *args)
    line = one_line_error(result)
    assert result.returncode == 2 and says in line
    assert not list((tmp_path / "run").glob("*.log"))  # no coordinator or peer was started


def test_the_demo_checks_its_arguments_before_starting_any_process(capsys):
    result = in_process(capsys, "demo", "--steps", "0")
    assert result.returncode == 2
    assert one_line_error(result).endswith("train for at least one step (--steps) or a duration (--duration)")


def test_a_bad_option_value_is_a_usage_error(capsys):
    result = in_process(capsys, "peer", "--steps", "many")
    assert result.returncode == 2 and "invalid int value: 'many'" in result.stderr
    assert "Traceback" not in result.stderr


def test_with_v_an_error_also_shows_its_traceback(taken_port, capsys):
    result = in_process(capsys, "coordinator", "-v", "--port", str(taken_port), "--dashboard-port", "none")
    assert result.returncode == 1
    assert "Traceback" in result.stderr and "AddressInUse" in result.stderr
    assert result.stderr.rstrip().splitlines()[-1].startswith("loconet: error: cannot listen on")


# -- Ctrl-C ---------------------------------------------------------------------------------------


@contextlib.contextmanager
def sigint_at_its_default_in_children():
    """Children start with SIGINT at its default, as from a terminal. A child inherits an ignored SIGINT (the
    suite started as a background job has one), and Python then never raises KeyboardInterrupt in it."""
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)  # a handler is reset to default by exec
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


def test_ctrl_c_on_the_demo_says_what_it_stopped_and_where_the_logs_are():
    with sigint_at_its_default_in_children():
        proc = subprocess.Popen(
            [sys.executable, "-m", "peer.cli", "demo", "--dashboard-port", "0", "--steps", "100000"],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True,
        )
    try:
        for line in proc.stdout:
            if line.startswith("Dashboard: "):
                break
        time.sleep(3)  # the peers are starting or training
        os.kill(proc.pid, signal.SIGINT)
        _, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    assert proc.returncode == 130
    assert "Traceback" not in err
    note = [line for line in err.splitlines() if "interrupted" in line]
    assert len(note) == 1 and "stopped the coordinator and 4 peer process(es)" in note[0]
    workdir = Path(note[0].rsplit("logs are in ", 1)[1])
    assert (workdir / "coordinator.log").read_text()  # the logs it points at hold something


def test_a_finished_command_ignores_sigterm_as_it_exits_and_a_callers_handler_comes_back(tmp_path):
    # A harness's SIGTERM to a peer that had finished raised inside the interpreter's exit handlers:
    # "Exception ignored in atexit callback ... KeyboardInterrupt" in most peers' logs.
    script = ("import signal, sys; from peer.cli import main; "
              f"sys.argv = ['loconet', 'certs', '--out', {str(tmp_path / 'a')!r}, '--host', 'a']; code = main(); "
              "print(code, signal.getsignal(signal.SIGTERM) is signal.SIG_IGN)")
    ran = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60, check=False)
    assert ran.stdout.splitlines()[-1] == "0 True", ran.stderr
    before = signal.getsignal(signal.SIGTERM)
    from peer.cli import main

    assert main(["certs", "--out", str(tmp_path / "b"), "--host", "b"]) == 0
    assert signal.getsignal(signal.SIGTERM) is before
