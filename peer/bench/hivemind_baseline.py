"""hivemind's all-reduce as a second baseline of ``loconet bench allreduce`` (``--hivemind``).

hivemind is not a dependency of loconet: its workers run under an interpreter that has it
(``--hivemind PYTHON``), each a standalone script (``hivemind_worker.py``) copied into a fresh folder, so
nothing of loconet is on its path. With ``--netns`` they run in the same namespaces, on the same addresses and
capped links as loconet's workers and gloo's, one after the other, never at once. Each round is matched by
hivemind's matchmaking first and then released at one instant for all peers: the times are its
``DecentralizedAverager`` all-reduce alone, the slowest peer's, as loconet's leave out its quorum.

Its launcher (``run_commands``, ``probe_command``) also starts ``bench diloco``'s hivemind trainers
(``hivemind_training.py``).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import statistics
import subprocess
import tempfile
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from peer.bench.kit import cpu_per_round, per_round_max, require
from peer.harness.processes import ChildFailed, log_tail

WORKER = Path(__file__).with_name("hivemind_worker.py")
# hivemind's compression for each of loconet's codecs that has one; any other codec is compared with fp32.
COUNTERPARTS = {"none": "none", "fp16": "fp16", "int8": "int8"}
HIVEMIND_CODECS = ("none", "fp16", "int8", "quantile8")
BYTES_PER_VALUE = {"none": 4, "fp16": 2, "int8": 1, "quantile8": 1}
METHODS = {
    "none": "hivemind DecentralizedAverager all-reduce, NoCompression (fp32)",
    "fp16": "hivemind DecentralizedAverager all-reduce, Float16Compression",
    "int8": "hivemind DecentralizedAverager all-reduce, Uniform8BitQuantization",
    "quantile8": "hivemind DecentralizedAverager all-reduce, Quantile8BitQuantization",
}
INSTALL_HINT = (
    "make a venv for it (python3 -m venv /opt/hivemind && /opt/hivemind/bin/pip install torch==2.13.0 "
    "hivemind==1.1.12 'numpy<2'), then pass --hivemind /opt/hivemind/bin/python"
)
_PROBE_TIMEOUT_S = 120.0
_ROUND_EXTRA_S = 10.0
_START_S = 120.0
_KILL_WAIT_S = 10.0
_WARNINGS_KEPT = 10


@dataclass(frozen=True)
class HivemindJob:
    """What every hivemind worker of one baseline run is given (timeout_s: per round)."""

    python: str
    peers: int
    numel: int
    repeat: int
    codec: str
    timeout_s: float
    seed: int = 1


def counterpart(codec_name: str, chosen: str | None) -> str:
    """hivemind's compression to compare with loconet's codec: the one chosen, else its counterpart, else fp32."""
    if chosen is not None:
        require(
            chosen in HIVEMIND_CODECS, f"--hivemind-codec must be one of {', '.join(HIVEMIND_CODECS)}, got {chosen}"
        )
        return chosen
    return COUNTERPARTS.get(codec_name, "none")


def probe(python: str, codec: str) -> str:
    """hivemind's version, once python has run the worker's probe (import hivemind, round-trip a tensor through
    the compression); ConfigError saying what failed and how to install it when it cannot."""
    with tempfile.TemporaryDirectory(prefix="loconet-hivemind-") as folder:
        script = _copy_worker(Path(folder))
        return probe_command([python, str(script), "--probe", "--codec", codec], f"hivemind's {codec} all-reduce")


def probe_command(argv: list[str], what: str, env: dict[str, str] | None = None) -> str:
    """The last line argv prints (the probe prints hivemind's version); ConfigError naming what cannot run, with
    the probe's last error line and how to install hivemind, when it fails."""
    python = argv[0]
    try:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=_PROBE_TIMEOUT_S, check=False,
                              stdin=subprocess.DEVNULL, env=env)
    except (OSError, subprocess.TimeoutExpired) as exc:
        require(False, f"--hivemind {python} does not run ({exc}); {INSTALL_HINT}")
    last = (done.stderr.strip().splitlines() or ["no message"])[-1]
    require(done.returncode == 0, f"--hivemind: {python} cannot run {what} ({last}); {INSTALL_HINT}")
    return done.stdout.strip().splitlines()[-1] if done.stdout.strip() else "unknown"


def _copy_worker(folder: Path) -> Path:
    """The worker script, copied into folder: run from there, loconet's bench folder (its codecs.py, ...) stays off
    the worker's sys.path."""
    return Path(shutil.copy(WORKER, folder / WORKER.name))


def worker_argv(job: HivemindJob, rank: int, ip: str, meet: Path) -> list[str]:
    """The command line of one hivemind worker (run from meet, where the script is copied)."""
    return [
        job.python, str(meet / WORKER.name), "--rank", str(rank), "--peers", str(job.peers),
        "--numel", str(job.numel), "--repeat", str(job.repeat), "--codec", job.codec, "--ip", ip,
        "--meet", str(meet), "--seed", str(job.seed), "--timeout", str(job.timeout_s),
    ]


def run_workers(job: HivemindJob, prefixes: list[list[str]], ips: list[str]) -> list[dict]:
    """Start one all-reduce worker per rank (argv prefixed by prefixes[rank], e.g. ``ip netns exec``) and return
    their reports in rank order; ChildFailed naming the first that failed, with its last error line."""
    # Every round may take its timeout, plus matchmaking; starting a DHT and p2pd takes seconds.
    whole_s = (job.repeat + 1) * (job.timeout_s + _ROUND_EXTRA_S) + _START_S
    return run_commands(lambda rank, meet: worker_argv(job, rank, ips[rank], meet), job.peers, whole_s, prefixes,
                        copy_worker=True)


def run_commands(argv_of: Callable[[int, Path], list[str]], peers: int, whole_s: float,
                 prefixes: list[list[str]], *, copy_worker: bool = False,
                 env: dict[str, str] | None = None) -> list[dict]:
    """Start argv_of(rank, meet) for every rank, in a fresh shared folder meet (also their working directory, with
    the all-reduce worker's script copied into it if copy_worker), and return the ``report-<rank>.json`` each wrote,
    with the warnings its log holds; ChildFailed naming the first that failed or ran past whole_s seconds."""
    with tempfile.TemporaryDirectory(prefix="loconet-hivemind-") as folder:
        meet = Path(folder)
        if copy_worker:
            _copy_worker(meet)
        logs = [meet / f"stderr-{rank}.log" for rank in range(peers)]
        with contextlib.ExitStack() as stack:
            procs = []
            for rank in range(peers):
                err = stack.enter_context(logs[rank].open("w"))
                # Output goes to files, not pipes: a daemon the worker leaves behind would hold a pipe open.
                procs.append(subprocess.Popen(
                    prefixes[rank] + argv_of(rank, meet), stdin=subprocess.DEVNULL, stdout=err, stderr=err,
                    start_new_session=True, cwd=meet, env=env,
                ))
            stack.callback(_kill_all, procs)
            deadline = time.monotonic() + whole_s
            outputs = [_finish(proc, deadline, logs[rank], meet, rank) for rank, proc in enumerate(procs)]
    return outputs


def _finish(proc: subprocess.Popen, deadline: float, log: Path, meet: Path, rank: int) -> dict:
    try:
        proc.wait(timeout=max(0.0, deadline - time.monotonic()))
    except subprocess.TimeoutExpired:
        last = log_tail(log, 1) or "no message"
        raise ChildFailed(f"hivemind worker {rank} did not finish in time; its last line: {last}") from None
    if proc.returncode != 0:
        raise ChildFailed(f"hivemind worker {rank} exited with {proc.returncode}: {log_tail(log, 1) or 'no message'}")
    try:
        report = json.loads((meet / f"report-{rank}.json").read_text())
    except (OSError, json.JSONDecodeError):
        raise ChildFailed(f"hivemind worker {rank} wrote no report") from None
    report["log_warnings"] = log_warnings(log.read_text(errors="replace"))
    return report


# hivemind's log lines: "Dec 05 04:20:35.355 [WARN] [hivemind.averaging.allreduce.run:123] message".
_LOG_LINE = re.compile(r"\[(WARN|ERROR)\] \[([^\]:]+)[^\]]*\] (.*)")
_WARNING_CHARS = 200


def log_warnings(text: str) -> list[str]:
    """hivemind's warnings and errors in a worker's log, as "LEVEL module: message" (times and line numbers
    left out, so that the same warning of two peers reads the same)."""
    found = []
    for line in text.splitlines():
        match = _LOG_LINE.search(line)
        if match:
            level, where, message = match.groups()
            found.append(f"{level} {where}: {message.strip()}"[:_WARNING_CHARS])
    return found


def _kill_all(procs: list[subprocess.Popen]) -> None:
    """Kill every worker's process group (hivemind's DHT, averager and p2pd daemon are its children)."""
    for proc in procs:
        # Even after the worker exited: a child left in its session (p2pd) must not outlive the benchmark.
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    # A killed process lingers until the kernel has torn it down; a namespace is removed only after that.
    deadline = time.monotonic() + _KILL_WAIT_S
    for proc in procs:
        while time.monotonic() < deadline and _group_alive(proc.pid):
            time.sleep(0.05)


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # it exists, though we may not signal it
    return True


def summarise(job: HivemindJob, version: str, reports: list[dict], wire_per_round: float | None,
              bandwidth_bps: float | None) -> dict:
    """The baseline's part of the report: per repeat the slowest peer's time, and medians over repeats."""
    times = per_round_max(reports)
    median = statistics.median(times)
    summary = {
        "method": METHODS[job.codec],
        "version": version,
        "numpy": reports[0].get("numpy"),
        "codec": job.codec,
        "median_s": median,
        "times_s": times,
        "release_late_s_max": max(late for r in reports for late in r.get("release_late_s", [0.0])),
        "cpu_s_per_round": cpu_per_round(reports),
        "bytes_sent_per_peer": payload_bytes(job.peers, job.numel, job.codec),
        "max_abs_error": max(r["max_abs_error"] for r in reports),
        "max_abs_error_per_round": per_round_max(reports, "max_abs_error_per_round"),
        "identical_across_peers": all(len(set(d)) == 1 for d in zip(*(r["sha256_per_round"] for r in reports))),
        # Where its result strays from the mean, hivemind says why only in its logs: bring the reasons here.
        "log_warnings": common_warnings(reports),
    }
    if wire_per_round is not None:
        summary["wire_bytes_per_round"] = wire_per_round
    if bandwidth_bps:
        summary["link_utilization"] = summary["bytes_sent_per_peer"] * 8 / bandwidth_bps / median
    return summary


def common_warnings(reports: list[dict]) -> dict[str, int]:
    """The warnings the workers logged, each with how many logged it (the most frequent first)."""
    return dict(Counter(w for r in reports for w in r.get("log_warnings", [])).most_common(_WARNINGS_KEPT))


def payload_bytes(peers: int, numel: int, codec: str) -> float:
    """Bytes a peer sends in hivemind's butterfly all-reduce: (N-1)/N of its tensor to the other parts' owners,
    and its own part's result to the N-1 others, at the compression's bytes per value (scales left out)."""
    return 2 * (peers - 1) / peers * BYTES_PER_VALUE[codec] * numel
