"""The run's state survives its holders: ``loconet peer`` processes that all leave, then come back.

Each test is one invariant of issue 14, end to end with real processes and gRPC on 127.0.0.1:
- after every peer left, a fresh peer waits (it never starts the run again from random weights);
- a peer restarted with its checkpoint directory brings the run back at its last committed round, and
  the waiting peer then fetches the state from it;
- ``--resume-from`` resumes another peer's checkpoint; one of another run is refused.
- a checkpoint of an older round waits for a holder of the last one; the run never goes back by itself.
"""

from __future__ import annotations

import json
import sys
import time
import urllib.request
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
from support.procs import DaemonRun

pytestmark = pytest.mark.timeout(300)

class Run(DaemonRun):
    """A DaemonRun whose coordinator keeps a state file, with the dashboard's status."""

    def __init__(self, tmp: Path) -> None:
        super().__init__(tmp, "durable", "--state-file", str(tmp / "coordinator-state.json"))

    def status(self) -> dict:
        with urllib.request.urlopen(f"{self.coordinator.dashboard}/api/status", timeout=10) as r:
            return json.loads(r.read())


@pytest.fixture
def run(tmp_path):
    r = Run(tmp_path)
    yield r
    r.close()


def finished(peer, timeout: float = 240) -> dict:
    return peer.wait_event(lambda e: e["event"] == "finished", timeout)


def last_commit(peer) -> dict:
    return [e for e in peer.events if e["event"] == "committed"][-1]


def wait_until(check, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        time.sleep(0.2)
    raise AssertionError(f"not within {timeout:g} s: {what}")


def train_then_leave(run: Run, tmp: Path) -> tuple[dict, Path, float]:
    """Two peers train 60 steps with checkpoints and finish: the last holder's last commit, checkpoint folder and
    final eval loss."""
    peers = {n: run.add(n, "--steps", "60", "--checkpoint-dir", str(tmp / f"ckpt-{n}")) for n in ("a", "b")}
    done = {n: finished(p) for n, p in peers.items()}
    assert all(d["rounds"] >= 3 for d in done.values())
    for p in peers.values():
        p.proc.wait(timeout=30)
    # The peer that committed the run's last round holds its state (the other may have left a round earlier).
    name = max(peers, key=lambda n: last_commit(peers[n])["round"])
    return last_commit(peers[name]), tmp / f"ckpt-{name}", done[name]["eval_loss"]


def test_after_every_peer_left_a_fresh_peer_waits_instead_of_starting_the_run_again(run, tmp_path):
    last, _, _ = train_then_leave(run, tmp_path)
    fresh = run.add("fresh", "--steps", "80")
    waiting = wait_until(lambda: run.status().get("waiting"), 60, "the coordinator lists the fresh peer as waiting")
    assert f"committed round {last['round']}" in waiting["reason"]
    assert "--resume-from" in waiting["reason"]
    time.sleep(3)
    assert not any(e["event"] == "joined" for e in fresh.events), "it did not found the run anew"


def test_a_peer_restarted_with_its_checkpoint_brings_the_run_back_and_the_waiting_peer_joins_it(run, tmp_path):
    last, ckpt, trained_loss = train_then_leave(run, tmp_path)
    fresh = run.add("fresh", "--steps", "100")
    wait_until(lambda: run.status().get("waiting"), 60, "the fresh peer waits")
    back = run.add("a-again", "--steps", "100", "--checkpoint-dir", str(ckpt), "--eval-every", "5")
    joined = back.wait_event(lambda e: e["event"] == "joined", 60)
    assert joined["round"] == last["round"] and joined["digest"] == last["digest"]
    fetched = fresh.wait_event(lambda e: e["event"] == "joined", 60)
    assert fetched["round"] >= last["round"], "the waiting peer fetched the run's state, not a new one"
    first_eval = back.wait_event(lambda e: e["event"] == "eval", 120)["eval_loss"]
    # Continued from its checkpoint: its loss stays near where the run was, far from an untrained model's log(64).
    assert first_eval < (trained_loss + 4.16) / 2
    finished(back)
    finished(fresh)
    common = {e["round"]: e["digest"] for e in back.events if e["event"] == "committed"}
    theirs = {e["round"]: e["digest"] for e in fresh.events if e["event"] == "committed"}
    shared = set(common) & set(theirs)
    assert shared and all(common[r] == theirs[r] for r in shared)
    assert min(shared) > last["round"], "the run went on from its last committed round"


def test_resume_from_takes_another_peers_checkpoint(run, tmp_path):
    last, ckpt, _ = train_then_leave(run, tmp_path)
    other = run.add("other", "--steps", "80", "--resume-from", str(ckpt))
    joined = other.wait_event(lambda e: e["event"] == "joined", 60)
    assert (joined["round"], joined["digest"]) == (last["round"], last["digest"])
    finished(other)


def test_a_checkpoint_of_an_older_round_waits_instead_of_rolling_the_run_back(run, tmp_path):
    last, ckpt, _ = train_then_leave(run, tmp_path)
    # Every peer left right after the last commit: their Leave carried that round's digest.
    assert len(run.status()["state_digest"]) == 64
    older = tmp_path / "ckpt-older"
    older.mkdir()
    kept = sorted(ckpt.glob("ckpt-*.pt"))[:-1]  # without the newest: an older round's checkpoint
    for f in kept:
        (older / f.name).write_bytes(f.read_bytes())
    old = run.add("old", "--steps", "80", "--checkpoint-dir", str(older))
    waiting = wait_until(lambda: run.status().get("waiting"), 60, "the peer with the older checkpoint waits")
    assert f"committed round {last['round']}" in waiting["reason"] and "--allow-rollback" in waiting["reason"]
    time.sleep(3)
    status = run.status()
    assert status["last_committed_round"] == last["round"], "the run did not go back"
    assert not [e for e in status["events"] if e["kind"] == "rollback"]
    assert not any(e["event"] == "committed" for e in old.events)
