"""The coordinator's state file: what it keeps, and what it refuses to start from."""

from __future__ import annotations

import pytest

from collectives.errors import ConfigError
from peer.coordinator.service import Coordinator, CoordinatorConfig
from peer.coordinator.statefile import SavedRun, load_run, save_run


def test_a_saved_run_loads_back_as_it_was(tmp_path):
    path = tmp_path / "run.json"
    save_run(path, SavedRun("r", last_committed_round=17, epoch=3))
    assert load_run(path, "r") == SavedRun("r", 17, 3)


def test_the_epoch_that_committed_the_last_round_is_saved_too(tmp_path):
    path = tmp_path / "run.json"
    save_run(path, SavedRun("r", last_committed_round=17, epoch=3, committed_epoch=2))
    assert load_run(path, "r").committed_epoch == 2


def test_a_file_from_before_the_committed_epoch_was_kept_loads_it_as_unknown(tmp_path):
    path = tmp_path / "run.json"
    path.write_text('{"run_id": "r", "last_committed_round": 17, "epoch": 3, "digest": ""}')
    assert load_run(path, "r") == SavedRun("r", 17, 3, "", committed_epoch=-1)


@pytest.mark.parametrize("committed_epoch", [-2, 4])
def test_a_committed_epoch_outside_the_epochs_given_out_is_refused(tmp_path, committed_epoch):
    path = tmp_path / "run.json"
    save_run(path, SavedRun("r", last_committed_round=17, epoch=3, committed_epoch=committed_epoch))
    with pytest.raises(ConfigError, match="outside -1..3"):
        load_run(path, "r")


def test_no_file_means_no_saved_run(tmp_path):
    assert load_run(tmp_path / "absent.json", "r") is None


def test_a_file_of_another_run_is_refused(tmp_path):
    path = tmp_path / "run.json"
    save_run(path, SavedRun("old", 1, 0))
    with pytest.raises(ConfigError, match="is for run 'old', not 'new'"):
        load_run(path, "new")


NOT_SAVED_RUNS = ["", "{", "[]", '{"run_id": "r"}', '{"run_id": "r", "last_committed_round": "x", "epoch": 0}']


@pytest.mark.parametrize("text", NOT_SAVED_RUNS)
def test_a_file_that_is_not_a_saved_run_is_refused(tmp_path, text):
    path = tmp_path / "run.json"
    path.write_text(text)
    with pytest.raises(ConfigError, match="not a saved run"):
        load_run(path, "r")


def test_a_coordinator_resumes_the_saved_round_and_epoch(tmp_path):
    path = tmp_path / "run.json"
    save_run(path, SavedRun("r", last_committed_round=41, epoch=2))
    coordinator = Coordinator(CoordinatorConfig(run_id="r", state_file=str(path)))
    assert coordinator.state.last_committed_round == 41 and coordinator.state.epoch == 2
    assert coordinator.state.next_round_id == 42
