"""The fork server: a child forked from it runs ``python -m peer.cli ARGS`` as an exec'ed one would.

Each child here is a real ``loconet`` command; tests/support/forkprobe.py, loaded as its plugin, records what the
process was given (directory, environment, argv, session, random state).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from peer.harness import processes
from peer.harness.forkserver import ForkedChild, ForkServer, ForkServerError, import_time_env, runs_as_imported
from peer.harness.processes import FORK_SERVER_ENV, Proc, forkable

sys.path.insert(0, str(Path(__file__).parent))
from support.forkspawn import CLI, PROBE, probe, spawn

pytestmark = pytest.mark.timeout(120)


@pytest.fixture(scope="module")
def server():
    s = ForkServer()
    yield s
    s.close()


def test_a_child_runs_the_cli_with_the_callers_directory_environment_and_arguments(server, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    child = spawn(server, tmp_path, "coordinator", *PROBE, "--help", LOCONET_PROBE_VALUE="given")
    assert child.wait(60) == 0
    seen = probe(tmp_path)
    assert seen["cwd"] == str(tmp_path)
    assert seen["value"] == "given"
    assert seen["argv"][1:] == ["coordinator", *PROBE, "--help"] and seen["argv"][0].endswith("cli.py")
    assert seen["pid"] == child.pid
    assert not seen["stdin_isatty"]
    assert "usage: loconet coordinator" in child.stdout.read()


def test_a_child_runs_in_a_session_of_its_own(server, tmp_path):
    child = spawn(server, tmp_path, "coordinator", *PROBE, "--help")
    assert child.wait(60) == 0
    assert probe(tmp_path)["sid"] == child.pid


def test_two_children_draw_different_random_numbers(server, tmp_path):
    seen = []
    for name in ("a", "b"):
        (tmp_path / name).mkdir()
        assert spawn(server, tmp_path / name, "coordinator", *PROBE, "--help").wait(60) == 0
        seen.append(probe(tmp_path / name))
    assert seen[0]["random"] != seen[1]["random"]
    assert seen[0]["numpy"] != seen[1]["numpy"]


def test_a_usage_error_exits_2_with_its_message_on_the_given_stderr(server, tmp_path):
    child = spawn(server, tmp_path, "coordinator", "--no-such-option")
    assert child.wait(60) == 2
    assert "unrecognized arguments: --no-such-option" in (tmp_path / "err").read_text()


def test_a_child_ended_by_a_signal_reports_minus_the_signal(server, tmp_path):
    child = spawn(server, tmp_path, "coordinator", "--run", "r", "--port", "0", "--dashboard-port", "0")
    with pytest.raises(subprocess.TimeoutExpired):
        child.wait(0.5)  # it serves until stopped
    assert child.poll() is None
    os.killpg(child.pid, signal.SIGKILL)  # its session is its own from the moment spawn returns
    assert child.wait(30) == -signal.SIGKILL


def test_closing_the_server_kills_the_children_it_forked(tmp_path):
    own = ForkServer()
    try:
        child = spawn(own, tmp_path, "coordinator", "--run", "r", "--port", "0", "--dashboard-port", "0")
    finally:
        own.close()
    assert child.wait(30) == -signal.SIGKILL
    with pytest.raises(ProcessLookupError):
        os.kill(child.pid, 0)
    with pytest.raises(ForkServerError, match="gone"):
        spawn(own, tmp_path, "coordinator", "--help")


def test_a_malformed_request_is_refused_and_the_server_keeps_serving(server, tmp_path):
    raw = server._sock
    with server._lock:
        raw.send(b"not json")  # and no file descriptors
        answer = server._next_answer()
    assert "bad request" in answer["error"]
    assert spawn(server, tmp_path, "coordinator", "--help").wait(60) == 0


def test_a_child_asked_for_a_network_namespace_that_does_not_exist_is_refused(server, tmp_path):
    with pytest.raises(ForkServerError, match="no network namespace named 'lcn-none'"):
        server.spawn([*CLI, "coordinator", "--help"], dict(os.environ), 2, netns="lcn-none")
    with pytest.raises(ForkServerError, match="no network namespace named '../../proc/1/ns/net'"):
        server.spawn([*CLI, "coordinator", "--help"], dict(os.environ), 2, netns="../../proc/1/ns/net")
    assert spawn(server, tmp_path, "coordinator", "--help").wait(60) == 0


def test_the_server_ends_with_the_process_that_started_it(tmp_path):
    # A script starts a server and a long-running child from it, prints the child's pid, and is then SIGKILLed:
    # the server sees its socket close and kills the child.
    script = tmp_path / "starter.py"
    script.write_text(
        "import os, sys, time\n"
        "from peer.harness.forkserver import ForkServer\n"
        "s = ForkServer()\n"
        f"c = s.spawn({[*CLI, 'coordinator', '--run', 'r', '--port', '0', '--dashboard-port', '0']!r}, "
        "dict(os.environ), 2)\n"
        "print(c.pid, flush=True)\n"
        "time.sleep(600)\n"
    )
    starter = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, text=True, cwd=os.getcwd())
    try:
        pid = int(starter.stdout.readline())
        os.kill(pid, 0)
        starter.kill()
        starter.wait(30)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                break
            time.sleep(0.1)
        else:
            os.kill(pid, signal.SIGKILL)
            pytest.fail("the child outlived the process that started its server")
    finally:
        starter.kill()
        starter.wait(30)


def test_only_loconet_commands_are_forked_and_only_while_the_server_is_on():
    env = {"PATH": "/usr/bin"}
    assert forkable([*CLI, "peer"], env)
    assert not forkable([sys.executable, "other.py"], env)
    assert not forkable([*CLI, "peer"], {**env, FORK_SERVER_ENV: "0"})


def test_a_server_imports_with_its_starters_start_up_environment_and_quiet_grpc_by_default():
    assert import_time_env({"PATH": "/usr/bin"}) == {
        "GRPC_VERBOSITY": "NONE",
        "GRPC_TRACE": None,
        "PYTHONHASHSEED": None,
    }
    assert import_time_env({"GRPC_VERBOSITY": "DEBUG", "GRPC_TRACE": "http", "PYTHONHASHSEED": "0"}) == {
        "GRPC_VERBOSITY": "DEBUG", "GRPC_TRACE": "http", "PYTHONHASHSEED": "0"}


# (what the child's environment sets, what the server imported with, forked?)
RUNS_AS_IMPORTED = [
    ({}, {"GRPC_VERBOSITY": "NONE"}, True),  # unset: the server's value is as good as the default
    ({"GRPC_VERBOSITY": "NONE"}, {"GRPC_VERBOSITY": "NONE"}, True),  # what `loconet` without -v sets for its children
    ({"GRPC_VERBOSITY": "DEBUG"}, {"GRPC_VERBOSITY": "NONE"}, False),
    ({"GRPC_TRACE": "http"}, {"GRPC_VERBOSITY": "NONE", "GRPC_TRACE": None}, False),
    ({"PYTHONHASHSEED": "0"}, {"PYTHONHASHSEED": "0"}, True),
    ({"PYTHONHASHSEED": "0"}, {"PYTHONHASHSEED": None}, False),  # a random hash seed is not seed 0
]


@pytest.mark.parametrize(("env", "imported", "forked"), RUNS_AS_IMPORTED)
def test_a_child_is_forked_only_when_the_environment_its_imports_read_is_the_servers(env, imported, forked):
    assert runs_as_imported({"PATH": "/usr/bin", **env}, imported) is forked


def test_a_loconet_command_without_v_forks_its_children(tmp_path, monkeypatch):
    # `loconet harness` (or demo, or bench) without -v sets GRPC_VERBOSITY=NONE before its children start.
    monkeypatch.setenv("GRPC_VERBOSITY", "NONE")
    monkeypatch.setattr(processes, "FORKS", processes._SharedForkServer())
    p = Proc([*CLI, "coordinator", "--help"], tmp_path / "help.log")
    try:
        assert isinstance(p.proc, ForkedChild)
        assert p.proc.wait(60) == 0
    finally:
        p.stop()
        processes.FORKS.close()


def test_a_proc_is_exec_ed_when_the_fork_server_is_switched_off(tmp_path, monkeypatch):
    monkeypatch.setenv(FORK_SERVER_ENV, "0")
    p = Proc([*CLI, "coordinator", "--help"], tmp_path / "help.log")
    assert isinstance(p.proc, subprocess.Popen)
    assert p.proc.wait(60) == 0
    p.stop()


def test_a_proc_asked_not_to_fork_is_exec_ed(tmp_path):
    p = Proc([*CLI, "coordinator", "--help"], tmp_path / "help.log", fork=False)
    assert isinstance(p.proc, subprocess.Popen)
    assert p.proc.wait(60) == 0
    p.stop()


def test_two_procs_in_a_row_are_forked_from_servers_with_different_string_hash_seeds(tmp_path, monkeypatch):
    # So a run's peers do not all share one seed, and a bug that depends on a set's order still shows between them.
    seen = []
    for name in ("a", "b"):
        monkeypatch.setenv("LOCONET_PROBE_OUT", str(tmp_path / f"{name}.json"))
        p = Proc([*CLI, "coordinator", *PROBE, "--help"], tmp_path / f"{name}.log")
        assert not isinstance(p.proc, subprocess.Popen)
        assert p.proc.wait(60) == 0
        p.stop()
        seen.append(json.loads((tmp_path / f"{name}.json").read_text())["hash"])
    assert seen[0] != seen[1]


def test_a_proc_of_a_loconet_command_is_forked_and_followed_like_an_exec_ed_one(tmp_path):
    p = Proc([*CLI, "coordinator", "--run", "r", "--port", "0", "--dashboard-port", "0"], tmp_path / "c.log")
    try:
        assert not isinstance(p.proc, subprocess.Popen)
        deadline = time.monotonic() + 60
        while not any("dashboard" in line for line in p.lines) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert any("dashboard" in line for line in p.lines), p.stderr_tail()
    finally:
        p.stop()
    assert not p.alive and p.proc.returncode == 0  # SIGTERM: the coordinator stops gracefully

