"""The coordinator's settings, one field per ``loconet coordinator`` option.

Every field has a default and a one-line ``help`` in its metadata: the
command line is generated from this dataclass (``peer/options.py``), so the
default and the help are written once, here. ``flag`` keeps an option's
historical name where it differs from the field's (``--run``, ``--no-probe``).
``peer/coordinator/service.py`` re-exports the class.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from collectives.errors import ConfigError
from collectives.membership.roundplan import DEFAULT_RUN_ID
from collectives.net.addresses import COORDINATOR_PORT, LOCAL_HOST, MAX_PORT, parse_advertise
from collectives.net.rpc import RpcSecurity
from peer.coordinator.dashboard_security import parse_allowed_hosts
from peer.coordinator.limits import CoordinatorLimits
from peer.coordinator.policies import QuorumPolicy, parse_policy
from peer.coordinator.rules import QuorumRules

# Catch-up memory is O(catchup_rounds x members); beyond this, fetching the whole state is cheaper anyway.
MAX_CATCHUP_ROUNDS = 1000
# More holders of a round's result than this buys nothing but every holder's fetch of it.
MAX_RESULT_HOLDERS = 64


def parse_dashboard_port(text: str) -> int | None:
    """A dashboard port from the command line: a number, or -1 / none / off for no dashboard."""
    if text.strip().lower() in ("none", "off"):
        return None
    try:
        port = int(text)
    except ValueError:
        raise ConfigError(f"dashboard port must be a number, or -1 / none for no dashboard; got {text!r}") from None
    if port == -1:
        return None
    if not 0 <= port <= MAX_PORT:
        raise ConfigError(f"dashboard port must be in 0..{MAX_PORT}, or -1 / none for no dashboard; got {port}")
    return port


@dataclass(frozen=True)
class CoordinatorConfig:
    """Settings of a coordinator process (filled by ``loconet coordinator``)."""

    run_id: str = field(default=DEFAULT_RUN_ID, metadata={"help": "run id this coordinator serves", "flag": "run"})
    host: str = field(
        default=LOCAL_HOST, metadata={"help": "interface to serve gRPC on (127.0.0.1: this machine only)"}
    )
    port: int = field(default=COORDINATOR_PORT, metadata={"help": "gRPC port (0: any free port)"})
    advertise: str | None = field(
        default=None,
        metadata={"help": "HOST[:PORT] peers reach this coordinator at, when it differs from --host (HOST alone: the "
                  "bound port)"},
    )
    dashboard_port: int | None = field(
        default=8080,
        metadata={
            "help": "HTTP dashboard port (0: any free port; -1 or none: no dashboard)", "parse": parse_dashboard_port
        },
    )
    dashboard_host: str = field(
        default=LOCAL_HOST,
        metadata={"help": "interface to serve the HTTP dashboard on (127.0.0.1: this machine only)"},
    )
    dashboard_token_file: str | None = field(
        default=None,
        metadata={
            "help": "file holding the dashboard's bearer token (a secret apart from the run's): /api/status and "
            "/metrics then need 'Authorization: Bearer TOKEN', and a browser opens /?token=TOKEN once"
        },
    )
    dashboard_allowed_hosts: str = field(
        default="",
        metadata={
            "help": "comma-separated host names the dashboard answers to besides localhost and IP addresses (the "
            "name in its URL when reached by DNS name or through a proxy); other names are refused (DNS rebinding; "
            "default: none)"
        },
    )
    min_peers: int = field(
        default=1, metadata={"help": "fewest peers a round may have; the run starts once this many have joined"}
    )
    join_timeout_s: float = field(
        default=5.0,
        metadata={"help": "seconds a quorum waits for missing live peers before it starts with those that asked"},
    )
    lease_s: float = field(
        default=5.0, metadata={"help": "seconds without a heartbeat before a peer is out of the run"}
    )
    heartbeat_s: float = field(default=1.0, metadata={"help": "heartbeat interval peers are told to use, in seconds"})
    commit_timeout_s: float = field(
        default=30.0, metadata={"help": "seconds the members of a round have to report after its first report"}
    )
    failure_grace_s: float = field(
        default=2.0,
        metadata={
            "help": "seconds the members of a round nobody named have to report after its first failure report, "
            "before the round (which can no longer commit) aborts without waiting for them"
        },
    )
    quorum_timeout_s: float = field(
        default=120.0, metadata={"help": "seconds a peer's quorum request waits before it is refused as too few peers"}
    )
    startup_grace_s: float | None = field(
        default=None,
        metadata={"help": "after a (re)start, or an outage in which every lease lapsed, seconds quorums wait for "
                "peers to re-register (none: one lease)"},
    )
    history: int = field(default=500, metadata={"help": "rounds (and twice as many events) the dashboard keeps"})
    probe_peers: bool = field(
        default=True,
        metadata={
            "help": "check that peers a quorum waits for still listen, so a dead one is dropped at once, not after "
            "its lease (off for simulated peers that have no server)",
            "flag": "probe",
        },
    )
    state_file: str | None = field(
        default=None,
        metadata={
            "help": "remember here that the run was founded, its last committed round and that state's digest, so "
            "a restarted coordinator never lets a new peer found it again"
        },
    )
    new_run: bool = field(
        default=False,
        metadata={
            "help": "start the run over: forget the round and state digest the state file remembers (without it, "
            "a run that committed a round is never founded again; give it once, not on every restart)"
        },
    )
    allow_rollback: bool = field(
        default=False,
        metadata={
            "help": "when every peer holding the last committed round is gone, go on from the newest older round "
            "a live peer holds (the later rounds are lost); without it the run waits for a holder of its last round"
        },
    )
    quorum: str = field(
        default="all",
        metadata={
            "help": "who takes part in a round: all (every live peer, or those that asked by the join timeout), "
            "first-k:K, sample:K or sample:F[,min=M] (drawn by --quorum-seed); for gradient coding coded:S, "
            "allbut:S, backup, grace:L; for async rounds buffer:K[,t=T]"
        },
    )
    seed: int = field(
        default=0,
        metadata={
            "help": "the run's seed: with --quorum sample:... it draws each round's peers", "flag": "quorum-seed"
        },
    )
    catchup_rounds: int = field(
        default=4,
        metadata={
            "help": "committed rounds remembered so that a peer that missed them fetches each round's result from "
            "its members instead of the whole state (0: always the whole state)"
        },
    )
    result_holders: int = field(
        default=3,
        metadata={
            "help": "live peers that keep each remembered round's result, its members counted: when a round took "
            "fewer (a buffer, a sample, first-k), other peers are asked to fetch and keep it, so that it outlives "
            "its members (0: its members only)"
        },
    )
    max_peers: int = field(
        default=10_000,
        metadata={"help": "most peers the run registers at once; a join beyond it is refused (RESOURCE_EXHAUSTED)"},
    )
    security: RpcSecurity = field(
        default=RpcSecurity(), metadata={"help": "TLS and the run secret of the coordinator's server", "flatten": True}
    )
    limits: CoordinatorLimits = field(
        default=CoordinatorLimits(), metadata={"help": "per-client rate limits on coordinator calls", "flatten": True}
    )

    def __post_init__(self) -> None:
        if not self.run_id:
            raise ConfigError("run id must not be empty")
        if not 0 <= self.port <= MAX_PORT:
            raise ConfigError(f"port must be in 0..{MAX_PORT} (0: any free port), got {self.port}")
        if self.dashboard_port is not None and not 0 <= self.dashboard_port <= MAX_PORT:
            raise ConfigError(
                f"dashboard port must be in 0..{MAX_PORT}, or None for no dashboard; got {self.dashboard_port}"
            )
        if self.advertise is not None:
            parse_advertise(self.advertise)
        if self.heartbeat_s <= 0 or self.lease_s <= self.heartbeat_s:
            raise ConfigError(
                f"lease ({self.lease_s} s) must be longer than the heartbeat interval ({self.heartbeat_s} s)"
            )
        for name in ("join_timeout_s", "commit_timeout_s", "quorum_timeout_s"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"{name} must be positive")
        if self.failure_grace_s < 0:
            raise ConfigError(f"failure_grace_s must not be negative, got {self.failure_grace_s}")
        self.rules  # noqa: B018 - raises ConfigError for min_peers < 1 or a negative grace
        if self.history < 1:
            raise ConfigError(f"history must be at least 1 round, got {self.history}")
        if self.max_peers < 1:
            raise ConfigError(f"max_peers must be at least 1, got {self.max_peers}")
        most = self.policy.max_members()  # parsing the spec raises ConfigError listing the forms
        if most is not None and most < self.min_peers:
            raise ConfigError(
                f"quorum {self.quorum} can never reach min_peers {self.min_peers}: "
                f"use K >= {self.min_peers} or lower --min-peers"
            )
        if not 0 <= self.seed < 1 << 64:
            raise ConfigError(f"seed must be between 0 and 2**64 - 1, got {self.seed}")
        self.dashboard_hosts  # noqa: B018 - raises ConfigError for a name that is not a host name
        if not 0 <= self.catchup_rounds <= MAX_CATCHUP_ROUNDS:
            raise ConfigError(f"catchup_rounds must be between 0 and {MAX_CATCHUP_ROUNDS}, got {self.catchup_rounds}")
        if not 0 <= self.result_holders <= MAX_RESULT_HOLDERS:
            raise ConfigError(f"result_holders must be between 0 and {MAX_RESULT_HOLDERS}, got {self.result_holders}")

    @property
    def dashboard_hosts(self) -> tuple[str, ...]:
        """The host names of dashboard_allowed_hosts, lower-case."""
        return parse_allowed_hosts(self.dashboard_allowed_hosts)

    @property
    def rules(self) -> QuorumRules:
        """The quorum rule's settings."""
        grace = self.lease_s if self.startup_grace_s is None else self.startup_grace_s
        return QuorumRules(min_peers=self.min_peers, join_timeout_s=self.join_timeout_s, startup_grace_s=grace,
                           allow_rollback=self.allow_rollback)

    @property
    def policy(self) -> QuorumPolicy:
        """The quorum policy ``quorum`` names (forms: see ``policies.policy_forms``), fitted to min_peers."""
        return parse_policy(self.quorum).fitted(self.min_peers)

