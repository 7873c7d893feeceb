"""``loconet bench coding``: synchronous SGD under stragglers, coded and not, on the same data and seeds.

In one invocation, each method of ``--methods`` trains the same model from
the same seed for ``--steps`` steps, one round per step, with ``--peers``
workers while ``--pattern`` slows some of them down (``peer/stragglers.py``):

- ``wait``: synchronous SGD that waits for every worker (quorum ``all``);
- ``ignore``: the first n-s workers' gradients, averaged (``allbut:s``; biased);
- ``coded``: gradient coding with s stragglers (``coded:s``), fp32 payloads;
- ``coded-int8``: the same with int8 payloads (the error quantization adds after decoding);
- ``backup``: dynamic backup workers, k chosen each step (quorum ``backup``);
- ``fixed-kK``: the first K workers (``allbut:n-K``), the fixed-k baselines of dynamic backup workers;
- ``sr-sgc``, ``m-sgc``: sequential gradient coding (``seq-sgc``, quorum ``grace:λ``) for the (B, W, λ)
  model ``--sgc-model`` names (by default the bursty pattern's, one round longer and wider: a straggler
  left out of a round is late for the next while it fetches the result); a step's gradient is applied
  when its job completes, up to T rounds later.

Every run is real: an in-process coordinator and one ``ElasticCollective``
per worker (its own gRPC server on 127.0.0.1), one thread each, running the
registered algorithm (``coded-sgd`` or ``sync-sgd``). Compute is modeled:
the workers share this machine's cores, so each partition batch costs its
real forward and backward pass plus ``--unit-ms`` times the worker's
slowdown at that step, slept (a worker with its own accelerator; the real
pass is a few milliseconds). The rounds, their bytes and the waiting are
real.

Per method: step times (between the coordinator's commits), the eval loss of
the global parameters every ``--eval-every`` steps and at the end, the time
to reach wait-for-all's final loss, and the decoded gradient's relative
error against the full gradient (the mean over all n partitions' batches of
that step, computed on the side at every checked step).
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import logging
import math
import statistics
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from collectives.elastic import ElasticCollective, ElasticConfig
from collectives.errors import ConfigError, LoconetError
from collectives.gradcoding.seqcoding import make_scheme
from collectives.gradcoding.stragglermodel import BurstyModel
from collectives.net.transportconfig import TransportConfig
from collectives.reduce.parts import flatten
from optimizers.coded import CodedSGD, StepSuperseded
from optimizers.outer_optim import OuterConfig
from optimizers.seqcoded import SequentialCodedSGD
from peer.bench.fields import Fields, describe_report
from peer.bench.kit import COMMA_LIST, add_bench_options, require
from peer.bench.progress import Progress, progress_for
from peer.coordinator.config import CoordinatorConfig
from peer.coordinator.thread import CoordinatorThread
from peer.device import place_model, resolve_device
from peer.jsonout import json_line
from peer.options import read_options
from peer.runtime.training import TaskPartitions, TrainConfig, make_optimizer
from peer.stragglers import BurstyStragglers, StragglerPattern
from peer.tasks.base import Task, TaskConfig
from peer.tasks.registry import DEFAULT_TASK, make_task

log = logging.getLogger(__name__)

# How often a modeled compute checks whether its step was committed without it.
CANCEL_POLL_S = 0.005
# Heartbeats carry the run's last committed round to the workers: a straggler learns within this long that
# its step is void.
HEARTBEAT_S = 0.05

# The grace of the sequential codes' rounds: once n-lambda workers are ready, the others get 20% of the
# time since the last commit (fast workers' jitter is far below that, a straggler's delay far above).
SGC_GRACE = 0.2

METHODS = ("wait", "ignore", "coded", "coded-int8", "backup", "sr-sgc", "m-sgc")
RUN_TIMEOUT_S = 900.0
# How long run_method waits for its workers to see the stop signal and leave, once it stops them.
STOP_GRACE_S = 30.0

FIELDS: Fields = {
    "peers": "workers per run (--peers); the data is cut into this many partitions",
    "stragglers": "stragglers s the coded and ignore methods tolerate (--stragglers)",
    "pattern": "who is slowed, when and by how much (--pattern, peer/stragglers.py)",
    "config": "the rest of what was run: task, steps, modeled compute unit, optimizer and learning rate, batch size, "
    "seed",
    "target_eval_loss": "the target of time_to_target_s: wait-for-all's final eval loss",
    "methods": "one entry per method of --methods",
    "methods[].method": "wait, ignore, coded, coded-int8, backup, sr-sgc, m-sgc, or fixed-kK (the first K workers)",
    "methods[].algorithm": "the registered algorithm the method runs (coded-sgd, sync-sgd, seq-sgc)",
    "methods[].quorum": "the coordinator's quorum policy of the run",
    "methods[].codec": "the codec of its rounds",
    "methods[].step_s_median": "median seconds between consecutive committed steps (the coordinator's commits)",
    "methods[].step_s_p90": "90th percentile of those seconds",
    "methods[].time_to_target_s": "seconds from the first step's start to the first evaluated step whose eval loss "
    "is at most target_eval_loss (null: never reached)",
    "methods[].time_to_target_over_wait": "time_to_target_s / wait-for-all's time_to_target_s (below 1: faster)",
    "methods[].final_eval_loss": "eval loss of the global parameters after --steps steps (every method but wait "
    "trains --overrun times longer, for time_to_target_s)",
    "methods[].eval_losses": "[step, eval loss] every --eval-every steps, in order",
    "methods[].curve_max_abs_diff_from_wait": "largest |eval loss - wait-for-all's eval loss| at the same step "
    "(the same gradients give the same curve, up to the codec's error)",
    "methods[].decode_rel_error_max": "largest ||applied gradient - full gradient|| / ||full gradient|| over the "
    "checked steps (the full gradient: the mean over all n partitions' batches of that step)",
    "methods[].bytes_sent_per_peer": "bytes each worker sent over the run, mean over workers",
    "methods[].compute_load": "fraction of a step's data a worker computed per step, mean over workers (coded: "
    "(s+1)/n; 1/n uncoded; sequential codes: partitions computed per round over a job's partitions)",
    "methods[].load_formula": "sr-sgc, m-sgc: the paper's load for the scheme's (B, W, lambda) (null otherwise)",
    "methods[].round_load_max": "sr-sgc, m-sgc: the most any worker was assigned in one round, as a share of a "
    "job's data, over the run (the paper's measure of load; null otherwise)",
    "methods[].gc_load_same_tolerance": "sr-sgc, m-sgc: plain gradient coding's load (lambda+1)/n for the same "
    "tolerance (null otherwise)",
    "methods[].jobs_lost": "sr-sgc, m-sgc: jobs the scheme could not complete (stragglers outside the model), "
    "never applied (null otherwise)",
    "methods[].sgc_model": "sr-sgc, m-sgc: the (B, W, lambda) the scheme was built for, and its delay T",
    "methods[].k_chosen": "backup only: the k of each committed step's round, [min, median, max]",
    "methods[].steps_committed": "steps committed (wait: --steps; the others: --overrun times --steps)",
    "methods[].members_per_round": "[fewest, most] members of a committed round",
    "methods[].identical": "every worker ended with the same global parameters",
    "methods[].wall_s": "wall seconds of the run",
}


def _model_arg(text: str) -> tuple[int, int, int]:
    """``B,W,LAMBDA`` (--sgc-model) as three whole numbers; ConfigError saying how to write them."""
    try:
        b, w, lam = (int(v) for v in text.split(","))
    except ValueError:
        raise ConfigError(f"--sgc-model {text!r}: write B,W,LAMBDA, three whole numbers, e.g. 2,3,1") from None
    return b, w, lam


@dataclass(frozen=True)
class CodingBenchConfig:
    """What ``bench coding`` runs: its options' defaults are these fields'."""

    peers: int = field(default=6, metadata={"help": "workers per run (partitions of the data)"})
    stragglers: int = field(default=1, metadata={"help": "stragglers s to tolerate"})
    pattern: str = field(
        default="random,x=4",
        metadata={"help": "straggler pattern: random,x=X; persistent,worker=I,x=X; bursty,B=..,W=..,lambda=..,x=X"},
    )
    steps: int = field(default=100, metadata={"help": "steps (rounds) per method"})
    methods: tuple[str, ...] = field(
        default=METHODS,
        metadata={"help": "comma-separated: wait, ignore, coded, coded-int8, backup, fixed-kK", **COMMA_LIST},
    )
    task: str = field(default=DEFAULT_TASK, metadata={"help": "the task every run trains"})
    # Modeled seconds of one partition batch's compute at normal speed; milliseconds on the command line.
    unit_s: float = field(
        default=0.2,
        metadata={"help": "modeled milliseconds of one partition batch's compute at normal speed", "flag": "unit-ms",
                  "parse": lambda text: float(text) / 1e3, "format": lambda s: f"{s * 1e3:g}", "metavar": "UNIT_MS"},
    )
    # The optimizer every worker applies the round's gradient with: Adam trains the transformer smoothly,
    # where SGD's loss curve swings by more than the methods differ (measured: BENCHMARKS.md).
    optimizer: str = field(
        default="adam",
        metadata={"help": "the optimizer applying each step's gradient (an outer optimizer: sgd, adam, ...)"},
    )
    lr: float = field(default=3e-3, metadata={"help": "its learning rate"})
    eval_every: int = field(default=5, metadata={"help": "evaluate every this many steps"})
    # The command line sets it to eval_every (bench_config).
    check_every: int = field(default=5, metadata={"cli": False})
    seed: int = field(default=0, metadata={"help": "seed of the model and the data"})
    # Every method but wait-for-all trains this many times --steps: one that applies a noisier (biased) or
    # later gradient gets more steps to reach wait-for-all's final loss, or time_to_target_s would say null.
    overrun: float = field(
        default=1.5,
        metadata={"help": "every method but wait trains this many times --steps, to reach wait's final loss"},
    )
    # Dynamic backup workers' c = lr x L (optimizers/backup.py).
    backup_c: float = field(
        default=1.0, metadata={"help": "dynamic backup workers' c = lr x L in (0, 2): smaller favours a smaller k"}
    )
    # (B, W, lambda) of the sequential codes; None: from the pattern (see sgc_model).
    sgc: tuple[int, int, int] | None = field(
        default=None,
        metadata={"help": "the (B, W, lambda) the sequential codes are built for (default: from the pattern)",
                  "flag": "sgc-model", "parse": _model_arg, "format": lambda m: ",".join(map(str, m)),
                  "metavar": "B,W,LAMBDA"},
    )
    # The command line sets its seed to seed (bench_config).
    task_config: TaskConfig = field(
        default_factory=lambda: TaskConfig(d_model=32, n_layers=1, batch_size=8, seq_len=32), metadata={"cli": False}
    )

    def __post_init__(self) -> None:
        require(self.peers >= 2, f"--peers must be at least 2, got {self.peers}")
        require(0 <= self.stragglers < self.peers, f"--stragglers must be in [0, {self.peers}), got {self.stragglers}")
        require(self.steps >= 1, f"--steps must be at least 1, got {self.steps}")
        require(self.overrun >= 1, f"--overrun must be at least 1, got {self.overrun}")
        require(self.unit_s >= 0, f"--unit-ms must be >= 0, got {self.unit_s * 1e3}")
        require(self.eval_every >= 1, f"--eval-every must be at least 1 (1: every step), got {self.eval_every}")
        require(self.check_every >= 1, f"check_every must be at least 1 (1: every step), got {self.check_every}")
        require(bool(self.methods), f"--methods is empty; give comma-separated methods such as wait,coded "
                f"(choose from {', '.join(METHODS)} or fixed-kK)")
        for i, m in enumerate(self.methods):
            require(m in METHODS or _fixed_k(m, self.peers) is not None,
                    f"unknown method {m!r}; choose from {', '.join(METHODS)} or fixed-kK (1 <= K <= peers)")
            require(m not in self.methods[:i], f"method {m!r} is given twice in --methods; give each method once")
        if "backup" in self.methods:
            require(0 < self.backup_c < 2, f"--backup-c must be in (0, 2) (c = lr x L), got {self.backup_c:g}")
        problem = StragglerPattern.parse(self.pattern).workers_problem(self.peers)
        require(not problem, f"--pattern {self.pattern}: {problem}; name one of the --peers {self.peers}")
        if self.sgc is not None:
            BurstyModel(self.peers, *self.sgc)  # ConfigError naming what is wrong
        # Every method's training config, built now: a method's option it refuses (an optimizer, a scheme) fails
        # here, not after the methods before it have run.
        for m in self.methods:
            train_config(method(m, self), self)


def _fixed_k(method: str, n: int) -> int | None:
    if not method.startswith("fixed-k"):
        return None
    try:
        k = int(method.removeprefix("fixed-k"))
    except ValueError:
        return None
    return k if 1 <= k <= n else None


@dataclass(frozen=True)
class Method:
    """How one method runs: its algorithm, options and the coordinator's quorum policy."""

    name: str
    algorithm: str
    quorum: str
    codec: str = "none"
    options: tuple[tuple[str, object], ...] = ()


def sgc_model(config: CodingBenchConfig) -> tuple[int, int, int]:
    """The (B, W, lambda) the sequential codes are built for: --sgc-model, or the bursty pattern's one round
    longer and wider (a straggler is late for the round after, fetching the result), or (2, 3, min(3, n-1))
    for other patterns (one straggler a step, each late for two rounds, three in any window of three)."""
    if config.sgc is not None:
        return config.sgc
    pattern = StragglerPattern.parse(config.pattern)
    if isinstance(pattern, BurstyStragglers):
        return pattern.B + 1, pattern.W + 1, min(pattern.lam, config.peers - 1)
    return 2, 3, min(3, config.peers - 1)


def method(name: str, config: CodingBenchConfig) -> Method:
    """The algorithm, options and quorum of a method."""
    s, n = config.stragglers, config.peers
    k = _fixed_k(name, n)
    if k is not None:
        return Method(name, "sync-sgd", f"allbut:{n - k}")
    if name in ("sr-sgc", "m-sgc"):
        b, w, lam = sgc_model(config)
        return Method(name, "seq-sgc", f"grace:{lam},f={SGC_GRACE}",
                      options=(("scheme", name), ("burst", b), ("window", w), ("lam", lam)))
    return {
        "wait": Method(name, "sync-sgd", "all"),
        "ignore": Method(name, "sync-sgd", f"allbut:{s}"),
        "coded": Method(name, "coded-sgd", f"coded:{s}", options=(("stragglers", s),)),
        "coded-int8": Method(name, "coded-sgd", f"coded:{s}", codec="int8", options=(("stragglers", s),)),
        "backup": Method(name, "sync-sgd", "backup", options=(("dynamic_k", True), ("backup_c", config.backup_c))),
    }[name]


def steps_of(m: Method, config: CodingBenchConfig) -> int:
    """Steps a method trains: --steps for wait-for-all (the target), overrun times more for the others."""
    return config.steps if m.name == "wait" else math.ceil(config.steps * config.overrun)


def train_config(m: Method, config: CodingBenchConfig) -> TrainConfig:
    """The training of one method's run."""
    outer = OuterConfig(name=config.optimizer, lr=config.lr, momentum=0.0, nesterov=False)
    # On the CPU: the workers are threads of one process whose compute time is modeled (unit_s), so a GPU
    # would change no figure of this benchmark (it has no --device).
    return TrainConfig.of(m.algorithm, steps=config.steps, codec=m.codec, outer=outer, device="cpu",
                          **dict(m.options))


class PacedPartitions:
    """A task's partition batches, each costing its real pass plus the modeled unit times this worker's slowdown."""

    def __init__(self, task: Task, pattern: StragglerPattern, worker: int, workers: int, unit_s: float) -> None:
        self.data = TaskPartitions(task)
        self.pattern, self.worker, self.workers, self.unit_s = pattern, worker, workers, unit_s
        self.computed = 0
        # Asked while the modeled compute runs: the run committed this step without this worker.
        self.superseded: Callable[[], bool] = lambda: False

    def loss(self, model: torch.nn.Module, partition: int, partitions: int, step: int) -> tuple[torch.Tensor, int]:
        """The batch's loss, after the modeled compute time (stopped, StepSuperseded, if the run moved on).

        A step's data costs n units whatever it is cut into: a partition of a sequential code's job (which
        has more partitions than workers) costs n / partitions of a unit.
        """
        self.computed += 1
        cost = self.unit_s * self.workers / partitions
        until = time.monotonic() + cost * self.pattern.slowdown(step, self.worker, self.workers)
        while (left := until - time.monotonic()) > 0:
            if self.superseded():
                raise StepSuperseded(f"step {step} was committed without worker {self.worker}")
            time.sleep(min(left, CANCEL_POLL_S))
        return self.data.loss(model, partition, partitions, step)


@dataclass
class WorkerOutcome:
    """What one worker of a run ended with (worker 0 also records every applied gradient)."""

    rank: int
    digest: str = ""
    bytes_sent: int = 0
    steps: int = 0
    computed: int = 0
    error: str = ""
    # step -> (global parameters before it, the gradient applied): worker 0 only.
    applied: dict[int, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)
    ks: list[int] = field(default_factory=list)
    final: torch.Tensor | None = None
    # The fraction of a step's data this worker computed per step; a sequential code's partitions per job.
    load: float = 0.0
    partitions: int = 0
    jobs_lost: int | None = None
    round_load_max: float | None = None


def _worker(rank: int, config: CodingBenchConfig, task: Task, train: TrainConfig, steps: int, address: str,
            run_id: str, out: WorkerOutcome, joined: threading.Barrier, done: threading.Barrier,
            stop: threading.Event) -> None:
    """One worker's run: join, wait until every worker has, train steps steps (or until stop is set), wait for the
    others (a late one fetches from them), leave."""
    model = place_model(task.build_model(), resolve_device(train.device))
    # Each worker its own host id, as on its own machine: workers of one host reduce through shared memory, where no
    # codec runs and no byte is sent (the methods' bytes and int8's error would be nobody's).
    elastic = ElasticCollective(ElasticConfig(coordinator=address, run_id=run_id, name=f"peer{rank}", keep_results=8,
                                              transport=TransportConfig(host_id=f"{run_id}-peer{rank}")))
    data = PacedPartitions(task, StragglerPattern.parse(config.pattern), rank, config.peers, config.unit_s)
    started = False
    try:
        opt = make_optimizer(model, elastic, train)
        assert isinstance(opt, CodedSGD)
        data.superseded = opt.superseded
        sequential = isinstance(opt, SequentialCodedSGD)
        if rank == 0 and sequential:
            # A job's gradient was computed at the parameters of its own round, w_j.
            opt.on_job = lambda step, params, gradient: out.applied.__setitem__(
                step, (params.clone(), gradient.clone()))
        elif rank == 0:
            opt.on_gradient = lambda step, gradient: out.applied.__setitem__(
                step, (flatten(opt.state.globals), gradient.clone()))
        snapshot = elastic.start(has_state=True)
        if snapshot is not None:
            opt.load_snapshot(snapshot)
        # No round before all n workers are registered. On a loaded machine a thread slow to start missed the
        # coordinator's startup grace, and the first rounds formed over a roster of fewer workers: their code cuts
        # the data into fewer partitions, another gradient than the full one over n this benchmark measures.
        try:
            joined.wait(timeout=RUN_TIMEOUT_S)
        except threading.BrokenBarrierError:
            raise LoconetError("another worker failed before the run started") from None
        started = True
        while opt.global_step < steps and not stop.is_set():
            opt.train_step(data)
        if opt.global_step < steps:
            raise LoconetError(f"stopped at step {opt.global_step} of {steps}")
        out.digest = opt.state.digest()
        out.steps = opt.global_step
        out.ks = list(opt.ks)
        out.final = flatten(opt.state.globals)
        if sequential:
            out.load, out.partitions, out.jobs_lost = opt.realized_load(), opt.scheme.partitions, opt.jobs_lost
            out.round_load_max = float(max(opt.assigned_loads)) if opt.assigned_loads else None
        else:
            out.load, out.partitions = data.computed / max(out.steps, 1) / config.peers, config.peers
    except LoconetError as exc:
        out.error = str(exc)
    finally:
        if not started:  # failed before the start: the others stop waiting for it
            joined.abort()
        out.computed = data.computed
        try:
            done.wait(timeout=RUN_TIMEOUT_S)
        except threading.BrokenBarrierError:
            pass
        elastic.close(leave=True, reason="finished")
        out.bytes_sent = elastic.transport.counters.bytes_sent


def full_gradient(task: Task, model: torch.nn.Module, params: torch.Tensor, n: int, step: int) -> torch.Tensor:
    """The mean over all n partitions' batches of step of the loss gradient at params (float64)."""
    data = TaskPartitions(task)
    with torch.no_grad():
        _load(model, params)
    total = torch.zeros(params.numel(), dtype=torch.float64)
    for j in range(n):
        model.zero_grad(set_to_none=True)
        loss, _ = data.loss(model, j, n, step)
        loss.backward()
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in model.parameters()]
        total += flatten(grads).double().cpu()
    return total / n


def _load(model: torch.nn.Module, flat: torch.Tensor) -> None:
    offset = 0
    for p in model.parameters():
        p.copy_(flat[offset: offset + p.numel()].view(p.shape))
        offset += p.numel()


def _eval_at(task: Task, model: torch.nn.Module, params: torch.Tensor) -> float:
    with torch.no_grad():
        _load(model, params)
    return task.evaluate(model)


def _stop_workers(
    threads: list[threading.Thread], stop: threading.Event, barriers: tuple[threading.Barrier, ...]
) -> None:
    """Tell the workers to stop, free any waiting at a barrier, and wait up to STOP_GRACE_S for them to leave."""
    stop.set()
    if any(t.is_alive() for t in threads):
        for barrier in barriers:
            barrier.abort()
    deadline = time.monotonic() + STOP_GRACE_S
    for t in threads:
        if t.is_alive():
            t.join(timeout=max(0.0, deadline - time.monotonic()))


def run_method(m: Method, config: CodingBenchConfig, task: Task) -> dict:
    """One method's run, and what it measured."""
    train = train_config(m, config)
    n = config.peers
    label = f"coding-{m.name}"
    # A fresh coordinator of a fresh run: no peer of an earlier one to wait for (startup grace 0, as the harness's).
    coordinator = CoordinatorConfig(run_id=label, port=0, dashboard_port=None, min_peers=1, quorum=m.quorum,
                                    seed=config.seed, heartbeat_s=HEARTBEAT_S, startup_grace_s=0.0)
    outcomes = [WorkerOutcome(r) for r in range(n)]
    joined, done = threading.Barrier(n), threading.Barrier(n)
    # Set on every way out of the run: a worker still training (after the timeout, or an error here) stops.
    stop = threading.Event()
    started = time.monotonic()
    with CoordinatorThread(coordinator) as coord:
        threads = [threading.Thread(target=_worker,
                                    args=(r, config, task, train, steps_of(m, config), coord.address, label,
                                          outcomes[r], joined, done, stop),
                                    name=f"{label}-peer{r}", daemon=True)
                   for r in range(n)]
        try:
            for t in threads:
                t.start()
            for t in threads:
                t.join(timeout=max(0.0, started + RUN_TIMEOUT_S - time.monotonic()))
            if any(t.is_alive() for t in threads):
                raise LoconetError(f"{label}: workers still running after {RUN_TIMEOUT_S:.0f} s; the run is stuck")
            rounds = [r for r in coord.status()["rounds"] if r["status"] == "committed"]
        finally:
            _stop_workers(threads, stop, (joined, done))
    wall = time.monotonic() - started
    errors = [f"peer{o.rank}: {o.error}" for o in outcomes if o.error]
    if errors:
        raise LoconetError(f"{label} failed: {'; '.join(errors)}")
    rounds.sort(key=lambda r: r["round_id"])
    commits = [r["started_at"] + (r["duration_s"] or 0.0) for r in rounds]
    starts = [r["started_at"] for r in rounds]
    steps = [b - a for a, b in itertools.pairwise(commits)]
    model = place_model(task.build_model(), resolve_device(train.device))
    applied = outcomes[0].applied
    evals = [(t, _eval_at(task, model, applied[t][0])) for t in sorted(applied)
             if t % config.eval_every == 0 or t == config.steps]
    evals.append((outcomes[0].steps, _eval_at(task, model, outcomes[0].final)))
    # After --steps steps (the parameters before step --steps), comparable across methods.
    final = next((loss for t, loss in evals if t == config.steps), evals[-1][1])
    errors_rel = []
    partitions = outcomes[0].partitions
    for t in sorted(applied):
        if t % config.check_every == 0:
            params, applied_grad = applied[t]
            full = full_gradient(task, model, params, partitions, t)
            errors_rel.append(float((applied_grad.double() - full).norm() / full.norm().clamp_min(1e-30)))
    first = starts[0] if starts else 0.0
    ks = outcomes[0].ks
    return {
        "method": m.name,
        "algorithm": m.algorithm,
        "quorum": m.quorum,
        "codec": m.codec,
        "step_s_median": statistics.median(steps) if steps else None,
        "step_s_p90": _quantile(steps, 0.9),
        "eval_losses": [[t, loss] for t, loss in evals],
        "eval_times": [commits[t - 1] - first if 0 < t <= len(commits) else 0.0 for t, _ in evals],
        "final_eval_loss": final,
        "decode_rel_error_max": max(errors_rel) if errors_rel else None,
        "bytes_sent_per_peer": statistics.mean(o.bytes_sent for o in outcomes),
        "compute_load": statistics.mean(o.load for o in outcomes),
        **_sequential_fields(m, config, outcomes[0]),
        "k_chosen": [min(ks), statistics.median(ks), max(ks)] if ks else None,
        "steps_committed": min(o.steps for o in outcomes),
        "members_per_round": [min(len(r["members"]) for r in rounds), max(len(r["members"]) for r in rounds)]
        if rounds else None,
        "identical": len({o.digest for o in outcomes}) == 1,
        "wall_s": wall,
    }


def _sequential_fields(m: Method, config: CodingBenchConfig, first: WorkerOutcome) -> dict:
    """A sequential code's loads (the paper's formula, plain GC's for the same tolerance), lost jobs, model."""
    if m.algorithm != "seq-sgc":
        return {"load_formula": None, "round_load_max": None, "gc_load_same_tolerance": None, "jobs_lost": None,
                "sgc_model": None}
    b, w, lam = sgc_model(config)
    scheme = make_scheme(m.name, BurstyModel(config.peers, b, w, lam))
    return {
        "load_formula": float(scheme.load),
        "round_load_max": first.round_load_max,
        "gc_load_same_tolerance": (lam + 1) / config.peers,
        "jobs_lost": first.jobs_lost,
        "sgc_model": {"B": b, "W": w, "lambda": lam, "T": scheme.T},
    }


def _quantile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, math.ceil(q * len(ordered)) - 1)]


def add_targets(entries: list[dict]) -> float | None:
    """Time to wait-for-all's final loss, its ratio to wait-for-all's, and each curve's distance from it."""
    wait = next((e for e in entries if e["method"] == "wait"), None)
    target = wait["final_eval_loss"] if wait is not None else None
    for e in entries:
        times = e.pop("eval_times")
        e["time_to_target_s"] = None if target is None else next(
            (t for t, (_, loss) in zip(times, e["eval_losses"]) if loss <= target), None)
    base = wait["time_to_target_s"] if wait is not None else None
    reference = {t: loss for t, loss in wait["eval_losses"]} if wait is not None else {}
    for e in entries:
        mine = e["time_to_target_s"]
        e["time_to_target_over_wait"] = mine / base if mine is not None and base else None
        diffs = [abs(loss - reference[t]) for t, loss in e["eval_losses"] if t in reference]
        e["curve_max_abs_diff_from_wait"] = max(diffs) if diffs else None
    return target


def run(config: CodingBenchConfig, progress: Progress | None = None) -> dict:
    """Every method on the same task, seeds and straggler pattern; the report."""
    torch.set_num_threads(1)  # many workers share two cores: one intra-op thread each
    task = make_task(config.task, config.task_config)
    entries = []
    for name in config.methods:
        m = method(name, config)
        if progress is not None:
            progress.begin(name)
        entries.append(result := run_method(m, config, task))
        if progress is not None:
            progress.end(f"step {result['step_s_median']:.3f} s, final loss {result['final_eval_loss']:.4f}")
    target = add_targets(entries)
    return {
        "peers": config.peers,
        "stragglers": config.stragglers,
        "pattern": config.pattern,
        "config": {"task": config.task, "steps": config.steps, "overrun": config.overrun,
                   "unit_ms": config.unit_s * 1e3, "optimizer": config.optimizer, "lr": config.lr,
                   "backup_c": config.backup_c, "batch_size": config.task_config.batch_size, "seed": config.seed},
        "target_eval_loss": target,
        "methods": entries,
    }


def table(report: dict) -> str:
    """The report as a readable table, one row per method."""
    rows = [("method", "step med", "step p90", "to target", "final loss", "decode err", "kB/peer", "load")]

    def f(v: object, fmt: str) -> str:
        return "-" if v is None else format(v, fmt)

    for e in report["methods"]:
        rows.append((e["method"], f(e["step_s_median"], ".3f"), f(e["step_s_p90"], ".3f"),
                     f(e["time_to_target_s"], ".1f"), f(e["final_eval_loss"], ".4f"),
                     f(e["decode_rel_error_max"], ".1e"), f(e["bytes_sent_per_peer"] / 1e3, ".0f"),
                     f(e["compute_load"], ".3f")))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    head = f"{report['peers']} workers, s={report['stragglers']}, pattern {report['pattern']}"
    return "\n".join([head, *("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows)])


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of this benchmark; the fields' meaning."""
    add_bench_options(parser, CodingBenchConfig)
    describe_report(parser, FIELDS)


def bench_config(ns: argparse.Namespace) -> CodingBenchConfig:
    """The CodingBenchConfig the options describe: the run checks as often as it evaluates, its task seeded --seed."""
    config = read_options(CodingBenchConfig, ns)
    return dataclasses.replace(config, check_every=config.eval_every,
                               task_config=dataclasses.replace(config.task_config, seed=config.seed))


def main(ns: argparse.Namespace) -> int:
    """Check the arguments, run every method, print the report."""
    config = bench_config(ns)
    make_task(config.task, config.task_config)  # a bad task fails before any run
    with progress_for("coding", getattr(ns, "quiet", 0)) as progress:
        report = run(config, progress)
    sys.stdout.write(json_line(report) + "\n" if ns.json else table(report) + "\n")
    return 0
