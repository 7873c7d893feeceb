"""Helpers shared by the benchmarks: CPU time and RSS from /proc, percentiles, a memcpy baseline, a serving child process."""

from __future__ import annotations

import contextlib
import math
import multiprocessing as mp
import os
import statistics
import time
from collections.abc import Callable, Iterator


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


def copy_baseline_s(nbytes: int, repeat: int) -> float:
    """Median seconds of an in-memory copy of nbytes (the baseline a transfer is compared with)."""
    import torch  # only the benchmarks that move tensors pay for the import

    src = torch.frombuffer(bytearray(nbytes), dtype=torch.uint8)
    dst = torch.empty_like(src)
    times = []
    for _ in range(max(1, repeat)):
        t0 = time.perf_counter()
        dst.copy_(src)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


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
