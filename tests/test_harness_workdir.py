"""What a harness run leaves in its work dir: the logs always, the peers' checkpoints only when asked or when it
failed."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from peer.harness.harness import Harness
from peer.runtime.training import TrainConfig

sys.path.insert(0, str(Path(__file__).parent))
from support.scenarios import run_scenario

pytestmark = pytest.mark.timeout(300)

SHORT = TrainConfig.of("diloco", steps=60, sync_every=20, round_timeout_s=10)


def _left(workdir: Path) -> tuple[list[str], list[str]]:
    """The peers' logs and checkpoint folders in a work dir."""
    return sorted(p.name for p in workdir.glob("peer*.log")), sorted(p.name for p in workdir.glob("ckpt-peer*"))


def test_a_finished_run_keeps_its_logs_and_removes_the_peers_checkpoints(tmp_path):
    report, _ = run_scenario(peers=2, workdir=tmp_path, train=SHORT)
    assert report["rounds_committed"] >= 1
    assert _left(tmp_path) == (["peer0.log", "peer1.log"], [])
    assert (tmp_path / "coordinator.log").is_file()


def test_keep_checkpoints_keeps_each_peers_folder_with_its_checkpoints(tmp_path):
    run_scenario(peers=2, workdir=tmp_path, train=SHORT, keep_checkpoints=True)
    logs, folders = _left(tmp_path)
    assert folders == ["ckpt-peer0", "ckpt-peer1"]
    assert all(any((tmp_path / f).iterdir()) for f in folders), "each folder holds a checkpoint"


def test_a_run_that_fails_keeps_the_peers_checkpoints_to_be_looked_into(tmp_path, monkeypatch):
    def fail(self):
        raise RuntimeError("the report could not be made")

    monkeypatch.setattr(Harness, "_report", fail)
    with pytest.raises(RuntimeError, match="could not be made"):
        run_scenario(peers=2, workdir=tmp_path, train=SHORT)
    assert _left(tmp_path)[1] == ["ckpt-peer0", "ckpt-peer1"]
