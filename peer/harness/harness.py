"""``loconet harness``: a whole network on this machine, broken on purpose, and a report of what happened.

It starts a coordinator and N ``loconet peer`` processes (each in its own
session, killed with the harness even if the harness itself is killed),
runs a schedule of fault events (``peer/harness/scenario.py``), follows every peer's
JSON events, and ends with a report: rounds committed and aborted, each
event's recovery time (event to the next committed round), the final eval
loss, bytes per peer, whether the survivors hold identical parameters, and
how many peers are alive. With ``--netns`` every process lives in its own
network namespace behind ``tbf``-shaped links (``peer/harness/netns/network.py``).

This module starts the processes and runs the loop; its options and their checks are ``config.py``, firing and
undoing the events ``schedule.py`` (a ``Schedule`` the harness owns), when a scenario cannot finish ``stuck.py``,
the report ``report.py`` and the ``--progress`` table ``display.py``.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import shutil
import signal
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import grpc
import torch

from collectives.errors import ConfigError
from collectives.net.ratelimit import parse_bandwidth
from collectives.net.rpc import RpcSecurity, blocking_channel
from collectives.net.transportconfig import codec_threads_for
from peer.device import resolve_device
from peer.harness import outcome
from peer.harness.config import COORDINATOR_OPTIONS_SET_BY_HARNESS, HarnessConfig, target_problem
from peer.harness.display import Display
from peer.harness.processes import ChildFailed, CoordinatorProc, Proc, daemon_peer, stop_all
from peer.harness.report import crashed_processes, harness_report, initial_evaluation
from peer.harness.schedule import STOP_EXIT_S, Fired, Schedule
from peer.harness.security import prepare_security, security_args, tool_channel_settings
from peer.harness.stuck import (
    STUCK_CHECK_S,
    STUCK_CHECKS,
    ScenarioStuck,
    ScenarioTimeout,
    never_due,
    stuck_waiters,
    untimed,
)
from peer.options import option_args
from peer.runtime.training import epochs_problem
from peer.tasks.registry import make_task
from peer.trainoptions import task_args, train_args
from protos import membership_pb2 as pb
from protos import membership_pb2_grpc as pb_grpc

# Names other modules, the tests and the docs import from here; each is defined in the module named beside it.
__all__ = [
    "COORDINATOR_OPTIONS_SET_BY_HARNESS",  # config
    "STOP_EXIT_S",  # schedule
    "Fired",  # schedule
    "Harness",
    "HarnessConfig",  # config
    "ScenarioStuck",  # stuck
    "ScenarioTimeout",  # stuck
    "never_due",  # stuck
    "stuck_waiters",  # stuck
    "target_problem",  # config
    "untimed",  # stuck
]

log = logging.getLogger(__name__)


class Harness:
    """Runs one scenario; use run() once. Its ``schedule`` fires the scenario's events on the processes it starts."""

    def __init__(self, config: HarnessConfig) -> None:
        self.config = config
        self.workdir = Path(config.workdir) if config.workdir else Path(tempfile.mkdtemp(prefix="loconet-harness-"))
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.coordinator: CoordinatorProc | None = None
        self.coordinators: list[CoordinatorProc] = []
        self.peers: dict[str, Proc] = {}
        # Processes of peers that a stop event ended and then started again (their events still count).
        self.retired: list[Proc] = []
        self.network = None
        self.hosts: dict = {}
        # Rounds aborted under the coordinators that a restart-coordinator event replaced.
        self._aborted_before = 0
        self._coordinator_port = 0
        self.security = RpcSecurity()
        # The scenario's events: when each is due, firing it and undoing it.
        self.schedule = Schedule(self, config.events)
        # Where the peers train (run() resolves --device); the harness's own evaluation runs there too.
        self.device = torch.device("cpu")

    # -- processes --------------------------------------------------------------------

    def _netns(self, name: str) -> str | None:
        """The network namespace process name runs in (None: this machine's)."""
        return self.network.netns_of(name) if self.network is not None else None

    def _host(self, name: str) -> str:
        return self.hosts[name].ip if self.network is not None else "127.0.0.1"

    def _start_network(self) -> None:
        if not self.config.netns:
            return
        from peer.harness.netns.availability import check_available
        from peer.harness.netns.network import NetnsNetwork
        from peer.harness.netns.registry import cleanup_leftovers
        from peer.harness.netns.shaping import LinkSpec

        check_available()
        cleanup_leftovers("lcn")
        up = self.config.uplink or self.config.bandwidth
        down = self.config.downlink or self.config.bandwidth
        spec = LinkSpec(parse_bandwidth(up) if up else None, parse_bandwidth(down) if down else None)
        names = ["coordinator", *self.config.peer_names]
        self.network = NetnsNetwork(prefix="lcn")
        self.hosts = self.network.create(names, {n: spec for n in names if n != "coordinator"})

    def _start_coordinator(self, port: int = 0) -> None:
        c = self.config
        name = f"coordinator{len(self.coordinators) or ''}"
        # As a deployment should: a restarted coordinator knows from this file that the run exists.
        state_file = self.workdir / "coordinator-state.json"
        self.coordinator = CoordinatorProc(
            self.workdir / f"{name}.log",
            c.run_id,
            port,
            *option_args(c.coordinator, skip=COORDINATOR_OPTIONS_SET_BY_HARNESS + ("dashboard-port", "security")),
            *security_args(self.security),
            "--host", self._host("coordinator"),
            "--dashboard-host", self._host("coordinator"),
            # A restarted coordinator serves its dashboard where the first one did.
            "--dashboard-port", self._dashboard_arg(),
            "--startup-grace", str(c.coordinator.lease_s if self.coordinators else 0),
            "--state-file", str(state_file),
            *self._plugin_args(),
            netns=self._netns("coordinator"),
        )
        self._dashboard_port = (
            int(self.coordinator.dashboard.rsplit(":", 1)[1].rstrip("/"))
            if self.coordinator.dashboard != "off" else 0
        )
        self.coordinators.append(self.coordinator)
        self._coordinator_port = self.coordinator.port

    def _dashboard_arg(self) -> str:
        port = self.config.coordinator.dashboard_port
        if port is None:
            return "none"
        return str(port if not self.coordinators else (self._dashboard_port or 0))

    def _plugin_args(self) -> list[str]:
        return [arg for module in self.config.plugins for arg in ("--plugin", module)]

    def _peer_args(self, name: str) -> list[str]:
        c = self.config
        args = [
            "--task", c.task, *task_args(c.task_config), *train_args(c.train),
            "--host", self._host(name),
            "--checkpoint-dir", str(self.workdir / f"ckpt-{name}"),
            "--control", str(self.workdir / f"{name}.control.json"),
            # The peers share this machine's cores: past one peer per core, no codec threads.
            "--codec-threads", str(codec_threads_for(c.peers)),
            "--keep-results", str(c.keep_results),
            *security_args(self.security),
            *self._plugin_args(),
        ]
        if c.bandwidth and not c.netns:
            args += ["--bandwidth", c.bandwidth]
        if c.shared_host:  # else daemon_peer gives each peer its own host id
            args += ["--host-id", f"{c.run_id}-shared"]
        index = int(name[4:])
        return args + ["--shard", f"{index % c.peers}/{c.peers}"]

    def _start_peer(self, name: str, gate: Path | None = None, start_line: Path | None = None) -> None:
        assert self.coordinator is not None
        extra = ["--start-when", str(gate)] if gate is not None else []
        extra += ["--train-when", str(start_line)] if start_line is not None else []
        self.peers[name] = daemon_peer(
            self.workdir, self.coordinator.address, self.config.run_id, name, *self._peer_args(name), *extra,
            netns=self._netns(name),
        )

    # -- what happened so far ----------------------------------------------------------------

    def committed_rounds(self) -> dict[tuple[int, int], float]:
        """(round id, epoch) -> when it was first reported committed, across every peer's events.

        A round is named by both: after a rollback (every holder of the newest state gone) the
        run goes on from an older round, and the ids that follow are given out again at a new epoch.
        """
        rounds: dict[tuple[int, int], float] = {}
        for p in [*self.retired, *self.peers.values()]:
            for e in list(p.events):
                if e["event"] == "committed":
                    key = (e["round"], e.get("epoch", 0))
                    rounds[key] = min(rounds.get(key, math.inf), e["t"])
        return rounds

    def _status(self) -> dict | None:
        if self.coordinator is None or not self.coordinator.alive:
            return None
        try:
            settings, auth = tool_channel_settings(self.security, self.config.run_id)
            with blocking_channel(self.coordinator.address, settings, auth=auth) as ch:
                reply = pb_grpc.CoordinatorStub(ch).Status(pb.StatusRequest(run_id=self.config.run_id), timeout=2)
            return json.loads(reply.json)
        except grpc.RpcError:
            return None

    # -- starting processes again (what the schedule's stop and restart-coordinator events ask) ----------------

    def restart_peer(self, name: str) -> None:
        """Start peer name again with its checkpoint directory; its exited process's events stay counted."""
        earlier = self.peers[name]
        # NAME.log is the current process's, as reports and messages say; earlier ones are NAME.1.log, NAME.2.log...
        earlier.keep_log_as(self.workdir / f"{name}.{len(self.lives(name))}.log")
        self.retired.append(earlier)
        self._start_peer(name)

    def restart_coordinator(self) -> None:
        """Kill the coordinator and start a new one on its port, counting the rounds the old one aborted."""
        status = self._status()
        if status:
            self._aborted_before += status["summary"]["rounds_aborted"]
        self.coordinator.signal(signal.SIGKILL)
        self.coordinator.proc.wait(timeout=10)
        self._start_coordinator(self._coordinator_port)

    # -- the run ------------------------------------------------------------------------------

    def run(self, on_start: Callable[[str], None] | None = None) -> dict:
        """Bring the network up, play the scenario, wait for the peers to finish, report, clean up.

        ``on_start(dashboard_url)`` is called once the coordinator serves.
        """
        c = self.config
        # The task is built here first, so a bad --task, --data or size is one error before any process starts;
        # so is a --device this machine lacks (the peers resolve the same spec on the same machine).
        self.device = resolve_device(c.train.device)
        self.task = make_task(c.task, c.task_config)
        problem = epochs_problem(self.task, c.train, c.peers)
        if problem:
            raise ConfigError(problem)
        log.info("%d peers train %s with %s on %s; logs in %s", c.peers, c.task, c.train.algorithm, self.device,
                 self.workdir)
        self._check_attacks()
        self._forget_earlier_run()
        try:
            self._start_network()
            hosts = tuple(h.ip for h in self.hosts.values()) if self.network is not None else ()
            self.security = prepare_security(self.workdir, c.token, c.tls, hosts)
            self._start_coordinator(0)
            self.dashboard_url = self.coordinator.dashboard
            if on_start is not None:
                on_start(self.dashboard_url)
            # Every peer starts idle behind a gate; the initial ones are released together once
            # all have started (Python start-up takes seconds and varies), so the first round
            # waits for all of them instead of one peer racing ahead alone.
            names = c.peer_names
            starting, self.schedule.joiners = names[:c.peers], names[c.peers:]
            for name in names:
                # A joiner trains once it joined: only the starting peers wait for the start line.
                self._start_peer(name, gate=self.workdir / f"{name}.gate",
                                 start_line=self.workdir / f"{name}.start" if name in starting else None)
            initial = [self.peers[name] for name in starting]
            for p in initial:
                p.wait_event(lambda e: e["event"] == "waiting", 120)
            # A byzantine peer "from the start" finds its attack in its control file before its first step.
            self.schedule.start(time.monotonic())
            for name in starting:
                (self.workdir / f"{name}.gate").touch()
            # Then the start line, once all have joined: a peer that steps at once would otherwise form the first
            # round (a round per step, as coded-sgd's) before the last one registered.
            for p in initial:
                with contextlib.suppress(ChildFailed):  # one that died or hangs is the run's to report: go on
                    p.wait_event(lambda e: e["event"] == "joined", 120)
            for name in starting:
                (self.workdir / f"{name}.start").touch()
            self._loop()
            report = self._report()
        finally:
            self.close()
        # Only a run that finished loses its checkpoints: a failed one keeps them to be looked into.
        if not c.keep_checkpoints and self._remove_checkpoints():
            log.info("removed the peers' checkpoints; logs kept in %s", self.workdir)
        return report

    # What a harness run leaves in its work dir besides the checkpoints: the coordinator's state file (with its key
    # and lock), the peers' start gates and control files, and the logs.
    EARLIER_RUN_FILES = ("coordinator-state.json*", "peer[0-9]*.gate", "peer[0-9]*.start", "peer[0-9]*.control.json",
                         "peer[0-9]*.log", "coordinator*.log")

    def _forget_earlier_run(self) -> None:
        """A reused workdir starts a new run: without the earlier run's state file and checkpoints (its peers would
        resume them, the new coordinator refuse them), its open gates (its peers would start at once, not together)
        and its control files (its attacks and slowdowns would carry over), nor its logs."""
        files = [path for pattern in self.EARLIER_RUN_FILES for path in self.workdir.glob(pattern)]
        for path in files:
            path.unlink(missing_ok=True)
        removed = self._remove_checkpoints()
        if removed or files:
            log.info("removed %d checkpoint folders and %d files of an earlier run in %s", removed, len(files),
                     self.workdir)

    def _remove_checkpoints(self) -> int:
        """Remove the peers' checkpoint folders from the work dir; returns how many there were."""
        folders = sorted(self.workdir.glob("ckpt-peer*"))
        for path in folders:
            shutil.rmtree(path, ignore_errors=True)
        return len(folders)

    def _check_attacks(self) -> None:
        """Refuse, before any process starts, a byzantine attack the task cannot have (labelflip without classes)."""
        for event in self.config.events:
            if event.attack is not None and event.attack.poisons_data and getattr(self.task, "classes", None) is None:
                raise ConfigError(
                    f"{event}: labelflip flips class labels, and task {self.config.task!r} has no classes; "
                    "use it with a classification task (e.g. --task digits), or choose another attack"
                )

    def _loop(self) -> None:
        schedule = self.schedule
        deadline = schedule.started_at + self.config.timeout_s
        display = Display(self.config.progress)
        next_check, stuck_answers = 0.0, 0
        try:
            while time.monotonic() < deadline:
                now = time.monotonic()
                rounds = self.committed_rounds()
                schedule.tick(now, len(rounds))
                display.update(self.peers, len(rounds), now - schedule.started_at)
                gated = set(schedule.joiners)
                running = [
                    p for n, p in self.peers.items()
                    if n not in gated and p.alive and not any(e["event"] == "finished" for e in p.events)
                ]
                restoring = schedule.restoring
                settled = not schedule.pending and not restoring
                if not running and settled:
                    return
                if never_due(schedule.pending, bool(running), restoring):
                    events = {n: p.events for n, p in self.peers.items()}
                    alone = outcome.left_behind(events, self.peers)
                    # Peers that found nobody holding the run's state trained on alone and finished early: more
                    # steps would not help them, a holder back in time would.
                    hint = (f"{', '.join(alone)} found nobody holding the run's state and trained on alone to "
                            "the end; keep a holder of the state alive longer, or set the events earlier"
                            if alone else "give the peers more --steps, or set the events earlier")
                    # Rounds that could not form (an aggregator needing more members than were left) say why.
                    missed = outcome.last_miss(events)
                    if missed and not alone:
                        hint = f"the peers' last syncs did not commit ({missed}); {hint}"
                    raise ScenarioStuck(
                        f"no peer runs any more, so {', '.join(map(str, schedule.pending))} cannot happen "
                        f"({len(rounds)} round(s) committed); {hint}; logs in {self.workdir}"
                    )
                # Events still pending that wait for rounds or syncs cannot fire while every running peer waits
                # to join (no round commits, no joiner syncs): they do not keep a stuck scenario going.
                if not restoring and untimed(schedule.pending) and running and now >= next_check:
                    # Peers still joining (no "joined" yet): one that waits for a state nobody left in the scenario
                    # holds would wait until the timeout. (A member that fell behind waits for it too, but trains on
                    # to its end: with one running, the scenario goes on.)
                    next_check = now + STUCK_CHECK_S
                    joining = [p.name for p in running if not any(e["event"] == "joined" for e in p.events)]
                    everyone_joining = len(joining) == len(running)
                    stuck, reason = stuck_waiters(joining, self._status()) if everyone_joining else ([], "")
                    stuck_answers = stuck_answers + 1 if stuck else 0
                    if stuck_answers >= STUCK_CHECKS:
                        unfired = (
                            f"; events not fired: {', '.join(map(str, schedule.pending))}"
                            if schedule.pending else ""
                        )
                        raise ScenarioStuck(
                            f"{', '.join(stuck)} wait{'s' if len(stuck) == 1 else ''} for the run's state and no other "
                            f"peer of the scenario is left to serve it ({reason}); give the others more steps or "
                            f"bring a holder back with an event{unfired}; logs in {self.workdir}"
                        )
                time.sleep(0.1)
            raise ScenarioTimeout(
                f"the scenario did not finish within {self.config.timeout_s:g} s; raise --timeout, or see the "
                f"peers' logs in {self.workdir}"
            )
        finally:
            display.close()

    def _report(self) -> dict:
        rounds = self.committed_rounds()
        status = self._status() or {"summary": {"rounds_aborted": 0}, "rounds": []}
        # The initial loss is evaluated on the peers' device, as their final losses are.
        initial = initial_evaluation(self.task, self.device)
        return harness_report(
            self.config, peers=self.peers, all_events=self.all_events, rounds=rounds, fired=self.schedule.fired,
            status=status, aborted_before=self._aborted_before, initial=initial,
            entropy_floor=self.task.entropy_floor, crashed=crashed_processes([*self.retired, *self.peers.values()]),
            stalls=self.schedule.stalls, wall_s=time.monotonic() - self.schedule.started_at,
            dashboard=self.dashboard_url, workdir=self.workdir,
        )

    def lives(self, name: str) -> list[Proc]:
        """Every process that ran as peer name, first to last (a stop event's restart makes a new one)."""
        return [p for p in self.retired if p.name == name] + ([self.peers[name]] if name in self.peers else [])

    def all_events(self, name: str) -> list[dict]:
        """The events of every process that ran as peer name, first to last."""
        return [e for p in self.lives(name) for e in list(p.events)]

    def close(self) -> None:
        """Stop every child (also paused ones), any stall, the network; idempotent."""
        self.schedule.stop_stalls()
        stop_all(list(self.peers.values()))
        stop_all(self.coordinators)
        if self.network is not None:
            self.network.cleanup()
            self.network = None

    def orphans(self) -> list[int]:
        """Pids of children still alive (should be none after close)."""
        return [p.proc.pid for p in [*self.peers.values(), *self.coordinators] if p.alive]
