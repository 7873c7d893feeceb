"""Checkpoints: atomic writes, the last K kept, damaged files skipped, nothing unpickled."""

import pytest
import torch

from collectives.errors import ConfigError
from peer.runtime.checkpoint import (
    CheckpointError,
    check_checkpoint_dir,
    checkpoint_path,
    list_checkpoints,
    load_latest,
    restore,
    save_checkpoint,
)


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


def test_a_newest_checkpoint_with_flipped_bytes_falls_back_to_the_previous(tmp_path, caplog):
    # torch.load read the flipped bytes as they were, and the peer resumed them.
    save_checkpoint(tmp_path, 1, state(1))
    damaged = save_checkpoint(tmp_path, 2, {"model": {"w": torch.zeros(4096)}, "step": 2, "task": "t"})
    raw = bytearray(damaged.read_bytes())
    at = raw.index(bytes(4096 * 4)) + 100  # inside the tensor's stored bytes
    raw[at:at + 8] = b"\xff" * 8
    damaged.write_bytes(bytes(raw))
    path, loaded = load_latest(tmp_path)
    assert loaded["step"] == 1
    assert "fails its CRC: the file is damaged" in caplog.text


def test_half_written_checkpoints_of_a_killed_writer_are_removed_at_the_check(tmp_path):
    save_checkpoint(tmp_path, 1, state(1))
    (tmp_path / ".ckpt-ab12cd.tmp").write_bytes(b"half of a checkpoint")
    check_checkpoint_dir(tmp_path).release()
    assert sorted(p.name for p in tmp_path.iterdir()) == [".lock", "ckpt-0000000001.pt"]


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


# -- resuming: a checkpoint of this peer's task and model, that its optimizer takes ----------------------------


class Optimizer:
    """Takes the optimizer state it is given, or refuses it as an optimizer of another algorithm does."""

    def __init__(self, refusal: str = "") -> None:
        self.refusal, self.loaded = refusal, None

    def load_state_dict(self, state: dict) -> None:
        if self.refusal:
            raise ConfigError(self.refusal)
        self.loaded = state


def written(model: torch.nn.Module, settings: list[str] | None = ("heads 2",)) -> dict:
    state = {"model": model.state_dict(), "optimizer": {"round_id": 3}, "step": 30, "task": "t"}
    if settings is not None:
        state["model_settings"] = list(settings)
    return state


def test_a_checkpoint_of_this_task_and_model_is_restored_into_the_model_and_the_optimizer():
    source, target, opt = torch.nn.Linear(3, 2), torch.nn.Linear(3, 2), Optimizer()
    restore("ckpt-30.pt", written(source), "t", ("heads 2",), target, opt)
    assert torch.equal(target.weight, source.weight) and opt.loaded == {"round_id": 3}


@pytest.mark.parametrize(
    ("task", "settings", "model", "refusal", "match"),
    [
        ("u", ("heads 2",), torch.nn.Linear(3, 2), "", "ckpt-30.pt is a checkpoint of task 't' and this peer runs 'u'"),
        ("t", ("heads 4",), torch.nn.Linear(3, 2), "",
         r"another model than this peer's \(heads 4, the checkpoint: heads 2\)"),
        (
            "t",
            ("heads 2",),
            torch.nn.Linear(3, 5),
            "",
            r"cannot resume from ckpt-30.pt \(Error\(s\) in loading state_dict "
            r"for Linear: size mismatch for weight",
        ),
        ("t", ("heads 2",), torch.nn.Linear(3, 2), "a 'diloco' state",
         r"cannot resume from ckpt-30.pt \(a 'diloco' state\)"),
    ],
)
def test_a_checkpoint_written_otherwise_is_refused_naming_it_and_what_differs(task, settings, model, refusal, match):
    with pytest.raises(CheckpointError, match=match) as info:
        restore("ckpt-30.pt", written(torch.nn.Linear(3, 2)), task, settings, model, Optimizer(refusal))
    assert str(info.value).endswith(
        "start this peer with the options it was written with, or move it away to start afresh"
    )


def test_a_checkpoint_that_names_no_model_settings_is_restored_when_the_shapes_fit():
    # Written before checkpoints named the model's settings: only the shapes are checked.
    target, opt = torch.nn.Linear(3, 2), Optimizer()
    restore("ckpt-30.pt", written(torch.nn.Linear(3, 2), settings=None), "t", ("heads 4",), target, opt)
    assert opt.loaded == {"round_id": 3}


def test_a_checkpoint_folder_that_is_missing_is_made_at_the_check(tmp_path):
    check_checkpoint_dir(tmp_path / "a" / "b").release()
    assert [p.name for p in (tmp_path / "a" / "b").iterdir()] == [".lock"]


def test_a_checkpoint_folder_another_peer_holds_is_refused_naming_its_pid_until_it_lets_go(tmp_path):
    # Two peers on one folder overwrote each other's checkpoints (one peer's inner optimizer state lost).
    import os

    held = check_checkpoint_dir(tmp_path)
    with pytest.raises(ConfigError, match=rf"--checkpoint-dir {tmp_path} is in use by another peer \(pid "
                                          rf"{os.getpid()}\): give each peer a folder of its own"):
        check_checkpoint_dir(tmp_path)
    held.release()
    check_checkpoint_dir(tmp_path).release()


@pytest.mark.parametrize(
    ("where", "says"),
    [("afile", "--checkpoint-dir {d}/afile is a file, not a folder"),
     ("afile/sub", "--checkpoint-dir {d}/afile/sub: cannot write in it (Not a directory)")],
)
def test_a_checkpoint_folder_that_cannot_take_checkpoints_is_refused_naming_it(tmp_path, where, says):
    (tmp_path / "afile").write_text("not a folder")
    with pytest.raises(CheckpointError) as info:
        check_checkpoint_dir(tmp_path / where)
    assert str(info.value).startswith(says.format(d=tmp_path))


def test_a_checkpoint_that_cannot_be_written_mid_run_is_logged_and_training_goes_on(tmp_path, caplog):
    # The folder was checked at the start, then lost (here: replaced by a file); the peer holds the round it just
    # committed, which the run may need from it, so it does not die for its checkpoint.
    from types import SimpleNamespace

    from peer.runtime.daemon import _checkpoint

    lost = tmp_path / "ckpt"
    lost.write_text("not a folder any more")
    config = SimpleNamespace(checkpoint_dir=str(lost), keep_checkpoints=3, task="t")
    model = torch.nn.Linear(2, 1)
    opt = SimpleNamespace(state_dict=lambda: {})
    task = SimpleNamespace(model_settings=lambda: ())
    _checkpoint(config, task, model, opt, 40)
    said = [r.getMessage() for r in caplog.records if r.levelname == "ERROR"]
    assert said == [f"could not write the checkpoint of step 40 in --checkpoint-dir {lost} (File exists); training "
                    "goes on without it (a restart resumes an older one)"]
