"""One hivemind peer of ``loconet bench allreduce --hivemind``: a standalone script, run by hivemind's interpreter.

It imports only the standard library, torch and hivemind (never loconet), so it runs under any Python that has
hivemind installed, inside a network namespace or not. The peers meet through files in a shared folder: rank 0
writes its DHT addresses, then, for every round, the wall-clock instant at which all peers release the
all-reduce. Each round is matched ahead of time (``step(require_trigger=True)``), so the times measured are
hivemind's all-reduce alone, not its matchmaking, as loconet's figures leave out the quorum. The report is one
JSON object in the shared folder (``report-<rank>.json``).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:  # for the hints only: both are imported where used, under hivemind's interpreter
    import torch
    from hivemind.compression.base import CompressionBase

# Matchmaking must fit between a round's scheduling and its release; the release waits for every peer's group.
_MATCH_S = 2.0
_READY_TIMEOUT_S = 120.0
_POLL_S = 0.01
# The release instant is this far ahead of rank 0's clock when it writes it: time for the others to read it.
_GO_AHEAD_S = 0.05


def _cpu_s() -> float:
    """CPU-seconds of this process and every live descendant: hivemind's DHT, averager and p2pd are processes."""
    return sum(_proc_cpu_s(pid) for pid in _tree(os.getpid()))


def _tree(pid: int) -> list[int]:
    found = [pid]
    for task in Path(f"/proc/{pid}/task").glob("*"):
        try:
            children = (task / "children").read_text().split()
        except FileNotFoundError:
            continue
        for child in children:
            found.extend(_tree(int(child)))
    return found


def _proc_cpu_s(pid: int) -> float:
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except FileNotFoundError:  # it ended meanwhile
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime + stime, all its threads


def wait_for(path: Path, timeout_s: float = _READY_TIMEOUT_S) -> str:
    """The text of path once it exists (another peer writes it); TimeoutError after timeout_s."""
    deadline = time.monotonic() + timeout_s
    while not path.exists():
        if time.monotonic() > deadline:
            raise TimeoutError(f"hivemind peer: {path.name} did not appear within {timeout_s:.0f} s")
        time.sleep(_POLL_S)
    return path.read_text()


def write_file(path: Path, text: str) -> None:
    """Write path whole, for other peers polling for it."""
    tmp = path.with_suffix(".tmp")
    tmp.write_text(text)
    tmp.replace(path)  # readers never see half a file


def _tensor(seed: int, rank: int, numel: int) -> torch.Tensor:
    """The tensor rank contributes: the same seeded draw as loconet's workers (procgroup.worker_tensor; a test
    holds the two equal), so both sides average the same numbers."""
    import torch

    return torch.randn(numel, generator=torch.Generator().manual_seed(seed * 1_000_003 + rank))


class Service(Protocol):
    """A hivemind service this script starts (its DHT, its averager): something to shut down."""

    def shutdown(self) -> None:
        """Stop the service and its background processes."""


def stop_and_report(meet: Path, rank: int, report: dict, *services: Service) -> None:
    """Shut hivemind's services down (each has ``shutdown()``), then write the report the launcher waits for."""
    for service in services:
        service.shutdown()
    write_file(meet / f"report-{rank}.json", json.dumps(report))


def compression_of(codec: str) -> CompressionBase:
    """hivemind's compression of that name (HIVEMIND_CODECS in hivemind_baseline.py)."""
    from hivemind import compression

    choices = {
        "none": compression.NoCompression,
        "fp16": compression.Float16Compression,
        "int8": compression.Uniform8BitQuantization,
        "quantile8": compression.Quantile8BitQuantization,
    }
    return choices[codec]()


def _release_together(meet: Path, rank: int, peers: int, round_index: int) -> float:
    """Wait until every peer has its group for this round; return the wall-clock instant all release it at."""
    write_file(meet / f"ready-{round_index}-{rank}", "")
    if rank == 0:
        for other in range(peers):
            wait_for(meet / f"ready-{round_index}-{other}")
        write_file(meet / f"go-{round_index}", repr(time.time() + _GO_AHEAD_S))
    go = float(wait_for(meet / f"go-{round_index}"))
    time.sleep(max(0.0, go - time.time()))
    return go


def check_compression(codec: str) -> str:
    """hivemind's version, once a small tensor made the round trip through the compression: hivemind 1.1.12's
    8-bit ones raise under numpy 2, and its averager then leaves the failed parts out instead of failing."""
    import hivemind
    import torch
    from hivemind.compression.base import CompressionInfo

    tensor = torch.randn(4096, generator=torch.Generator().manual_seed(0))
    compression = compression_of(codec)
    back = compression.extract(compression.compress(tensor, CompressionInfo.from_tensor(tensor)))
    if back.shape != tensor.shape or not torch.isfinite(back).all():
        raise RuntimeError(f"hivemind's {codec} compression does not give the tensor back")
    return hivemind.__version__


def main(argv: list[str] | None = None) -> int:
    """Run this peer's rounds and write its report (or, with --probe, print hivemind's version); the exit code."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--probe", action="store_true", help="only check the compression works; print the version")
    parser.add_argument("--rank", type=int)
    parser.add_argument("--peers", type=int)
    parser.add_argument("--numel", type=int)
    parser.add_argument("--repeat", type=int)
    parser.add_argument("--codec", choices=("none", "fp16", "int8", "quantile8"), required=True)
    parser.add_argument("--ip", default="127.0.0.1", help="the address this peer listens on")
    parser.add_argument("--meet", type=Path, help="a folder every peer can read and write")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--timeout", type=float, default=300.0, help="seconds a round may take before it fails")
    ns = parser.parse_args(argv)
    if ns.probe:
        print(check_compression(ns.codec))
        return 0
    missing = [f"--{k}" for k in ("rank", "peers", "numel", "repeat", "meet") if getattr(ns, k) is None]
    if missing:
        parser.error(f"missing {', '.join(missing)}")

    import hivemind
    import numpy
    import torch
    from hivemind.averaging.control import AveragingStage
    from hivemind.utils import get_dht_time

    torch.set_num_threads(1)
    initial = []
    if ns.rank > 0:
        initial = json.loads(wait_for(ns.meet / "dht.json"))
    dht = hivemind.DHT(start=True, initial_peers=initial, host_maddrs=[f"/ip4/{ns.ip}/tcp/0"])
    if ns.rank == 0:
        write_file(ns.meet / "dht.json", json.dumps([str(a) for a in dht.get_visible_maddrs()]))
    mine = _tensor(ns.seed, ns.rank, ns.numel)
    averager = hivemind.averaging.DecentralizedAverager(
        [torch.zeros(ns.numel)], dht, start=True, prefix="bench", target_group_size=ns.peers,
        min_group_size=ns.peers, min_matchmaking_time=_MATCH_S, compression=compression_of(ns.codec),
        request_timeout=_MATCH_S / 2, allreduce_timeout=ns.timeout,
    )
    # Every round averages the same tensors, so every round's result is checked against one exact mean.
    exact = sum(_tensor(ns.seed, rank, ns.numel).double() for rank in range(ns.peers)) / ns.peers
    times, lateness, cpus, errors, digests = [], [], [], [], []
    for round_index in range(ns.repeat + 1):  # round 0 warms up: connections, buffers
        with averager.get_tensors() as tensors:
            tensors[0].copy_(mine)
        control = averager.step(wait=False, require_trigger=True, scheduled_time=get_dht_time() + _MATCH_S,
                                timeout=_MATCH_S + ns.timeout)
        while control.stage != AveragingStage.AWAITING_TRIGGER:
            if control.done():
                control.result()  # raises what went wrong
                raise RuntimeError("hivemind step finished before its trigger")
            time.sleep(_POLL_S)
        go = _release_together(ns.meet, ns.rank, ns.peers, round_index)
        late = time.time() - go  # a peer that read the instant late starts late, and its round counts it
        cpu0 = _cpu_s()
        control.allow_allreduce()
        control.result(timeout=ns.timeout)
        done = time.time()
        if round_index == 0:
            continue
        times.append(done - go)
        lateness.append(late)
        cpus.append(_cpu_s() - cpu0)
        with averager.get_tensors() as tensors:
            result = tensors[0].clone()
        errors.append(float((result.double() - exact).abs().max()))
        digests.append(hashlib.sha256(result.numpy().tobytes()).hexdigest())
    report = {
        "rank": ns.rank,
        "times_s": times,
        "release_late_s": lateness,
        "cpu_s": cpus,
        "max_abs_error_per_round": errors,
        "max_abs_error": max(errors),
        "sha256_per_round": digests,
        "hivemind": hivemind.__version__,
        "numpy": numpy.__version__,  # hivemind 1.1.12's 8-bit codecs fail inside its averager under numpy 2
    }
    stop_and_report(ns.meet, ns.rank, report, averager, dht)
    return 0


if __name__ == "__main__":
    sys.exit(main())
