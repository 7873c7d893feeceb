"""A harness run's JSON report, from what its processes recorded: rounds, each fired event's recovery, losses,
bytes, whether the survivors are identical, the peers that crashed (``harness_report``)."""

from __future__ import annotations

import contextlib
import math
import statistics
import sys
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path

import torch

from collectives.net.ratelimit import parse_bandwidth
from peer.device import place_model
from peer.harness import outcome
from peer.harness.config import HarnessConfig
from peer.harness.joiners import joiners, restarts_from_round_0, rollbacks
from peer.harness.processes import Proc
from peer.harness.recovery import back_s, comes_back, lost_s
from peer.harness.schedule import Fired
from peer.harness.stall import StallRecord
from peer.tasks.base import Task


def initial_evaluation(task: Task, device: torch.device) -> tuple[float, int]:
    """The eval loss of the task's freshly built model on device (the peers' own), and its parameter count."""
    model = place_model(task.build_model(), device)
    with contextlib.redirect_stdout(sys.stderr):  # a user task's prints must not break the JSON report
        initial = task.evaluate(model)
    return initial, sum(p.numel() for p in model.parameters())


def crashed_processes(processes: Iterable[Proc]) -> list[dict]:
    """Every peer process that exited with an error of its own: its name, exit code, one-line error and log."""
    return [
        {"peer": p.name, "exit_code": p.proc.returncode, "error": p.last_words(), "log": str(p.log_path)}
        for p in processes
        if outcome.unexpected_exit(p.proc.poll(), p.signalled)
    ]


def harness_report(
    config: HarnessConfig, *, peers: Mapping[str, Proc], all_events: Callable[[str], list[dict]],
    rounds: dict[tuple[int, int], float], fired: list[Fired], status: dict, aborted_before: int,
    initial: tuple[float, int], entropy_floor: float | None, crashed: list[dict], stalls: list[StallRecord],
    wall_s: float, dashboard: str, workdir: Path,
) -> dict:
    """The report of a run: ``peers`` are each peer's current process, ``all_events(name)`` the events of all of its
    processes; ``initial`` is (eval loss, parameters) of the initial model. Sets each fired event's recovery_s, lost_s
    and back_s, and stops the stalls before it takes their figures."""
    c = config
    # A peer a stop event ended (and did not start again) finished too, but it is no survivor.
    finished = {n: next(e for e in p.events if e["event"] == "finished") for n, p in peers.items()
                if any(e["event"] == "finished" and not e.get("stopped") for e in p.events)}
    survivors = list(finished)
    # Survivors whose syncs found nobody holding the run's state (the others finished and left while they
    # were paused or down): they trained on alone, by design (docs/durability.md), so their parameters are
    # their own. Identity is judged over the others.
    by_peer = {n: list(p.events) for n, p in peers.items()}
    behind = outcome.left_behind(by_peer, survivors)
    # The survivors' own syncs (rounds applied late are not syncs of theirs): what each event cost them.
    syncs = {n: [(e["t"], e["wall_s"]) for e in peers[n].events
                 if e["event"] == "committed" and e.get("contributed", True) and e.get("wall_s")]
             for n in survivors}
    for f in fired:
        after = [t for t in rounds.values() if t > f.wall]
        f.recovery_s = (min(after) - f.wall) if after else None
        f.lost_s = lost_s(f.wall, syncs)
        if comes_back(f.event):
            contributed = [e["t"] for e in all_events(f.event.target)
                           if e["event"] == "committed" and e.get("contributed", True)]
            f.back_s = back_s(f.wall, f.event.duration_s or 0.0, contributed)
    # A survivor holds the rounds any of its processes committed (a stop event's restart makes a new one).
    every_life = {n: all_events(n) for n in survivors}
    digest_round, identical = outcome.identical(every_life, [n for n in survivors if n not in behind] or survivors)
    aborted = aborted_before + status["summary"]["rounds_aborted"]
    initial_loss, numel = initial
    dp_bytes = outcome.data_parallel_bytes(c.train.steps, numel, outcome.committed_members(status) or [c.peers])
    sent = [f["bytes_sent"] - f.get("bytes_served", 0) for f in finished.values()]
    report = {
        "peers": c.peers,
        "joined": sum(e.action == "join" for e in c.events),
        "rounds_committed": len(rounds),
        "rounds_aborted": aborted,
        "aborted_rounds_retried": outcome.retried(status),
        "events": [
            {"event": str(f.event), "time_s": round(f.time_s, 3), "recovery_s": f.recovery_s, "lost_s": f.lost_s,
             **({"target": f.event.target, "back_s": f.back_s} if comes_back(f.event) else {}), "detail": f.detail}
            for f in fired
        ],
        "byzantine": outcome.byzantine(by_peer),
        # The run's state surviving its holders: joiners' fetch and catch-up, and any restart or rollback.
        "joiners": joiners(by_peer, c.peer_names[c.peers:]),
        "restarts_from_round_0": restarts_from_round_0(by_peer),
        # Results of rounds of some of the peers that others fetched to keep for the run (docs/durability.md).
        "results_kept": {
            "results": sum(f.get("results_kept", 0) for f in finished.values()),
            "bytes": sum(f.get("results_kept_bytes", 0) for f in finished.values()),
        },
        "rollbacks": rollbacks(status),
        "initial_eval_loss": initial_loss if math.isfinite(initial_loss) else None,
        # A loss that is not finite comes as None (JSON has no NaN): the mean is over the others.
        "final_eval_loss": outcome.mean_of(f["eval_loss"] for f in finished.values()),
        "eval_loss_per_peer": {n: f["eval_loss"] for n, f in finished.items()},
        "entropy_floor": entropy_floor,
        # A classification task's held-out accuracy, mean over the peers that finished (None otherwise).
        "final_accuracy": outcome.mean_of(f.get("accuracy") for f in finished.values()),
        "bytes_sent_per_peer": statistics.mean(sent) if sent else 0,
        "state_sync_bytes_per_peer": (
            statistics.mean(f.get("bytes_served", 0) for f in finished.values()) if finished else 0
        ),
        "data_parallel_bytes_per_peer": dp_bytes,
        "survivors_identical": identical,
        "identical_at_round": digest_round,
        "last_round_per_peer": outcome.last_rounds(every_life, survivors),
        "left_behind": behind,
        "peers_alive": len(survivors),
        # Peer processes that ended with an error of their own (not a kill or stop of the scenario's).
        "crashed": crashed,
        "wall_s": wall_s,
        "dashboard": dashboard,
        "workdir": str(workdir),
    }
    cap = c.uplink or c.bandwidth
    utilization = outcome.link_utilization(by_peer, parse_bandwidth(cap)) if cap else None
    if utilization is not None:
        report["link_utilization"] = utilization
    report.update(outcome.replicas(by_peer))
    if stalls:
        for record in stalls:
            record.stall.stop()
        late = c.peer_names[c.peers:]
        report["stalls"] = [record.report(by_peer, status, late) for record in stalls]
    return report
