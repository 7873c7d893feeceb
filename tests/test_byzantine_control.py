"""A peer's harness controls turn it byzantine from its control file, and honest again (no processes)."""

from __future__ import annotations

import logging
from types import SimpleNamespace

import pytest
import torch

from peer.harness.control import Control, write_control

MODEL = torch.nn.Linear(2, 1)


class Recorder:
    """The daemon's ``Events.emit``: the events, in order."""

    def __init__(self) -> None:
        self.events: list[dict] = []

    def __call__(self, event: str, **fields) -> None:
        self.events.append({"event": event, **fields})

    def kinds(self) -> list[str]:
        return [e["event"] for e in self.events]


def attached(
    tmp_path, classes: int | None = None, batches=()
) -> tuple[Control, SimpleNamespace, SimpleNamespace, Recorder]:
    """A Control reading its file at every step, attached to a fake optimizer and loop."""
    control = Control(str(tmp_path / "peer1.control.json"), poll_s=0.0)
    optimizer = SimpleNamespace(tamper=None, inner_steps=7)
    loop = SimpleNamespace(task=SimpleNamespace(classes=classes), batches=iter(batches))
    emit = Recorder()
    control.attach(optimizer, loop, emit)
    return control, optimizer, loop, emit


def test_a_byzantine_control_installs_the_attack_as_the_optimizers_tamper(tmp_path, caplog):
    control, optimizer, _, emit = attached(tmp_path)
    write_control(tmp_path / "peer1.control.json", {"byzantine": "signflip"})
    with caplog.at_level(logging.WARNING, logger="peer.harness.control"):
        assert control.after_step(MODEL) is None
    assert optimizer.tamper is not None
    assert emit.events == [{"event": "byzantine-started", "attack": "signflip", "step": 7}]
    assert (
        "this peer corrupts every contribution it sends (attack signflip: -10 times its honest update)" in caplog.text
    )


def test_each_contribution_the_tamper_corrupts_is_counted_in_the_events(tmp_path):
    control, optimizer, _, emit = attached(tmp_path)
    write_control(tmp_path / "peer1.control.json", {"byzantine": "signflip,k=5"})
    control.after_step(MODEL)
    sent = optimizer.tamper([torch.tensor([3.0, -4.0])])
    optimizer.tamper([torch.tensor([0.0, 1.0])])
    assert sent[0].tolist() == [-15.0, 20.0]
    assert emit.events[1:] == [
        {
            "event": "byzantine-sent",
            "attack": "signflip,k=5",
            "contributions": 1,
            "honest_norm": 5.0,
            "sent_norm": 25.0,
        },
        {"event": "byzantine-sent", "attack": "signflip,k=5", "contributions": 2, "honest_norm": 1.0, "sent_norm": 5.0},
    ]
    assert control.corrupted == 2


def test_removing_the_attack_from_the_control_file_makes_the_peer_honest_again(tmp_path):
    control, optimizer, _, emit = attached(tmp_path)
    path = tmp_path / "peer1.control.json"
    write_control(path, {"byzantine": "zero"})
    control.after_step(MODEL)
    optimizer.tamper([torch.ones(2)])
    write_control(path, {"byzantine": None})
    control.after_step(MODEL)
    assert optimizer.tamper is None and control.attack is None
    assert emit.events[-1] == {"event": "byzantine-stopped", "attack": "zero", "step": 7, "contributions": 1}


def test_a_file_that_asks_for_the_same_attack_again_starts_it_once(tmp_path):
    control, _, _, emit = attached(tmp_path)
    write_control(tmp_path / "peer1.control.json", {"byzantine": "scale=3", "slowdown": 1.0})
    control.after_step(MODEL)
    control.after_step(MODEL)
    assert emit.kinds() == ["byzantine-started"]


def test_labelflip_flips_the_labels_of_the_batches_the_loop_draws_from_then_on(tmp_path):
    x = torch.zeros(3, 2)
    batches = [(x, torch.tensor([0, 1, 9])), (x, torch.tensor([2, 2, 2])), (x, torch.tensor([5, 6, 7]))]
    control, optimizer, loop, emit = attached(tmp_path, classes=10, batches=batches)
    path = tmp_path / "peer1.control.json"
    assert next(loop.batches)[1].tolist() == [0, 1, 9]
    write_control(path, {"byzantine": "labelflip"})
    control.after_step(MODEL)
    assert next(loop.batches)[1].tolist() == [7, 7, 7]
    write_control(path, {})
    control.after_step(MODEL)
    assert next(loop.batches)[1].tolist() == [5, 6, 7]
    assert emit.kinds() == ["byzantine-started", "byzantine-stopped"]
    assert optimizer.tamper is None


def test_labelflip_on_a_task_without_classes_is_refused_and_the_peer_stays_honest(tmp_path, caplog):
    control, optimizer, _, emit = attached(tmp_path, classes=None)
    write_control(tmp_path / "peer1.control.json", {"byzantine": "labelflip"})
    with caplog.at_level(logging.ERROR, logger="peer.harness.control"):
        control.after_step(MODEL)
    assert optimizer.tamper is None
    assert emit.kinds() == ["byzantine-refused"]
    assert "labelflip needs a classification task (one with classes)" in emit.events[0]["reason"]
    assert "cannot carry out attack 'labelflip'" in caplog.text


@pytest.mark.parametrize("content", ['{"byzantine": "flip"}', "not json"])
def test_an_unreadable_attack_leaves_the_peer_honest(tmp_path, content):
    control, optimizer, _, _ = attached(tmp_path)
    (tmp_path / "peer1.control.json").write_text(content)
    control.after_step(MODEL)
    assert optimizer.tamper is None


def test_an_attack_the_file_asks_for_before_training_starts_when_the_peer_attaches(tmp_path):
    write_control(tmp_path / "peer1.control.json", {"byzantine": "noise=0.5"})
    _, optimizer, _, emit = attached(tmp_path)
    assert optimizer.tamper is not None
    assert emit.events == [{"event": "byzantine-started", "attack": "noise=0.5", "step": 7}]
