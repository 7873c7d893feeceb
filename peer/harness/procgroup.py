"""A group of local worker processes, each a collective endpoint, driven over pipes.

Benchmarks and multi-process tests use it to run real all-reduces between
real processes on 127.0.0.1 (ports chosen by the OS), to run the
torch.distributed gloo baseline in the same processes, and to break members
on purpose (a worker can stop itself at a phase of a round so that the caller
kills it there). Every worker is killed and reaped on ``close``.
"""

from __future__ import annotations

import hashlib
import logging
import multiprocessing as mp
import os
import signal
import time
import traceback
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from typing import TYPE_CHECKING

from collectives.net.addresses import LOCAL_HOST
from collectives.net.rpc import RpcSecurity
from collectives.net.transportconfig import TransportConfig
from peer.harness.loopback import LOOPBACK, LOOPBACK_INTERFACE, loopback_store, use_loopback_for_gloo

if TYPE_CHECKING:  # for the hints only: torch is imported where used, in the workers
    import torch

log = logging.getLogger(__name__)


class WorkerError(RuntimeError):
    """A worker process failed to start, died, or did not answer in time."""


@dataclass(frozen=True)
class Placement:
    """Where a worker lives on a network of namespaces: its namespace, its address there, its interface."""

    netns: str
    ip: str
    interface: str


@dataclass(frozen=True)
class WorkerConfig:
    """How every worker of a group sets itself up."""

    run_id: str = "local"
    host: str = LOCAL_HOST
    chunk_bytes: int = TransportConfig.chunk_bytes
    bandwidth_bps: float | None = None
    torch_threads: int = 1
    # See TransportConfig.codec_threads (0: on each worker's event loop).
    codec_threads: int = TransportConfig.codec_threads
    # One per rank: each worker enters its own network namespace (peer/harness/netns/commands.py) and
    # serves, and runs gloo, on its address there; empty: every worker on `host`.
    placements: tuple[Placement, ...] = ()
    # TLS between the workers (empty: plaintext); gloo is never encrypted.
    security: RpcSecurity = field(default_factory=RpcSecurity)


@dataclass(frozen=True)
class AllReduceJob:
    """One all-reduce command: every worker reduces a seeded random tensor (or its own rank, for tiny checks)."""

    numel: int
    codec: str = "none"
    # The round's aggregator, e.g. "mean", "trimmed_mean:trim=0.2", "krum:f=1".
    aggregator: str = "mean"
    timeout_s: float = 60.0
    repeat: int = 1
    first_round: int = 0
    epoch: int = 0
    seed: int = 0
    # Per-rank contribution weights (None: 1.0 each).
    weights: tuple[float, ...] | None = None
    # Per-rank factors the seeded tensors are multiplied by (None: 1.0 each): outliers for robust aggregators.
    scales: tuple[float, ...] | None = None
    # Ranks of the group taking part (None: all); lets a test run a round on survivors.
    members: tuple[int, ...] | None = None
    # Return the full result tensor (small tensors only) / the error against the exact mean.
    return_value: bool = False
    check_error: bool = False
    # Align the members before each timed round with an untimed one-element round (benchmarks).
    barrier: bool = False
    # Rank that freezes when its round reaches this phase ("scatter" / "gather"), for kill tests.
    hold_rank: int | None = None
    hold_phase: str | None = None
    error_feedback: bool = False
    # Per-rank host ids (None: every member on its own, the flat round): members sharing one reduce through
    # shared memory first (collectives/hosts/round.py), e.g. ("h",) * n for one host, ("a", "a", "b", "b").
    hosts: tuple[str, ...] | None = None


def worker_tensor(job: AllReduceJob, rank: int, size: int = 0) -> torch.Tensor:
    """The tensor a rank contributes to a job (seeded, so any process can recompute it); size is not used."""
    import torch

    g = torch.Generator().manual_seed(job.seed * 1_000_003 + rank)
    x = torch.randn(job.numel, generator=g, dtype=torch.float32)
    return x if job.scales is None else x * job.scales[rank]


def _worker_main(conn: Connection, rank: int, config: WorkerConfig) -> None:
    # Runs in a fresh (spawned) process: imports happen here.
    from peer.harness.processes import die_with_parent

    die_with_parent()
    parent = mp.parent_process()
    if parent is not None and os.getppid() != parent.pid:
        return  # the parent died before the line above took effect
    place = config.placements[rank] if config.placements else None
    if place is not None:
        from peer.harness.netns.commands import enter_netns

        enter_netns(place.netns)  # before any socket or thread: all of them live there
        # A namespace has no name for its address: c10d warned so twice per gloo run ("The hostname of the client
        # socket cannot be retrieved"). Read by torch's C++ logging as it loads, so set before the import.
        os.environ.setdefault("TORCH_CPP_LOG_LEVEL", "ERROR")
    import torch

    from collectives.allocator import tune_malloc
    from collectives.allreduce import Collective
    from collectives.errors import LoconetError, MemberFailure
    from collectives.net.transport import Transport
    from collectives.reduce.inbox import Group

    tune_malloc()
    torch.set_num_threads(config.torch_threads)
    hold: dict = {}

    def phase_hook(group: Group, phase: str) -> None:
        if hold.get("phase") == phase and hold.get("rank") == group.rank:
            conn.send(("held", phase))
            while True:  # frozen inside the round until the parent kills us
                time.sleep(3600)

    transport = Transport(
        TransportConfig(
            host=place.ip if place else config.host,
            chunk_bytes=config.chunk_bytes,
            bandwidth_bps=config.bandwidth_bps,
            codec_threads=config.codec_threads,
            security=config.security,
        )
    )
    collective = Collective(transport, config.run_id, phase_hook=phase_hook)
    address = transport.start(collective.handlers())
    conn.send(("ready", address, os.getpid()))
    addresses: list[str] = []
    store = None
    try:
        while True:
            cmd, arg = conn.recv()
            try:
                if cmd == "members":
                    addresses = list(arg)
                    reply = None
                elif cmd == "allreduce":
                    job: AllReduceJob = arg
                    hold.clear()
                    if job.hold_rank is not None:
                        hold.update(rank=job.hold_rank, phase=job.hold_phase)
                    reply = _run_allreduce(collective, addresses, rank, job, torch)
                elif cmd == "gloo_init":
                    store, reply = _gloo_init(rank, len(addresses), arg, store, config.placements)
                elif cmd == "gloo_allreduce":
                    reply = _gloo_allreduce(rank, len(addresses), arg, torch)
                elif cmd == "exit":
                    conn.send(("ok", None))
                    return
                else:
                    raise ValueError(f"unknown command {cmd!r}")
                conn.send(("ok", reply))
            except LoconetError as exc:
                conn.send(("failed", _failure_info(exc, MemberFailure)))
            except Exception as exc:
                conn.send(("error", f"{type(exc).__name__}: {exc}\n{traceback.format_exc()}"))
    except (EOFError, KeyboardInterrupt):
        return
    finally:
        collective.close()  # its hierarchical rounds' shared memory
        transport.close()
        del store


def _failure_info(exc: Exception, member_failure: type) -> dict:
    failed = isinstance(exc, member_failure)
    return {
        "type": type(exc).__name__,
        "message": str(exc),
        "failed_ranks": exc.failed_ranks if failed else (),
        "failed": exc.failed if failed else (),
        "elapsed_s": getattr(exc, "elapsed_s", None),
    }


def _run_allreduce(collective, addresses: list[str], rank: int, job: AllReduceJob, torch) -> dict:
    from collectives.allreduce import AllReduceConfig
    from collectives.codecs import CodecConfig
    from collectives.reduce.aggregators import AggregatorConfig
    from collectives.reduce.inbox import Group

    ranks = list(job.members) if job.members is not None else list(range(len(addresses)))
    if rank not in ranks:
        return {"skipped": True}
    members = tuple(addresses[r] for r in ranks)
    my = ranks.index(rank)
    hosts = None if job.hosts is None else tuple(job.hosts[r] for r in ranks)
    x = worker_tensor(job, rank)
    weight = 1.0 if job.weights is None else job.weights[rank]
    cfg = AllReduceConfig(
        codec=CodecConfig.parse(job.codec),
        aggregator=AggregatorConfig.parse(job.aggregator),
        timeout_s=job.timeout_s,
    )
    residual = torch.zeros_like(x) if job.error_feedback else None
    # Reused by every repeat, as a training loop would; written once first, so the first
    # timed round does not pay for faulting in its pages (gloo's buffer is copied untimed too).
    out = torch.zeros_like(x)
    times: list[float] = []
    cpu: list[float] = []  # CPU seconds of the whole process (every thread) per timed round
    result = None
    stats = None
    decisions: list[dict] = []
    tiny = torch.zeros(1)
    for k in range(job.repeat):
        # Round ids: first_round * 1000 + 2k for the barrier, + 2k + 1 for the timed round.
        base = job.first_round * 1000 + 2 * k
        if job.barrier:
            collective.allreduce(Group(collective.run_id, job.epoch, base, members, my), tiny)
        group = Group(collective.run_id, job.epoch, base + 1, members, my)
        t0, c0 = time.perf_counter(), time.process_time()
        try:
            done = collective.allreduce(group, x, weight=weight, config=cfg, residual=residual, out=out, hosts=hosts)
        except Exception as exc:
            exc.elapsed_s = time.perf_counter() - t0
            raise
        times.append(time.perf_counter() - t0)
        cpu.append(time.process_time() - c0)
        result, stats, decisions = done.value, done.stats, done.decisions
    reply = {
        "times_s": times,
        "cpu_s": cpu,
        "stats": stats.as_dict(),
        "decisions": decisions,
        "sha256": hashlib.sha256(result.numpy().tobytes()).hexdigest(),
        "traffic": collective.transport.counters.snapshot(),
    }
    if job.return_value:
        reply["value"] = result.tolist()
    if job.check_error:
        reply["max_abs_error"] = _error_against_exact_mean(job, ranks, result, torch)
    return reply


def _error_against_exact_mean(job: AllReduceJob, ranks: list[int], result, torch) -> float:
    exact = torch.zeros(job.numel, dtype=torch.float64)
    for r in ranks:
        exact += worker_tensor(job, r).double()
    exact /= len(ranks)
    return float((result.double() - exact).abs().max()) if job.numel else 0.0


def _gloo_init(
    rank: int, world: int, port: int | None, store: object | None, placements: tuple[Placement, ...] = ()
) -> tuple[object, int]:
    """Rank 0 first creates the TCP store (port None -> OS-chosen); then every rank joins the gloo group.

    With placements gloo runs over each worker's namespace link, where ours does, and the store is on rank 0's address.
    """
    import datetime

    import torch.distributed as dist

    # gloo's own connections listen on 127.0.0.1 only, or on the worker's private veth.
    use_loopback_for_gloo(placements[rank].interface if placements else LOOPBACK_INTERFACE)
    store_host = placements[0].ip if placements else LOOPBACK
    timeout = datetime.timedelta(seconds=120)
    if store is None:
        if rank == 0:
            # torch's own store server would listen on every interface: this one listens on one address only.
            store = loopback_store(world, timeout, port or 0, host=store_host)
        else:
            store = dist.TCPStore(store_host, port or 0, world, is_master=False, timeout=timeout)
        if port is None:
            return store, store.port
    dist.init_process_group("gloo", store=store, rank=rank, world_size=world, timeout=timeout)
    return store, store.port


def _gloo_allreduce(rank: int, world: int, job: AllReduceJob, torch) -> dict:
    import torch.distributed as dist

    x = worker_tensor(job, rank)
    times, cpu = [], []
    for _ in range(job.repeat):
        buf = x.clone()
        dist.barrier()
        t0, c0 = time.perf_counter(), time.process_time()
        dist.all_reduce(buf)
        buf.div_(world)
        times.append(time.perf_counter() - t0)
        cpu.append(time.process_time() - c0)
    return {"times_s": times, "cpu_s": cpu, "sha256": hashlib.sha256(buf.numpy().tobytes()).hexdigest()}


@dataclass
class ProcessGroup:
    """N worker processes on this machine, each with its own transport and collective."""

    size: int
    config: WorkerConfig = field(default_factory=WorkerConfig)
    start_timeout_s: float = 120.0
    addresses: list[str] = field(default_factory=list)
    pids: list[int] = field(default_factory=list)

    def __post_init__(self) -> None:
        self._procs: list[mp.process.BaseProcess] = []
        self._conns: list[Connection] = []

    def __enter__(self) -> ProcessGroup:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def start(self) -> None:
        """Start the workers and tell each the group's addresses."""
        ctx = mp.get_context("spawn")
        try:
            for rank in range(self.size):
                parent, child = ctx.Pipe()
                proc = ctx.Process(target=_worker_main, args=(child, rank, self.config), daemon=True)
                proc.start()
                child.close()
                self._procs.append(proc)
                self._conns.append(parent)
            for rank in range(self.size):
                kind, address, pid = self._recv(rank, self.start_timeout_s)
                self.addresses.append(address)
                self.pids.append(pid)
            for rank in range(self.size):
                self.send(rank, "members", tuple(self.addresses))
            for rank in range(self.size):
                self.reply(rank, self.start_timeout_s)
        except BaseException:
            self.close()
            raise

    def send(self, rank: int, cmd: str, arg: object = None) -> None:
        """Send a command to one worker."""
        self._conns[rank].send((cmd, arg))

    def _recv(self, rank: int, timeout_s: float):
        conn = self._conns[rank]
        if not conn.poll(timeout_s):
            raise WorkerError(f"worker {rank} did not answer within {timeout_s:g} s")
        try:
            return conn.recv()
        except EOFError as exc:
            raise WorkerError(f"worker {rank} died (exit code {self._procs[rank].exitcode})") from exc

    def reply(self, rank: int, timeout_s: float = 600.0) -> tuple[str, object]:
        """The next message from a worker: ("ok", value), ("failed", info), ("held", phase)."""
        msg = self._recv(rank, timeout_s)
        if msg[0] == "error":
            raise WorkerError(f"worker {rank} raised {msg[1]}")
        return msg

    def run(self, cmd: str, arg: object = None, ranks: list[int] | None = None, timeout_s: float = 600.0) -> list:
        """Send a command to several workers and return their replies in rank order."""
        ranks = list(range(self.size)) if ranks is None else ranks
        for r in ranks:
            self.send(r, cmd, arg)
        return [self.reply(r, timeout_s) for r in ranks]

    def allreduce(self, job: AllReduceJob, timeout_s: float = 600.0) -> list[dict]:
        """Run an all-reduce job on the group's live workers; return each worker's ("ok"|"failed", info)."""
        return self.run("allreduce", job, timeout_s=timeout_s)

    def gloo_init(self) -> None:
        """Set up torch.distributed (gloo) among the workers, for the baseline."""
        port = self.run("gloo_init", None, ranks=[0])[0][1]
        self.run("gloo_init", port)

    def signal(self, rank: int, sig: int) -> None:
        """Send a signal to a worker process (SIGKILL, SIGSTOP, SIGCONT...)."""
        os.kill(self.pids[rank], sig)

    def alive(self) -> list[bool]:
        """Whether each worker process is still running."""
        return [p.is_alive() for p in self._procs]

    def close(self) -> None:
        """Stop every worker (politely, then SIGKILL) and reap it."""
        for rank, conn in enumerate(self._conns):
            try:
                if self._procs[rank].is_alive():
                    os.kill(self._procs[rank].pid, signal.SIGCONT)
                    conn.send(("exit", None))
            except (OSError, BrokenPipeError, ValueError):
                pass
        deadline = time.monotonic() + 5
        for proc in self._procs:
            proc.join(timeout=max(0.0, deadline - time.monotonic()))
        for proc in self._procs:
            if proc.is_alive():
                proc.kill()
                proc.join(timeout=5)
        for conn in self._conns:
            conn.close()
        self._procs.clear()
        self._conns.clear()
