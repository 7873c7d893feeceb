"""The coordinator's state file: what it keeps, and what it refuses to start from."""

from __future__ import annotations

import json

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


NOT_SAVED_RUNS = [
    # (the file's text, what the refusal says)
    ("", "not JSON"),
    ("{", "not JSON"),
    ("[]", "holds a JSON list, not an object of fields"),
    ('{"run_id": "r"}', "field 'last_committed_round' is missing"),
    ('{"last_committed_round": 1, "epoch": 0}', "field 'run_id' is missing"),
    ('{"run_id": "r", "last_committed_round": 1}', "field 'epoch' is missing"),
    ('{"run_id": "r", "last_committed_round": "x", "epoch": 0}', "field 'last_committed_round' is \"x\", not a whole"),
    (
        '{"run_id": "r", "last_committed_round": "12", "epoch": 0}',
        "field 'last_committed_round' is \"12\", not a whole",
    ),
    ('{"run_id": "r", "last_committed_round": 1.7, "epoch": 0}', "field 'last_committed_round' is 1.7, not a whole"),
    ('{"run_id": "r", "last_committed_round": true, "epoch": 0}', "field 'last_committed_round' is true, not a whole"),
    ('{"run_id": "r", "last_committed_round": Infinity, "epoch": 0}', "field 'last_committed_round' is Infinity"),
    ('{"run_id": "r", "last_committed_round": 1e400, "epoch": 0}', "field 'last_committed_round' is Infinity"),
    ('{"run_id": "r", "last_committed_round": 1, "epoch": NaN}', "field 'epoch' is NaN, not a whole number"),
    ('{"run_id": "r", "last_committed_round": 1, "epoch": 0, "committed_epoch": 0.0}', "field 'committed_epoch' is"),
    ('{"run_id": 7, "last_committed_round": 1, "epoch": 0}', "field 'run_id' is 7, not a string"),
    ('{"run_id": "r", "last_committed_round": 1, "epoch": 0, "digest": []}', "field 'digest' is [], not a string"),
    ("[" * 100_000, "not JSON"),
]


@pytest.mark.parametrize(("text", "says"), NOT_SAVED_RUNS)
def test_a_file_that_is_not_a_saved_run_is_refused_saying_which_field(tmp_path, text, says):
    path = tmp_path / "run.json"
    path.write_text(text)
    with pytest.raises(ConfigError, match="not a saved run") as info:
        load_run(path, "r")
    assert says in str(info.value)


def test_a_file_that_is_not_utf8_is_refused_as_not_a_saved_run(tmp_path):
    path = tmp_path / "run.json"
    path.write_bytes(b"\xff\xfe\x00garbage")
    with pytest.raises(ConfigError, match="not a saved run: it is not UTF-8 text"):
        load_run(path, "r")


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("last_committed_round", 100000000000000000000000),  # beyond uint64: every Join's answer would fail
        ("epoch", 100000000000000000000000),
        ("last_committed_round", 2**64),
        ("epoch", 2**48 + 1),  # beyond the claims a joiner may make (rules.MAX_CLAIM)
    ],
)
def test_a_round_or_epoch_too_large_for_a_run_is_refused_naming_the_field(tmp_path, field, value):
    path = tmp_path / "run.json"
    record = {"run_id": "r", "last_committed_round": 1, "epoch": 1, field: value}
    path.write_text(json.dumps(record))
    with pytest.raises(ConfigError, match=f"holds {field} {value}, beyond"):
        load_run(path, "r")


def test_the_largest_round_and_epoch_a_run_reaches_load(tmp_path):
    path = tmp_path / "run.json"
    save_run(path, SavedRun("r", last_committed_round=2**48, epoch=2**48))
    assert load_run(path, "r") == SavedRun("r", 2**48, 2**48)


def test_a_coordinator_resumes_the_saved_round_and_epoch(tmp_path):
    path = tmp_path / "run.json"
    save_run(path, SavedRun("r", last_committed_round=41, epoch=2))
    coordinator = Coordinator(CoordinatorConfig(run_id="r", state_file=str(path)))
    assert coordinator.state.last_committed_round == 41 and coordinator.state.epoch == 2
    assert coordinator.state.next_round_id == 42
