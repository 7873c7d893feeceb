"""hivemind's training as a baseline of ``loconet bench diloco`` (``--hivemind``).

hivemind's own answer to DiLoCo is ``hivemind.Optimizer`` with ``use_local_updates``: every peer steps its inner
optimizer on each batch, and once the peers together have processed ``target_batch_size`` samples they average
their parameters in the background (no outer optimizer: the average replaces the parameters). Here it trains the
benchmark's task, from the same initial weights, on the same shards and batches, with the same inner optimizer and
steps, and averages as often as loconet's run syncs (``target_batch_size`` = peers x batch x ``--sync-every``).
Its averaging compression is the counterpart of the DiLoCo run's ``--codec`` (``hivemind_baseline.counterpart``).

Its workers (``hivemind_trainer.py``) run under the interpreter given, with loconet's folder on ``PYTHONPATH``
for the task code; hivemind is not a dependency of loconet.
"""

from __future__ import annotations

import json
import os
import statistics
import time
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path

from peer.bench.hivemind_baseline import BYTES_PER_VALUE, common_warnings, probe_command, run_commands
from peer.tasks.base import TaskConfig

TRAINER = "peer.bench.hivemind_trainer"
# loconet's folder: the trainer imports the task code (peer.tasks) from it.
ROOT = Path(__file__).resolve().parents[2]
METHOD = "hivemind.Optimizer, use_local_updates: inner steps, parameters averaged every epoch in the background"
BYTES_METHOD = ("computed: for every averaging round a peer logged (hivemind exposes no counters), its butterfly's "
                "payload 2 (K-1)/K x parameters x bytes per value, K the round's group size")


@dataclass(frozen=True)
class HivemindTraining:
    """What every hivemind trainer of one run is given (timeout_s: per averaging round; whole_s: the whole run)."""

    python: str
    peers: int
    task: str
    task_config: TaskConfig
    steps: int
    sync_every: int
    inner: str
    inner_lr: float
    weight_decay: float
    codec: str
    device: str = "cpu"
    timeout_s: float = 60.0
    whole_s: float = 3600.0


def trainer_env() -> dict[str, str]:
    """This process's environment with loconet's folder first on PYTHONPATH."""
    paths = [str(ROOT), *filter(None, os.environ.get("PYTHONPATH", "").split(os.pathsep))]
    return {**os.environ, "PYTHONPATH": os.pathsep.join(paths)}


def _common(job: HivemindTraining) -> list[str]:
    return [job.python, "-m", TRAINER, "--task", job.task, "--task-config", json.dumps(asdict(job.task_config)),
            "--codec", job.codec]


def trainer_argv(job: HivemindTraining, rank: int, meet: Path, host: str = "127.0.0.1") -> list[str]:
    """The command line of one trainer, serving on host."""
    return [
        *_common(job), "--rank", str(rank), "--peers", str(job.peers), "--steps", str(job.steps),
        "--sync-every", str(job.sync_every), "--inner", job.inner, "--inner-lr", repr(job.inner_lr),
        "--weight-decay", repr(job.weight_decay), "--device", job.device, "--meet", str(meet),
        "--timeout", repr(job.timeout_s), "--host", host,
    ]


def probe(job: HivemindTraining) -> str:
    """hivemind's version, once its interpreter has built the task's model and round-tripped a tensor through the
    compression; ConfigError saying what failed and how to install hivemind when it cannot."""
    return probe_command([*_common(job), "--probe"], f"hivemind's training of {job.task} ({job.codec} averaging)",
                         trainer_env())


def run(job: HivemindTraining, version: str, prefixes: list[list[str]], hosts: list[str]) -> dict:
    """Train with hivemind and summarise its peers' reports: trainer r's argv behind prefixes[r] (e.g. ``ip netns
    exec``), serving on hosts[r]."""
    started = time.monotonic()
    reports = run_commands(lambda rank, meet: trainer_argv(job, rank, meet, hosts[rank]), job.peers, job.whole_s,
                           prefixes, env=trainer_env())
    return summarise(job, version, reports, time.monotonic() - started)


def round_bytes(group: int, numel: int, codec: str) -> float:
    """Bytes one peer sends in an averaging round of a group of that size (scales left out)."""
    return 2 * (group - 1) / group * BYTES_PER_VALUE[codec] * numel if group > 1 else 0.0


def summarise(job: HivemindTraining, version: str, reports: list[dict], wall_s: float) -> dict:
    """The method's entry in the report, with the fields loconet's methods have where they mean the same."""
    losses = [r["final_eval_loss"] for r in reports]
    numel = reports[0]["numel"]
    sent = [sum(round_bytes(k, numel, job.codec) for k in r["averaged_groups"]) for r in reports]
    per_round = [round_bytes(k, numel, job.codec) for r in reports for k in r["averaged_groups"]]
    return {
        "method": METHOD,
        "version": version,
        "codec": job.codec,
        "final_eval_loss": statistics.mean(losses),
        "final_eval_loss_per_peer": losses,
        "local_eval_loss_spread": max(losses) - min(losses),
        "bytes_sent_per_peer": statistics.mean(sent),
        "bytes_method": BYTES_METHOD,
        "peak_bytes_per_sync": max(per_round, default=0.0),
        "rounds": statistics.mean(len(r["averaged_groups"]) for r in reports),
        "group_sizes": dict(sorted(Counter(k for r in reports for k in r["averaged_groups"]).items())),
        "epochs": statistics.mean(r["epochs"] for r in reports),
        "averaging_failures": sum(r["averaging_failures"] for r in reports),
        "state_loads": sum(r["state_loads"] for r in reports),
        "log_warnings": common_warnings(reports),
        "wall_s": wall_s,
        # wall_s includes each peer's start (imports, its DHT and p2pd daemon); this is the training loop alone.
        "train_s": max(r["train_s"] for r in reports),
        "loop_s": max(r["loop_s"] for r in reports),
    }
