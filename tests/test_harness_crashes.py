"""A peer process that fails by itself fails the harness, in one line naming it; nothing a task prints breaks the
harness's reading of the peers' events."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from peer.harness.processes import Proc

pytestmark = pytest.mark.timeout(240)

TASKS = '''
import itertools, torch
from peer.tasks.base import Task

class Regression(Task):
    name = "regression"
    def build_model(self):
        torch.manual_seed(0)
        return torch.nn.Linear(4, 1)
    def batches(self, rank, world, start=0):
        g = torch.Generator().manual_seed(rank)
        for _ in itertools.count(start):
            x = torch.randn(8, 4, generator=g)
            yield x, x.sum(1, keepdim=True)
    def loss(self, model, batch):
        x, y = batch
        return torch.nn.functional.mse_loss(model(x), y)
    def evaluate(self, model):
        x = torch.ones(8, 4)
        return float(self.loss(model, (x, x.sum(1, keepdim=True))).detach())

class DataGone(Regression):
    def batches(self, rank, world, start=0):
        if rank == 1:
            raise RuntimeError("my data is gone")
        return super().batches(rank, world, start)

def data_gone(config):
    return DataGone(config)
'''


def test_a_peer_that_fails_by_itself_fails_the_run_naming_it_and_its_error(tmp_path: Path) -> None:
    # It used to exit 0 with "1 of 2 finished with identical parameters", the crash only in peer1's log.
    (tmp_path / "mytasks.py").write_text(TASKS)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path), os.environ.get("PYTHONPATH", "")])}
    result = subprocess.run(
        [sys.executable, "-m", "peer.cli", "harness", "--peers", "2", "--task", "mytasks:data_gone", "--steps", "60",
         "--workdir", str(tmp_path / "run"), "--json"],
        capture_output=True, text=True, timeout=200, env=env, cwd=tmp_path,
    )
    assert result.returncode == 1
    report = json.loads(result.stdout)
    assert [(c["peer"], c["exit_code"], c["error"]) for c in report["crashed"]] == [
        ("peer1", 1, "RuntimeError: my data is gone")
    ]
    assert "Traceback" not in result.stderr
    error = result.stderr.splitlines()[-1]  # after the dashboard's address
    assert error.startswith("loconet: error: ")
    assert "peer1 exited (1): RuntimeError: my data is gone" in error
    assert str(tmp_path / "run" / "peer1.log") in error


def test_a_line_of_json_that_is_no_event_is_not_read_as_one(tmp_path: Path) -> None:
    # A task printing a loss prints a JSON number: the reader thread died on it, and a peer filling the pipe hung.
    program = ('import json; print(1.5); print("[1]"); print(json.dumps({"loss": 2.0})); '
               'print(json.dumps({"event": "x"}), flush=True)')
    child = Proc([sys.executable, "-c", program], tmp_path / "child.log", fork=False, name="child", event_key="event")
    try:
        assert child.wait_event(lambda e: e["event"] == "x", timeout=60)["event"] == "x"
        assert [e["event"] for e in child.events] == ["x"]
        assert child.lines[:3] == ["1.5", "[1]", '{"loss": 2.0}']
    finally:
        child.stop()
