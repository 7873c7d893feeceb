"""``loconet peer``: one training replica of a run, as a long-running process.

It joins the run through the coordinator, takes the run's state (or resumes
its own checkpoint and then re-syncs with the group), trains the task with
DiLoCo or Streaming DiLoCo, reports its loss, speed and bytes in heartbeats,
shows progress in the terminal, writes checkpoints atomically after committed
rounds, and on SIGTERM/SIGINT stops at the next step boundary, finishes any
round in flight by the protocol, writes a last checkpoint and leaves the run.

With ``--events`` it also prints one JSON object per line on stdout (joined,
committed, eval, finished) for the harness and tests. A harness controls it
through one narrow hook (``PeerHooks``; ``peer/harness/control.py``).
"""

from __future__ import annotations

import json
import logging
import math
import signal
import sys
import threading
import time
from dataclasses import dataclass, field
from typing import Protocol

import torch

from collectives.allocator import tune_malloc
from collectives.allreduce import AllReduceConfig
from collectives.elastic import ElasticCollective, ElasticConfig
from collectives.transport import TransportConfig
from peer.runtime.checkpoint import load_latest, save_checkpoint
from peer.runtime.training import Progress, TrainConfig, TrainLoop, make_optimizer
from peer.tasks.base import TaskConfig
from peer.tasks.registry import make_task

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class PeerConfig:
    """Everything ``loconet peer`` is told (its options come from these fields)."""

    coordinator: str = field(default="127.0.0.1:7070", metadata={"help": "host:port of the run's coordinator"})
    run_id: str = field(default="demo", metadata={"help": "run id", "flag": "run"})
    task: str = field(default="synthetic-lm", metadata={"help": "synthetic-lm, text-lm, or package.module:function"})
    task_config: TaskConfig = field(default_factory=TaskConfig, metadata={"cli": False})
    train: TrainConfig = field(default_factory=TrainConfig, metadata={"cli": False})
    name: str = field(default="", metadata={"help": "label shown on the dashboard"})
    transport: TransportConfig = field(default_factory=TransportConfig, metadata={"cli": False})
    checkpoint_dir: str | None = field(default=None, metadata={"help": "write checkpoints here, and resume from them"})
    keep_checkpoints: int = field(default=3, metadata={"help": "checkpoints to keep", "flag": "keep"})
    # Write a checkpoint after every this many committed rounds.
    checkpoint_every: int = field(default=1, metadata={"help": "committed rounds between checkpoints"})
    # This peer's data shard (peer i of n); with iid data only the seed stream differs.
    shard: int = field(default=0, metadata={"cli": False})
    shards: int = field(default=1, metadata={"cli": False})
    keep_results: int = field(
        default=ElasticConfig.keep_results,
        metadata={"help": "recent rounds' results kept for peers that were late for them"},
    )
    events: bool = field(default=False, metadata={"help": "print JSON events on stdout"})
    progress: bool | None = field(default=None, metadata={"help": "draw a progress bar (default: when stderr is a terminal)"})
    threads: int = field(default=1, metadata={"help": "torch threads for training"})


class PeerHooks(Protocol):
    """The one hook a harness has into a peer: when to join, and a word after each step."""

    def before_join(self, stop: threading.Event) -> bool:
        """Wait until the peer may join; False to stop instead."""

    def after_step(self, model: torch.nn.Module) -> str | None:
        """Called after each inner step; the name of an event to report, or None."""


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


def run_peer(config: PeerConfig, hooks: PeerHooks | None = None) -> int:
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
        # The codec and aggregator are the algorithm's, passed with every sync.
        allreduce=AllReduceConfig(timeout_s=train_cfg.round_timeout_s),
        keep_results=config.keep_results,
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
    if hooks is not None:
        events.emit("waiting")
        if not hooks.before_join(stop):
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
        digest=opt.state.digest(),
    )
    # A joiner (or a peer that was behind) counts steps from the run's count.
    loop = TrainLoop(task, model, opt, train_cfg, config.shard, config.shards, opt.inner_steps)
    display = ProgressDisplay(config.progress if config.progress is not None else sys.stderr.isatty(), train_cfg.steps)
    counters = elastic.transport.counters

    def on_step(p: Progress) -> None:
        said = hooks.after_step(model) if hooks is not None else None
        if said:
            events.emit(said, step=p.step)
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
                epoch=record.epoch,
                step=opt.inner_steps,
                bytes=record.bytes_sent,
                wall_s=record.wall_s,
                allreduce_s=record.allreduce_s,
                digest=opt.state.digest(),
                loss=loop.progress.loss,
                contributed=record.contributed,
                decisions=record.decisions,
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
        digest=opt.state.digest(),
        bytes_sent=counters.bytes_sent,
        bytes_served=elastic.state_server.bytes_served,
        bytes_received=counters.bytes_received,
        stopped=stop.is_set(),
        entropy_floor=task.entropy_floor,
    )
    elastic.close(leave=True, reason="stopped" if stop.is_set() else "finished")
    return 0


def _checkpoint(config: PeerConfig, model: torch.nn.Module, opt, step: int) -> None:
    state = {"model": model.state_dict(), "optimizer": opt.state_dict(), "step": step, "task": config.task}
    save_checkpoint(config.checkpoint_dir, step, state, keep=config.keep_checkpoints)
