"""Helpers shared by the benchmarks: CPU time and RSS from /proc, percentiles, median timings, a memcpy baseline,
a serving child process, the printed report."""

from __future__ import annotations

import contextlib
import json
import math
import multiprocessing as mp
import os
import statistics
import sys
import time
from collections.abc import Callable, Iterator
from typing import TextIO


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


def print_report(report: dict, as_json: bool, out: TextIO | None = None, fmt: Callable[[object], str] = str) -> None:
    """Print a benchmark's report to out (default stdout): one JSON line, or one aligned "key: value" line per entry."""
    out = sys.stdout if out is None else out  # looked up per call: tests replace sys.stdout
    if as_json:
        out.write(json.dumps(report) + "\n")
        return
    width = max((len(key) for key in report), default=0)
    for key, value in report.items():
        text = fmt(value).replace("\n", "\n" + " " * (width + 2))  # a multi-line value stays in its column
        out.write(f"{key:>{width}}: {text}\n")


@contextlib.contextmanager
def serving_child(target: Callable, *args: object, start_timeout_s: float = 120.0) -> Iterator[tuple[object, int]]:
    """Run target(conn, *args) in a spawned process; yield (what it sends first, its pid).

    The child sends one value (its address) when ready, then waits for a message
    on conn; on exit it is told to stop, then killed if it does not.
    """
    ctx = mp.get_context("spawn")
    parent, child = ctx.Pipe()
    proc = ctx.Process(target=target, args=(child, *args), daemon=True)
    proc.start()
    try:
        if not parent.poll(start_timeout_s):
            raise RuntimeError(f"the child process did not start within {start_timeout_s:g} s")
        yield parent.recv(), proc.pid
    finally:
        try:
            parent.send("done")
        except (OSError, ValueError):  # the child is already gone
            pass
        proc.join(timeout=30)
        if proc.is_alive():
            proc.kill()
            proc.join(timeout=10)
