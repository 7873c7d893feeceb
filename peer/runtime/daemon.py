"""``loconet peer``: one training replica of a run, as a long-running process.

It joins the run through the coordinator, takes the run's state (or resumes
its own checkpoint and then re-syncs with the group), trains the task with
DiLoCo or Streaming DiLoCo, reports its loss, speed and bytes in heartbeats,
shows progress in the terminal, writes checkpoints atomically after committed
rounds, and on SIGTERM/SIGINT stops at the next step boundary, finishes any
round in flight by the protocol, writes a last checkpoint and leaves the run.

With ``--events`` it also prints one JSON object per line on stdout (joined,
committed, eval, finished) for the harness and tests.
"""

from __future__ import annotations

import json
import logging
import math
import os
import signal
import sys
import threading
import time
from dataclasses import dataclass, field

import torch

from collectives.allocator import tune_malloc
from collectives.elastic import ElasticCollective, ElasticConfig
from collectives.transport import TransportConfig
from peer.runtime.checkpoint import load_latest, save_checkpoint
from peer.tasks.base import TaskConfig, make_task
from peer.runtime.training import Progress, TrainConfig, TrainLoop, global_digest, make_optimizer

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class PeerConfig:
    """Everything ``loconet peer`` is told."""

    coordinator: str
    run_id: str
    task: str = "synthetic-lm"
    task_config: TaskConfig = field(default_factory=TaskConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    name: str = ""
    transport: TransportConfig = field(default_factory=TransportConfig)
    checkpoint_dir: str | None = None
    keep_checkpoints: int = 3
    # Write a checkpoint after every this many committed rounds.
    checkpoint_every: int = 1
    # This peer's data shard (peer i of n); with iid data only the seed stream differs.
    shard: int = 0
    shards: int = 1
    events: bool = False
    # A JSON file the harness may write ({"slowdown": 3.0}) to make this peer a straggler.
    control_file: str | None = None
    # Wait until this file exists before joining (the harness starts joiners early, then opens the gate).
    start_when: str | None = None
    progress: bool | None = None  # None: when stderr is a terminal
    threads: int = 1


class Events:
    """JSON lines on stdout (when enabled)."""

    def __init__(self, enabled: bool) -> None:
        self.enabled = enabled
        self._lock = threading.Lock()

    def emit(self, event: str, **fields) -> None:
        """Print one event line."""
        if not self.enabled:
            return
        fields = {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in fields.items()}
        with self._lock:
            sys.stdout.write(json.dumps({"event": event, "t": time.time(), **fields}) + "\n")
            sys.stdout.flush()


class ProgressDisplay:
    """A live line in the terminal (rich), or nothing when stderr is not a terminal."""

    def __init__(self, enabled: bool, total: int | None) -> None:
        self._bar = None
        if enabled:
            from rich.progress import BarColumn, Progress as RichProgress, TextColumn, TimeElapsedColumn

            self._bar = RichProgress(
                TextColumn("[bold]{task.description}"),
                BarColumn(),
                TextColumn("step {task.completed}/{task.total}"),
                TextColumn("{task.fields[info]}"),
                TimeElapsedColumn(),
                transient=False,
            )
            self._bar.start()
            self._task = self._bar.add_task("training", total=total, info="")

    def update(self, p: Progress, sent: int) -> None:
        """Redraw with the latest figures."""
        if self._bar is not None:
            info = f"loss {p.loss:.3f} eval {p.eval_loss:.3f} rounds {p.rounds} {p.steps_per_s:.1f} it/s sent {sent / 1e6:.1f} MB"
            self._bar.update(self._task, completed=p.step, info=info)

    def close(self) -> None:
        """Stop drawing."""
        if self._bar is not None:
            self._bar.stop()


def run_peer(config: PeerConfig) -> int:
    """Run a peer until its steps are done or it is told to stop; return the exit code."""
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    tune_malloc()
    torch.set_num_threads(config.threads)
    events = Events(config.events)
    task = make_task(config.task, config.task_config)
    model = task.build_model()
    train_cfg = config.train
    elastic_cfg = ElasticConfig(
        coordinator=config.coordinator,
        run_id=config.run_id,
        name=config.name,
        transport=config.transport,
        allreduce=train_cfg.allreduce(),
    )
    elastic = ElasticCollective(elastic_cfg)
    opt = make_optimizer(model, elastic, train_cfg)  # registers itself as the state joiners fetch
    resumed = None
    if config.checkpoint_dir:
        resumed = load_latest(config.checkpoint_dir)
        if resumed is not None:
            path, state = resumed
            model.load_state_dict(state["model"])
            opt.load_state_dict(state["optimizer"])
            log.info("resumed from %s (step %d, round %d)", path, opt.inner_steps, opt.state.round_id)
    if config.start_when:
        events.emit("waiting", gate=config.start_when)
        while not os.path.exists(config.start_when):
            if stop.wait(0.05):
                return 0
    t0 = time.monotonic()
    snapshot = elastic.start(has_state=resumed is not None, last_round=opt.state.round_id)
    if snapshot is not None:
        opt.load_snapshot(snapshot)
    events.emit(
        "joined",
        peer_id=elastic.peer_id,
        address=elastic.address,
        sync_s=time.monotonic() - t0,
        resumed_step=opt.inner_steps,
        round=opt.state.round_id,
        digest=global_digest(opt),
    )
    # A joiner (or a peer that was behind) counts steps from the run's count.
    loop = TrainLoop(task, model, opt, train_cfg, config.shard, config.shards, opt.inner_steps)
    display = ProgressDisplay(config.progress if config.progress is not None else sys.stderr.isatty(), train_cfg.steps)
    counters = elastic.transport.counters

    control = Control(config.control_file, model)

    def on_step(p: Progress) -> None:
        if control.after_step():
            events.emit("diverge-injected", step=p.step)
        s = elastic.status
        s.step, s.loss, s.samples = p.step, p.loss, p.samples
        s.steps_per_s = p.steps_per_s
        s.activity = "training"
        display.update(p, counters.bytes_sent)

    def on_commit(record) -> None:
        if events.enabled:  # the digest hashes every global parameter: only when someone reads it
            events.emit(
                "committed",
                round=record.round_id,
                step=opt.inner_steps,
                bytes=record.bytes_sent,
                wall_s=record.wall_s,
                allreduce_s=record.allreduce_s,
                digest=global_digest(opt),
                loss=loop.progress.loss,
            )
        if config.checkpoint_dir and opt.committed_rounds % max(config.checkpoint_every, 1) == 0:
            # Inside the optimizer's step: the model and optimizer are consistent at inner_steps.
            _checkpoint(config, model, opt, opt.inner_steps)

    loop.on_step = on_step
    loop.on_eval = lambda step, loss: events.emit("eval", step=step, eval_loss=loss)
    opt.on_commit = on_commit
    opt.on_sync_start = lambda step: events.emit("sync-start", step=step)
    opt.on_miss = lambda record: events.emit("sync-missed", step=record.step, reason=record.reason[:500])
    try:
        progress = loop.run(stop)
    finally:
        display.close()
    if config.checkpoint_dir:
        _checkpoint(config, model, opt, opt.inner_steps)
    events.emit(
        "finished",
        step=progress.step,
        eval_loss=progress.eval_loss,
        rounds=progress.rounds,
        digest=global_digest(opt),
        bytes_sent=counters.bytes_sent,
        bytes_served=elastic.state_server.bytes_served,
        bytes_received=counters.bytes_received,
        stopped=stop.is_set(),
        entropy_floor=task.entropy_floor,
    )
    elastic.close(leave=True, reason="stopped" if stop.is_set() else "finished")
    return 0


class Control:
    """What the harness asks of this peer through its control file: train slower, or blow up.

    ``{"slowdown": 3}`` makes each step take three times as long (a straggler on
    purpose); each increase of ``"diverge"`` sets this peer's parameters to NaN
    once, as a training blow-up would (the optimizer must recover from it).
    """

    def __init__(self, path: str | None, model: torch.nn.Module) -> None:
        self.path = path
        self.model = model
        self.factor = 1.0
        self.diverged = 0
        self._checked = 0.0
        self._last = time.monotonic()

    def after_step(self) -> bool:
        """Apply the control file after a step; True if the parameters were just set to NaN."""
        now = time.monotonic()
        took = now - self._last
        poisoned = False
        if self.path and now - self._checked >= 1.0:
            self._checked = now
            try:
                with open(self.path) as f:
                    wanted = json.load(f)
                self.factor = max(1.0, float(wanted.get("slowdown", 1.0)))
                diverge = int(wanted.get("diverge", 0))
            except (OSError, ValueError, AttributeError, TypeError):
                self.factor, diverge = 1.0, self.diverged
            if diverge > self.diverged:
                self.diverged = diverge
                with torch.no_grad():
                    for p in self.model.parameters():
                        p.fill_(float("nan"))
                poisoned = True
        if self.factor > 1.0:
            time.sleep(took * (self.factor - 1.0))
        self._last = time.monotonic()
        return poisoned


def _checkpoint(config: PeerConfig, model: torch.nn.Module, opt, step: int) -> None:
    state = {"model": model.state_dict(), "optimizer": opt.state_dict(), "step": step, "task": config.task}
    save_checkpoint(config.checkpoint_dir, step, state, keep=config.keep_checkpoints)
