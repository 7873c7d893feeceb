"""Helpers shared by the benchmarks: CPU time and RSS from /proc, percentiles, median timings, a memcpy baseline,
spawned child processes that log to a file and are reported by name when they die, the printed report, their
command-line options."""

from __future__ import annotations

import argparse
import contextlib
import math
import multiprocessing as mp
import os
import pathlib
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from typing import TextIO

from collectives.errors import ConfigError
from peer.harness.processes import ChildFailed, die_with_parent, log_tail
from peer.jsonout import json_line
from peer.options import add_options


def proc_cpu_s(pid: int) -> float:
    """CPU time (user + system, all threads) of a process, from /proc/<pid>/stat."""
    with open(f"/proc/{pid}/stat") as f:
        data = f.read()
    fields = data[data.rindex(")") + 2 :].split()  # fields[0] is field 3 (state)
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def proc_cpu_ns_s(pid: int) -> float:
    """CPU time of a process's live threads with nanosecond resolution (sum of /proc/<pid>/task/*/schedstat).

    A cross-check of ``proc_cpu_s``, whose clock ticks (10 ms) are coarse for a quiet coordinator;
    threads that exited are missing (the coordinator's threads live as long as it does).
    """
    total = 0
    for task in os.listdir(f"/proc/{pid}/task"):
        try:
            with open(f"/proc/{pid}/task/{task}/schedstat") as f:
                total += int(f.read().split()[0])
        except (OSError, ValueError, IndexError):
            continue
    return total / 1e9


def proc_rss_mb(pid: int) -> float:
    """Resident set size of a process in MiB, from /proc/<pid>/status."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return math.nan


def percentile(values: list[float], q: float) -> float:
    """The q-th percentile (0..100) with linear interpolation; NaN for no values."""
    if not values:
        return math.nan
    xs = sorted(values)
    pos = (len(xs) - 1) * q / 100
    lo = math.floor(pos)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


def summary(values: list[float]) -> dict:
    """p50 / p99 / max (and the number of samples)."""
    return {
        "p50": percentile(values, 50),
        "p99": percentile(values, 99),
        "max": max(values) if values else math.nan,
        "n": len(values),
    }


def median_seconds(fn: Callable[[], object], repeat: int, warmup: bool = True) -> float:
    """Median wall seconds of repeat calls of fn, after one untimed call if warmup."""
    if warmup:
        fn()  # first call allocates scratch buffers and faults pages in
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def copy_baseline_s(nbytes: int, repeat: int) -> float:
    """Median seconds of an in-memory copy of nbytes (the baseline a transfer is compared with)."""
    import torch  # only the benchmarks that move tensors pay for the import

    src = torch.frombuffer(bytearray(nbytes), dtype=torch.uint8)
    dst = torch.empty_like(src)
    return median_seconds(lambda: dst.copy_(src), max(1, repeat), warmup=False)


def copy_baseline(nbytes: int, repeat: int) -> dict:
    """The ``baseline`` entry of a transfer benchmark's report: an in-memory copy of the same bytes."""
    return {"method": "in-memory copy of the same bytes", "median_s": copy_baseline_s(nbytes, repeat)}


def per_round_max(replies: list[dict], key: str = "times_s") -> list[float]:
    """Per round, the largest of the peers' values under key (each reply lists one per round): the slowest peer's
    time, or the largest error."""
    return [max(values) for values in zip(*(r[key] for r in replies))]


def cpu_per_round(replies: list[dict]) -> float:
    """Median over rounds of the CPU-seconds all peers spent in that round (each reply's ``cpu_s``, one per round)."""
    return statistics.median(sum(cpus) for cpus in zip(*(r["cpu_s"] for r in replies)))


def print_report(report: dict, as_json: bool, out: TextIO | None = None, fmt: Callable[[object], str] = str) -> None:
    """Print a benchmark's report to out (default stdout): one JSON line, or one aligned "key: value" line per entry."""
    out = sys.stdout if out is None else out  # looked up per call: tests replace sys.stdout
    if as_json:
        out.write(json_line(report) + "\n")
        return
    width = max((len(key) for key in report), default=0)
    for key, value in report.items():
        text = fmt(value).replace("\n", "\n" + " " * (width + 2))  # a multi-line value stays in its column
        out.write(f"{key:>{width}}: {text}\n")


def child_failed(name: str, exitcode: int | None, log_path: str | os.PathLike, what: str = "") -> ChildFailed:
    """The error for a child that died: its name, exit code, the tail of its log and where the log is."""
    tail = log_tail(log_path)
    return ChildFailed(
        f"{name} exited ({exitcode}){' ' + what if what else ''}"
        + (f"; last lines of its log:\n{tail}" if tail else "; its log is empty")
        + f"\n(log: {log_path})"
    )


def spawned_entry(log_path: str, target: Callable, *args: object) -> None:
    """A spawned child's first code: its stderr (tracebacks, library noise) goes to log_path, then target(*args)."""
    die_with_parent()
    log = open(log_path, "a", buffering=1)  # noqa: SIM115 -- stays open as the process's stderr
    os.dup2(log.fileno(), 2)
    sys.stderr = log
    target(*args)


def bench_log_dir(bench: str) -> pathlib.Path:
    """A fresh folder for a benchmark's child logs."""
    return pathlib.Path(tempfile.mkdtemp(prefix=f"loconet-bench-{bench}-"))


@contextlib.contextmanager
def serving_child(
    target: Callable, *args: object, name: str = "server", log_dir: pathlib.Path | None = None,
    start_timeout_s: float = 120.0,
) -> Iterator[tuple[object, int]]:
    """Run target(conn, *args) in a spawned process; yield (what it sends first, its pid).

    The child sends one value (its address) when ready, then waits for a message
    on conn; on exit it is told to stop, then killed if it does not. Its stderr
    goes to ``<log_dir>/<name>.log``; if it dies before it is ready, ChildFailed
    says so at once, with that log's last lines.
    """
    ctx = mp.get_context("spawn")
    own_dir = log_dir is None
    log_path = (bench_log_dir(name) if own_dir else log_dir) / f"{name}.log"
    parent, child = ctx.Pipe()
    proc = ctx.Process(target=spawned_entry, args=(str(log_path), target, child, *args), daemon=True)
    proc.start()
    child.close()  # so that the child's death reads as EOF here
    failed = True
    try:
        deadline = time.monotonic() + start_timeout_s
        while not parent.poll(0.2):
            if not proc.is_alive():
                proc.join(timeout=5)
                raise child_failed(name, proc.exitcode, log_path, "before it was ready")
            if time.monotonic() > deadline:
                raise ChildFailed(f"{name} did not start within {start_timeout_s:g} s (log: {log_path})")
        try:
            ready = parent.recv()
        except EOFError:
            proc.join(timeout=5)
            raise child_failed(name, proc.exitcode, log_path, "before it was ready") from None
        try:
            yield ready, proc.pid
        except Exception as exc:
            proc.join(timeout=0.5)
            if not proc.is_alive():  # the benchmark failed because the child died: say that
                raise child_failed(name, proc.exitcode, log_path, "during the benchmark") from exc
            raise
        failed = False
    finally:
        try:
            parent.send("done")
        except (OSError, ValueError):  # the child is already gone
            pass
        proc.join(timeout=30)
        if proc.is_alive():
            proc.kill()
            proc.join(timeout=10)
        parent.close()
        if own_dir and not failed:  # a failure's log stays where its message points
            shutil.rmtree(log_path.parent, ignore_errors=True)


def require(ok: bool, message: str) -> None:
    """Raise ConfigError(message) unless ok: an argument check, made before any process starts."""
    if not ok:
        raise ConfigError(message)


def comma_list(text: str) -> tuple[str, ...]:
    """``a, b,c`` as ("a", "b", "c"): the names of a comma-separated option (empty items dropped)."""
    return tuple(item.strip() for item in text.split(",") if item.strip())


# Field metadata of a tuple of names written comma-separated on the command line (--codecs, --methods, ...).
COMMA_LIST = {"parse": comma_list, "format": ",".join}


def add_bench_options(parser: argparse.ArgumentParser, config: type, skip: tuple[str, ...] = ()) -> None:
    """A benchmark's options: one per field of its config dataclass (but skip), and --json."""
    add_options(parser, config, skip=skip)
    parser.add_argument("--json", action="store_true", help="print the report as one JSON object")
