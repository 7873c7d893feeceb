"""``loconet bench membership``: how the coordinator scales with many peers.

A REAL coordinator process (``loconet coordinator``) is driven by lightweight
*simulated* peers: no model, no data plane, each one only speaks the
membership protocol. They live as asyncio tasks in ``--client-procs`` spawned
processes (grpc.aio, ``--channels`` TCP connections per process), so that
1000 peers cost two processes, not 1000.

Each simulated peer (``peer/bench/simpeers.py``; its processes and the
coordinator's: ``peer/bench/simsession.py``) joins, heartbeats with plausible
metrics and, on command, takes part in ``rounds`` rounds (Quorum -> Commit).
The coordinator runs with ``--min-peers N`` (and a join timeout as long as
the quorum timeout), so every quorum must hold all N. As the real client
does, Join / Quorum / Commit are retried after UNAVAILABLE, DEADLINE_EXCEEDED
or CANCELLED (``rpc_retries`` counts them), heartbeats have a deadline of
max(interval, 1 s) and are not retried (``heartbeat_errors`` counts them).

Phases of one measurement (each with a coordinator of its own):

1. idle: the coordinator's CPU with the clients connected and no peer;
2. all peers join at once (join latency per peer);
3. after one and a half heartbeat intervals, a heartbeat-only window of
   ``window_s``: the coordinator's CPU (utime+stime of ``/proc/<pid>/stat``,
   all threads, 10 ms ticks) over the window divided by the heartbeats the
   clients sent in it (by send time; one machine clock, ``time.time()``);
   cross-checked with the nanosecond thread clocks (``/proc/<pid>/task/*/schedstat``)
   and net of the idle cost;
4. ``rounds`` rounds (heartbeats keep going); then the Status RPC, the
   coordinator's RSS and the checks: every peer got the same round id and
   epoch with all N members and commit=True in every round, and the
   coordinator counts ``rounds`` committed rounds, none aborted, N live peers.

The baseline is the same measurement at ``baseline_peers`` (10) peers without
rounds, in the same run: ``cpu_per_heartbeat_over_baseline``.

Latencies (``time.time()`` read in the client processes):

- ``quorum_latency_s``: per peer and round, first Quorum attempt sent ->
  answered. With "all live peers asked" it mostly measures how late the last
  peer asked.
- ``quorum_close_latency_s``: per peer and round, answer time minus the send
  time of the round's LAST Quorum request (the answered attempt, over all
  client processes): the coordinator's reaction once the group is complete
  plus the delivery of n answers. ``quorum_close_first_answer_s`` /
  ``quorum_close_last_answer_s`` (one sample per round) and ``per_round``
  give the first and the last answer of each round.
- ``quorum_formed_after_last_request_s`` / ``quorum_answers_after_formed_last_s``
  split the close at the round's formation (the coordinator's status says when):
  taking in the requests and deciding, then answering every member.
- ``commit_latency_s`` / ``commit_close_latency_s``: the same for Commit.

These figures are pure functions of the peers' records (``peer/bench/roundstats.py``).

By default every peer asks at once and commits at once (a burst: the intake of
1,000 calls by one Python gRPC process is then most of the quorum latency);
``--spread`` and ``--allreduce`` space the calls as a run's training and data
exchange would. The coordinator's rate limits are its per-client defaults
times the simulated peers behind the one loopback address (nothing exempt);
the run has no run secret. docs/scale.md says where the time goes.
- ``heartbeat_latency_s`` in the window, ``heartbeat_latency_during_rounds_s``
  (a coordinator loop busy with a round shows up here).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import pathlib
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from peer.bench.fields import SUMMARY, Fields, describe_report
from peer.bench.kit import add_bench_options, bench_log_dir, print_report, proc_rss_mb, require, summary
from peer.bench.progress import Progress, progress_for
from peer.bench.roundstats import coordinator_checks, cpu_floor, formed_at, group_messages, round_stats
from peer.bench.simpeers import RoundRecord, merge_counts
from peer.bench.simsession import RUN, SimSession, bench_rate_limits
from peer.coordinator.config import CoordinatorConfig
from peer.coordinator.dashboard import json_safe
from peer.options import read_options

_CPU_US = "coordinator CPU microseconds per heartbeat in the window"
FIELDS: Fields = {
    "peers": "simulated peers of the main measurement (--peers)",
    "rounds": "rounds (Quorum, then Commit) every peer takes part in",
    "client_procs": "processes the simulated peers run in",
    "channels_per_client_proc": "gRPC channels (TCP connections) per client process",
    "heartbeat_s": "heartbeat interval, seconds",
    "lease_s": "the coordinator's lease, seconds",
    "window_s": "length asked for the heartbeat-only window, seconds",
    "spread_s": "each peer asks for a quorum after a random delay below this, seconds (0: all at once)",
    "allreduce_s": "each member waits this long between its Quorum answer and its Commit (the round's data "
    "exchange), seconds (0: it commits at once)",
    "churn": "peers that leave and join again under a new peer id before each round after the first (--churn)",
    "control_plane": "how the simulated peers send Heartbeat, Quorum and Commit: session (messages on one Session "
    "stream per peer, as the real client) or unary (one gRPC call each, --unary)",
    "coordinator_rate_limits": "the coordinator's rate-limit options: the product's per-client defaults times the "
    "simulated peers sharing one address (nothing exempt: the limiter checks every call)",
    "run_secret": "whether the run has a run secret (--token-file): false, so no call carries an Ed25519 credential "
    "to check (docs/security.md; docs/scale.md estimates that cost)",
    "join_latency_s": SUMMARY + ": seconds from a peer's first Join attempt to its answer, all peers joining at once",
    "join_wall_s": "seconds until every peer had joined",
    "heartbeat_window_s": "measured length of the heartbeat-only window, seconds",
    "heartbeats_in_window": "heartbeats the clients sent in the window",
    "heartbeats_per_s": "heartbeats_in_window / heartbeat_window_s",
    "heartbeat_latency_s": SUMMARY + ": seconds from a heartbeat sent to its answer, in the window",
    "coordinator_cpu_s_in_window": "the coordinator's CPU seconds (user + system, /proc/<pid>/stat) in the window",
    "coordinator_cpu_per_heartbeat_us": _CPU_US + " (10 ms clock ticks)",
    "coordinator_cpu_utilization": "the coordinator's CPU seconds per wall second in the window (cores)",
    "coordinator_idle_cpu_utilization": "the same with the clients connected and no peer joined: its fixed cost",
    "coordinator_cpu_per_heartbeat_us_schedstat": _CPU_US + ", from the nanosecond thread clocks (schedstat)",
    "coordinator_idle_cpu_utilization_schedstat": "the idle cost from the nanosecond thread clocks",
    "coordinator_cpu_per_heartbeat_net_of_idle_us": _CPU_US + ", schedstat, minus the idle cost",
    "client_cpu_utilization": "CPU seconds per wall second of each client process in the window (cores)",
    "coordinator_rss_mb": "the coordinator's resident memory at the end, MiB",
    "heartbeat_errors": "heartbeats without an answer within max(heartbeat, 1 s), by gRPC status",
    "heartbeat_errors_in_window": "of those, the ones sent in the window",
    "rpc_retries": "Join / Quorum / Commit calls retried after UNAVAILABLE, DEADLINE_EXCEEDED or CANCELLED, by call",
    "warnings": "what went slower than it should, without failing (unanswered heartbeats, retries)",
    "heartbeat_latency_during_rounds_s": SUMMARY + ": heartbeat latency while rounds ran",
    "quorum_latency_s": SUMMARY + ": per peer and round, first Quorum attempt sent -> answered",
    "quorum_close_latency_s": SUMMARY + ": per peer and round, answer time minus the send time of the round's "
    "last Quorum request (the coordinator's reaction once the group is complete)",
    "commit_latency_s": SUMMARY + ": per peer and round, first Commit attempt sent -> answered",
    "commit_close_latency_s": SUMMARY + ": as quorum_close_latency_s, for Commit",
    "quorum_close_first_answer_s": SUMMARY + ": per round, the first Quorum answer after the last request",
    "quorum_close_last_answer_s": SUMMARY + ": per round, the last Quorum answer after the last request",
    "round_wall_s": SUMMARY + ": per round, first Quorum request -> last Commit answer, seconds",
    "quorum_formed_after_last_request_s": SUMMARY + ": per round, the round's formation (the coordinator's clock, "
    "its status) minus the send time of the last Quorum request: taking in the requests and deciding",
    "quorum_answers_after_formed_last_s": SUMMARY + ": per round, the last Quorum answer received minus the "
    "round's formation: serialising, sending and the clients reading the answers",
    "quorum_answer_bytes_per_round": SUMMARY + ": per round, the bytes of every Quorum answer the peers got (the "
    "member list whole, plain or packed; left out; or its change from the asker's)",
    "rounds_full": "rounds every peer committed with all peers as members",
    "per_round": "one entry per round, in order",
    "per_round[].round_id": "the round id the coordinator gave",
    "per_round[].epoch": "the epoch of the round",
    "per_round[].members": "members of the round's group",
    "per_round[].peers_answered": "simulated peers that got an answer for the round",
    "per_round[].committed_by_all": "true when every peer committed it with all peers as members",
    "per_round[].quorum_spread_s": "seconds between the first and the last Quorum request",
    "per_round[].quorum_close_first_s": "first Quorum answer after the last request, seconds",
    "per_round[].quorum_close_last_s": "last Quorum answer after the last request, seconds",
    "per_round[].commit_close_last_s": "last Commit answer after the last Commit request, seconds",
    "per_round[].round_wall_s": "first Quorum request -> last Commit answer, seconds",
    "per_round[].formed_after_last_request_s": "the round's formation (the coordinator's status) minus the send "
    "time of the last Quorum request, seconds",
    "per_round[].answers_after_formed_first_s": "first Quorum answer received after the round's formation, seconds",
    "per_round[].answers_after_formed_last_s": "last Quorum answer received after the round's formation, seconds",
    "per_round[].quorum_answer_bytes": "bytes of the round's Quorum answers, all peers together",
    "per_round[].quorum_answer_lists": "how many of the round's Quorum answers carried the member list in each "
    "form: whole, packed, change (from the asker's list) or left_out (the asker holds it)",
    "rounds_phase": "the rounds as a whole (heartbeats keep going; with --churn, the leaves and joins between them)",
    "rounds_phase.wall_s": "seconds from the command to the last peer's last round",
    "rounds_phase.coordinator_cpu_s": "the coordinator's CPU seconds in that time",
    "rounds_phase.coordinator_cpu_per_round_s": "coordinator_cpu_s / rounds",
    "rounds_phase.coordinator_cpu_utilization": "coordinator_cpu_s / wall_s (cores)",
    "rounds_phase.client_cpu_utilization": "CPU seconds per wall second of each client process in that time (cores): "
    "the simulated peers share the machine's cores with the coordinator",
    "rounds_phase.wall_per_round_s": "wall_s / rounds",
    "rounds_phase.client_cpu_per_round_s": "the client processes' CPU seconds in that time, summed, / rounds",
    "rounds_phase.cores": "the cores this benchmark may run on (its CPU affinity)",
    "rounds_phase.cpu_floor_per_round_s": "(coordinator_cpu_per_round_s + client_cpu_per_round_s) / cores: the "
    "shortest a round can take here with every core busy, were the coordinator's work perfectly parallel; on a "
    "machine of their own the simulated peers would not count",
    "baseline": "the same measurement at --baseline-peers peers without rounds, in the same run",
    "baseline.peers": "its peers",
    "baseline.coordinator_cpu_per_heartbeat_us": _CPU_US,
    "baseline.heartbeats_per_s": "heartbeats per second in its window",
    "baseline.coordinator_cpu_utilization": "the coordinator's CPU seconds per wall second in its window",
    "baseline.coordinator_idle_cpu_utilization": "its idle cost",
    "baseline.coordinator_cpu_per_heartbeat_us_schedstat": _CPU_US + ", schedstat",
    "baseline.coordinator_cpu_per_heartbeat_net_of_idle_us": _CPU_US + ", schedstat, minus the idle cost",
    "baseline.heartbeat_latency_s": SUMMARY + ": its heartbeat latency",
    "baseline.join_latency_s": SUMMARY + ": its join latency",
    "baseline.coordinator_rss_mb": "its coordinator's resident memory, MiB",
    "rounds_committed": "rounds the coordinator counts as committed (its Status)",
    "rounds_aborted": "rounds the coordinator counts as aborted",
    "peers_alive_at_end": "live peers the coordinator counts at the end",
    "committed_rounds_member_counts": "the distinct member counts of the committed rounds in its history",
    "all_rounds_committed_with_all_peers": "true when every check passed: the exit code is 0 only then",
    "problems_total": "failed checks (a round missing, a peer short, a lease lapsed, ...)",
    "problems": "failed checks grouped by shape, most frequent first (at most 20 groups)",
    "problems[].count": "checks of this shape that failed",
    "problems[].example": "one of them, shortened",
    "wall_s": "seconds the whole benchmark took (both measurements)",
    "method": "(--json only) how the CPU and quorum-close figures are measured, in words",
    "cpu_per_heartbeat_over_baseline": "coordinator_cpu_per_heartbeat_us / baseline's: below 1, a heartbeat costs "
    "less at --peers than at --baseline-peers",
    "cpu_per_heartbeat_net_of_idle_over_baseline": "coordinator_cpu_per_heartbeat_net_of_idle_us / baseline's: "
    "the same ratio net of the idle cost (schedstat)",
}


@dataclass(frozen=True)
class _Clock:
    """Wall time, the coordinator's CPU (two clocks) and each client process's CPU, read at one instant."""

    wall: float
    cpu: float
    cpu_ns: float
    clients: tuple[float, ...]

    @classmethod
    def read(cls, session: SimSession) -> _Clock:
        return cls(time.time(), session.cpu_s(), session.cpu_ns_s(), tuple(session.client_cpu_s()))


def _measure(peers: int, rounds: int, client_procs: int, heartbeat_s: float, window_s: float, lease_s: float,
             channels: int, log_dir: pathlib.Path, tag: str, quorum_timeout_s: float, spread_s: float = 0.0,
             allreduce_s: float = 0.0, unary: bool = False, churn: int = 0,
             stage: Callable[[str], None] = lambda _: None) -> dict:
    """One coordinator, peers simulated peers: join, a heartbeat-only window, rounds; the measurements.

    ``stage`` is told each phase as it starts (for the progress line).
    """
    stage("starting the coordinator and the clients")
    session = SimSession(peers, client_procs, heartbeat_s, lease_s, channels, log_dir, tag, quorum_timeout_s,
                         spread_s, allreduce_s, unary)
    try:
        session.gather("ready", timeout_s=120)
        stage("idle coordinator")
        # Idle coordinator (clients connected, no peer yet): its fixed cost (the 50 ms tick) for reference.
        idle = _Clock.read(session)
        time.sleep(min(2.0, window_s / 4))
        idle_end = _Clock.read(session)

        stage(f"{peers} peers joining")
        t_join0 = time.time()
        session.send({"cmd": "join"})
        joined = session.gather("joined", timeout_s=quorum_timeout_s + 60)
        join_wall = time.time() - t_join0
        join_s = [x for r in joined for x in r["join_s"]]
        problems = [e for r in joined for e in r["errors"]]

        # Let every peer's heartbeat schedule start (random phase within one interval), then measure.
        stage("heartbeat-only window")
        time.sleep(1.5 * heartbeat_s)
        window = _Clock.read(session)
        time.sleep(window_s)
        window_end = _Clock.read(session)

        rounds_info: dict = {}
        if rounds > 0:
            stage(f"{rounds} rounds")
            start = _Clock.read(session)
            records, round_problems = _rounds(session, peers, rounds, churn, quorum_timeout_s)
            end = _Clock.read(session)
            problems += round_problems
        status = session.status()
        if rounds > 0:
            rounds_info, stats_problems = round_stats(records, peers, formed_at(status))
            problems += stats_problems
            rounds_info["rounds_phase"] = _rounds_phase(start, end, rounds)
        rss = proc_rss_mb(session.pid)
        session.send({"cmd": "stop"})
        final = session.gather("final", timeout_s=60)
    finally:
        session.close()

    out = {
        "peers": peers,
        "join_latency_s": summary(join_s),
        "join_wall_s": join_wall,
        **_heartbeat_window(final, idle, idle_end, window, window_end),
        "coordinator_rss_mb": rss,
        "status": status,
        "rpc_retries": merge_counts(f["retries"] for f in final),
        "problems": problems,
    }
    unknown = sum(f["unknown"] for f in final)
    if unknown:
        problems.append(f"{unknown} heartbeats answered known=false (a lease lapsed)")
    out["warnings"] = []
    if out["heartbeat_errors"]:
        out["warnings"].append(f"heartbeats without an answer within max(heartbeat, 1 s): {out['heartbeat_errors']}")
    if out["rpc_retries"]:
        out["warnings"].append(f"calls retried after no answer (see rpc_retries): {out['rpc_retries']}")
    if rounds_info:
        out["heartbeat_latency_during_rounds_s"] = summary(
            [h[1] for f in final for h in f["heartbeats"] if start.wall <= h[0] < end.wall and h[2]]
        )
        out.update(rounds_info)
    return out


def _rounds(
    session: SimSession, peers: int, rounds: int, churn: int, quorum_timeout_s: float
) -> tuple[list[RoundRecord], list[str]]:
    """Command the rounds (with churn, one at a time, churn peers leaving and joining again before each after the
    first); the simulated peers' round records and the problems they reported."""
    problems: list[str] = []
    if churn:
        done = []
        for k in range(rounds):
            if k:  # churn peers leave and join again: this round's member list is not the last one's
                moving = [(k * churn + j) % peers for j in range(churn)]
                session.send({"cmd": "churn", "indexes": moving})
                problems += [e for r in session.gather("churned", timeout_s=quorum_timeout_s + 60) for e in r["errors"]]
            session.send({"cmd": "rounds", "rounds": 1, "expected_members": peers, "first": k})
            done += session.gather("rounds", timeout_s=quorum_timeout_s + 30)
    else:
        session.send({"cmd": "rounds", "rounds": rounds, "expected_members": peers})
        done = session.gather("rounds", timeout_s=rounds * (quorum_timeout_s + 30))
    records = [RoundRecord(*r) for d in done for r in d["records"]]
    return records, problems + [p for d in done for p in d["problems"]]


def _rounds_phase(start: _Clock, end: _Clock, rounds: int) -> dict:
    """Wall and CPU of the rounds phase, and the floor the machine's cores set on a round."""
    wall, cpu = end.wall - start.wall, end.cpu - start.cpu
    return {
        "wall_s": wall,
        "coordinator_cpu_s": cpu,
        "coordinator_cpu_per_round_s": cpu / rounds,
        "coordinator_cpu_utilization": cpu / wall,
        "client_cpu_utilization": [(b - a) / wall for a, b in zip(start.clients, end.clients)],
        **cpu_floor(cpu, sum(end.clients) - sum(start.clients), wall, rounds, len(os.sched_getaffinity(0))),
    }


def _heartbeat_window(final: list[dict], idle: _Clock, idle_end: _Clock, start: _Clock, end: _Clock) -> dict:
    """The heartbeat-only window's figures: heartbeats the clients sent in it (by send time), their latency, and
    the coordinator's CPU per heartbeat on both clocks, net of the idle cost on the nanosecond one."""
    heartbeats = [tuple(h) for f in final for h in f["heartbeats"]]
    in_window = [h for h in heartbeats if start.wall <= h[0] < end.wall]
    n = len(in_window)
    window = end.wall - start.wall
    cpu, cpu_ns = end.cpu - start.cpu, end.cpu_ns - start.cpu_ns
    idle_wall = idle_end.wall - idle.wall
    idle_util_ns = (idle_end.cpu_ns - idle.cpu_ns) / idle_wall
    return {
        "heartbeat_window_s": window,
        "heartbeats_in_window": n,
        "heartbeats_per_s": n / window,
        "heartbeat_latency_s": summary([h[1] for h in in_window if h[2]]),
        "coordinator_cpu_s_in_window": cpu,
        "coordinator_cpu_per_heartbeat_us": cpu / n * 1e6 if n else math.nan,
        "coordinator_cpu_utilization": cpu / window,
        "coordinator_idle_cpu_utilization": (idle_end.cpu - idle.cpu) / idle_wall,
        # The same from the nanosecond thread clocks, and net of the idle cost (the fixed 50 ms tick).
        "coordinator_cpu_per_heartbeat_us_schedstat": cpu_ns / n * 1e6 if n else math.nan,
        "coordinator_idle_cpu_utilization_schedstat": idle_util_ns,
        "coordinator_cpu_per_heartbeat_net_of_idle_us": (cpu_ns - idle_util_ns * window) / n * 1e6 if n else math.nan,
        "client_cpu_utilization": [(b - a) / window for a, b in zip(start.clients, end.clients)],
        "heartbeat_errors": merge_counts(f["heartbeat_errors"] for f in final),
        "heartbeat_errors_in_window": sum(1 for h in in_window if not h[2]),
    }


# ---------------------------------------------------------------------------------------
# the benchmark
# ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class MembershipBenchConfig:
    """What ``bench membership`` runs: its options' defaults are these fields'."""

    peers: int = field(default=1000, metadata={"help": "simulated peers"})
    rounds: int = field(default=5, metadata={"help": "rounds (quorum + commit) all peers take part in"})
    # None: default_client_procs(peers).
    client_procs: int | None = field(
        default=None, metadata={"help": "processes the simulated peers run in (default 2, or 1 for one peer)"}
    )
    heartbeat_s: float = field(
        default=CoordinatorConfig.heartbeat_s, metadata={"help": "heartbeat interval (s), told to the coordinator"}
    )
    window_s: float = field(default=10.0, metadata={"help": "heartbeat-only window for the CPU measurement (s)"})
    lease_s: float = field(default=CoordinatorConfig.lease_s, metadata={"help": "the coordinator's lease (s)"})
    channels: int = field(default=4, metadata={"help": "gRPC channels (TCP connections) per client process"})
    baseline_peers: int = field(default=10, metadata={"help": "peers of the baseline measurement"})
    quorum_timeout_s: float = field(
        default=CoordinatorConfig.quorum_timeout_s,
        metadata={"help": "the coordinator's quorum / commit timeouts; how long a simulated peer retries a call (s)"},
    )
    spread_s: float = field(
        default=0.0,
        metadata={"help": "each peer asks for each quorum after a random delay in [0, SPREAD) s (0: all at once)"},
    )
    allreduce_s: float = field(
        default=0.0,
        metadata={"help": "each member waits this long between its quorum answer and its commit, as the round's "
                  "data exchange would take (s; 0: it commits at once)"},
    )
    unary: bool = field(
        default=False,
        metadata={"help": "simulated peers send each Heartbeat, Quorum and Commit as a gRPC call of its own, as "
                  "before Session streams (default: on one Session stream per peer, as the real client)"},
    )
    churn: int = field(
        default=0,
        metadata={"help": "before each round after the first, this many peers leave and join again under a new "
                  "peer id, so every round's member list changes (0: none)"},
    )
    # parse: a path from the command line is a str (the API takes any os.PathLike too).
    log_dir: str | os.PathLike | None = field(
        default=None,
        metadata={"help": "keep the coordinators' and clients' logs here (none: a temporary folder, removed after "
                  "a success)", "parse": str, "metavar": "LOG_DIR"},
    )

    @property
    def procs(self) -> int:
        """The client processes: client_procs, or default_client_procs(peers) when it is None."""
        return default_client_procs(self.peers) if self.client_procs is None else self.client_procs


def run(config: MembershipBenchConfig | None = None, progress: Progress | None = None) -> dict:
    """Run the benchmark (baseline at baseline_peers, then peers) and return its report as a JSON-ready dict.

    The logs of the coordinators and client processes go to log_dir; without one, to a temporary
    folder that is removed after a success and kept after a failure (the error names it). config None: the
    defaults.
    """
    config = config or MembershipBenchConfig()
    check_arguments(config)
    peers, rounds, client_procs, channels = config.peers, config.rounds, config.procs, config.channels
    heartbeat_s, window_s, lease_s, quorum_timeout_s = (
        config.heartbeat_s, config.window_s, config.lease_s, config.quorum_timeout_s)
    baseline_peers, spread_s, allreduce_s = config.baseline_peers, config.spread_s, config.allreduce_s
    unary, churn, log_dir = config.unary, config.churn, config.log_dir
    progress = progress or Progress("membership", enabled=False)
    t0 = time.monotonic()
    logs = pathlib.Path(log_dir) if log_dir is not None else bench_log_dir("membership")
    logs.mkdir(parents=True, exist_ok=True)
    common = {
        "heartbeat_s": heartbeat_s, "window_s": window_s, "lease_s": lease_s, "channels": channels,
        "log_dir": logs, "quorum_timeout_s": quorum_timeout_s, "unary": unary,
    }
    now = ["starting"]

    def stage(text: str) -> None:
        now[0] = text

    progress.begin(f"baseline, {baseline_peers} peers", lambda: now[0])
    base = _measure(baseline_peers, 0, 1, tag=f"baseline-{baseline_peers}", stage=stage, **common)
    progress.end(f"{base['coordinator_cpu_per_heartbeat_us']:.0f} us of coordinator CPU per heartbeat")
    progress.begin(f"{peers} peers, {rounds} rounds", lambda: now[0])
    main = _measure(peers, rounds, client_procs, tag=str(peers), spread_s=spread_s, allreduce_s=allreduce_s,
                    churn=churn, stage=stage, **common)
    progress.end(f"{main['coordinator_cpu_per_heartbeat_us']:.0f} us of coordinator CPU per heartbeat")
    if log_dir is None:
        shutil.rmtree(logs, ignore_errors=True)
    status = main.pop("status")
    summary_ = status.get("summary", {})
    rounds_committed = summary_.get("rounds_committed")
    history = [r for r in status.get("rounds", []) if r.get("status") == "committed"]
    problems = main.pop("problems") + coordinator_checks(status, peers, rounds, main.get("rounds_full", 0))
    base_problems = base.pop("problems") + coordinator_checks(base.pop("status"), baseline_peers, 0, 0)
    problems += [f"baseline: {p}" for p in base_problems]

    report = {
        "peers": peers,
        "rounds": rounds,
        "client_procs": client_procs,
        "channels_per_client_proc": channels,
        "heartbeat_s": heartbeat_s,
        "lease_s": lease_s,
        "window_s": window_s,
        "spread_s": spread_s,
        "allreduce_s": allreduce_s,
        "churn": churn,
        "control_plane": "unary" if unary else "session",
        "coordinator_rate_limits": " ".join(bench_rate_limits(peers)),
        "run_secret": False,
        **{k: v for k, v in main.items() if k != "peers"},
        "baseline": {
            "peers": baseline_peers,
            "coordinator_cpu_per_heartbeat_us": base["coordinator_cpu_per_heartbeat_us"],
            "heartbeats_per_s": base["heartbeats_per_s"],
            "coordinator_cpu_utilization": base["coordinator_cpu_utilization"],
            "coordinator_idle_cpu_utilization": base["coordinator_idle_cpu_utilization"],
            "coordinator_cpu_per_heartbeat_us_schedstat": base["coordinator_cpu_per_heartbeat_us_schedstat"],
            "coordinator_cpu_per_heartbeat_net_of_idle_us": base["coordinator_cpu_per_heartbeat_net_of_idle_us"],
            "heartbeat_latency_s": base["heartbeat_latency_s"],
            "join_latency_s": base["join_latency_s"],
            "coordinator_rss_mb": base["coordinator_rss_mb"],
        },
        "rounds_committed": rounds_committed,
        "rounds_aborted": summary_.get("rounds_aborted"),
        "peers_alive_at_end": summary_.get("peers_alive"),
        "committed_rounds_member_counts": sorted({len(r.get("members", [])) for r in history}),
        "all_rounds_committed_with_all_peers": not problems and rounds_committed == rounds,
        "problems_total": len(problems),
        "problems": group_messages(problems),
        "wall_s": time.monotonic() - t0,
        "method": {
            "cpu": "coordinator utime+stime (/proc/<pid>/stat, all threads) over the heartbeat-only window, "
            "divided by the heartbeats the clients sent in it (send time in the window)",
            "quorum_close": "per peer and round: answer time minus the send time of the round's last Quorum "
            "request (time.time() in the client processes, one machine clock)",
        },
    }
    report["cpu_per_heartbeat_over_baseline"] = (
        report["coordinator_cpu_per_heartbeat_us"] / base["coordinator_cpu_per_heartbeat_us"]
        if base["coordinator_cpu_per_heartbeat_us"] else math.nan
    )
    report["cpu_per_heartbeat_net_of_idle_over_baseline"] = (
        report["coordinator_cpu_per_heartbeat_net_of_idle_us"] / base["coordinator_cpu_per_heartbeat_net_of_idle_us"]
        if base["coordinator_cpu_per_heartbeat_net_of_idle_us"] > 0 else math.nan
    )
    return json_safe(report)  # NaN / inf (no samples) as None: strict JSON


def default_client_procs(peers: int) -> int:
    """Client processes when none are given: two, or one for a single peer (a process runs at least one peer)."""
    return max(1, min(2, peers))


def check_arguments(config: MembershipBenchConfig) -> None:
    """ConfigError for arguments the benchmark (or its coordinators) cannot run with."""
    peers, rounds, client_procs, channels = config.peers, config.rounds, config.procs, config.channels
    heartbeat_s, window_s, lease_s, quorum_timeout_s = (
        config.heartbeat_s, config.window_s, config.lease_s, config.quorum_timeout_s)
    baseline_peers, spread_s, allreduce_s, churn = (
        config.baseline_peers, config.spread_s, config.allreduce_s, config.churn
    )
    require(peers >= 1 and baseline_peers >= 1, f"--peers and --baseline-peers must be at least 1, got {peers} and "
            f"{baseline_peers}")
    require(rounds >= 0, f"--rounds must be 0 or more, got {rounds}")
    require(client_procs >= 1 and channels >= 1,
            f"--client-procs and --channels must be at least 1, got {client_procs} and {channels}")
    require(window_s > 0, f"--window must be positive, got {window_s:g}")
    require(spread_s >= 0, f"--spread must be 0 or more, got {spread_s:g}")
    require(allreduce_s >= 0, f"--allreduce must be 0 or more, got {allreduce_s:g}")
    require(0 <= churn <= peers, f"--churn must be between 0 and --peers ({peers}), got {churn}")
    require(client_procs <= peers,
            f"--client-procs ({client_procs}) must be at most --peers ({peers}): each process runs at least one peer")
    # Checked here under its option's name: the coordinators' own check below names their join_timeout_s.
    require(quorum_timeout_s > 0, f"--quorum-timeout must be positive (seconds), got {quorum_timeout_s:g}")
    for n in (baseline_peers, peers):  # the coordinators' own checks (lease vs heartbeat, timeouts)
        CoordinatorConfig(run_id=RUN, min_peers=n, lease_s=lease_s, heartbeat_s=heartbeat_s,
                          join_timeout_s=quorum_timeout_s, quorum_timeout_s=quorum_timeout_s,
                          commit_timeout_s=quorum_timeout_s)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of this benchmark, and what its report's fields mean (the help's epilog)."""
    add_bench_options(parser, MembershipBenchConfig)
    describe_report(parser, FIELDS)


def _fmt(value) -> str:
    if isinstance(value, dict) and "p50" in value:
        if value["p50"] is None:
            return "(no samples)"
        return f"p50 {value['p50']:.4g}  p99 {value['p99']:.4g}  max {value['max']:.4g}  (n={value.get('n', '?')})"
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, list) and value and isinstance(value[0], dict):
        return "\n" + "\n".join(json.dumps(v) for v in value)  # one line each, under the value column
    return json.dumps(value) if isinstance(value, (dict, list)) else str(value)


def bench_config(ns: argparse.Namespace) -> MembershipBenchConfig:
    """The MembershipBenchConfig the options describe."""
    return read_options(MembershipBenchConfig, ns)


def main(ns: argparse.Namespace) -> int:
    """Run from parsed arguments and print the report; exit code 1 unless every round committed with all peers."""
    config = bench_config(ns)
    check_arguments(config)
    with progress_for("membership", getattr(ns, "quiet", 0)) as progress:
        report = run(config, progress)
    # Without --json, the description of the method (long prose) is left out.
    print_report(report if ns.json else {k: v for k, v in report.items() if k != "method"}, ns.json, fmt=_fmt)
    return 0 if report["all_rounds_committed_with_all_peers"] else 1


if __name__ == "__main__":
    _parser = argparse.ArgumentParser(prog="python -m peer.bench.membership", description=__doc__.splitlines()[0])
    add_arguments(_parser)
    try:
        raise SystemExit(main(_parser.parse_args()))
    except KeyboardInterrupt:
        raise SystemExit(130) from None
