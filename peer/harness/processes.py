"""Child processes followed through their JSON-lines output: coordinators and peers on this machine.

Used by the benchmarks, the local harness and the tests. Each child runs in
its own session (process group), so stopping it also stops whatever it
started; ``stop_all`` stops many at once.
"""

from __future__ import annotations

import atexit
import json
import logging
import os
import pathlib
import queue
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable

from collectives.errors import LoconetError
from peer.harness.forkserver import ForkedChild, ForkServer, ForkServerError, runs_as_imported
from peer.harness.netns.commands import netns_exec

log = logging.getLogger(__name__)


class ChildFailed(LoconetError):
    """A child process exited, or stayed silent, before doing what was expected of it; see its log."""


def log_tail(path: str | os.PathLike, lines: int = 15) -> str:
    """The last lines of a log file ('' when it is empty or missing)."""
    try:
        tail = pathlib.Path(path).read_text(errors="replace").splitlines()[-lines:]
    except OSError:
        return ""
    return "\n".join(tail)


def die_with_parent() -> None:
    """Ask the kernel to SIGKILL this process when its parent dies (Linux; elsewhere a no-op)."""
    # Called first thing in a child: if the process that started it dies, even by SIGKILL,
    # the child goes too, so a crash leaves no orphans.
    if not sys.platform.startswith("linux"):
        return
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except OSError:
        pass


# How a Proc tells its child which process it must die with. The child sets that up itself, first thing
# (die_with_parent_from_env): Python code between fork and exec (preexec_fn) can crash the child when the
# parent has gRPC threads, whose fork handlers then run against a half-copied event engine.
PARENT_PID_ENV = "LOCONET_DIE_WITH_PARENT"


def die_with_parent_from_env() -> None:
    """In a child a Proc started: die with the parent it names (exit at once if that parent is gone already)."""
    value = os.environ.pop(PARENT_PID_ENV, None)  # not inherited by this child's own children
    if value is None:
        return
    die_with_parent()
    try:
        os.kill(int(value), 0)  # still there? (it may have died before the line above took effect)
    except ProcessLookupError:
        os._exit(1)
    except (ValueError, PermissionError):
        pass


# Set to 0 to start every child with exec, as a user's shell would (the fork server is skipped).
FORK_SERVER_ENV = "LOCONET_FORK_SERVER"


class _SharedForkServer:
    """This process's fork servers (peer/harness/forkserver.py), started at their first use and stopped at exit.

    One set per process rather than one per harness, because Procs are started from many places (harness,
    benchmarks, tests) and each would otherwise pay a server's own seconds of imports. Children alternate between
    ``SERVERS`` servers: a forked child has its server's string-hash seed, and with two a run's peers do not all
    share one, so a bug where peers iterate a set of strings in different orders can still show."""

    SERVERS = 2

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._servers: list[ForkServer | None] = [None] * self.SERVERS
        self._next = 0
        self._failed = False

    def get(self) -> ForkServer | None:
        """The next server in turn, started if need be; None if one could not be started (children are exec'ed)."""
        with self._lock:
            if self._failed:
                return None
            # Every server at once: each spends seconds on its imports, and they do them side by side (started
            # one at a time, a harness's second child waited for the second server's imports after the first
            # child had waited for the first's).
            for i, server in enumerate(self._servers):
                if server is None or not server.alive:
                    try:
                        self._servers[i] = ForkServer()
                    except OSError as exc:
                        log.warning("no fork server (%s): children start with exec", exc)
                        self._failed = True
                        return None
            i, self._next = self._next, (self._next + 1) % self.SERVERS
            return self._servers[i]

    def give_up(self) -> None:
        """Start every later child with exec: a server failed (an import error would fail every new one too)."""
        with self._lock:
            self._failed = True

    def close(self) -> None:
        """Stop the servers (and any child still running from them)."""
        with self._lock:
            for i, server in enumerate(self._servers):
                if server is not None:
                    server.close()
                    self._servers[i] = None


FORKS = _SharedForkServer()
atexit.register(FORKS.close)


def forkable(args: list[str], env: dict[str, str]) -> bool:
    """Whether a child may be forked from a server: it is ``python -m peer.cli ...`` and the fork server is not
    switched off (the server then checks the environment its imports read: ``ForkServer.import_env``)."""
    return (
        sys.platform.startswith("linux") and args[:3] == [sys.executable, "-m", "peer.cli"]
        and env.get(FORK_SERVER_ENV) != "0"
    )


class Proc:
    """A child process in its own session; stdout lines that are JSON objects become events.

    ``loconet`` children are forked from this process's fork server (its imports done once), in network namespace
    ``netns`` if one is named; any other command, one run under a prefix, or one with ``fork=False`` (a benchmark
    measuring the process's own CPU and memory, which a fork would share with the server's imports), is exec'ed
    (under ``ip netns exec NETNS``, if named)."""

    def __init__(self, args: list[str], log_path: pathlib.Path, prefix: list[str] | tuple[str, ...] = (),
                 *, fork: bool = True, name: str | None = None, netns: str | None = None,
                 event_key: str | None = None) -> None:
        """``event_key``: a JSON object on stdout is an event only with this string field (None: every object)."""
        self._event_key = event_key
        self.args = list(prefix) + list(args)
        self.log_path = log_path
        self._name = name
        self.log = open(log_path, "w")
        env = {**os.environ, PARENT_PID_ENV: str(os.getpid())}
        self.proc: subprocess.Popen | ForkedChild | None = None
        server = FORKS.get() if fork and not prefix and forkable(self.args, env) else None
        if server is not None and not runs_as_imported(env, server.import_env):
            server = None  # GRPC_TRACE set in this process after the server started: only a fresh interpreter reads it
        if server is not None:
            try:
                self.proc = server.spawn(self.args, env, self.log.fileno(), netns=netns)
            except ForkServerError as exc:
                log.warning("%s: %s; starting it and every later child with exec", self.name, exc)
                FORKS.give_up()
        if self.proc is None:
            self.proc = subprocess.Popen(
                (netns_exec(netns) if netns else []) + self.args, stdout=subprocess.PIPE, stderr=self.log, text=True,
                start_new_session=True, bufsize=1, env=env,
            )
        self.events: list[dict] = []
        self.lines: list[str] = []
        # The signals this process was sent (a kill event's SIGKILL, a stop's SIGTERM): its exit code is then ours.
        self.signalled: set[int] = set()
        self._queue: queue.Queue = queue.Queue()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        for line in self.proc.stdout:
            line = line.strip()
            self.lines.append(line)
            try:
                event = json.loads(line)
            except ValueError:
                continue
            # Only objects are events, and of a loconet peer only its own (event_key): a task of the user's may print
            # anything, a bare number (JSON too) or a dict of its own included.
            if not isinstance(event, dict) or (self._event_key and not isinstance(event.get(self._event_key), str)):
                continue
            event["_seen"] = time.time()
            self.events.append(event)
            self._queue.put(event)

    def wait_event(self, pred: Callable[[dict], bool], timeout: float = 60.0) -> dict:
        """The first event (past or future) matching pred; ChildFailed when the process exits or time runs out."""
        for event in list(self.events):
            if pred(event):
                return event
        deadline = time.monotonic() + timeout
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise ChildFailed(
                    f"{self.name}: no matching event within {timeout:g} s; last events {self.events[-5:]}"
                    f"{self.stderr_tail()}"
                )
            try:
                event = self._queue.get(timeout=min(remaining, 0.5))
            except queue.Empty:
                if self.proc.poll() is not None and self._queue.empty():
                    self._reader.join(timeout=1)
                    for ev in list(self.events):
                        if pred(ev):
                            return ev
                    raise ChildFailed(self.exit_message("without a matching event"))
                continue
            if pred(event):
                return event

    @property
    def name(self) -> str:
        """The process's name for messages: the one it was given, else its log file's stem (peer0, coordinator...)."""
        return self._name or self.log_path.stem

    def keep_log_as(self, path: pathlib.Path) -> None:
        """Move this process's log to path (a later process of the same name then writes the usual one)."""
        os.replace(self.log_path, path)
        self.log_path = path

    def exit_message(self, what: str) -> str:
        """'<name> exited (code) <what>: <its one-line error>' and where its log is (the log's tail if it gave none)."""
        last = self.last_error()
        head = f"{self.name} exited ({self.proc.returncode}) {what}"
        if last:  # the child said what is wrong in one line: so does the parent
            return f"{head}: {last} (log: {self.log_path})"
        return f"{head}{self.stderr_tail()}\n(log: {self.log_path})"

    def last_error(self) -> str:
        """The child's one-line error (``loconet: error: ...``), if it printed one."""
        try:
            self.log.flush()
            lines = self.log_path.read_text(errors="replace").splitlines()
        except (OSError, ValueError):
            return ""
        errors = [line for line in lines if line.startswith("loconet: error: ")]
        return errors[-1][len("loconet: error: "):] if errors else ""

    def last_words(self) -> str:
        """The child's one-line error, else the last line of its log (a traceback's exception line)."""
        said = self.last_error()
        if said:
            return said
        tail = log_tail(self.log_path, 1)
        return tail.strip()

    def stderr_tail(self, lines: int = 15) -> str:
        """The last lines the process wrote to stderr, for failure messages."""
        try:
            self.log.flush()
        except ValueError:  # closed: the file holds everything already
            pass
        tail = log_tail(self.log_path, lines)
        return "\nstderr tail:\n" + tail if tail else ""

    def signal(self, sig: int) -> None:
        """Send sig to the process (if it still runs), and remember it was sent."""
        if self.proc.poll() is None:
            self.signalled.add(sig)
            os.kill(self.proc.pid, sig)

    def stop(self, timeout: float = 10.0) -> None:
        """SIGTERM, then SIGKILL the whole session; reap."""
        if self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGCONT)
                os.killpg(self.proc.pid, signal.SIGTERM)
                self.proc.wait(timeout=timeout)
            except (ProcessLookupError, subprocess.TimeoutExpired):
                pass
        if self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            self.proc.wait(timeout=10)
        self.log.close()

    @property
    def alive(self) -> bool:
        """Whether the process is still running (not yet exited)."""
        return self.proc.poll() is None


def stop_all(procs: list[Proc], timeout: float = 10.0) -> None:
    """Stop several processes at once (SIGTERM to all, then wait, then SIGKILL what is left)."""
    for p in procs:
        if p.alive:
            try:
                os.killpg(p.proc.pid, signal.SIGCONT)
                os.killpg(p.proc.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
    deadline = time.monotonic() + timeout
    for p in procs:
        try:
            p.proc.wait(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            pass
        p.stop(timeout=0.1)


class CoordinatorProc(Proc):
    """``loconet coordinator`` as a child; knows its gRPC address and dashboard URL."""

    LINE = re.compile(r"at (\S+), dashboard (\S+)")

    def __init__(
        self, log_path: pathlib.Path, run: str, port: int = 0, *extra: str, prefix: list[str] | tuple[str, ...] = (),
        fork: bool = True, netns: str | None = None,
    ) -> None:
        dashboard = [] if "--dashboard-port" in extra else ["--dashboard-port", "0"]
        # -v: the coordinator's info log (joins, rounds, drops) goes to its log file.
        args = [
            sys.executable, "-m", "peer.cli", "coordinator", "-v", "--run", run, "--port", str(port), *dashboard, *extra
        ]
        super().__init__(args, log_path, prefix, fork=fork, netns=netns)
        try:
            self._wait_started(60.0)
        except BaseException:  # not started in time, or interrupted: leave no coordinator behind
            self.stop()
            raise

    def _wait_started(self, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            for line in list(self.lines):
                m = self.LINE.search(line)
                if m:
                    self.address, self.dashboard = m.group(1), m.group(2)
                    self.port = int(self.address.rsplit(":", 1)[1])
                    return
            if self.proc.poll() is not None:
                break
            time.sleep(0.05)
        if self.proc.poll() is not None:
            raise ChildFailed(self.exit_message("before serving"))
        raise ChildFailed(
            f"{self.name} did not start serving within {timeout_s:g} s{self.stderr_tail()}\n(log: {self.log_path})"
        )


def daemon_peer(
    log_dir: pathlib.Path, coordinator: str, run: str, name: str, *extra: str, prefix: list[str] | tuple[str, ...] = (),
    netns: str | None = None,
) -> Proc:
    """Start ``loconet peer --events`` named name (small model, quick syncs unless extra says otherwise).

    Its info log (-v) goes to ``log_dir/NAME.log``, which reports and failure messages point at. It is
    its own host (``--host-id RUN-NAME``, unless extra gives one): local peers stand for machines on a
    network, so their rounds cross the data plane rather than shared memory.
    """
    args = [
        sys.executable, "-m", "peer.cli", "peer", "-v", "--coordinator", coordinator, "--run", run, "--name", name,
        "--events", "--no-progress", "--round-timeout", "10", "--host-id", f"{run}-{name}", *extra,
    ]
    return Proc(args, log_dir / f"{name}.log", prefix, name=name, netns=netns, event_key="event")
