"""``loconet bench hetero``: peers of different speeds, synchronous against time-budget, asynchronous and NoLoCo.

In one invocation, on the same task, data and seeds, every method trains for
the same wall-clock budget (``--duration`` seconds) with a real coordinator
and ``--peers`` real ``loconet peer`` processes (the local harness,
``peer/harness/harness.py``), while the harness slows the ``--slow`` peers
down for the whole run (``straggle:PEER@0s,x=X``):

- ``target``: synchronous DiLoCo with no slow peer, the reference: its final
  eval loss is ``target_eval_loss``;
- ``diloco``: synchronous DiLoCo, every ``--sync-every`` steps; a round waits
  for every live peer (its coordinator's join timeout outlasts the run, where
  the default of 5 s would start rounds without a slow peer), so the slow one
  sets the pace;
- ``diloco-time``: DiLoCo on a time budget (``sync_seconds``): every peer
  syncs after the same seconds of training, the slow one with fewer samples;
- ``async``: asynchronous DiLoCo (``async-diloco``, quorum ``buffer:K``): a
  round starts once K = ``--buffer`` peers are ready (default: the peers not
  slowed), a stale contribution counts 1/sqrt(1+tau);
- ``async-unweighted``: the same with every contribution counting fully (the
  ablation of the staleness weights);
- ``noloco``: NoLoCo (each peer averages with one partner), its rounds cut
  from the K ready peers as async's are (``buffer:K``, one peer sitting out
  when they are odd).

Each peer evaluates its model every ``--eval-every`` steps and at the end.
The run's eval loss at a moment is the mean, over the peers that are not
slowed (every peer for target), of each one's latest eval loss (events carry
the peer's wall-clock time ``t``); ``time_to_target_s`` is the first moment it
is at most ``target_eval_loss``, in seconds since the run's first peer started
training (its ``joined`` event). With ``--eval-every`` equal to
``--sync-every`` (the default) DiLoCo's evals see each round's parameters just
committed; the final eval sees each peer's local model where the budget
stopped it. Every field: ``FIELDS`` below, ``--help``,
docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import re
import shutil
import statistics
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from collectives.errors import ConfigError
from optimizers.registry import algorithm_names
from peer.bench.fields import Fields, describe_report
from peer.bench.kit import COMMA_LIST, add_bench_options, bench_log_dir, print_report, require
from peer.bench.progress import Progress, progress_for
from peer.coordinator.config import CoordinatorConfig
from peer.harness.scenario import make_event
from peer.options import read_options
from peer.runtime.training import LOCAL_SYNC_EVERY, TrainConfig
from peer.tasks.base import TaskConfig
from peer.tasks.registry import DEFAULT_TASK, TASK_HELP, check_task, make_task

TARGET = "target"
METHODS = ("diloco", "diloco-time", "async", "async-unweighted", "noloco")
# The registered algorithm each method runs.
ALGORITHMS = {TARGET: "diloco", "diloco": "diloco", "diloco-time": "diloco", "async": "async-diloco",
              "async-unweighted": "async-diloco", "noloco": "noloco"}
# Methods whose rounds wait for every live peer: their coordinator's join timeout outlasts the whole run.
WAIT_FOR_ALL = (TARGET, "diloco", "diloco-time")
# Beyond the budget: start-up, the last round and the final evaluation (a run that takes longer is stuck).
RUN_SLACK_S = 600.0

FIELDS: Fields = {
    "peers": "peers per run (--peers)",
    "slow": "the slowed peers and factors (--slow), each slowed by the harness's straggle:PEER@0s,x=X for the whole "
    "run of every method but target",
    "budget_s": "the wall-clock budget of every method: each peer trains this many seconds (--duration)",
    "config": "the rest of what was run: task, task_config, sync_every, eval_every, sync_seconds (diloco-time's, and "
    "whether it was measured on target's run or given), buffer (async's K), methods asked for",
    "entropy_floor": "the task's best possible loss (null for tasks that do not know it)",
    "target_eval_loss": "target's final_eval_loss: synchronous DiLoCo's with no slow peer, in this invocation",
    "skipped": "methods asked for that did not run, each {method, reason} (noloco before it is registered)",
    "methods": "one entry per method that ran, target first",
    "methods[].method": "target, diloco, diloco-time, async, async-unweighted or noloco",
    "methods[].algorithm": "the registered algorithm it runs (diloco, async-diloco, noloco)",
    "methods[].options": "its own settings: sync_every, or sync_seconds (diloco-time); buffer and staleness (async)",
    "methods[].final_eval_loss": "the run's eval loss at its end: the mean, over the peers not slowed (target: every "
    "peer), of each one's last eval loss (its local model after its last step)",
    "methods[].final_eval_loss_all_peers": "the same mean over every peer, the slowed ones included",
    "methods[].time_to_target_s": "seconds from the run's first peer starting to train to the first eval after which "
    "the run's eval loss (mean over the peers not slowed of each one's latest eval) is at most target_eval_loss; "
    "null: not within the budget",
    "methods[].eval_curve": "[seconds since the start, run's eval loss] at every eval of a peer not slowed, from the "
    "moment each has evaluated once",
    "methods[].bytes_sent_per_peer": "bytes a peer sent for training, mean over peers (counted by the transport, all "
    "round attempts, not the state served to joiners)",
    "methods[].rounds": "rounds a peer contributed to that committed, mean over peers",
    "methods[].contributions_per_peer": "those rounds per peer, by name",
    "methods[].rounds_committed": "distinct rounds the run committed",
    "methods[].median_staleness": "async methods: median over the counted contributions of their staleness tau "
    "(rounds committed since the global version the contribution trained from, as the committed events report "
    "it); null for the others",
    "methods[].largest_group": "noloco: the most members any peer's group had in a committed round (2: pairs; 3: a "
    "trio, with an odd number of peers); null for methods whose rounds average over all their members",
    "methods[].spread_max": "noloco: the largest replicas' spread a peer measured at an eval (the norm of its "
    "parameters minus the replicas' mean); null for methods whose peers share the global parameters",
    "methods[].spread_final": "noloco: the largest of the peers' last measured spreads; null as above",
    "methods[].wall_s": "seconds from the peers' release to the last one finished",
    "time_to_target_async_over_diloco": "async's time_to_target_s / diloco's (below 1: asynchronous rounds reach the "
    "target sooner); null unless both reached it",
    "time_to_target_async_over_diloco_at_most": "when diloco did not reach the target within the budget and async "
    "did: async's time_to_target_s / the time of diloco's last eval, an upper bound of the ratio above; else null",
    "time_to_target_async_over_async_unweighted": "async's time_to_target_s / async-unweighted's (below 1: the "
    "staleness weights reach the target sooner); null unless both reached it",
    "loss_async_over_async_unweighted": "async's final_eval_loss / async-unweighted's (below 1: the staleness weights "
    "end lower)",
}


@dataclass(frozen=True)
class SlowPeer:
    """A peer the harness slows down for a whole run: each of its steps takes ``factor`` times as long."""

    name: str
    factor: float

    def __str__(self) -> str:
        return f"{self.name}:x={self.factor:g}"


_SLOW = re.compile(r"^(peer\d+):x=(\d+(?:\.\d+)?)$")


def parse_slow(text: str) -> SlowPeer:
    """``PEER:x=X`` (e.g. ``peer3:x=3``, X > 1) as a SlowPeer; ConfigError saying how to write it."""
    m = _SLOW.fullmatch(text.strip())
    if not m or float(m.group(2)) <= 1:
        raise ConfigError(f"cannot read --slow {text!r}: write PEER:x=X with X above 1, e.g. peer3:x=3")
    return SlowPeer(m.group(1), float(m.group(2)))


@dataclass(frozen=True)
class HeteroConfig:
    """What ``bench hetero`` runs: the network, its slow peers, the budget, the methods."""

    peers: int = field(default=4, metadata={"help": "peers per run"})
    task: str = field(default=DEFAULT_TASK, metadata={"help": TASK_HELP})
    # The task options (add_task_arguments), in their own group of --help.
    task_config: TaskConfig = field(default_factory=TaskConfig, metadata={"cli": False})
    # None: the last peer, 3 times slower; () for none. On the command line --slow PEER:x=X, repeatable, which
    # options.py has no form for (add_arguments adds it).
    slow: tuple[SlowPeer, ...] | None = field(default=None, metadata={"cli": False})
    duration_s: float = field(default=60.0, metadata={"help": "seconds every method trains"})
    sync_every: int = field(default=LOCAL_SYNC_EVERY, metadata={"help": "inner steps between syncs"})
    # None: every sync_every steps, so that DiLoCo's evals see the parameters of each round just committed.
    eval_every: int | None = field(default=None, metadata={"help": "steps between evals (default: --sync-every)"})
    # diloco-time's seconds between syncs; None: target's median training time between two of its rounds.
    sync_seconds: float | None = field(
        default=None,
        metadata={"help": "diloco-time's seconds between syncs (default: target's training time per round)"},
    )
    # async's K; None: the peers not slowed (their rounds never wait for a slow peer).
    buffer: int | None = field(
        default=None,
        metadata={"help": "async's K: a round starts once K peers are ready (default: the peers not slowed)"},
    )
    methods: tuple[str, ...] = field(
        default=METHODS,
        metadata={"help": f"comma-separated, from {', '.join(METHODS)} (target always runs)", **COMMA_LIST},
    )

    def __post_init__(self) -> None:
        require(self.peers >= 2, f"--peers must be at least 2, got {self.peers}")
        if self.slow is None:
            object.__setattr__(self, "slow", (SlowPeer(f"peer{self.peers - 1}", 3.0),))
        names = [s.name for s in self.slow]
        for name in names:
            require(int(name[4:]) < self.peers,
                    f"--slow {name} names no peer of this run: its peers are peer0..peer{self.peers - 1}")
        require(len(set(names)) == len(names), "--slow names a peer twice; give each peer one factor")
        require(len(names) < self.peers, "--slow slows every peer; leave at least one at full speed")
        require(self.duration_s > 0, f"--duration must be positive, got {self.duration_s:g}")
        require(self.sync_every >= 1, f"--sync-every must be at least 1, got {self.sync_every}")
        require(
            self.eval_every is None or self.eval_every >= 1, f"--eval-every must be at least 1, got {self.eval_every}"
        )
        require(self.sync_seconds is None or self.sync_seconds > 0,
                f"--sync-seconds must be positive, got {self.sync_seconds}")
        require(self.buffer is None or self.buffer >= 1, f"--buffer must be at least 1, got {self.buffer}")
        for m in self.methods:
            require(m in METHODS, f"unknown method {m!r} in --methods; choose from {', '.join(METHODS)}")
        require(len(set(self.methods)) == len(self.methods), "--methods names a method twice; name each once")

    @property
    def evals_every(self) -> int:
        """Steps between evals: eval_every, or sync_every."""
        return self.eval_every or self.sync_every

    @property
    def fast_peers(self) -> list[str]:
        """The peers not slowed, whose evals make the run's eval loss."""
        slowed = {s.name for s in self.slow}
        return [f"peer{i}" for i in range(self.peers) if f"peer{i}" not in slowed]

    @property
    def k(self) -> int:
        """async's round size K."""
        return self.buffer or len(self.fast_peers)


def plan(methods: Sequence[str], registered: Sequence[str]) -> tuple[list[str], list[dict]]:
    """The methods to run (target first, then those asked for whose algorithm is registered) and the skipped ones."""
    run = [TARGET, *[m for m in methods if ALGORITHMS[m] in registered]]
    skipped = [{"method": m, "reason": f"algorithm {ALGORITHMS[m]!r} is not registered"}
               for m in methods if ALGORITHMS[m] not in registered]
    return run, skipped


def train_config(method: str, config: HeteroConfig, sync_seconds: float | None = None) -> TrainConfig:
    """The training of one method: the budget, the evals and the method's own options."""
    own: dict = {"sync_every": config.sync_every}
    if method == "diloco-time":
        require(sync_seconds is not None, "diloco-time needs its sync_seconds")
        own["sync_seconds"] = sync_seconds
    elif method in ("async", "async-unweighted"):
        own |= {"buffer": config.k, "staleness": "inverse-sqrt" if method == "async" else "constant"}
    elif method == "noloco":
        # No barrier either: the pairs are cut from the K ready peers (one sits out when they are odd).
        own |= {"buffer": max(config.k, 2), "odd": "idle"}
    return TrainConfig.of(ALGORITHMS[method], duration_s=config.duration_s, eval_every=config.evals_every, **own)


def check_config(config: HeteroConfig) -> None:
    """ConfigError for anything a child process would refuse: run in the parent before any process starts."""
    check_task(config.task, config.task_config)
    registered = algorithm_names()
    for method in plan(config.methods, registered)[0]:
        train_config(method, config, sync_seconds=config.sync_seconds or 1.0)


# -- what the events say ------------------------------------------------------------------


def eval_curve(
    evals: Mapping[str, Sequence[tuple[float, float | None]]], t0: float
) -> list[tuple[float, float | None]]:
    """The run's eval loss over time from each counted peer's (time, eval loss) evals: at every eval (seconds since
    t0), the mean of each peer's latest loss, once every peer that evaluated at all has; None while one is not
    finite."""
    counted = {name: points for name, points in evals.items() if points}
    merged = sorted(((t, name, loss) for name, points in counted.items() for t, loss in points),
                    key=lambda point: point[:2])
    latest: dict[str, float | None] = {}
    curve: list[tuple[float, float | None]] = []
    for t, name, loss in merged:
        latest[name] = loss
        if len(latest) == len(counted):
            values = list(latest.values())
            curve.append((t - t0, None if None in values else statistics.fmean(values)))
    return curve


def time_to_target(curve: Sequence[tuple[float, float | None]], target: float) -> float | None:
    """The first time of curve whose loss is at most target; None if none is."""
    return next((t for t, loss in curve if loss is not None and loss <= target), None)


def contributions(events: Sequence[dict]) -> int:
    """Committed rounds this peer contributed to (a catch-up applies a round it was not in: not counted)."""
    return sum(e["event"] == "committed" and e.get("contributed", True) for e in events)


def committed_field(events: Sequence[dict], name: str) -> list:
    """A field of a peer's committed events for the rounds it contributed to, where it is reported (not null):
    ``staleness`` (asynchronous rounds) or ``group`` (NoLoCo's group size)."""
    return [e[name] for e in events
            if e["event"] == "committed" and e.get("contributed", True) and e.get(name) is not None]


def training_interval_s(events: Sequence[dict]) -> list[float]:
    """A peer's seconds of training (and evaluating) between its committed rounds: from its join or last commit to
    its next commit, less that round's own time."""
    start, out = None, []
    for e in events:
        if e["event"] == "joined":
            start = e["t"]
        elif e["event"] == "committed" and e.get("contributed", True) and start is not None:
            out.append(max(e["t"] - start - (e.get("wall_s") or 0.0), 0.0))
            start = e["t"]
    return out


def summarize(method: str, train: TrainConfig, events: Mapping[str, Sequence[dict]], fast: Sequence[str],
              harness_report: dict) -> dict:
    """One method's entry of the report (its time_to_target_s is filled in once the target is known)."""
    t0 = min(e["t"] for evs in events.values() for e in evs if e["event"] == "joined")
    counted = fast if method != TARGET else list(events)
    points = {n: [(e["t"], e["eval_loss"]) for e in events[n] if e["event"] == "eval"] for n in counted}
    curve = eval_curve(points, t0)
    finals = {n: next((e["eval_loss"] for e in evs if e["event"] == "finished"), None) for n, evs in events.items()}
    known = [v for v in finals.values() if v is not None]
    stale = [tau for evs in events.values() for tau in committed_field(evs, "staleness")]
    groups = [g for evs in events.values() for g in committed_field(evs, "group")]
    spreads = {n: [e["spread"] for e in evs if e["event"] == "eval" and e.get("spread") is not None]
               for n, evs in events.items()}
    per_peer = {n: contributions(evs) for n, evs in events.items()}
    options = {k: v for k, v in dataclasses.asdict(train.options).items()
               if k in ("sync_every", "sync_seconds", "buffer", "staleness") and v is not None}
    if "sync_seconds" in options:
        options.pop("sync_every")
    return {
        "method": method,
        "algorithm": train.algorithm,
        "options": options,
        "final_eval_loss": curve[-1][1] if curve else None,
        "final_eval_loss_all_peers": statistics.fmean(known) if len(known) == len(finals) else None,
        "time_to_target_s": None,
        "eval_curve": [[round(t, 3), loss] for t, loss in curve],
        "bytes_sent_per_peer": harness_report["bytes_sent_per_peer"],
        "rounds": statistics.fmean(per_peer.values()),
        "contributions_per_peer": per_peer,
        "rounds_committed": harness_report["rounds_committed"],
        "median_staleness": statistics.median(stale) if stale else None,
        "largest_group": max(groups) if groups else None,
        "spread_max": max((v for vs in spreads.values() for v in vs), default=None),
        "spread_final": max((vs[-1] for vs in spreads.values() if vs), default=None),
        "wall_s": harness_report["wall_s"],
    }


# -- running ------------------------------------------------------------------------------


def _detail(harness) -> str:
    """How far a run is: committed rounds and the furthest step, from its peers' events."""
    peers = list(harness.peers.values())
    rounds = len(harness.committed_rounds()) if peers else 0
    step = max((e.get("step") or 0 for p in peers for e in list(p.events)), default=0)
    return f"round {rounds}, step {step}" if step else "starting"


def run_method(
    method: str, config: HeteroConfig, train: TrainConfig, progress: Progress, label: str
) -> tuple[dict, dict[str, list[dict]]]:
    """Train one method with the harness (its slow peers slowed unless it is the target); its report entry and
    every peer's events."""
    from peer.harness.harness import Harness, HarnessConfig

    slow = () if method == TARGET else config.slow
    coordinator = CoordinatorConfig(lease_s=3.0, heartbeat_s=0.5, dashboard_port=None)
    if method in WAIT_FOR_ALL:
        # Synchronous: a round waits for every live peer, however slow, and never starts without one.
        coordinator = dataclasses.replace(coordinator, join_timeout_s=config.duration_s + RUN_SLACK_S)
    workdir = bench_log_dir(f"hetero-{method}")
    harness = Harness(HarnessConfig(
        peers=config.peers, task=config.task, task_config=config.task_config, train=train,
        events=tuple(make_event("straggle", "0s", target=s.name, factor=s.factor) for s in slow),
        coordinator=coordinator, workdir=str(workdir), timeout_s=config.duration_s + RUN_SLACK_S,
    ))
    progress.begin(label, lambda: _detail(harness))
    report = harness.run()  # the peers' events stay on their Proc objects after it closes them
    events = {name: list(p.events) for name, p in harness.peers.items()}
    shutil.rmtree(workdir, ignore_errors=True)  # a failure raised above and kept the logs its message names
    entry = summarize(method, train, events, config.fast_peers, report)
    loss = entry["final_eval_loss"]
    progress.end(f"eval loss {loss:.4f}, {entry['rounds']:g} rounds per peer" if loss is not None else "no eval")
    return entry, events


def _ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b else None


def _ratios(entries: Mapping[str, dict]) -> dict:
    """The comparisons the issue asks for, where both methods ran."""
    out: dict = {}
    a, d, u = entries.get("async"), entries.get("diloco"), entries.get("async-unweighted")
    if a and d:
        out["time_to_target_async_over_diloco"] = _ratio(a["time_to_target_s"], d["time_to_target_s"])
        bound = None
        if d["time_to_target_s"] is None and a["time_to_target_s"] is not None and d["eval_curve"]:
            bound = a["time_to_target_s"] / d["eval_curve"][-1][0]
        out["time_to_target_async_over_diloco_at_most"] = bound
    if a and u:
        out["time_to_target_async_over_async_unweighted"] = _ratio(a["time_to_target_s"], u["time_to_target_s"])
        out["loss_async_over_async_unweighted"] = _ratio(a["final_eval_loss"], u["final_eval_loss"])
    return out


def run(config: HeteroConfig, progress: Progress | None = None) -> dict:
    """Run target and every method of config that is registered; return the report."""
    from collectives.allocator import tune_malloc

    progress = progress or Progress("hetero", enabled=False)
    check_config(config)
    tune_malloc()
    methods, skipped = plan(config.methods, algorithm_names())
    sync_seconds, measured = config.sync_seconds, False
    entries: dict[str, dict] = {}
    for i, method in enumerate(methods, 1):
        train = train_config(method, config, sync_seconds)  # target runs first: sync_seconds is known by diloco-time
        entries[method], events = run_method(method, config, train, progress, f"{method} [{i}/{len(methods)}]")
        if method == TARGET and sync_seconds is None:
            # Target's peers train at full speed: their time per round is what a fast peer needs for sync_every steps.
            intervals = [s for evs in events.values() for s in training_interval_s(evs)]
            sync_seconds = statistics.median(intervals) if intervals else config.duration_s / 2
            measured = True
    target = entries[TARGET]["final_eval_loss"]
    for entry in entries.values():
        entry["time_to_target_s"] = time_to_target(entry["eval_curve"], target) if target is not None else None
    return {
        "peers": config.peers,
        "slow": [str(s) for s in config.slow],
        "budget_s": config.duration_s,
        "config": {
            "task": config.task, "task_config": dataclasses.asdict(config.task_config),
            "sync_every": config.sync_every, "eval_every": config.evals_every,
            "sync_seconds": sync_seconds, "sync_seconds_measured": measured, "buffer": config.k,
            "methods": list(config.methods),
        },
        "entropy_floor": make_task(config.task, config.task_config).entropy_floor,
        "target_eval_loss": target,
        "skipped": skipped,
        "methods": list(entries.values()),
        **_ratios(entries),
    }


# -- the command ------------------------------------------------------------------------------


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of this benchmark; the fields' meaning."""
    from peer.trainoptions import add_task_arguments

    add_bench_options(parser, HeteroConfig)
    parser.add_argument("--slow", action="append", default=None, metavar="PEER:x=X",
                        help="slow PEER down X times for the whole run (repeatable; 'none': no slow peer; "
                        "default: the last peer, x=3)")
    add_task_arguments(parser)
    describe_report(parser, FIELDS)


def bench_config(ns: argparse.Namespace) -> HeteroConfig:
    """The HeteroConfig the options describe, checked (ConfigError for a bad --slow, method, task...)."""
    from peer.trainoptions import read_task_config

    slow = None
    if ns.slow is not None:
        slow = () if ns.slow == ["none"] else tuple(parse_slow(s) for s in ns.slow)
    require(bool(ns.methods), f"--methods is empty; choose from {', '.join(METHODS)}")
    config = dataclasses.replace(read_options(HeteroConfig, ns), slow=slow, task_config=read_task_config(ns))
    check_config(config)
    return config


def main(ns: argparse.Namespace) -> int:
    """Check the arguments, run, and print the report (progress on stderr)."""
    config = bench_config(ns)  # every check before the first process starts
    with progress_for("hetero", getattr(ns, "quiet", 0)) as progress:
        report = run(config, progress)
    print_report(report, ns.json, fmt=lambda value: json.dumps(value, indent=2))
    return 0
