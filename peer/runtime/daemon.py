"""``loconet peer``: one training replica of a run, as a long-running process.

It joins the run through the coordinator, takes the run's state (or resumes
its own checkpoint and then re-syncs with the group), trains the task with
DiLoCo or Streaming DiLoCo, reports its loss, speed and bytes in heartbeats,
and writes checkpoints atomically after committed rounds.

A wrong ``--coordinator`` shows within seconds: a warning names the address
and what answered there (nothing, or not a coordinator), a countdown follows,
and after ``--connect-timeout`` the peer gives up with a one-line error.

SIGTERM and SIGINT stop it at once in every phase (connecting, joining,
fetching the state, training, syncing): the first signal interrupts the
blocking call in flight (``ElasticCollective.interrupt``; nothing of an
interrupted round is applied, but a round this peer voted to commit is waited
for briefly and applied if committed), the peer writes a last checkpoint if it had
joined, leaves the run (so a round waiting for it goes on without it) and
exits with 0 for SIGTERM, 130 for SIGINT. A second signal ends it
immediately.

What it prints (``peer/runtime/display.py``): a line when it joins (ending
with the device it trains on, ``--device``), one per committed round and a
summary, on stdout (plain text, or rich on a terminal), and a live bar on
stderr when stderr is a terminal. With
``--events`` stdout carries only JSON objects, one per line (connecting,
joined, sync-start, committed, eval, finished...), for the harness and
tests, and the human lines go to stderr. A harness controls the peer through
one narrow hook (``PeerHooks``; ``peer/harness/control.py``).
"""

from __future__ import annotations

import json
import logging
import math
import signal
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Protocol

import torch

from collectives.allocator import tune_malloc
from collectives.allreduce import AllReduceConfig
from collectives.elastic import LEAVE_ON_STOP_S, ElasticCollective, ElasticConfig, Stopped, leave_reason
from collectives.errors import ConfigError
from collectives.membership.roundplan import DEFAULT_RUN_ID
from collectives.net.addresses import COORDINATOR_PORT, LOCAL_HOST, coordinator_address, format_address
from collectives.net.transportconfig import TransportConfig
from optimizers.outer import OuterOptimizer
from peer.device import place_model, resolve_device
from peer.runtime.checkpoint import CheckpointError, check_checkpoint_dir, load_latest, restore, save_checkpoint
from peer.runtime.display import PeerDisplay, RoundFigures, Summary, bar_info, choose_streams, joined_line
from peer.runtime.training import Progress, TrainConfig, TrainLoop, epochs_problem, make_optimizer
from peer.tasks.base import Task, TaskConfig
from peer.tasks.registry import DEFAULT_TASK, TASK_HELP, make_task

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class PeerConfig:
    """Everything ``loconet peer`` is told (its options come from these fields)."""

    coordinator: str = field(
        default=format_address(LOCAL_HOST, COORDINATOR_PORT),
        metadata={"help": "host:port of the run's coordinator, as `loconet coordinator` prints it (a port alone: "
                  "this machine)"},
    )
    connect_timeout_s: float = field(
        default=ElasticConfig.connect_timeout_s,
        metadata={"help": "seconds to keep trying to reach the coordinator before giving up"},
    )
    run_id: str = field(default=DEFAULT_RUN_ID, metadata={"help": "run id", "flag": "run"})
    task: str = field(default=DEFAULT_TASK, metadata={"help": TASK_HELP})
    task_config: TaskConfig = field(default_factory=TaskConfig, metadata={"cli": False})
    train: TrainConfig = field(default_factory=TrainConfig, metadata={"cli": False})
    name: str = field(default="", metadata={"help": "label shown on the dashboard"})
    transport: TransportConfig = field(default_factory=TransportConfig, metadata={"cli": False})
    checkpoint_dir: str | None = field(default=None, metadata={"help": "write checkpoints here, and resume from them"})
    resume_from: str | None = field(
        default=None,
        metadata={
            "help": "resume from the newest checkpoint in this folder when --checkpoint-dir holds none (e.g. another "
            "peer's, when no live peer holds the run's state)"
        },
    )
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
    events: bool = field(
        default=False,
        metadata={"help": "print JSON events on stdout, and nothing else there (the human lines go to stderr)"},
    )
    progress: bool | None = field(
        default=None, metadata={"help": "draw a live progress bar on stderr (default: when stderr is a terminal)"}
    )
    threads: int = field(default=1, metadata={"help": "torch threads for training"})

    def __post_init__(self) -> None:
        # Checked here, so a wrong address is a usage error before anything starts.
        object.__setattr__(self, "coordinator", coordinator_address(self.coordinator))
        if not self.connect_timeout_s > 0:
            raise ConfigError(f"--connect-timeout must be positive, got {self.connect_timeout_s}")
        # 0 kept every checkpoint (a full one per round, for good); a checkpoint every 0 rounds means nothing.
        if self.keep_checkpoints < 1:
            raise ConfigError(f"--keep must be at least 1 (checkpoints kept), got {self.keep_checkpoints}")
        if self.checkpoint_every < 1:
            raise ConfigError(f"--checkpoint-every must be at least 1 (committed rounds), got {self.checkpoint_every}")
        if self.keep_results < 0:  # said by the result store in its own words otherwise ("keep (-1) and max_bytes")
            raise ConfigError(f"--keep-results must be >= 0 (0: keep none), got {self.keep_results}")


class PeerHooks(Protocol):
    """The one hook a harness has into a peer: when to join, its optimizer and loop, and a word after each step."""

    def before_join(self, stop: threading.Event) -> bool:
        """Wait until the peer may join; False to stop instead."""

    def before_training(self, stop: threading.Event) -> bool:
        """Joined: wait until the peer may take its first step (the others have joined too); False to stop instead."""

    def attach(self, optimizer: OuterOptimizer, loop: TrainLoop, emit: Callable[..., None]) -> None:
        """Called once, before training: the optimizer (its ``tamper`` hook), the loop (its ``batches``) and
        ``emit(event, **fields)``, which reports an event of the hook's own (a byzantine peer's)."""

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


# Exit codes of a requested stop. SIGTERM is how supervisors (systemd, Kubernetes, the harness) ask a peer
# to stop, and a clean stop is a success; Ctrl-C gives 130 as every loconet command does (docs/cli.md), so a
# script can tell an interrupted run from a finished one.
STOP_EXIT_CODES = {signal.SIGTERM: 0, signal.SIGINT: 130}


class StopSignals:
    """SIGTERM/SIGINT: the first sets ``stop`` and interrupts the peer's blocking calls; a second ends the process.

    The handler only sets flags (no I/O: it may run in the middle of a write). The
    second signal gets the default action, for a user who does not want to wait.
    """

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self) -> None:
        self.stop = threading.Event()
        self.signum: int | None = None
        self._elastic: ElasticCollective | None = None
        self._previous = {sig: signal.signal(sig, self._handle) for sig in self.SIGNALS}

    def watch(self, elastic: ElasticCollective) -> None:
        """Interrupt this peer's blocking calls on a stop (at once if one came already)."""
        self._elastic = elastic
        if self.stop.is_set():
            elastic.interrupt(f"stopped by {self.name}")

    def _handle(self, signum: int, frame: object) -> None:
        self.signum = signum
        self.stop.set()
        for sig in self.SIGNALS:
            signal.signal(sig, signal.SIG_DFL)
        if self._elastic is not None:
            self._elastic.interrupt(f"stopped by {self.name}")

    @property
    def name(self) -> str:
        """SIGTERM, SIGINT, or "" when no signal came."""
        return signal.Signals(self.signum).name if self.signum is not None else ""

    def exit_code(self) -> int:
        """0 when done or stopped by SIGTERM, 130 when stopped by SIGINT."""
        return STOP_EXIT_CODES.get(self.signum, 0) if self.signum is not None else 0

    def restore(self) -> None:
        """Put back the handlers that were there before."""
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


def run_peer(config: PeerConfig, hooks: PeerHooks | None = None) -> int:
    """Run a peer until its steps are done or it is told to stop; return the exit code (STOP_EXIT_CODES)."""
    signals = StopSignals()
    hold = None
    try:
        # Checked (and held for this peer) now, not at the first commit: see checkpoint.check_checkpoint_dir.
        hold = check_checkpoint_dir(config.checkpoint_dir) if config.checkpoint_dir else None
        return _run(config, hooks, signals)
    finally:
        signals.restore()
        if hold is not None:
            hold.release()


def _run(config: PeerConfig, hooks: PeerHooks | None, signals: StopSignals) -> int:
    began = time.monotonic()
    train_cfg = config.train
    # First: a CUDA device this machine lacks is a one-line error before anything starts.
    device = resolve_device(train_cfg.device)
    tune_malloc()
    torch.set_num_threads(config.threads)
    events = Events(config.events)
    display = PeerDisplay(*choose_streams(config.events, config.progress, sys.stdout, sys.stderr))
    task = make_task(config.task, config.task_config)
    problem = epochs_problem(task, train_cfg, config.shards)
    if problem:  # before the peer joins (its training loop would refuse it after)
        raise ConfigError(problem)
    model = place_model(task.build_model(), device)
    log.info("training %s with %s on %s", config.task, train_cfg.algorithm, device)
    elastic_cfg = ElasticConfig(
        coordinator=config.coordinator,
        run_id=config.run_id,
        name=config.name,
        transport=config.transport,
        # The codec and aggregator are the algorithm's, passed with every sync.
        allreduce=AllReduceConfig(timeout_s=train_cfg.round_timeout_s),
        keep_results=config.keep_results,
        connect_timeout_s=config.connect_timeout_s,
        model_settings=task.model_settings(),
    )
    elastic = ElasticCollective(elastic_cfg)
    signals.watch(elastic)
    opt = make_optimizer(model, elastic, train_cfg)  # registers itself as the state joiners fetch
    resumed = _load_checkpoint(config)
    if resumed is not None:
        path, state = resumed
        restore(path, state, config.task, task.model_settings(), model, opt)
        log.info("resumed from %s (step %d, round %d)", path, opt.inner_steps, opt.state.round_id)
    if hooks is not None:
        events.emit("waiting")
        if not hooks.before_join(signals.stop):
            return signals.exit_code()
    events.emit("connecting", coordinator=config.coordinator)
    t0 = time.monotonic()
    try:
        # Blocks until joined and holding the run's state; a stop cuts it short (it then leaves and closes).
        snapshot = elastic.start(has_state=resumed is not None, last_round=opt.state.round_id)
    except Stopped:
        where = "while joining" if elastic.peer_id else "before joining"
        display.line(f"stopped ({signals.name}) {where} run {config.run_id} (coordinator {config.coordinator})")
        return signals.exit_code()
    # From here on this peer is a member: however it ends (finished, stopped, or an error such as refusing the
    # run's state), it leaves at once, so that no round waits for it until its lease lapses.
    adopted = False
    failure: BaseException | None = None
    try:
        if snapshot is not None:
            opt.load_snapshot(snapshot)  # refuses another model, or a malformed state, changing nothing
            how = "fetched the run's state"
        elif elastic.kept_initial_state:
            how = "kept its initial state, identical to the run's"
        elif resumed is not None:
            how = f"resumed its checkpoint at step {opt.inner_steps}"
        else:
            how = "started the run"
        adopted = True
        sync_s = time.monotonic() - t0
        events.emit(
            "joined",
            peer_id=elastic.peer_id,
            address=elastic.address,
            sync_s=sync_s,
            # The state fetch, if any: seconds, bytes in all and per donor, blocks refetched (statesync.FetchReport).
            fetch=asdict(elastic.fetches[-1]) if elastic.fetches else None,
            # A fresh peer that kept its initial state, the founder's too (nothing fetched before the first commit).
            kept_initial=elastic.kept_initial_state,
            resumed_step=opt.inner_steps,
            round=opt.state.round_id,
            digest=opt.state.digest(),
            device=str(device),
        )
        label = f"{elastic.peer_id} ({config.name})" if config.name else elastic.peer_id
        joined = joined_line(config.run_id, label, elastic.address, opt.state.round_id, how, sync_s)
        display.joined(f"{joined}, on {device}")
        if hooks is not None:
            hooks.before_training(signals.stop)  # a stop meanwhile: the training loop ends at once
        progress = _train(config, hooks, signals, task, model, opt, elastic, events, display)
        stopped = signals.stop.is_set()
        if config.checkpoint_dir:
            # Consistent even after an interrupted round: nothing of it was applied.
            _checkpoint(config, task, model, opt, opt.inner_steps)
        counters = elastic.transport.counters
        events.emit(
            "finished",
            step=progress.step,
            eval_loss=progress.eval_loss,
            rounds=progress.rounds,
            digest=opt.state.digest(),
            bytes_sent=counters.bytes_sent,
            bytes_served=elastic.state_server.bytes_served,
            bytes_received=counters.bytes_received,
            # Results of rounds it was no member of, fetched to keep for the run when the coordinator asked.
            results_kept=elastic.late.fetched_count,
            results_kept_bytes=elastic.late.fetched_bytes,
            stopped=stopped,
            entropy_floor=task.entropy_floor,
            accuracy=task.accuracy(model),  # held-out accuracy of a classification task (None otherwise)
        )
    except BaseException as exc:
        failure = exc
        raise
    finally:
        display.stop_bar()
        reason = leave_reason(signals.name if signals.stop.is_set() else None, failure, adopted)
        bounded = signals.stop.is_set() or failure is not None
        elastic.close(leave=True, reason=reason, leave_timeout_s=LEAVE_ON_STOP_S if bounded else None)
        log.info("left run %s (%s) and closed", config.run_id, reason)
    display.summary(
        Summary(
            peer=label,
            run_id=config.run_id,
            outcome=f"stopped ({signals.name})" if stopped else "finished",
            steps=opt.inner_steps,  # the step a stop interrupted counts: the optimizer took it
            total_steps=_total_steps(train_cfg),
            rounds_committed=opt.committed_rounds,
            rounds_missed=opt.syncs_missed,
            eval_loss=progress.eval_loss,
            bytes_sent=counters.bytes_sent,
            bytes_received=counters.bytes_received,
            bytes_served=elastic.state_server.bytes_served,
            wall_s=time.monotonic() - began,
            checkpoint_dir=config.checkpoint_dir,
            trained_steps=progress.trained,
        )
    )
    return signals.exit_code()


def _load_checkpoint(config: PeerConfig) -> tuple[Path, dict] | None:
    """The checkpoint to resume: the newest of --checkpoint-dir, else of --resume-from (which must hold one)."""
    resumed = load_latest(config.checkpoint_dir) if config.checkpoint_dir else None
    if resumed is None and config.resume_from:
        resumed = load_latest(config.resume_from)
        if resumed is None:
            raise CheckpointError(
                f"--resume-from {config.resume_from}: no checkpoint (ckpt-*.pt) there; point it at a peer's "
                "--checkpoint-dir"
            )
    return resumed


def _total_steps(train: TrainConfig) -> int | None:
    """The step budget, or None when the peer trains for a duration instead."""
    return train.steps if train.duration_s is None else None


def _train(config, hooks, signals, task, model, opt, elastic, events, display) -> Progress:
    """The training loop with its reports (events, heartbeat status, display, checkpoints); the progress made.

    A stop ends it at the next step boundary, or at once when a round is in flight
    (the round is abandoned, nothing of it applied).
    """
    train_cfg = config.train
    total = _total_steps(train_cfg)
    if config.shards == 1:
        # Every peer started without --shard draws the same batches: their rounds average updates of the same data.
        log.warning("no --shard: this peer trains on shard 0/1, the batches of every peer started without one; "
                    "give each peer its own --shard I/N")
    # A joiner (or a peer that was behind) counts steps from the run's count.
    loop = TrainLoop(task, model, opt, train_cfg, config.shard, config.shards, opt.inner_steps)
    if hooks is not None:
        hooks.attach(opt, loop, events.emit)
    counters = elastic.transport.counters

    def on_step(p: Progress) -> None:
        said = hooks.after_step(model) if hooks is not None else None
        if said:
            events.emit(said, step=p.step)
        # The optimizer put the step, loss, samples and speed on elastic.status (the heartbeats' payload).
        display.update(p.step, total, bar_info(p.loss, p.eval_loss, p.steps_per_s, p.rounds, counters.bytes_sent))

    def on_eval(step: int, loss: float) -> None:
        elastic.status.eval_loss = loss
        if loop.progress.spread is not None:
            elastic.status.spread = loop.progress.spread
        events.emit("eval", step=step, eval_loss=loss, spread=loop.progress.spread)

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
                epsilon=record.epsilon,  # differential privacy: the privacy spent so far (None: no DP)
                staleness=record.staleness,  # asynchronous rounds: rounds stale (None: a synchronous algorithm)
                group=record.group_size,  # NoLoCo: the size of this peer's group in the round (None: all of it)
                fetched_bytes=record.fetched_bytes,  # a round applied late: what its result took to fetch
            )
        display.committed(
            RoundFigures(
                round_id=record.round_id,
                step=opt.inner_steps,
                total_steps=total,
                loss=loop.progress.loss,
                eval_loss=loop.progress.eval_loss,
                bytes_sent=record.bytes_sent,
                wall_s=record.wall_s,
                contributed=record.contributed,
            )
        )
        if config.checkpoint_dir and opt.committed_rounds % config.checkpoint_every == 0:
            # Inside the optimizer's step: the model and optimizer are consistent at inner_steps.
            _checkpoint(config, task, model, opt, opt.inner_steps)

    loop.on_step = on_step
    loop.on_eval = on_eval
    opt.on_commit = on_commit
    opt.on_sync_start = lambda step: events.emit("sync-start", step=step)

    def on_miss(record) -> None:
        if record.resynced:  # the run's state replaced this peer's: which round, and its digest (as "joined")
            digest = opt.state.digest() if events.enabled else ""
            events.emit("resynced", step=record.step, round=record.round_id, digest=digest)
        else:
            events.emit("sync-missed", step=record.step, reason=record.reason[:500], error=record.error)

    opt.on_miss = on_miss
    display.start_bar(total, loop.progress.step)
    try:
        opt.sync_if_due()  # resumed from a checkpoint taken while its sync was in flight: that sync first
        return loop.run(signals.stop)
    except Stopped:
        log.info("stopped by %s with a round in flight; nothing of it was applied", signals.name)
        return loop.progress
    finally:
        display.stop_bar()


def _checkpoint(config: PeerConfig, task: Task, model: torch.nn.Module, opt, step: int) -> None:
    """Write this peer's checkpoint of step; a failed write (a full or lost disk) is logged, and training goes on: the
    peer still holds the round it just committed, which the run may need from it."""
    state = {"model": model.state_dict(), "optimizer": opt.state_dict(), "step": step, "task": config.task,
             "model_settings": list(task.model_settings())}
    try:
        save_checkpoint(config.checkpoint_dir, step, state, keep=config.keep_checkpoints)
    except OSError as exc:
        log.error("could not write the checkpoint of step %d in --checkpoint-dir %s (%s); training goes on without "
                  "it (a restart resumes an older one)", step, config.checkpoint_dir, exc.strerror or exc)
