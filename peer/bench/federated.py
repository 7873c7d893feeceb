"""``loconet bench federated``: every federated strategy, clean and under attack, on the same data and seeds.

In one invocation, for each strategy of ``--strategies`` (the federated
algorithms, and FedAvg with each robust aggregator), two runs: ``clean``, and
``attacked``, where the last ``--byzantine`` peers send corrupted but finite
updates (``--attack``, ``peer/attacks.py``). Every run is real: an
in-process coordinator and ``--peers`` peers (``ElasticCollective``, each
with its own gRPC server on 127.0.0.1), one training thread each, reducing on
the butterfly with no server. Peers share nothing but the network; they live
in one process so that a run costs no process start-up (torch's import
dominates a tiny model's run).

Every peer gets the same task seed, so the same initial model and, from
``--dirichlet``, its own non-IID share of the data; every run of the
invocation uses the same shares. A run trains ``--rounds`` rounds of
``--local-steps`` local SGD steps. Per run: ``final_accuracy`` and
``final_eval_loss`` of the global model on the held-out set (every peer ends
with the same one; ``identical`` checks it), ``bytes_sent_per_peer``.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import math
import statistics
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch

from collectives.elastic import ElasticCollective, ElasticConfig
from collectives.errors import ConfigError, LoconetError
from collectives.membership.sampling import SAMPLE_POLICY, parse_sample_arg, sample_count, sample_members
from collectives.net.transportconfig import TransportConfig
from collectives.reduce.aggregators import make_aggregator
from optimizers.federated import FEDERATED, FedConfig
from optimizers.privacy import DPConfig
from optimizers.registry import get_algorithm
from peer.attacks import Attack, parse_attack
from peer.bench.fields import Fields, describe_report
from peer.bench.kit import COMMA_LIST, add_bench_options, require
from peer.bench.progress import Progress, progress_for
from peer.coordinator.config import CoordinatorConfig
from peer.coordinator.thread import CoordinatorThread
from peer.device import place_model, resolve_device
from peer.jsonout import json_line
from peer.options import read_options
from peer.runtime.training import TrainConfig, TrainLoop, make_optimizer
from peer.tasks.base import Task, TaskConfig
from peer.tasks.registry import make_task

log = logging.getLogger(__name__)

# The federated algorithms (item 1 of the issue; their tags, as optimizers/federated.py registers them), then FedAvg
# with each robust aggregator (item 2).
ALGORITHMS = tuple(config.TAG for config, _ in FEDERATED)
ROBUST = ("median", "trimmed_mean", "krum", "multi_krum", "bulyan", "centered_clip", "norm_clip")
STRATEGIES = ALGORITHMS + ROBUST
# A run that takes longer than this on one machine is stuck, not slow.
RUN_TIMEOUT_S = 600.0
# How long a run waits for its peers to see the stop signal and leave, once it stops them.
STOP_GRACE_S = 30.0

FIELDS: Fields = {
    "task": "the task every run trains (--task)",
    "peers": "peers per run (--peers)",
    "rounds": "rounds each run trains (--rounds), of local_steps local steps each",
    "dirichlet": "alpha of the Dirichlet split of labels across peers (null: iid)",
    "byzantine": "peers that attack in the attacked runs (the last ones by rank)",
    "attack": "what the byzantine peers send (peer/attacks.py)",
    "config": "the rest of what was run: local steps, inner optimizer and learning rate, batch size, seed, quorum "
    "policy, differential privacy, robust aggregators' parameters, algorithm options given with --set (overrides)",
    "strategies": "one entry per strategy of --strategies",
    "strategies[].strategy": "a federated algorithm (fedavg, fedadam...), or a robust aggregator run with FedAvg",
    "strategies[].algorithm": "the registered algorithm the strategy runs",
    "strategies[].aggregator": "the aggregator its rounds use (every peer the same)",
    "strategies[].clean": "the run without attackers",
    "strategies[].attacked": "the run with --byzantine attackers (null with --byzantine 0)",
    "strategies[].*.final_accuracy": "held-out accuracy of the global model at the end (fraction, 0-1)",
    "strategies[].*.final_eval_loss": "held-out loss of the global model at the end",
    "strategies[].*.bytes_sent_per_peer": "bytes each peer sent over the run, mean over peers",
    "strategies[].*.rounds_committed": "rounds that committed (the run aims for --rounds)",
    "strategies[].*.identical": "every peer ended with the same global parameters (their digests agree)",
    "strategies[].*.members_per_round": "[fewest, most] members of a committed round (the sample's size with --sample)",
    "strategies[].*.samples_verified": "with --sample: every committed round's members are the sample drawn from "
    "the run's seed, the round id and its candidates, recomputed by the benchmark",
    "strategies[].*.wall_s": "wall seconds of the run",
    "strategies[].*.epsilon": "with --dp-clip: the privacy spent, epsilon at --dp-delta, after the last round",
    "strategies[].loss_attacked_over_clean": "attacked final_eval_loss / clean final_eval_loss: what the attack "
    "costs this strategy (1: nothing; null without both runs)",
    "strategies[].loss_over_fedavg": "clean final_eval_loss / FedAvg's clean final_eval_loss, the baseline "
    "(below 1: better than FedAvg; null when FedAvg was not run)",
    "strategies[].*.epsilon_per_round": "with --dp-clip: epsilon after each round, in order",
    "strategies[].*.error": "why the run could not be made (e.g. Bulyan needs n >= 4f+3); its other fields are absent",
}


def sample_quorum(arg: str) -> str:
    """--sample ARG as the coordinator's quorum policy: sample:ARG, or all for ``all`` (its default, which argparse
    passes through here too, as it does every default written as a string)."""
    return arg if arg == "all" else f"{SAMPLE_POLICY}:{arg}"


@dataclass(frozen=True)
class FederatedBenchConfig:
    """What ``bench federated`` runs: its options' defaults are these fields'."""

    peers: int = field(default=8, metadata={"help": "peers per run"})
    task: str = field(default="digits", metadata={"help": "a classification task (digits)"})
    rounds: int = field(default=30, metadata={"help": "rounds per run"})
    dirichlet: float | None = field(
        default=100.0, metadata={"help": "Dirichlet alpha of the label split across peers (small: non-IID)"}
    )
    byzantine: int = field(default=0, metadata={"help": "attacking peers in the attacked runs"})
    attack: str = field(default="signflip", metadata={"help": "signflip, scale=K, noise=S, zero or labelflip"})
    strategies: tuple[str, ...] = field(
        default=STRATEGIES, metadata={"help": "comma-separated strategies", **COMMA_LIST}
    )
    local_steps: int = field(default=10, metadata={"help": "local SGD steps per round (S)"})
    # Federated learning's usual client: plain SGD.
    inner: str = field(default="sgd", metadata={"cli": False})
    # Measured: in 30 rounds FedAvg reaches 90.0% on digits at 0.05, 93.6% at 0.1, 97.5% at 0.3 (BENCHMARKS.md).
    inner_lr: float = field(default=0.3, metadata={"help": "client learning rate"})
    batch_size: int = field(default=32, metadata={"help": "examples per local step"})
    seed: int = field(default=0, metadata={"help": "seed of the model, the data split and the sample"})
    # --sample X is the coordinator's policy sample:X; without it every peer takes part in every round.
    quorum: str = field(
        default="all",
        metadata={"help": "client sampling: the coordinator's sample policy argument (0.5: half the peers, 3: three; "
                  "default: all, every peer)", "flag": "sample", "parse": sample_quorum,
                  "format": lambda quorum: quorum.partition(":")[2] or quorum},
    )
    dp_clip: float | None = field(
        default=None, metadata={"help": "differential privacy: clip updates to this norm"}
    )
    dp_noise: float = field(default=1.0, metadata={"help": "differential privacy: noise multiplier"})
    dp_delta: float = field(default=1e-5, metadata={"help": "differential privacy: delta"})
    # Robust aggregators' scale parameters (in units of an update's L2 norm), measured on digits with 2 of 8
    # peers flipping signs (BENCHMARKS.md): centered_clip keeps 96.7% at tau 0.3 or 0.1, 93.3% at 1;
    # norm_clip keeps 92.5% at C 1, 88.3% at 0.3 (small C clips the honest updates too).
    clip: float = field(default=1.0, metadata={"help": "norm_clip's bound C on each update's norm"})
    tau: float = field(default=0.3, metadata={"help": "centered_clip's radius tau"})
    codec: str | None = field(default=None, metadata={"help": "codec of the rounds (default: the algorithm's)"})
    # Algorithm fields set for every strategy whose config has them, e.g. (("proximal_mu", 0.1),): on the
    # command line --set FIELD=VALUE, repeatable, which options.py has no form for (add_arguments adds it).
    overrides: tuple[tuple[str, float], ...] = field(default=(), metadata={"cli": False})
    # Made of --seed, --batch-size and --dirichlet (bench_config).
    task_config: TaskConfig = field(default_factory=TaskConfig, metadata={"cli": False})

    def __post_init__(self) -> None:
        require(self.peers >= 2, f"--peers must be at least 2, got {self.peers}")
        require(self.rounds >= 1, f"--rounds must be at least 1, got {self.rounds}")
        require(0 <= self.byzantine < self.peers, f"--byzantine must be in [0, {self.peers}), got {self.byzantine}")
        require(bool(self.strategies), f"--strategies is empty; give comma-separated strategies such as "
                f"fedavg,median (choose from {', '.join(STRATEGIES)})")
        for i, s in enumerate(self.strategies):
            require(s in STRATEGIES, f"unknown strategy {s!r}; choose from {', '.join(STRATEGIES)}")
            require(s not in self.strategies[:i],
                    f"strategy {s!r} is given twice in --strategies; give each strategy once")
        if "norm_clip" in self.strategies:
            require(math.isfinite(self.clip) and self.clip > 0,
                    f"--clip must be a positive number (norm_clip's bound on an update's norm), got {self.clip:g}")
        if "centered_clip" in self.strategies:
            require(math.isfinite(self.tau) and self.tau > 0,
                    f"--tau must be a positive number (centered_clip's radius), got {self.tau:g}")
        parse_attack(self.attack)
        for key, _ in self.overrides:
            algorithms = {train_algorithm(s) for s in self.strategies}
            require(any(key in _fields(a) for a in algorithms),
                    f"--set {key}: none of the strategies' algorithms ({', '.join(sorted(algorithms))}) has it")
        # Every strategy's training config and aggregator, built now: one they refuse (a --set value, --dp-*, a
        # codec) fails here, not after the strategies before it have trained. Whether the aggregator can run with
        # this many peers (Bulyan: n >= 4f+3) is not checked: the report says so for that strategy instead.
        for s in self.strategies:
            make_aggregator(train_config(s, self).options.aggregator)


def aggregator_for(strategy: str, config: FederatedBenchConfig) -> str:
    """The aggregator a strategy's rounds use, its parameters set for f = --byzantine attackers among the peers."""
    n, f = config.peers, max(config.byzantine, 1)
    return {
        "median": "median",
        "trimmed_mean": f"trimmed_mean:trim={min(f / n, 0.49):.4f}",
        "krum": f"krum:f={f}",
        "multi_krum": f"multi_krum:f={f},m={n - f}",
        "bulyan": f"bulyan:f={f}",
        "centered_clip": f"centered_clip:tau={config.tau}",
        "norm_clip": f"norm_clip:clip={config.clip}",
    }.get(strategy, "mean")


def round_size(config: FederatedBenchConfig) -> int:
    """Members of a round: every peer, or the sample's size (the coordinator's --min-peers, so rounds are whole)."""
    name, _, arg = config.quorum.partition(":")
    return sample_count(arg, config.peers) if name == SAMPLE_POLICY else config.peers


def train_algorithm(strategy: str) -> str:
    """The registered algorithm a strategy runs: its own, or FedAvg for a robust aggregator."""
    return strategy if strategy in ALGORITHMS else FedConfig.TAG


def _fields(algorithm: str) -> set[str]:
    return {f.name for f in dataclasses.fields(get_algorithm(algorithm).config) if f.init}


def train_config(strategy: str, config: FederatedBenchConfig) -> TrainConfig:
    """The training of one strategy's runs (the same for clean and attacked)."""
    algorithm = train_algorithm(strategy)
    options: dict = {"sync_every": config.local_steps, "aggregator": aggregator_for(strategy, config)}
    options.update({k: v for k, v in config.overrides if k in _fields(algorithm)})
    if config.dp_clip is not None:
        # Seeded, so the benchmark repeats (each peer's stream differs): a real run draws from the OS.
        options["dp"] = DPConfig(clip=config.dp_clip, noise=config.dp_noise, delta=config.dp_delta, seed=config.seed)
    if config.codec is not None:
        options["codec"] = config.codec
    return TrainConfig.of(
        algorithm,
        steps=config.rounds * config.local_steps,
        inner=config.inner,
        inner_lr=config.inner_lr,
        weight_decay=0.0,
        # On the CPU: its peers are threads of one process training a model of a few thousand parameters,
        # where a GPU's launches cost more than the arithmetic (the benchmark has no --device).
        device="cpu",
        **options,
    )


@dataclass
class PeerOutcome:
    """What one peer of a run ended with."""

    rank: int
    digest: str = ""
    accuracy: float | None = None
    eval_loss: float = float("nan")
    bytes_sent: int = 0
    rounds: int = 0
    # Differential privacy: the privacy spent after each round this peer applied.
    epsilons: list[float] = field(default_factory=list)
    error: str = ""


def _poisoned(batches: Iterator, attack: Attack, classes: int) -> Iterator:
    for batch in batches:
        yield attack.flip_labels(batch, classes)


def _peer(
    rank: int, world: int, task: Task, train: TrainConfig, address: str, run_id: str, attack: Attack | None,
    out: PeerOutcome, stop: threading.Event,
) -> None:
    """One peer's whole run: join, train, evaluate the global model, leave."""
    model = place_model(task.build_model(), resolve_device(train.device))
    # Each client its own host id, as on its own machine: clients of one host reduce through shared memory, where no
    # codec runs and no byte is sent (fedavg's bytes were 0, and it trained without the codec the robust ones use).
    elastic = ElasticCollective(ElasticConfig(coordinator=address, run_id=run_id, name=f"peer{rank}",
                                              transport=TransportConfig(host_id=f"{run_id}-peer{rank}")))
    try:
        opt = make_optimizer(model, elastic, train)
        # Every peer builds the same initial model from the task seed: each already holds round 0.
        snapshot = elastic.start(has_state=True)
        if snapshot is not None:
            opt.load_snapshot(snapshot)
        loop = TrainLoop(task, model, opt, train, rank, world)
        if attack is not None:
            if attack.kind == "labelflip":
                classes = getattr(task, "classes", None)
                if classes is None:
                    raise ConfigError(f"labelflip needs a classification task; {task.name} has no classes")
                loop.batches = _poisoned(loop.batches, attack, classes)
            else:
                opt.tamper = attack.corrupt
        loop.run(stop)
        # The global model: after the last round every peer's local model restarted from it.
        opt.state.load_into_model(range(len(opt.state.params)))
        out.digest = opt.state.digest()
        out.eval_loss = task.evaluate(model)
        out.accuracy = task.accuracy(model)
        out.rounds = opt.committed_rounds
        out.epsilons = [r.epsilon for r in opt.history if r.committed and r.epsilon is not None]
    except LoconetError as exc:
        out.error = str(exc)
        stop.set()
    finally:
        elastic.close(leave=True, reason="finished")
        out.bytes_sent = elastic.transport.counters.bytes_sent


def _stuck_state(status: dict) -> str:
    """What a stuck run's coordinator says: its peers' states and rounds, its last rounds and events, in one line."""
    peers = ", ".join(f"{p['peer_id']} {p['state']}/{p['activity'] or '-'} at round {p['last_round']}"
                      for p in status.get("peers", []))
    rounds = ", ".join(
        f"{r['round_id']}.{r['epoch']} {r['status']} {r.get('members')}" for r in status.get("rounds", [])[:4]
    )
    events = "; ".join(f"{e['kind']} {e['peer_id']} {e['detail'][:80]}" for e in status.get("events", [])[:6])
    return f"peers: {peers}; last rounds: {rounds}; last events: {events}"


def run_once(
    strategy: str, config: FederatedBenchConfig, task: Task, attacked: bool, label: str
) -> dict:
    """One run of a strategy (clean or attacked): its accuracy, loss, bytes, and whether peers agree."""
    train = train_config(strategy, config)
    try:
        # A strategy that cannot run with this many peers (Bulyan: n >= 4f+3) is reported, not attempted.
        make_aggregator(train.options.aggregator).check_group(config.peers)
    except ConfigError as exc:
        return {"error": str(exc)}
    attack = parse_attack(config.attack) if attacked else None
    n = config.peers
    coordinator = CoordinatorConfig(
        run_id=label, port=0, dashboard_port=None, min_peers=round_size(config), quorum=config.quorum, seed=config.seed,
        heartbeat_s=0.5,
    )
    outcomes = [PeerOutcome(rank) for rank in range(n)]
    stop = threading.Event()
    started = time.monotonic()
    with CoordinatorThread(coordinator) as coord:
        threads = [
            threading.Thread(
                target=_peer,
                args=(r, n, task, train, coord.address, label,
                      attack if r >= n - config.byzantine else None, outcomes[r], stop),
                name=f"{label}-peer{r}",
                daemon=True,
            )
            for r in range(n)
        ]
        try:
            for t in threads:
                t.start()
            deadline = started + RUN_TIMEOUT_S
            for t in threads:
                t.join(timeout=max(0.0, deadline - time.monotonic()))
            if any(t.is_alive() for t in threads):
                raise LoconetError(f"{label}: peers still running after {RUN_TIMEOUT_S:.0f} s; the run is stuck "
                                   f"({_stuck_state(coord.status())})")
            rounds = [r for r in coord.status()["rounds"] if r["status"] == "committed"]
        finally:
            # On every way out: a peer still training stops, and leaves before its coordinator does.
            stop.set()
            grace = time.monotonic() + STOP_GRACE_S
            for t in threads:
                if t.is_alive():
                    t.join(timeout=max(0.0, grace - time.monotonic()))
    errors = [f"peer{o.rank}: {o.error}" for o in outcomes if o.error]
    if errors:
        raise LoconetError(f"{label} failed: {'; '.join(errors)}")
    honest = outcomes[: n - config.byzantine] if attacked else outcomes
    result = {
        "final_accuracy": honest[0].accuracy,
        "final_eval_loss": honest[0].eval_loss,
        "bytes_sent_per_peer": statistics.mean(o.bytes_sent for o in outcomes),
        "rounds_committed": min(o.rounds for o in outcomes),
        "identical": len({o.digest for o in outcomes}) == 1,
        "members_per_round": [min(len(r["members"]) for r in rounds), max(len(r["members"]) for r in rounds)]
        if rounds else None,
        "wall_s": time.monotonic() - started,
    }
    if config.quorum.startswith(SAMPLE_POLICY + ":"):
        result["samples_verified"] = samples_verified(config, rounds, least=train.options.least_members())
    if config.dp_clip is not None:
        result["epsilon"] = honest[0].epsilons[-1] if honest[0].epsilons else None
        result["epsilon_per_round"] = honest[0].epsilons
    return result


def samples_verified(config: FederatedBenchConfig, rounds: list[dict], least: int = 1) -> bool:
    """Whether every committed round's members are the sample its seed, round id and candidates give, drawn at
    least ``least`` large (the members the strategy's rounds need, as its peers ask: Krum's 2f+3)."""
    size = parse_sample_arg(config.quorum.partition(":")[2])
    return all(
        sorted(r["members"]) == sorted(sample_members(config.seed, r["round_id"], r["candidates"],
                                                      size.of(len(r["candidates"]), least)))
        for r in rounds
    )


def run(config: FederatedBenchConfig, progress: Progress | None = None) -> dict:
    """Every strategy, clean and attacked; the report (each run's line on progress, when given)."""
    torch.set_num_threads(1)  # many peers share two cores: one intra-op thread each
    task = make_task(config.task, config.task_config)
    entries = []
    for strategy in config.strategies:
        entry = {"strategy": strategy, "algorithm": train_config(strategy, config).algorithm,
                 "aggregator": aggregator_for(strategy, config)}
        for attacked in (False, True):
            name = "attacked" if attacked else "clean"
            if attacked and config.byzantine == 0:
                entry[name] = None
                continue
            if progress is not None:
                progress.begin(f"{strategy} {name}")
            entry[name] = result = run_once(strategy, config, task, attacked, f"fed-{strategy}-{name}")
            if progress is not None:
                progress.end(result["error"] if "error" in result else
                             f"accuracy {result['final_accuracy']:.3f}, loss {result['final_eval_loss']:.3f}")
        entries.append(entry)
    add_ratios(entries)
    return {
        "task": config.task,
        "peers": config.peers,
        "rounds": config.rounds,
        "dirichlet": config.dirichlet,
        "byzantine": config.byzantine,
        "attack": config.attack,
        "config": {
            "local_steps": config.local_steps, "inner": config.inner, "inner_lr": config.inner_lr,
            "batch_size": config.batch_size, "seed": config.seed, "quorum": config.quorum,
            "dp_clip": config.dp_clip, "dp_noise": config.dp_noise, "dp_delta": config.dp_delta,
            "clip": config.clip, "tau": config.tau, "codec": config.codec,
            "overrides": dict(config.overrides),
        },
        "strategies": entries,
    }


def _loss(result: dict | None) -> float | None:
    return None if result is None or "error" in result else result["final_eval_loss"]


def add_ratios(entries: list[dict]) -> None:
    """Each entry's losses against its own clean run and against FedAvg's clean run (the baseline)."""
    baseline = next((_loss(e["clean"]) for e in entries if e["strategy"] == "fedavg"), None)
    for e in entries:
        clean, attacked = _loss(e["clean"]), _loss(e["attacked"])
        e["loss_attacked_over_clean"] = attacked / clean if clean and attacked is not None else None
        e["loss_over_fedavg"] = clean / baseline if clean is not None and baseline else None


def _cell(result: dict | None, key: str) -> str:
    if result is None:
        return "-"
    if "error" in result:
        return "n/a"
    value = result.get(key)
    return "-" if value is None else f"{value:.3f}" if key != "bytes_sent_per_peer" else f"{value / 1e3:.0f} kB"


def table(report: dict) -> str:
    """The report as a readable table: one row per strategy, clean and attacked side by side."""
    rows = [("strategy", "clean acc", "clean loss", "attacked acc", "attacked loss", "bytes/peer")]
    for e in report["strategies"]:
        rows.append((e["strategy"], _cell(e["clean"], "final_accuracy"), _cell(e["clean"], "final_eval_loss"),
                     _cell(e["attacked"], "final_accuracy"), _cell(e["attacked"], "final_eval_loss"),
                     _cell(e["clean"], "bytes_sent_per_peer")))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]
    head = (f"{report['task']}, {report['peers']} peers, {report['rounds']} rounds, dirichlet {report['dirichlet']}, "
            f"{report['byzantine']} byzantine ({report['attack']})")
    notes = [
        f"{e['strategy']}: {e['clean']['error']}" for e in report["strategies"] if e["clean"] and "error" in e["clean"]
    ]
    return "\n".join([head, *lines, *notes])


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of this benchmark; the fields' meaning."""
    add_bench_options(parser, FederatedBenchConfig)
    parser.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                        help="an algorithm option for every strategy that has it, e.g. proximal_mu=0.1 or eta=0.01 "
                        "(repeatable)")
    describe_report(parser, FIELDS)


def bench_config(ns: argparse.Namespace) -> FederatedBenchConfig:
    """The FederatedBenchConfig the options describe (ConfigError for a bad one)."""
    config = read_options(FederatedBenchConfig, ns)
    task_config = TaskConfig(seed=config.seed, batch_size=config.batch_size, dirichlet=config.dirichlet)
    return dataclasses.replace(config, overrides=tuple(_override(text) for text in ns.set), task_config=task_config)


def _override(text: str) -> tuple[str, float]:
    key, eq, value = (s.strip() for s in text.partition("="))
    try:
        if not (eq and key):
            raise ValueError
        return key.replace("-", "_"), float(value)
    except ValueError:
        raise ConfigError(f"--set {text!r}: write FIELD=NUMBER, e.g. proximal_mu=0.1") from None


def main(ns: argparse.Namespace) -> int:
    """Check the arguments, run every strategy, print the report."""
    config = bench_config(ns)
    make_task(config.task, config.task_config)  # a bad task or split fails before any run
    with progress_for("federated", getattr(ns, "quiet", 0)) as progress:
        report = run(config, progress)
    sys.stdout.write(json_line(report) + "\n" if ns.json else table(report) + "\n")
    return 0


