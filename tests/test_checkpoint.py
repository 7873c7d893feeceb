"""Checkpoints: atomic writes, the last K kept, damaged files skipped, nothing unpickled."""

import pytest
import torch

from peer.runtime.checkpoint import CheckpointError, checkpoint_path, list_checkpoints, load_latest, save_checkpoint


def state(step: int) -> dict:
    return {"model": {"w": torch.full((3,), float(step))}, "step": step, "task": "t"}


def test_save_then_load_latest_returns_the_newest(tmp_path):
    for step in (10, 20, 30):
        save_checkpoint(tmp_path, step, state(step), keep=5)
    path, loaded = load_latest(tmp_path)
    assert path == checkpoint_path(tmp_path, 30)
    assert loaded["step"] == 30 and torch.equal(loaded["model"]["w"], torch.full((3,), 30.0))


def test_only_the_last_k_are_kept(tmp_path):
    for step in range(1, 6):
        save_checkpoint(tmp_path, step, state(step), keep=2)
    assert [p.name for p in list_checkpoints(tmp_path)] == ["ckpt-0000000004.pt", "ckpt-0000000005.pt"]


def test_no_temporary_file_is_left_behind(tmp_path):
    save_checkpoint(tmp_path, 1, state(1))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt-0000000001.pt"]


def test_a_damaged_newest_checkpoint_falls_back_to_the_previous(tmp_path):
    save_checkpoint(tmp_path, 1, state(1))
    checkpoint_path(tmp_path, 2).write_bytes(b"torn write")
    path, loaded = load_latest(tmp_path)
    assert loaded["step"] == 1


def test_a_checkpoint_with_code_in_it_is_refused(tmp_path):
    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    torch.save({"step": 9, "x": Evil()}, checkpoint_path(tmp_path, 9))
    with pytest.raises(CheckpointError, match="ckpt-0000000009.pt"):
        load_latest(tmp_path)


def test_a_folder_of_only_unreadable_checkpoints_is_an_error_not_a_fresh_start(tmp_path):
    checkpoint_path(tmp_path, 1).write_bytes(b"torn")
    checkpoint_path(tmp_path, 2).write_bytes(b"torn too")
    with pytest.raises(CheckpointError, match=r"none of the 2 checkpoint\(s\) .* move them away"):
        load_latest(tmp_path)


def test_empty_or_missing_folder_has_no_checkpoint(tmp_path):
    assert load_latest(tmp_path / "nothing") is None
    assert load_latest(tmp_path) is None
