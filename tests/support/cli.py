"""Running the ``loconet`` command in a test: in this process (checks made before any child starts), and reading
its one-line error."""

from __future__ import annotations

import os
import signal
import subprocess


def in_process(capsys, *args: str) -> subprocess.CompletedProcess:
    """Run ``peer.cli.main(ARGS)`` here (for checks made before any process starts); what it printed."""
    from peer import cli

    sigterm, verbosity = signal.getsignal(signal.SIGTERM), os.environ.get("GRPC_VERBOSITY")
    try:
        code = cli.main(list(args))
    except SystemExit as exc:  # argparse's usage errors
        code = exc.code
    finally:
        signal.signal(signal.SIGTERM, sigterm)
        if verbosity is None:
            os.environ.pop("GRPC_VERBOSITY", None)
    out, err = capsys.readouterr()
    return subprocess.CompletedProcess(list(args), code, out, err)


def one_line_error(result: subprocess.CompletedProcess) -> str:
    """The single error line of a failed command (asserting there is nothing else on stderr)."""
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert "Traceback" not in result.stderr, result.stderr
    assert len(lines) == 1 and lines[0].startswith("loconet: error: "), result.stderr
    return lines[0]


def forbid_processes(monkeypatch) -> None:
    """Make starting any child process (subprocess or multiprocessing) fail the test."""
    import multiprocessing.process

    def forbidden(*_args, **_kwargs):
        raise AssertionError("a process was started before the arguments were checked")

    monkeypatch.setattr(multiprocessing.process.BaseProcess, "start", forbidden)
    monkeypatch.setattr(subprocess.Popen, "__init__", forbidden)


def before_any_process(monkeypatch, capsys, *args: str, uid: int | None = None) -> subprocess.CompletedProcess:
    """in_process(ARGS) with every child process forbidden (a check must refuse first); with uid, as that user."""
    if uid is not None:
        monkeypatch.setattr("os.geteuid", lambda: uid)
    forbid_processes(monkeypatch)
    return in_process(capsys, *args)
