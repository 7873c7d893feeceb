"""``loconet harness``'s options: the local network, what its peers train, the faults to inject, and the checks that
refuse a scenario that could not run (``HarnessConfig``), before any process starts; and ``loconet demo``'s, a harness
run of fewer options (``DemoConfig``)."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from collectives.elastic import ElasticConfig
from collectives.errors import ConfigError
from collectives.membership.roundplan import DEFAULT_RUN_ID
from collectives.net.ratelimit import parse_bandwidth
from collectives.reduce.aggregators import make_aggregator
from optimizers.syncconfig import least_members
from peer.coordinator.config import CoordinatorConfig, parse_dashboard_port
from peer.harness.scenario import Event
from peer.runtime.training import TrainConfig, local_run
from peer.tasks.base import TaskConfig
from peer.tasks.registry import DEFAULT_TASK, TASK_HELP

# The coordinator options the harness sets itself for every coordinator it starts.
COORDINATOR_OPTIONS_SET_BY_HARNESS = (
    "run", "host", "port", "advertise", "dashboard-host", "startup-grace", "state-file"
)


def target_problem(event: Event, names: Sequence[str]) -> str:
    """Why an event's target is no peer of the scenario ("" when it is one): it would fire on nobody."""
    if event.target is not None and event.target not in names:
        return f"no peer is called {event.target}; the scenario's peers are {names[0]}..{names[-1]}"
    problem = event.pattern.workers_problem(len(names)) if event.pattern is not None else ""
    if problem:
        return f"the straggler pattern's {problem}: the scenario has {len(names)} peers"
    return ""



@dataclass(frozen=True)
class HarnessConfig:
    """A local network: its peers, what they train, the faults to inject (options of ``loconet harness``)."""

    peers: int = field(default=4, metadata={"help": "peers at the start (joiners come on top)"})
    run_id: str = field(default=DEFAULT_RUN_ID, metadata={"help": "run id", "flag": "run"})
    task: str = field(default=DEFAULT_TASK, metadata={"help": TASK_HELP})
    task_config: TaskConfig = field(default_factory=TaskConfig, metadata={"cli": False})
    train: TrainConfig = field(
        default_factory=local_run, metadata={"cli": False}
    )
    events: tuple[Event, ...] = field(default=(), metadata={"cli": False})
    # Per-peer cap on send and on receive (the transport's token buckets, or tbf with --netns).
    bandwidth: str | None = field(default=None, metadata={"help": "per-peer cap on send and receive, e.g. 100mbit"})
    # With netns: different caps per direction (default: bandwidth).
    uplink: str | None = field(
        default=None, metadata={"help": "--netns: cap of what a peer sends (default --bandwidth)"}
    )
    downlink: str | None = field(
        default=None, metadata={"help": "--netns: cap of what a peer receives (default --bandwidth)"}
    )
    netns: bool = field(default=False, metadata={"help": "each process in its own network namespace (root)"})
    # The harness stands for machines on a network: each peer is its own host unless this says they share one.
    shared_host: bool = field(
        default=False,
        metadata={"help": "the peers share one host id: they reduce through shared memory, one leader per host"},
    )
    token: bool = field(
        default=False,
        metadata={"help": "make a run secret in the work dir and give it to every process (--token-file)"},
    )
    tls: bool = field(
        default=False,
        metadata={"help": "make a CA and a certificate in the work dir and run every process with mutual TLS"},
    )
    # Short leases and heartbeats: a local network notices failures fast.
    coordinator: CoordinatorConfig = field(
        default_factory=lambda: CoordinatorConfig(lease_s=3.0, heartbeat_s=0.5, dashboard_port=0),
        metadata={"cli": False},
    )
    keep_results: int = field(
        default=ElasticConfig.keep_results,
        metadata={"help": "recent rounds' results each peer keeps for peers that were late for them"},
    )
    workdir: str | None = field(default=None, metadata={
        "help": "logs and checkpoints (default: a new temporary folder; a reused one starts a new run, without the "
                "earlier run's checkpoints)"})
    # A run's checkpoints are a few MB per peer and the harness never resumes them; hundreds of runs filled a disk.
    keep_checkpoints: bool = field(default=False, metadata={
        "help": "keep the peers' checkpoints in the work dir after a run that finished (a failed run keeps them; "
                "the logs are always kept)"})
    timeout_s: float = field(default=1800.0, metadata={"help": "give up after this many seconds"})
    progress: bool = field(default=False, metadata={"help": "draw a live status table on stderr"})
    # Modules every peer imports first (they may register algorithms, aggregators...).
    plugins: tuple[str, ...] = field(default=(), metadata={"cli": False})

    def __post_init__(self) -> None:
        if self.peers < 1:
            raise ConfigError("the harness needs at least one peer")
        if not (self.timeout_s > 0 and math.isfinite(self.timeout_s)):
            raise ConfigError(f"--timeout must be a positive number of seconds, got {self.timeout_s:g}")
        if self.keep_results < 0:
            raise ConfigError(f"--keep-results must be >= 0 (0: keep none), got {self.keep_results}")
        for flag, rate in (("--bandwidth", self.bandwidth), ("--uplink", self.uplink), ("--downlink", self.downlink)):
            if rate is not None:
                try:
                    parse_bandwidth(rate)
                except ConfigError as exc:
                    raise ConfigError(f"{flag}: {exc}") from None
        if (self.uplink or self.downlink) and not self.netns:
            # Without namespaces only the transport's own cap exists, the same both ways (--bandwidth).
            raise ConfigError("--uplink and --downlink cap each direction of a namespace's link and need --netns; "
                              "without it, --bandwidth caps both")
        names = self.peer_names
        if self.coordinator.max_peers < len(names):
            raise ConfigError(f"--max-peers {self.coordinator.max_peers} is fewer than the {len(names)} peers the "
                              "scenario starts (joiners included): the coordinator would refuse the others")
        for event in self.events:
            problem = target_problem(event, names)
            if problem:
                raise ConfigError(f"{event}: {problem}")
        if any(e.action == "cut" for e in self.events) and not self.netns:
            raise ConfigError("cut events take a peer's link down and need --netns (network namespaces, root)")
        if self.shared_host and self.netns:
            raise ConfigError("--shared-host puts the peers on one host, --netns on one each: choose one")
        # An algorithm whose rounds need a quorum policy (coded-sgd: coded:s) gets it unless one was chosen; one
        # chosen that cannot serve it is refused here, not after every peer refused its every round.
        options = self.train.options
        expected = getattr(options, "expected_quorum", lambda: None)()
        if expected is not None and self.coordinator.quorum == CoordinatorConfig.quorum:
            object.__setattr__(self, "coordinator", dataclasses.replace(self.coordinator, quorum=expected))
        # In the spelling every round's plan carries to the peers (``coded:1`` for ``coded:1,code=auto``), so this
        # check is the peers' own.
        problem = getattr(options, "quorum_problem", lambda policy: "")(self.coordinator.policy.spec)
        if problem:
            raise ConfigError(f"{problem}: leave --quorum out and the harness sets {expected}")
        self._check_round_minimum(options, len(self.peer_names))

    @staticmethod
    def _check_round_minimum(options: Any, most: int) -> None:
        """ConfigError when the algorithm's rounds need more members than the scenario ever has (``most``, its peers
        and joiners): every peer would train alone to its end and the run report 0 rounds, exit 0."""
        aggregator = getattr(options, "aggregator_config", None)
        if aggregator is not None:
            try:
                make_aggregator(aggregator).check_group(most)
            except ConfigError as exc:
                raise ConfigError(f"no round can form: {exc} (the scenario has at most {most} peers)") from None
        least = least_members(options)
        if least > most:  # beyond the aggregator's: a private round's --dp-min-members, a plugin's own
            raise ConfigError(f"no round can form: the rounds need {least} members (the aggregator's minimum, or "
                              f"--dp-min-members) and the scenario has at most {most} peers; add peers or lower it")

    @property
    def joins(self) -> int:
        """How many peers join during the scenario (one per join event)."""
        return sum(e.action == "join" for e in self.events)

    @property
    def peer_names(self) -> list[str]:
        """The scenario's peers: peer0.. for those at the start, then one per join event (the joiners)."""
        return [f"peer{i}" for i in range(self.peers + self.joins)]



# The demo trains longer than a harness run (400 steps) so the loss gets close to its floor.
DEMO_STEPS = 600


@dataclass(frozen=True)
class DemoConfig:
    """What ``loconet demo`` runs (its options): a harness run of DiLoCo with the dashboard and an eval per round."""

    peers: int = field(default=4, metadata={"help": "local peers to start"})
    steps: int = field(
        default=DEMO_STEPS,
        metadata={"help": "inner steps each peer trains (more than a harness run, so the loss nears its floor)"},
    )
    dashboard_port: int | None = field(
        default=CoordinatorConfig.dashboard_port,
        metadata={"help": "port of the dashboard (0: any free port; -1 or none: no dashboard)",
                  "parse": parse_dashboard_port},
    )
    # None: TrainConfig's device.
    device: str | None = field(
        default=None,
        metadata={"help": "where the peers train: auto (CUDA when available, else the CPU), cpu, cuda or cuda:N "
                  "(default: the training default, auto)"},
    )
