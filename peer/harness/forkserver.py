"""A fork server for ``loconet`` children: one process imports loconet once, and each child is forked from it.

Why: a peer's start-up is about 2.5 CPU-seconds of imports (torch alone 1.6 s). A harness run of a coordinator and
four peers on a 2-core machine spent about half of its CPU on them. A child forked from a process that has done the
imports starts its ``main`` within milliseconds, and shares the imported pages copy-on-write.

What a forked child gets, so that it runs as ``python -m peer.cli ARGS`` would:
- its own session (``setsid``), so signals to its process group reach it and whatever it starts;
- the stdout and stderr the caller passed (sent over the socket), /dev/null as stdin;
- the caller's working directory, environment and ``sys.argv``; fresh random state (Python's ``random`` reseeds
  itself at fork; NumPy's legacy global state is reseeded here);
- the network namespace the caller named (``netns``), entered before ``main`` runs, as ``ip netns exec`` would put
  an exec'ed child there (a peer of ``--netns`` restarted by the harness is back in milliseconds, not seconds);
- its exit code as the interpreter would give it: ``main``'s return value, 1 after an uncaught exception, -N when a
  signal N ended it. Its non-daemon threads are joined and its atexit functions run before it exits.

Forking from the server is safe: it never creates a gRPC channel or server and starts no thread of its own (the one
thread an import starts, NumPy's OpenBLAS pool, has fork handlers). It reports each child's exit through a pidfd.
When the process that started it goes away (its socket end closes, even after SIGKILL), it kills every child it
forked and exits, so a crash leaves no orphans, as ``die_with_parent`` ensures for exec'ed children.

Protocol, one JSON message per SOCK_SEQPACKET datagram:
- client -> server: ``{"argv": [...], "env": {...}, "cwd": "...", "netns": NAME or null}`` with two file descriptors
  attached (stdout, stderr);
- server -> client: ``{"started": PID}`` or ``{"error": "..."}`` in answer, in order; and, whenever a child ends,
  ``{"exited": PID, "code": CODE}``.
"""

from __future__ import annotations

import importlib
import json
import os
import runpy
import selectors
import signal
import socket
import subprocess
import sys
import threading
import traceback
from collections.abc import Mapping, Sequence

from collectives.errors import LoconetError
from peer.harness.netns.commands import enter_netns, netns_exists

__all__ = ["ForkServer", "ForkServerError", "ForkedChild", "import_time_env", "runs_as_imported", "serve"]

# The modules the server runs with `-m`. Each runs in the child as __main__, so it is not imported here (runpy would
# warn that it is in sys.modules already); what it imports is.
MODULES = ("peer.cli",)
# The modules whose import is the start-up cost: everything `loconet peer` and `loconet coordinator` load.
# torch._dynamo too: building the first torch.optim optimizer imports it (torch's `_disable_dynamo` decorator), about
# 1.7 CPU-seconds that every peer paid again after its fork.
PRELOAD = ("torch", "torch._dynamo", "numpy", "grpc", "peer.runtime.daemon", "peer.coordinator.service", "peer.plugins")
MAX_MESSAGE = 1 << 20  # a request's argv and environment
# Read once, when gRPC is imported (GRPC_*) or the interpreter starts (PYTHONHASHSEED): a forked child runs with the
# server's values of these, whatever its own environment says.
IMPORT_TIME_ENV = ("GRPC_VERBOSITY", "GRPC_TRACE", "PYTHONHASHSEED")
# What the server sets where its starter did not: gRPC's C core quiet, as `loconet` is without -v.
SERVER_DEFAULTS = {"GRPC_VERBOSITY": "NONE"}


def import_time_env(environ: Mapping[str, str]) -> dict[str, str | None]:
    """The import-time variables a server started with environ runs with (None: unset)."""
    return {name: environ.get(name, SERVER_DEFAULTS.get(name)) for name in IMPORT_TIME_ENV}


def runs_as_imported(env: Mapping[str, str], imported: Mapping[str, str | None]) -> bool:
    """Whether a child with env would run as a server that imported with ``imported`` does: every import-time
    variable env sets has the server's value (one env leaves unset takes the server's)."""
    return all(env.get(name) in (None, imported.get(name)) for name in IMPORT_TIME_ENV)


class ForkServerError(LoconetError):
    """The fork server is gone or refused a request; the caller may start the child with exec instead."""


# -- the server --------------------------------------------------------------------------------------------------------


def serve(sock: socket.socket) -> None:
    """Answer fork requests on sock until its other end closes; then kill the children still running."""
    children: dict[int, int] = {}  # pidfd -> pid
    # epoll, not select(): a harness may run more children than select's 1,024 descriptors.
    watch = selectors.DefaultSelector()
    watch.register(sock, selectors.EVENT_READ)
    try:
        while True:
            for key, _ in watch.select():
                if key.fileobj is sock:
                    if not _answer(sock, children, watch):
                        return
                else:
                    fd = key.fd
                    watch.unregister(fd)
                    pid = children.pop(fd)
                    os.close(fd)
                    _, status = os.waitpid(pid, 0)
                    _send(sock, {"exited": pid, "code": os.waitstatus_to_exitcode(status)})
    finally:
        watch.close()
        for fd, pid in children.items():
            try:
                os.killpg(pid, signal.SIGKILL)
            except OSError:
                pass
        for fd, pid in children.items():
            os.waitpid(pid, 0)  # reaped here: a zombie left to init could linger where init does not reap
            os.close(fd)


def _answer(sock: socket.socket, children: dict[int, int], watch: selectors.BaseSelector) -> bool:
    """Take one request, fork its child and watch its pidfd (the child closes the server's own descriptors: sock,
    watch, the children's pidfds); False when the client has gone."""
    try:
        data, fds, _, _ = socket.recv_fds(sock, MAX_MESSAGE, 2)
    except OSError:
        return False
    if not data:
        return False
    try:
        request = json.loads(data)
        argv, env = list(map(str, request["argv"])), {str(k): str(v) for k, v in request["env"].items()}
        cwd = str(request["cwd"])
        netns = request.get("netns")
        if argv[1:2] != ["-m"] or len(argv) < 3 or argv[2] not in MODULES:
            raise ValueError(f"only `python -m MODULE` of {', '.join(MODULES)} is forked, not {argv[1:3]}")
        if netns is not None and not (isinstance(netns, str) and netns_exists(netns)):
            raise ValueError(f"no network namespace named {str(netns)[:40]!r}")
        if len(fds) != 2:
            raise ValueError(f"expected 2 file descriptors (stdout, stderr), got {len(fds)}")
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        for fd in fds:
            os.close(fd)
        _send(sock, {"error": f"bad request: {exc}"})
        return True
    # The child's setsid must be done before the caller can signal its process group: it closes this pipe then.
    ready_r, ready_w = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(ready_r)
        _run_child(argv, env, cwd, fds, [sock.fileno(), watch.fileno(), *children], ready_w, netns)  # never returns
    os.close(ready_w)
    for fd in fds:
        os.close(fd)
    os.read(ready_r, 1)  # b"" once the child closed its end (or died)
    os.close(ready_r)
    try:
        pidfd = os.pidfd_open(pid)
    except OSError as exc:  # out of descriptors: a child this server could not follow is not left running
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        _send(sock, {"error": f"cannot follow the child: {exc}"})
        return True
    children[pidfd] = pid
    watch.register(pidfd, selectors.EVENT_READ)
    _send(sock, {"started": pid})
    return True


def _run_child(argv: list[str], env: Mapping[str, str], cwd: str, fds: Sequence[int], server_fds: Sequence[int],
               ready: int, netns: str | None = None) -> None:
    """In the forked child: run argv (``python -m MODULE ARGS``) as the interpreter would (in network namespace
    netns, if named), and exit with its code."""
    code = 1
    try:
        if netns is not None:
            # Before anything opens a socket or starts a thread: a forked child has one thread, which setns moves.
            enter_netns(netns)
        os.setsid()
        os.close(ready)
        for fd in server_fds:
            os.close(fd)
        devnull = os.open(os.devnull, os.O_RDONLY)
        os.dup2(devnull, 0)
        os.dup2(fds[0], 1)
        os.dup2(fds[1], 2)
        for fd in (devnull, *fds):
            os.close(fd)
        os.chdir(cwd)
        os.environ.clear()
        os.environ.update(env)
        import numpy as np

        np.random.seed()  # Python's random reseeds itself at fork; NumPy's legacy global state does not
        # As `python -m MODULE ARGS` does: sys.argv is [the module's file, ARGS...], the module runs as __main__.
        sys.argv = ["-m", *argv[3:]]
        runpy.run_module(argv[2], run_name="__main__", alter_sys=True)
        code = 0
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    except BaseException:  # noqa: BLE001 - as the interpreter would: the traceback on stderr, exit code 1
        traceback.print_exc()
        code = 1
    try:
        # What interpreter shutdown does: wait for non-daemon threads, run atexit functions, flush.
        main_thread = threading.main_thread()
        for thread in threading.enumerate():
            if thread is not main_thread and not thread.daemon:
                thread.join()
        import atexit

        atexit._run_exitfuncs()
        sys.stdout.flush()
        sys.stderr.flush()
    finally:
        os._exit(int(code or 0) & 0xFF)


def _send(sock: socket.socket, message: dict) -> None:
    try:
        sock.send(json.dumps(message).encode())
    except OSError:  # the client is gone: the loop sees it at its next read
        pass


# -- the client --------------------------------------------------------------------------------------------------------


class ForkedChild:
    """A child forked by the server: the part of ``subprocess.Popen`` that Proc uses (pid, stdout, poll, wait)."""

    def __init__(self, pid: int, stdout) -> None:
        self.pid = pid
        self.stdout = stdout
        self.returncode: int | None = None
        self._ended = threading.Event()

    def _exited(self, code: int) -> None:
        self.returncode = code
        self._ended.set()

    def poll(self) -> int | None:
        """The exit code, or None while it runs."""
        return self.returncode

    def wait(self, timeout: float | None = None) -> int:
        """Wait for the child to end; subprocess.TimeoutExpired after timeout seconds."""
        if not self._ended.wait(timeout):
            raise subprocess.TimeoutExpired(f"pid {self.pid}", timeout)
        assert self.returncode is not None
        return self.returncode


class ForkServer:
    """The client end: starts the server process and forks children from it, one request at a time."""

    def __init__(self) -> None:
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        self._sock = ours
        env = dict(os.environ)
        # What its imports read: a child whose environment says otherwise must be exec'ed (runs_as_imported).
        self.import_env = import_time_env(env)
        self._server = subprocess.Popen(
            [sys.executable, "-m", "peer.harness.forkserver", str(theirs.fileno())],
            pass_fds=(theirs.fileno(),), stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
            start_new_session=True, env=env,
        )
        theirs.close()
        self._lock = threading.Lock()  # one request in flight: answers come back in order
        self._answers: list[dict] = []
        self._answered = threading.Condition()
        self._children: dict[int, ForkedChild] = {}
        self._codes: dict[int, int] = {}  # exits seen before their ForkedChild was registered
        self._closed = False
        self._reader = threading.Thread(target=self._read, name="forkserver-reader", daemon=True)
        self._reader.start()

    def spawn(
        self, argv: Sequence[str], env: Mapping[str, str], stderr_fd: int, netns: str | None = None
    ) -> ForkedChild:
        """Fork argv (``python -m peer.cli ARGS``) with env, in network namespace netns if named; its stdout is a new
        pipe (text, line by line), its stderr stderr_fd. ForkServerError when the server is gone or refuses."""
        read_fd, write_fd = os.pipe()
        try:
            with self._lock:
                request = {"argv": list(argv), "env": dict(env), "cwd": os.getcwd(), "netns": netns}
                message = json.dumps(request).encode()
                try:
                    socket.send_fds(self._sock, [message], [write_fd, stderr_fd])
                except OSError as exc:
                    raise ForkServerError(f"the fork server is gone: {exc}") from exc
                answer = self._next_answer()
        finally:
            os.close(write_fd)
        if "started" not in answer:
            os.close(read_fd)
            raise ForkServerError(f"the fork server refused: {answer.get('error', answer)}")
        pid = int(answer["started"])
        child = ForkedChild(pid, open(read_fd, "r", buffering=1, errors="replace"))  # noqa: SIM115 - read to EOF by Proc
        with self._answered:
            self._children[pid] = child
            if pid in self._codes:
                child._exited(self._codes.pop(pid))
        return child

    def _next_answer(self, timeout: float = 60.0) -> dict:
        with self._answered:
            if not self._answered.wait_for(lambda: self._answers or self._closed, timeout):
                raise ForkServerError(f"the fork server did not answer within {timeout:g} s")
            if not self._answers:
                raise ForkServerError("the fork server is gone")
            return self._answers.pop(0)

    def _read(self) -> None:
        while True:
            try:
                data = self._sock.recv(MAX_MESSAGE)
            except OSError:
                data = b""
            if not data:
                break
            message = json.loads(data)
            with self._answered:
                if "exited" in message:
                    pid, code = int(message["exited"]), int(message["code"])
                    child = self._children.pop(pid, None)
                    if child is None:
                        self._codes[pid] = code
                    else:
                        child._exited(code)
                else:
                    self._answers.append(message)
                    self._answered.notify_all()
        with self._answered:
            self._closed = True
            self._answered.notify_all()
        # The server kills and reaps what it forked before it exits; then so is every child not yet reported.
        try:
            self._server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self._server.kill()
            self._server.wait()
        with self._answered:
            for child in self._children.values():
                child._exited(-signal.SIGKILL)
            self._children.clear()

    @property
    def alive(self) -> bool:
        """Whether the server still answers."""
        return not self._closed and self._server.poll() is None

    def close(self, timeout: float = 10.0) -> None:
        """Stop the server; it kills the children still running."""
        try:
            self._sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        try:
            self._server.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self._server.kill()
            self._server.wait()
        self._reader.join(timeout=timeout)
        self._sock.close()


def _main() -> None:
    fd = int(sys.argv[1])
    sock = socket.socket(fileno=fd)
    try:
        os.close(os.pidfd_open(os.getpid()))  # Linux 5.3 or later: checked before any child exists to lose
    except (AttributeError, OSError) as exc:
        sys.exit(f"loconet fork server: no pidfd_open on this system ({exc}); children start with exec")
    for name, value in SERVER_DEFAULTS.items():
        os.environ.setdefault(name, value)
    for name in PRELOAD:
        importlib.import_module(name)
    serve(sock)
    # Its children are reaped and it holds nothing to flush: skip the interpreter's finalisation, which with torch and
    # torch._dynamo imported took a second of CPU (10-20 s on a loaded machine, with the caller waiting at its exit).
    sys.stderr.flush()
    os._exit(0)


if __name__ == "__main__":
    _main()
