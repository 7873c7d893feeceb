"""A coordinator whose state file (or its key beside it) cannot be kept refuses to start, in one line naming it.

Without this it started, and only logged a warning at every commit: a restart then lost the run's history.
The command-line cases run the real ``loconet coordinator`` in a child process (OS-chosen ports, a timeout).
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from collectives.errors import ConfigError
from collectives.net.credentials import load_issuer_key
from peer.coordinator.statefile import load_run
from tests.support.cli import one_line_error

pytestmark = pytest.mark.timeout(60)


def loconet(*args: str) -> subprocess.CompletedProcess:
    """Run ``loconet ARGS`` to completion in a child process; its output as text."""
    return subprocess.run(
        [sys.executable, "-m", "peer.cli", *args], check=False, capture_output=True, text=True, timeout=50
    )


@pytest.mark.parametrize(
    ("where", "says"),
    [
        ("absent/run.json", "its folder {d}/absent does not exist"),
        ("a-file/run.json", "{d}/a-file is a file, not a folder"),
    ],
)
def test_a_state_file_whose_folder_cannot_take_it_is_refused(tmp_path, where, says):
    (tmp_path / "a-file").write_text("")
    with pytest.raises(ConfigError, match="--state-file") as info:
        load_run(tmp_path / where, "r")
    assert says.format(d=tmp_path) in str(info.value)


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes in any folder")
def test_a_state_file_in_a_read_only_folder_is_refused(tmp_path):
    folder = tmp_path / "ro"
    folder.mkdir(mode=0o500)
    with pytest.raises(ConfigError, match="cannot write in its folder"):
        load_run(folder / "run.json", "r")


def test_a_writable_folder_is_left_as_it_was(tmp_path):
    assert load_run(tmp_path / "run.json", "r") is None
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    ("make", "says"),
    [
        (lambda key: None, "cannot create the coordinator key {key} (made beside --state-file"),
        (lambda key: key.parent.mkdir() or key.symlink_to(key.parent / "gone"),
         "the coordinator key {key} (made beside --state-file, so a restart keeps the credentials it issued) is a "
         "symbolic link to {key.parent}/gone, which does not exist"),
    ],
    ids=["folder missing", "dangling link"],
)
def test_a_coordinator_key_that_cannot_be_made_is_named(tmp_path, make, says):
    key = tmp_path / "dir" / "run.json.key"
    make(key)
    with pytest.raises(ConfigError) as info:
        load_issuer_key(str(key))
    assert says.format(key=key) in str(info.value)


def test_a_missing_coordinator_key_is_made_private(tmp_path):
    key = tmp_path / "run.json.key"
    made = load_issuer_key(str(key))
    assert len(made) == 32 and key.stat().st_mode & 0o777 == 0o600 and load_issuer_key(str(key)) == made


@pytest.mark.parametrize("secret", [False, True], ids=["no secret", "with --token-file"])
def test_a_coordinator_with_its_state_file_in_a_missing_folder_exits_2(tmp_path, secret):
    token = tmp_path / "token"
    token.write_text("a-run-secret-long-enough-0123456789\n")
    token.chmod(0o600)
    state = tmp_path / "absent" / "run.json"
    args = ["--token-file", str(token)] if secret else []
    result = loconet("coordinator", "--port", "0", "--dashboard-port", "none", "--state-file", str(state), *args)
    line = one_line_error(result)
    assert result.returncode == 2
    assert str(state) in line and "folder" in line


def test_a_second_coordinator_on_a_state_file_in_use_exits_2_naming_the_holder(tmp_path):
    # Two coordinators writing one record overwrite each other's round and epoch; a restart resumes the last writer.
    from peer.coordinator.config import CoordinatorConfig
    from peer.coordinator.thread import CoordinatorThread

    state = tmp_path / "run.json"
    config = CoordinatorConfig(port=0, dashboard_port=None, state_file=str(state))
    with CoordinatorThread(config):
        result = loconet("coordinator", "--port", "0", "--dashboard-port", "none", "--state-file", str(state))
        line = one_line_error(result)
        assert result.returncode == 2
        assert f"--state-file {state} is in use by another coordinator (pid {os.getpid()})" in line
    with CoordinatorThread(config):  # stopped, the first let go of it
        pass


def test_a_coordinator_that_fails_to_start_lets_go_of_its_state_file(tmp_path):
    from collectives.errors import AddressInUse
    from peer.coordinator.config import CoordinatorConfig
    from peer.coordinator.thread import CoordinatorThread

    state = tmp_path / "run.json"
    with CoordinatorThread(CoordinatorConfig(port=0, dashboard_port=None)) as busy:
        port = int(busy.address.rsplit(":", 1)[1])
        with pytest.raises(AddressInUse):
            CoordinatorThread(CoordinatorConfig(port=port, dashboard_port=None, state_file=str(state)))
    with CoordinatorThread(CoordinatorConfig(port=0, dashboard_port=None, state_file=str(state))):
        pass


@pytest.mark.parametrize(("mode", "warned"), [(0o600, False), (0o640, False), (0o644, True)])
def test_a_coordinator_key_every_user_may_read_is_warned_of(tmp_path, caplog, mode, warned):
    key = tmp_path / "run.json.key"
    load_issuer_key(str(key))
    key.chmod(mode)
    load_issuer_key(str(key))
    said = [r.getMessage() for r in caplog.records if "readable by every user" in r.getMessage()]
    assert said == ([f"the coordinator key {key} is readable by every user; chmod 600 (or 640) it"] if warned else [])
