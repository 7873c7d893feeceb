"""Children of the harness, benchmarks and tests never outlive the process that started them."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

PARENT = """
import pathlib, sys, time
from peer.harness.processes import CoordinatorProc
child = CoordinatorProc(pathlib.Path(sys.argv[1]), "r", 0)
print(child.proc.pid, flush=True)
time.sleep(600)
"""


def gone(pid: int) -> bool:
    """Whether pid has exited (reaped, or a zombie waiting to be)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(") ", 1)[1].startswith("Z")
    except (FileNotFoundError, ProcessLookupError):
        return True


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the parent-death signal is Linux's")
@pytest.mark.timeout(120)
def test_a_child_dies_when_the_process_that_started_it_is_killed(tmp_path):
    parent = subprocess.Popen(
        [sys.executable, "-c", PARENT, str(tmp_path / "child.log")], stdout=subprocess.PIPE, text=True
    )
    try:
        child = int(parent.stdout.readline())
        assert not gone(child)
        parent.kill()  # SIGKILL: the parent runs no cleanup of its own
        parent.wait(timeout=30)
        deadline = time.monotonic() + 30
        while not gone(child) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert gone(child), "the child outlived its parent"
    finally:
        parent.kill()
        parent.wait(timeout=30)
        if "child" in locals() and not gone(child):
            os.kill(child, 9)

