"""``loconet bench diloco``: DiLoCo and Streaming DiLoCo against data-parallel training and one peer alone.

In one invocation, on the same task, data and inner steps per peer:

- every registered algorithm named in ``--methods`` (``diloco``,
  ``streaming``, a plugin's): a real coordinator and N real ``loconet peer``
  processes on 127.0.0.1, talking through our collective;
- ``data_parallel``: N processes of torch DDP on gloo, same per-peer batch,
  every step's gradients all-reduced (the synchronous baseline), on the CPU
  whatever ``--device`` says;
- ``one_peer``: one process training alone on peer 0's data, on ``--device``.

With ``--netns`` every peer (and every DDP process, and every hivemind
trainer) lives in its own network namespace, behind ``tbf`` caps of
``--bandwidth`` on its uplink and downlink (``peer/bench/capped.py``), the
coordinator in one of its own, uncapped: the methods meet the same slow links,
and ``wall_s`` says what their bytes cost in time there.

Per method: ``final_eval_loss`` (the held-out loss after training),
``bytes_sent_per_peer``, ``peak_bytes_per_sync`` and ``wall_s``; for synthetic
tasks the ``entropy_floor`` (every field: ``FIELDS`` below, ``--help``,
docs/benchmarks.md). Our methods' bytes are counted by the transport;
data-parallel's are a ring all-reduce's: 2 (N-1)/N x 4 bytes x parameters per
step (gloo's ring algorithm; it exposes no counters). The state a joiner
fetches at start (once per peer, like DDP's initial broadcast) is reported
apart as ``state_sync_bytes_per_peer``. Against fp32, ours report
``fp32_bytes_per_peer`` (what their rounds would carry uncompressed) and
``bytes_fp32_over_method``. Every peer gets its own ``--host-id``: the
benchmark stands for peers on separate machines, so no two reduce through
shared memory and every byte of a round crosses the data plane.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import multiprocessing as mp
import queue
import shutil
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, replace

from collectives.codecs import CodecConfig
from collectives.errors import ConfigError
from collectives.net.ratelimit import parse_bandwidth
from optimizers.registry import algorithm_names, algorithms, get_algorithm
from peer.bench import hivemind_training
from peer.bench.capped import CappedNetwork, capped_network, link_traffic, on_hosts, peer_names
from peer.bench.fields import Fields, describe_report
from peer.bench.hivemind_baseline import HIVEMIND_CODECS, counterpart
from peer.bench.kit import (
    add_bench_options,
    bench_log_dir,
    child_failed,
    comma_list,
    print_report,
    require,
    spawned_entry,
)
from peer.bench.progress import Progress, progress_for
from peer.device import move_batch, place_model, resolve_device
from peer.harness.loopback import LOOPBACK, LOOPBACK_INTERFACE, loopback_store, use_loopback_for_gloo
from peer.harness.netns.availability import check_available
from peer.harness.processes import ChildFailed
from peer.harness.procgroup import Placement
from peer.options import options_of, read_options
from peer.runtime.training import LOCAL_SYNC_EVERY, TrainConfig, local_run
from peer.tasks.base import TaskConfig
from peer.tasks.registry import DEFAULT_TASK, TASK_HELP, check_task, make_task

BASELINES = ("data_parallel", "one_peer")
DEFAULT_TRAIN = local_run("diloco")
# Generous: a run that takes longer than this on one machine is stuck, not slow.
RUN_TIMEOUT_S = 3600.0

_OURS = "(ours only) "
FIELDS: Fields = {
    "config": "what was run: peers, task, task_config, runs (one TrainConfig per algorithm), baselines, "
    "baseline_train (the baselines' steps and inner optimizer when no algorithm runs), netns and bandwidth (the "
    "links every peer, DDP process and hivemind trainer sat behind; one_peer sends nothing and runs outside)",
    "methods": "one entry per method of --methods, keyed by its name (an algorithm, data_parallel or one_peer)",
    "methods.*.final_eval_loss": "held-out loss after training; for ours the mean over peers of each peer's "
    "local model (the inner parameters it trained, after its last sync)",
    "methods.*.final_eval_loss_per_peer": _OURS + "each peer's final held-out loss of its local model",
    "methods.*.local_eval_loss_spread": _OURS + "max - min of final_eval_loss_per_peer: how far apart the peers' "
    "local models end (0 when they end on the global parameters, as DiLoCo's do when --steps is a multiple "
    "of --sync-every; above 0 for Streaming DiLoCo, which mixes each synced fragment with local values)",
    "methods.*.identical_global_params": _OURS + "true when every peer ends with bit-identical global "
    "parameters (the synced ones: SHA-256 of each peer's global state); the local models may still differ",
    "methods.*.bytes_sent_per_peer": "bytes a peer sent for training (mean over peers): ours counted by the "
    "transport (all round attempts, not the state served to joiners); data_parallel computed, see bytes_method",
    "methods.*.state_sync_bytes_per_peer": _OURS + "bytes of state a peer served to joiners at the start "
    "(mean over peers; like DDP's initial broadcast)",
    "methods.*.peak_bytes_per_sync": "the most bytes one peer sent in one sync (data_parallel: in one step)",
    "methods.*.rounds": _OURS + "rounds committed per peer (mean over peers)",
    "methods.*.fp32_bytes_per_peer": _OURS + "the payload bytes the same committed rounds would carry per peer at "
    "fp32 (codec none, no framing): rounds x 2(N-1)/N x 4 B x the parameters a round carries (all of them; a "
    "fragment's share for algorithms that sync fragments, e.g. streaming)",
    "methods.*.bytes_fp32_over_method": _OURS + "fp32_bytes_per_peer / bytes_sent_per_peer: how many times fewer bytes "
    "than fp32 rounds (a little below 1 for codec none: the framing)",
    "methods.*.bytes_method": "(data_parallel and hivemind) how their bytes are computed: data_parallel's a ring "
    "all-reduce of the fp32 gradients every step, 2(N-1)/N x 4 B x parameters; hivemind's from the averaging rounds "
    "its peers logged",
    "methods.*.wall_s": "seconds from the first process started to the last peer finished (with --netns and "
    "--bandwidth, over the capped links: what the method's bytes cost in time); for data_parallel from its first "
    "process done with its imports, as our peers are forked from a server that did them already",
    "methods.*.wire_bytes_per_peer": "with --netns: what left a peer's namespace over its link while the method "
    "ran (its veth's counter, mean over peers): TCP/IP headers, the coordinator's calls and the state a joiner "
    "fetched included; for data_parallel what gloo really sent, for hivemind its DHT's traffic too",
    "congestion_control": "with --netns: the TCP congestion control of every namespace, the same for every "
    "method (a loss-based one unless the kernel allows none)",
    "methods.hivemind": "with --hivemind: hivemind.Optimizer with use_local_updates on the same task, shards, "
    "initial weights, inner optimizer, steps and device (--device), on 127.0.0.1; its peers average their "
    "parameters in the background once they together processed peers x batch x --sync-every samples (an epoch), "
    "as often as DiLoCo syncs",
    "methods.hivemind.method": "what ran",
    "methods.hivemind.version": "the hivemind version its trainers imported",
    "methods.hivemind.codec": "its averaging compression (--hivemind-codec; default the counterpart of diloco's "
    "--codec: none, fp16, int8 = Uniform8BitQuantization; any other codec: none)",
    "methods.hivemind.rounds": "averaging rounds a peer took part in (mean over peers; from its log)",
    "methods.hivemind.group_sizes": "group size -> how many peer-rounds averaged in a group of that size",
    "methods.hivemind.epochs": "the epoch its peers ended at (mean; one epoch per --sync-every steps of every peer)",
    "methods.hivemind.averaging_failures": "averaging rounds its peers logged as failed (all peers)",
    "methods.hivemind.state_loads": "times a peer found itself out of sync and downloaded the state from another "
    "(all peers; not counted in bytes_sent_per_peer)",
    "methods.hivemind.log_warnings": "the warnings and errors its peers logged, with how many logged each",
    "methods.hivemind.train_s": "the slowest peer's seconds from the common start of training to its last step's "
    "averaging applied (wall_s less the peers' start: imports, DHT, p2pd)",
    "methods.hivemind.loop_s": "the slowest peer's seconds of its training steps alone (train_s less the wait for "
    "the last epoch's averaging)",
    "entropy_floor": "the task's best possible loss (the source's entropy rate; null for tasks that do not know it)",
    "loss_diloco_over_data_parallel": "methods.diloco.final_eval_loss / methods.data_parallel's: below 1, "
    "DiLoCo ends with a lower loss than data-parallel",
    "bytes_data_parallel_over_diloco": "data_parallel's bytes_sent_per_peer / diloco's: how many times more "
    "bytes data-parallel sends",
    "wall_s_diloco_over_data_parallel": "methods.diloco.wall_s / methods.data_parallel's: below 1, DiLoCo's run "
    "is quicker (on capped links with --netns --bandwidth, mostly the bytes; on 127.0.0.1, the CPU)",
    "peak_bytes_streaming_over_diloco": "methods.streaming.peak_bytes_per_sync / diloco's: below 1, Streaming "
    "DiLoCo's largest sync is smaller",
    "loss_streaming_over_diloco": "methods.streaming.final_eval_loss / diloco's: below 1, Streaming ends lower",
    "loss_diloco_over_hivemind": "methods.diloco.final_eval_loss / methods.hivemind's: below 1, DiLoCo ends lower",
    "bytes_hivemind_over_diloco": "methods.hivemind.bytes_sent_per_peer / diloco's: how many times more bytes "
    "hivemind sends",
    "wall_s_diloco_over_hivemind": "methods.diloco.wall_s / methods.hivemind's: below 1, DiLoCo's run is quicker",
}


@dataclass(frozen=True)
class BenchConfig:
    """What to compare, at which size: one TrainConfig per algorithm (same loop settings), and the baselines."""

    peers: int = field(default=4, metadata={"help": "peers (and DDP processes) per method"})
    task: str = field(default=DEFAULT_TASK, metadata={"help": TASK_HELP})
    # The task options (add_task_arguments), in their own group of --help.
    task_config: TaskConfig = field(default_factory=TaskConfig, metadata={"cli": False})
    # runs and baselines are --methods on the command line, each run's settings the training options (bench_config).
    runs: tuple[TrainConfig, ...] = field(default=(DEFAULT_TRAIN, local_run("streaming")), metadata={"cli": False})
    baselines: tuple[str, ...] = field(default=BASELINES, metadata={"cli": False})
    # The baselines' loop settings (steps, inner lr, weight decay) when no algorithm runs.
    baseline_train: TrainConfig = field(default=DEFAULT_TRAIN, metadata={"cli": False})
    # --hivemind: an interpreter with hivemind, to train the task with hivemind.Optimizer as one more method.
    hivemind_python: str | None = field(
        default=None,
        metadata={"help": "also train with hivemind.Optimizer (local updates), run by PYTHON (an interpreter with "
                  "hivemind; default: this one)", "flag": "hivemind", "const": sys.executable, "metavar": "PYTHON"},
    )
    # parse: "none" is a compression here (NoCompression), not None.
    hivemind_codec: str | None = field(
        default=None,
        metadata={"help": "hivemind's averaging compression (default: the counterpart of diloco's --codec, else none)",
                  "choices": HIVEMIND_CODECS, "parse": str, "metavar": "{" + ",".join(HIVEMIND_CODECS) + "}"},
    )
    # --netns: every process in its own network namespace; --bandwidth: their links capped (e.g. "100mbit").
    netns: bool = field(
        default=False, metadata={"help": "every process in its own network namespace, as on separate hosts (root)"}
    )
    bandwidth: str | None = field(
        default=None,
        metadata={"help": "with --netns: cap every peer's uplink and downlink, e.g. 100mbit (default: uncapped)"},
    )

    def __post_init__(self) -> None:
        unknown = [b for b in self.baselines if b not in BASELINES]
        if unknown:
            raise ConfigError(f"unknown baseline {unknown[0]!r}: use {', '.join(BASELINES)}")
        require(self.peers >= 1, f"--peers must be at least 1, got {self.peers}")
        require(bool(self.runs or self.baselines), f"nothing to run; {_choose()}")
        names = [t.algorithm for t in self.runs] + list(self.baselines)
        twice = sorted({n for n in names if names.count(n) > 1})
        require(not twice, f"method {twice[0] if twice else ''!r} is given twice in --methods; name each once")
        require(
            all(t.duration_s is None for t in self.runs),
            "bench diloco compares the methods at equal steps: give --steps, not --duration",
        )
        require(self.hivemind_codec is None or self.hivemind_python is not None,
                "--hivemind-codec chooses hivemind's compression: give --hivemind too")
        require(self.bandwidth is None or self.netns,
                "--bandwidth caps the links of the network namespaces: give --netns too")
        if self.bandwidth is not None:
            parse_bandwidth(self.bandwidth)  # ConfigError saying how to write a rate

    @property
    def loop(self) -> TrainConfig:
        """The loop settings the baselines share with the algorithms (steps, inner lr, weight decay)."""
        return self.runs[0] if self.runs else self.baseline_train


def _choose() -> str:
    return (f"choose from {', '.join(algorithm_names())} (registered algorithms) and {', '.join(BASELINES)} "
            "(baselines), comma-separated")


def check_config(config: BenchConfig) -> None:
    """ConfigError for anything a child process would refuse: run in the parent before any process starts."""
    check_task(config.task, config.task_config)  # a bad --task, --data or model size, said in one line
    for train in (*config.runs, config.loop):
        resolve_device(train.device)  # a --device this machine lacks (DeviceUnavailable), said in one line
    if config.netns:
        check_available()  # not root, no iproute2 or tbf: NetnsUnavailable, said in one line


def _ours_detail(procs: list, peers: int, steps: int) -> str:
    """How far a run of ours is, from its peers' events: joined peers, committed rounds, steps."""
    procs = list(procs)
    joined = sum(any(e["event"] == "joined" for e in list(p.events)) for p in procs)
    if joined < peers:
        return f"{joined}/{peers} peers joined"
    rounds = max(sum(e["event"] == "committed" for e in list(p.events)) for p in procs)
    step = max((e.get("step") or 0 for p in procs for e in list(p.events)), default=0)
    return f"round {rounds}, step {step}/{steps}"


def run_ours(config: BenchConfig, train: TrainConfig, progress: Progress | None = None, label: str = "",
             devices: Sequence[str] = (), links: CappedNetwork | None = None) -> dict:
    """Train with a coordinator and N ``loconet peer`` processes; collect their events.

    ``devices``: peer r's ``--device`` is ``devices[r]`` (one GPU per peer); empty: ``train.device`` for all.
    ``links``: the namespaces the coordinator and peer0, peer1, ... run in (None: all on 127.0.0.1).
    """
    from peer.harness.processes import CoordinatorProc, Proc, stop_all
    from peer.trainoptions import task_args, train_args

    progress = progress or Progress("diloco", enabled=False)
    algorithm = train.algorithm
    tmp = bench_log_dir(f"diloco-{algorithm}")
    run = f"bench-{algorithm}"
    peers: list = []
    progress.begin(label or algorithm, lambda: _ours_detail(peers, config.peers, train.steps))
    coordinator = CoordinatorProc(tmp / "coordinator.log", run, 0, "--join-timeout", "10",
                                  "--min-peers", str(config.peers), "--startup-grace", "0", "--dashboard-port", "-1",
                                  *_host_args(links, "coordinator"),
                                  netns=links.netns("coordinator") if links else None)
    started = time.monotonic()
    try:
        for rank in range(config.peers):
            args = [sys.executable, "-m", "peer.cli", "peer", "--coordinator", coordinator.address, "--run", run,
                    "--name", f"peer{rank}", "--events", "--no-progress", "--task", config.task,
                    *task_args(config.task_config), "--shard", f"{rank}/{config.peers}", *train_args(train),
                    "--host-id", f"{run}-peer{rank}",  # peers on separate machines: nothing shared through memory
                    *(["--device", devices[rank]] if devices else []), *_host_args(links, f"peer{rank}")]
            peers.append(Proc(args, tmp / f"peer{rank}.log", netns=links.netns(f"peer{rank}") if links else None))
        finished = [p.wait_event(lambda e: e["event"] == "finished", RUN_TIMEOUT_S) for p in peers]
        wall = time.monotonic() - started
        per_sync = [
            e["bytes"] for p in peers for e in p.events if e["event"] == "committed" and e.get("contributed", True)
        ]
    finally:
        stop_all(peers)
        coordinator.stop()
    shutil.rmtree(tmp, ignore_errors=True)  # a failure raised above and kept the logs its message names
    losses = [f["eval_loss"] for f in finished]
    result = {
        "final_eval_loss": statistics.mean(losses),
        "final_eval_loss_per_peer": losses,
        "local_eval_loss_spread": max(losses) - min(losses),
        # Training traffic: what peers sent in rounds (all attempts), without the state served to joiners.
        "bytes_sent_per_peer": statistics.mean(f["bytes_sent"] - f["bytes_served"] for f in finished),
        "state_sync_bytes_per_peer": statistics.mean(f["bytes_served"] for f in finished),
        "peak_bytes_per_sync": max(per_sync) if per_sync else 0,
        "rounds": statistics.mean(f["rounds"] for f in finished),
        # The digest hashes the global (synced) parameters, not a peer's local model.
        "identical_global_params": len({f["digest"] for f in finished}) == 1,
        "wall_s": wall,
    }
    progress.end(_done(result))
    return result


def _host_args(links: CappedNetwork | None, name: str) -> list[str]:
    """A process's --host: its address in its namespace (none on 127.0.0.1, the default)."""
    return ["--host", links.ip(name)] if links is not None else []


def _done(result: dict, mb_digits: int = 2) -> str:
    """A method's progress line when it ends: its eval loss, the bytes a peer sent, and its wall_s (the line's own
    "done in" counts the processes' start too, which wall_s leaves out: probe K saw 9.6 s beside wall_s 4.1 s)."""
    return (f"eval loss {result['final_eval_loss']:.4f}, {result['bytes_sent_per_peer'] / 1e6:.{mb_digits}f} MB sent "
            f"per peer, wall_s {result['wall_s']:.1f} s")


def fp32_figures(result: dict, train: TrainConfig, peers: int, numel: int) -> dict:
    """fp32_bytes_per_peer and bytes_fp32_over_method of one of our methods (see FIELDS)."""
    per_round = numel / getattr(train.options, "fragments", 1)  # streaming's rounds carry one fragment each
    fp32 = result["rounds"] * 2 * (peers - 1) / peers * 4 * per_round
    return {"fp32_bytes_per_peer": fp32, "bytes_fp32_over_method": fp32 / max(result["bytes_sent_per_peer"], 1)}


def _ddp_worker(rank: int, world: int, port: int, config: BenchConfig, out, step, place: Placement | None,
                store_host: str) -> None:
    """One DDP process; place: the namespace it runs in (None: on 127.0.0.1); the store at store_host:port."""
    import datetime

    if place is not None:
        from peer.harness.netns.commands import enter_netns

        enter_netns(place.netns)  # before any socket: gloo's connections go over this namespace's capped link
    import torch
    import torch.distributed as dist

    from collectives.allocator import tune_malloc

    # The run's time counts from here: our peers are forked from a server that has done its imports already.
    imported_at = time.time()
    tune_malloc()
    torch.set_num_threads(1)
    # gloo's own connections listen on 127.0.0.1 only, or on the namespace's one interface.
    use_loopback_for_gloo(place.interface if place is not None else LOOPBACK_INTERFACE)
    store = dist.TCPStore(store_host, port, world, is_master=False, timeout=datetime.timedelta(seconds=120))
    dist.init_process_group("gloo", store=store, rank=rank, world_size=world)
    task = make_task(config.task, config.task_config)
    # On the CPU whatever --device says: gloo is the process group every machine has, and it reduces CUDA
    # tensors through host buffers; NCCL, DDP's GPU backend, refuses two processes on one GPU. Its bytes are
    # computed (a ring all-reduce's), so they are the same on any device.
    model = torch.nn.parallel.DistributedDataParallel(task.build_model())
    loop = config.loop
    opt = torch.optim.AdamW(model.parameters(), lr=loop.resolved_inner_lr, weight_decay=loop.weight_decay)
    batches = task.batches(rank, world)
    started = time.monotonic()
    for k in range(loop.steps):
        task.loss(model, next(batches)).backward()
        opt.step()
        opt.zero_grad()
        if rank == 0:
            step.value = k + 1  # read by the parent's progress line
    wall = time.monotonic() - started
    numel = sum(p.numel() for p in model.parameters())
    result = {"wall_s": wall, "numel": numel, "imported_at": imported_at}
    if rank == 0:
        result["final_eval_loss"] = task.evaluate(model.module)
    dist.destroy_process_group()
    out.put((rank, result))


def _gather_results(procs: list, logs: list, out, timeout_s: float) -> dict[int, dict]:
    """Every worker's (rank, result) from out; ChildFailed naming a worker that exits without one."""
    results: dict[int, dict] = {}
    deadline = time.monotonic() + timeout_s
    exited_clean: dict[int, float] = {}
    while len(results) < len(procs):
        try:
            rank, result = out.get(timeout=0.5)
            results[rank] = result
            continue
        except queue.Empty:
            pass
        now = time.monotonic()
        for rank, p in enumerate(procs):
            if rank in results or p.exitcode is None:
                continue
            # Exit code 0 means its result is on the way (the queue flushes at exit): give it a moment.
            if p.exitcode != 0 or now - exited_clean.setdefault(rank, now) > 10:
                raise child_failed(f"data_parallel worker {rank}", p.exitcode, logs[rank], "without a result")
        if now > deadline:
            raise ChildFailed(f"data_parallel workers gave no result within {timeout_s:g} s (logs: {logs[0].parent})")
    return results


def run_data_parallel(config: BenchConfig, progress: Progress | None = None, label: str = "data_parallel",
                      links: CappedNetwork | None = None) -> dict:
    """Synchronous data-parallel training: torch DDP on gloo over N local processes (links: in peer0, peer1...'s
    namespaces, the store on the bridge)."""
    import datetime

    progress = progress or Progress("diloco", enabled=False)
    ctx = mp.get_context("spawn")
    log_dir = bench_log_dir("diloco-data_parallel")
    logs = [log_dir / f"worker{r}.log" for r in range(config.peers)]
    # torch's own store server would listen on every interface: this one listens on one address only, 127.0.0.1
    # or the namespaces' bridge.
    store_host = links.gateway if links is not None else LOOPBACK
    store = loopback_store(config.peers + 1, datetime.timedelta(seconds=120), host=store_host)
    places = [links.placement(name) if links is not None else None for name in peer_names(config.peers)]
    out = ctx.Queue()
    step = ctx.Value("i", 0, lock=False)
    steps = config.loop.steps
    progress.begin(label, lambda: f"step {step.value}/{steps}" if step.value else f"starting {config.peers} processes")
    procs = [
        ctx.Process(target=spawned_entry, args=(str(logs[r]), _ddp_worker, r, config.peers, store.port, config, out,
                                                step, places[r], store_host))
        for r in range(config.peers)
    ]
    for p in procs:
        p.start()
    results: dict[int, dict] = {}
    try:
        results = _gather_results(procs, logs, out, RUN_TIMEOUT_S)
        finished_at = time.time()
    finally:
        for p in procs:
            # With every result in, a worker is on its way out; on a failure or an interrupt the others would
            # train on to the end (or wait for a dead peer): they are killed at once.
            if len(results) == len(procs):
                p.join(timeout=30)
            if p.is_alive():
                p.kill()
                p.join(timeout=10)
    # From the first worker done with its imports (as our peers start) to the last result.
    wall = finished_at - min(r["imported_at"] for r in results.values())
    shutil.rmtree(log_dir, ignore_errors=True)  # a failure raised above and kept the logs its message names
    numel = results[0]["numel"]
    per_step = 2 * (config.peers - 1) / config.peers * 4 * numel
    result = {
        "final_eval_loss": results[0]["final_eval_loss"],
        "bytes_sent_per_peer": per_step * steps,
        "peak_bytes_per_sync": per_step,
        "bytes_method": "ring all-reduce of fp32 gradients every step: 2(N-1)/N x 4 B x parameters",
        "wall_s": wall,
    }
    progress.end(_done(result, mb_digits=1))
    return result


def run_one_peer(config: BenchConfig, progress: Progress | None = None, label: str = "one_peer") -> dict:
    """One peer training alone (AdamW) on peer 0's data for the same number of steps."""
    import torch

    progress = progress or Progress("diloco", enabled=False)
    torch.set_num_threads(1)
    task = make_task(config.task, config.task_config)
    loop = config.loop
    device = resolve_device(loop.device)
    model = place_model(task.build_model(), device)
    opt = torch.optim.AdamW(model.parameters(), lr=loop.resolved_inner_lr, weight_decay=loop.weight_decay)
    batches = task.batches(0, config.peers)
    done = [0]
    progress.begin(label, lambda: f"step {done[0]}/{loop.steps}")
    started = time.monotonic()
    for _ in range(loop.steps):
        task.loss(model, move_batch(next(batches), device)).backward()
        opt.step()
        opt.zero_grad()
        done[0] += 1
    result = {"final_eval_loss": task.evaluate(model), "bytes_sent_per_peer": 0, "peak_bytes_per_sync": 0,
              "wall_s": time.monotonic() - started}
    progress.end(f"eval loss {result['final_eval_loss']:.4f}, wall_s {result['wall_s']:.1f} s")
    return result


def run(config: BenchConfig, progress: Progress | None = None) -> dict:
    """Run every algorithm of config.runs and every baseline; return the report."""
    from collectives.allocator import tune_malloc

    progress = progress or Progress("diloco", enabled=False)
    check_config(config)
    tune_malloc()
    report: dict = {"config": asdict(config), "methods": {}}
    task = make_task(config.task, config.task_config)
    report["entropy_floor"] = task.entropy_floor
    # Before any process: a missing hivemind, or one that cannot build the task, is a usage error.
    hivemind = None
    if config.hivemind_python is not None:
        job = hivemind_job(config)
        hivemind = (job, hivemind_training.probe(job))
    numel = sum(p.numel() for p in task.build_model().parameters() if p.requires_grad)
    total = len(config.runs) + len(config.baselines) + (hivemind is not None)
    names = peer_names(config.peers)
    bps = parse_bandwidth(config.bandwidth) if config.bandwidth else None
    with capped_network(["coordinator", *names], names, bps, progress) if config.netns \
            else contextlib.nullcontext(None) as links:

        def on_links(method: Callable[..., dict], *args, **kwargs) -> dict:
            """Run a method; with namespaces, add what its peers' links carried (wire_bytes_per_peer)."""
            with link_traffic(links, names) as sent:
                result = method(*args, **kwargs)
            if sent:
                result["wire_bytes_per_peer"] = statistics.mean(sent)
            return result

        for i, train in enumerate(config.runs, 1):
            label = f"{train.algorithm} [{i}/{total}]"
            result = on_links(run_ours, config, train, progress, label, links=links)
            report["methods"][train.algorithm] = {**result, **fp32_figures(result, train, config.peers, numel)}
        for i, name in enumerate(config.baselines, len(config.runs) + 1):
            label = f"{name} [{i}/{total}]"
            # One peer alone sends nothing: no link to run it behind.
            report["methods"][name] = (on_links(run_data_parallel, config, progress, label, links)
                                       if name == "data_parallel" else run_one_peer(config, progress, label))
        if hivemind is not None:
            report["methods"]["hivemind"] = on_links(
                run_hivemind, *hivemind, progress, f"hivemind [{total}/{total}]", links
            )
        if links is not None:
            report["congestion_control"] = links.congestion_control
    m = report["methods"]
    if "diloco" in m and "data_parallel" in m:
        report["loss_diloco_over_data_parallel"] = (
            m["diloco"]["final_eval_loss"] / m["data_parallel"]["final_eval_loss"]
        )
        report["bytes_data_parallel_over_diloco"] = (
            m["data_parallel"]["bytes_sent_per_peer"] / max(m["diloco"]["bytes_sent_per_peer"], 1)
        )
        report["wall_s_diloco_over_data_parallel"] = m["diloco"]["wall_s"] / m["data_parallel"]["wall_s"]
    if "diloco" in m and "streaming" in m:
        report["peak_bytes_streaming_over_diloco"] = (
            m["streaming"]["peak_bytes_per_sync"] / max(m["diloco"]["peak_bytes_per_sync"], 1)
        )
        report["loss_streaming_over_diloco"] = m["streaming"]["final_eval_loss"] / m["diloco"]["final_eval_loss"]
    if "diloco" in m and "hivemind" in m:
        report["loss_diloco_over_hivemind"] = m["diloco"]["final_eval_loss"] / m["hivemind"]["final_eval_loss"]
        report["bytes_hivemind_over_diloco"] = (
            m["hivemind"]["bytes_sent_per_peer"] / max(m["diloco"]["bytes_sent_per_peer"], 1)
        )
        report["wall_s_diloco_over_hivemind"] = m["diloco"]["wall_s"] / m["hivemind"]["wall_s"]
    return report


def hivemind_job(config: BenchConfig) -> hivemind_training.HivemindTraining:
    """hivemind's run of the same task, steps, inner optimizer and syncing interval as the DiLoCo run (the first
    algorithm's when no diloco runs), averaging with the counterpart of its codec."""
    loop = next((t for t in config.runs if t.algorithm == "diloco"), config.loop)
    options = loop.options
    sync_every = getattr(options, "sync_every", None) or LOCAL_SYNC_EVERY
    codec = CodecConfig.parse(getattr(options, "codec", "none")).name
    return hivemind_training.HivemindTraining(
        python=str(config.hivemind_python), peers=config.peers, task=config.task, task_config=config.task_config,
        steps=loop.steps, sync_every=sync_every, inner=loop.inner, inner_lr=loop.resolved_inner_lr,
        weight_decay=loop.weight_decay, codec=counterpart(codec, config.hivemind_codec),
        device=str(resolve_device(loop.device)), whole_s=RUN_TIMEOUT_S,
    )


def run_hivemind(job: hivemind_training.HivemindTraining, version: str, progress: Progress | None = None,
                 label: str = "hivemind", links: CappedNetwork | None = None) -> dict:
    """hivemind.Optimizer (local updates) on the same task: N trainers on 127.0.0.1, or in peer0, peer1...'s
    namespaces."""
    progress = progress or Progress("diloco", enabled=False)
    progress.begin(label, lambda: f"{job.peers} hivemind peers training")
    with on_hosts(links, peer_names(job.peers)) as (prefixes, hosts):
        result = hivemind_training.run(job, version, prefixes, hosts)
    progress.end(_done(result))
    return result


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of this benchmark (the training options apply to every algorithm that has them); the fields' meaning."""
    from peer.trainoptions import add_task_arguments, add_train_arguments

    add_bench_options(parser, BenchConfig)
    parser.add_argument(
        "--methods", default=",".join(["diloco", "streaming", *BASELINES]),
        help=f"comma-separated: registered algorithms ({', '.join(algorithm_names())}) and {', '.join(BASELINES)}",
    )
    add_task_arguments(parser)
    add_train_arguments(parser, DEFAULT_TRAIN)
    describe_report(parser, FIELDS)


def _stray_options(ns: argparse.Namespace, chosen: list[str]) -> list[str]:
    """Algorithm options given on the command line that none of the chosen algorithms has."""
    every = {o.flag for algo in algorithms() for o in options_of(algo.config)}
    wanted = {o.flag for name in chosen for o in options_of(get_algorithm(name).config)}
    return sorted(f for f in every - wanted if getattr(ns, f.replace("-", "_"), None) is not None)


def bench_config(ns: argparse.Namespace) -> BenchConfig:
    """The BenchConfig the options describe, checked: ConfigError for an unknown method, task, codec, ..."""
    from peer.trainoptions import read_task_config, read_train_config

    methods = comma_list(ns.methods)
    require(bool(methods), f"--methods is empty; {_choose()}")
    require(ns.algorithm == DEFAULT_TRAIN.algorithm,
            f"bench diloco runs every method of --methods; name {ns.algorithm!r} there instead of in --algorithm")
    known = [*algorithm_names(), *BASELINES]
    for m in methods:
        require(m in known, f"unknown method {m!r} in --methods; {_choose()}")
    chosen = [m for m in methods if m not in BASELINES]
    stray = _stray_options(ns, chosen)
    require(not stray, f"--{stray[0] if stray else ''} applies to none of the methods {', '.join(methods)}; "
            "drop it, or add a method that has it to --methods")
    base = {t.algorithm: t for t in BenchConfig.runs}
    runs = tuple(read_train_config(ns, base=base.get(m, DEFAULT_TRAIN), algorithm=m, strict=False) for m in chosen)
    config = replace(
        read_options(BenchConfig, ns), task_config=read_task_config(ns), runs=runs,
        baselines=tuple(m for m in methods if m in BASELINES),
        baseline_train=read_train_config(ns, base=DEFAULT_TRAIN, strict=False),
    )
    check_config(config)
    return config


def main(ns: argparse.Namespace) -> int:
    """Check the arguments, run, and print the report (progress on stderr)."""
    config = bench_config(ns)  # every check before the first process starts
    with progress_for("diloco", getattr(ns, "quiet", 0)) as progress:
        report = run(config, progress)
    # config and methods are nested dicts: their values are printed as indented JSON, one line per field.
    print_report(report, ns.json, fmt=lambda value: json.dumps(value, indent=2))
    return 0
