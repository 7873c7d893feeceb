"""Sequential gradient coding on real rounds: ``seq-sgc``, jobs decoded within T rounds of bursty stragglers.

Krishnan, Ebrahimi and Khisti (ICLR 2023) spend a delay of T rounds to lower the compute that plain gradient
coding needs against (B, W, λ)-bursty stragglers. ``collectives/gradcoding/seqcoding.py`` has the schemes (``gc``,
``sr-sgc``, ``m-sgc``); this module runs them, one round per ``train_step``:

- Job j is the gradient, at the global parameters w_j as they were when round j started, over all
  ``scheme.partitions`` partitions of step j's data (partition p's batch: ``data.loss(model, p, P, j)``).
  Every worker keeps w_j and a running partial sum for each job in flight (at most T+1).
- In round t, worker i computes its tasks ``scheme.assign(t)[i]`` (each a combination of one job's
  partition gradients at that job's w_j) before asking for the round, so the quorum forms from the
  workers that are ready. A worker the round went on without stops computing (``superseded``) and
  applies the round's committed result instead (``CaughtUp``).
- Once the round's members are known (``prepare``), a member weighs its task results by the round's
  coefficients ``scheme.combine(t, survivors)`` into one segment per job in flight (job t-k in segment k,
  T+1 segments), and adds a header: the roster size n and a 1 in its own roster slot. The ``sum`` of the
  members' messages is the round's value: every job's contribution of this round, the survivors, and n.
- Applying a round (``_apply``, also for a round this worker was late for) reads the survivors from the
  slots, feeds ``scheme.observe``, adds each segment into its job's partial sum, and applies every job the
  scheme reports complete (partial sum / P, with the outer optimizer: plain SGD by default), in job order.
  A job the scheme reports lost (its stragglers broke the model) is discarded, never applied.

This is SGD with a delay of at most T: job j is applied once complete (in round j+T for M-SGC with
coded groups, round j or j+B for SR-SGC, round j for GC), after the jobs before it that completed
earlier. Every state change happens in ``_apply`` from the committed value, so the workers stay
bit-identical, late ones included.

The roster (n workers) is fixed for a scheme. When a round's roster has another size (a join, a leave),
its members compute for a fresh scheme built for the new n, and applying the round rebuilds the scheme
and drops the jobs in flight (``jobs_dropped``): their partial sums were coded over the old n. A late
worker learns n from the header. A roster of the same size with other peers keeps the scheme: any worker
can compute any slot's tasks (each keeps every w_j), so only the slots' owners change.

Joiners get the whole state (``snapshot``): the global parameters, the jobs in flight (their w_j and
partial sums, as extra snapshot tensors), the round counter, and the scheme's state (``state_dict``: the
stragglers of its last W rounds, the outcomes of the jobs in flight, the repeats and chunks planned), from
which the scheme goes on exactly as the others'. Until 2026-12-05 the state carried the scheme's whole
straggler history, replayed at a join (a fraction of a millisecond per round): a run's state grew with its
rounds, and past about 200,000 rounds went over the 1 MiB a state's metadata may be. A checkpoint of then
still loads that way.

Used from ``loconet peer --algorithm seq-sgc --scheme m-sgc --burst 1 --window 2 --lam 1`` with the
coordinator's ``--quorum grace:1`` (its λ must be the run's), or from Python with ``train_step(data)``.
The rounds carry the survivors and n alongside the gradients, so their codec must be lossless (``none``).
"""

from __future__ import annotations

import logging
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from fractions import Fraction
from functools import partial
from typing import Any, ClassVar

import numpy as np
import torch

from collectives.codecs import CodecConfig
from collectives.errors import ConfigError, ProtocolError, QuorumMismatch
from collectives.gradcoding.gradcodes import AUTO, CYCLIC, FRC
from collectives.gradcoding.seqcoding import SCHEMES, SequentialScheme, gradcode, make_scheme
from collectives.gradcoding.seqrounds import checked_workers
from collectives.gradcoding.stragglermodel import BurstyModel
from collectives.membership.roundplan import RoundPlan
from collectives.reduce.parts import flatten, unflatten_like
from collectives.statesync import StateSnapshot
from optimizers.coded import (
    CodedSGD,
    PartitionData,
    StepRoundConfig,
    StepSuperseded,
    plan_roster,
    policy_argument,
    policy_name,
)
from optimizers.outer import OuterOptimizer
from optimizers.statemeta import meta_int, meta_ints, meta_optional_int
from optimizers.syncrecord import RECENT_SYNCS

log = logging.getLogger(__name__)

# A round's header: the roster size, then one slot per roster index (1 for each member): at most this many workers.
MAX_SLOTS = 64
HEADER = 1 + MAX_SLOTS
# Snapshot tensors of the jobs in flight: seq/job/<j>/params (w_j, fp32) and seq/job/<j>/partial (fp64).
JOB_PREFIX = "seq/job/"
# The plain codes a scheme may use (explicit frc is refused: see SeqSGCConfig.__post_init__).
SEQ_CODE_KINDS = (AUTO, CYCLIC)


@dataclass(frozen=True)
class SeqSGCConfig(StepRoundConfig):
    """Sequential gradient coding: a (B, W, λ)-bursty straggler model, a scheme, one round per step."""

    TAG: ClassVar[str] = "seq-sgc"

    codec: str = field(default="none", metadata={"help": "codec of the rounds: none (lossless: the rounds carry who "
                                                          "survived), optionally +zstd"})
    scheme: str = field(default="m-sgc", metadata={"help": "sequential coding scheme: m-sgc (multiplexed), sr-sgc "
                                                            "(selective repeat), gc (plain gradient coding)",
                                                    "choices": SCHEMES})
    burst: int = field(default=1, metadata={"help": "B of the (B, W, lambda) straggler model: longest burst of rounds "
                                                    "a worker straggles"})
    window: int = field(default=2, metadata={"help": "W of the straggler model: window of rounds with at most one "
                                                     "burst per worker and --lam distinct stragglers"})
    lam: int = field(default=1, metadata={"help": "lambda of the straggler model: distinct stragglers per window "
                                                  "(the coordinator needs --quorum grace:lambda)"})
    code: str = field(default="auto", metadata={"help": "the plain code inside the scheme: auto (fractional "
                                                        "repetition whenever s+1 divides the roster, else cyclic) "
                                                        "or cyclic",
                                                "choices": SEQ_CODE_KINDS})

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.scheme not in SCHEMES:
            raise ConfigError(f"scheme must be one of {', '.join(SCHEMES)}, got {self.scheme!r}")
        for name in ("burst", "window", "lam"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise ConfigError(f"{name} must be a whole number >= 0, got {value!r}")
        if not 1 <= self.burst < self.window:
            raise ConfigError(f"the straggler model needs 1 <= burst < window, got burst={self.burst}, "
                              f"window={self.window}")
        if self.code == FRC:
            # auto is frc on every roster frc can be built over; a roster that a join or a leave leaves
            # undivided would make every round refused, since grace rounds have no one to sit out.
            raise ConfigError("seq-sgc's roster changes with joins and leaves, and fractional repetition needs s+1 "
                              "to divide it: use --code auto (frc whenever it divides, cyclic otherwise) or "
                              "--code cyclic")
        if self.code not in SEQ_CODE_KINDS:
            raise ConfigError(f"code must be auto or cyclic, got {self.code!r}")
        if CodecConfig.parse(self.codec).name != "none":
            raise ConfigError(f"seq-sgc rounds carry who survived alongside the gradients, so their codec must be "
                              f"lossless: use none (or none+zstd), not {self.codec!r}")

    @property
    def delay(self) -> int:
        """T: a job started in round j is complete (or lost) by the end of round j+T."""
        return {"gc": 0, "sr-sgc": self.burst, "m-sgc": self.window - 2 + self.burst}[self.scheme]

    def expected_quorum(self) -> str | None:
        """The quorum policy this algorithm's rounds need."""
        return f"grace:{self.lam}"

    def round_settings(self) -> tuple[str, ...]:
        """With the outer step's, the scheme and its straggler model: every worker must encode and decode alike."""
        return (*super().round_settings(), f"scheme {self.scheme}", f"burst {self.burst}", f"window {self.window}",
                f"lambda {self.lam}", f"code {self.code}")

    def quorum_problem(self, policy: str) -> str:
        """Any policy but ``grace:lambda`` (this lambda) cannot serve: the scheme counts on its stragglers."""
        if policy_name(policy) != "grace" or policy_argument(policy) != str(self.lam):
            return (
                f"seq-sgc --lam {self.lam} needs the coordinator's --quorum grace:{self.lam}, "
                f"and the run's is {policy!r}"
            )
        return ""


@dataclass(frozen=True)
class SeqState:
    """A state's seq-sgc part, read and checked (``_checked``)."""

    rounds: int
    base: int
    scheme: SequentialScheme | None
    jobs: list[int]
    applied: int
    lost: int
    dropped: int


def _history_of(meta: dict, key: str, n: int) -> list[set[int]]:
    """meta[key] as a list of sets of worker indices in [0, n) (an old state's straggler history)."""
    value = meta.get(key)
    if not isinstance(value, list):
        raise ConfigError(f"the run's state's {key!r} must be lists of worker indices below {n}, got {value!r:.60}")
    return [checked_workers(s, n, key) for s in value]  # as a scheme's own state's stragglers are checked


@dataclass
class Job:
    """A job in flight: the global parameters it is computed at, and the sum of its coded contributions so far."""

    params: torch.Tensor  # fp32, flat
    partial: torch.Tensor  # fp64, flat


@dataclass(frozen=True)
class Slot:
    """What a worker computes in a round: slot ``index`` of a scheme over n workers, at global round ``round``.

    ``fresh``: the round's roster has another size than the current scheme's; it is round 0 of a new one.
    """

    n: int
    index: int
    fresh: bool
    round: int


@dataclass
class Work:
    """A worker's task results for a slot (fp64, flat, in ``assign`` order), and what computing them saw."""

    slot: Slot
    results: list[torch.Tensor]
    losses: list[float]
    samples: int


class SequentialCodedSGD(CodedSGD):
    """Sequential gradient coding (``SeqSGCConfig``): one round per ``train_step``, jobs applied once decoded."""

    config: SeqSGCConfig  # type: ignore[assignment]

    def __init__(
        self,
        model: torch.nn.Module,
        inner: torch.optim.Optimizer,
        peer: Any,
        config: SeqSGCConfig | None = None,
        **overrides: Any,
    ) -> None:
        """``inner`` is not stepped: decoded job gradients are applied by the outer optimizer, the same everywhere."""
        config = replace(config or SeqSGCConfig(), **overrides)
        super().__init__(model, inner, peer, config)  # type: ignore[arg-type]
        self.T = config.delay
        self.numel = self.state.numel(range(len(self.state.params)))
        # The run's state beyond the global parameters, the same on every worker (changed only by _apply):
        self.rounds = 0  # rounds applied
        self.base = 0  # the round the current scheme started at (its job j trains on step base + j)
        self.scheme: SequentialScheme | None = None
        self.jobs: dict[int, Job] = {}
        self.jobs_applied = 0
        self.jobs_lost = 0  # reported lost by the scheme: their stragglers broke the model
        self.jobs_dropped = 0  # in flight when the roster size changed
        # This worker's own accounting: the scheme's load of each recent round it applied (the most any worker
        # was assigned, as a share of one job's partitions), and the partition gradients it computed.
        self.assigned_loads: deque[Fraction] = deque(maxlen=RECENT_SYNCS)
        self.partitions_computed = 0
        # Called with (step, w_j, gradient) before job j (trained on step j's data) is applied.
        self.on_job: Callable[[int, torch.Tensor, torch.Tensor], None] | None = None
        self._jobs_nbytes = 0
        self._work: Work | None = None

    @property
    def global_step(self) -> int:
        """Rounds applied: the same on every worker (round t starts job t, on step t's data)."""
        return self.rounds

    def realized_load(self) -> float:
        """Partition gradients this worker computed per step, as a share of one job's partitions."""
        if not self.inner_steps or self.scheme is None:
            return 0.0
        return self.partitions_computed / self.inner_steps / self.scheme.partitions

    # -- the scheme ---------------------------------------------------------------------------

    def new_scheme(self, n: int) -> SequentialScheme:
        """The configured scheme for n workers (λ capped to what n workers allow), with an unbounded job stream."""
        c = self.config
        lam = min(c.lam, n if c.scheme == "m-sgc" else n - 1)
        scheme = make_scheme(c.scheme, BurstyModel(n, c.burst, c.window, lam), partial(gradcode, kind=c.code))
        assert scheme.T == self.T, (scheme.T, self.T)
        return scheme

    def _scheme_of(self, slot: Slot) -> tuple[SequentialScheme, int, int]:
        """(the scheme, its round, its base) a slot is computed for."""
        if slot.fresh:
            return self.new_scheme(slot.n), 0, slot.round
        assert self.scheme is not None
        return self.scheme, slot.round - self.base, self.base

    def _slot(self, roster: Sequence[str]) -> Slot:
        n = len(roster)
        fresh = self.scheme is None or self.scheme.n != n
        return Slot(n, list(roster).index(self.me), fresh, self.rounds)

    # -- what the base class asks ---------------------------------------------------------------

    def _layout(self, tag: str) -> list[torch.Tensor]:
        """T+1 job segments of the parameters' size, then the header (roster size, member slots)."""
        self.round_indices(tag)
        return [torch.empty((self.T + 1) * self.numel), torch.empty(HEADER)]

    def _state_nbytes(self) -> int:
        """The state a joiner fetches holds the jobs in flight too: late peers compare results with its size."""
        return self.state.nbytes() + self._jobs_nbytes

    def superseded(self) -> bool:
        """Whether the run committed a round this worker has not applied (its round's work is void).

        Compared with the last applied round, which this algorithm advances every round (a job completes in
        only some of them).
        """
        run_round = getattr(self.peer, "run_round", None)
        return run_round is not None and run_round() > self.state.round_id

    # -- one round ----------------------------------------------------------------------------

    def train_step(self, data: PartitionData) -> tuple[float, int]:
        """Compute this worker's tasks of the next round, reduce them with the run, apply what completed.

        Returns the mean loss of the batches this worker computed, and their samples.
        """
        started = time.monotonic()
        before = self.rounds
        roster = self.roster
        if self.scheme is not None and roster is not None and self.me in roster and len(roster) == self.scheme.n:
            self._compute(self._slot(roster), data)
        self.compute_s = time.monotonic() - started
        sent: list[tuple[str, ...]] = []

        def prepare(plan: RoundPlan, flat: torch.Tensor) -> torch.Tensor:
            roster = plan_roster(plan)
            self._check_plan(plan, roster)
            try:
                work = self._compute(self._slot(roster), data)
                if work is None:
                    raise ProtocolError(f"round {plan.round_id} was committed while this worker computed it")
                message = self._message(work, plan, roster)
            except ConfigError as exc:  # a roster the scheme cannot be built over
                raise ProtocolError(f"round {plan.round_id}: {exc}") from None
            sent.append(roster)
            return message

        placeholder = torch.zeros((self.T + 1) * self.numel + HEADER)
        self._sync_starts()

        def call() -> Any:
            return self.peer.sync([placeholder], weight=self._weight, tag=self.tag, codec=self.codec,
                                  aggregator=self.aggregator, prepare=prepare, **self._settings_for(self.peer.sync))

        if self._conclude(call, self.tag, started=started, label=f"{self.tag} round {self.rounds}") and sent:
            self.roster = sent[-1]
        # The results of this call's round (None: it stopped computing, the run went on without it).
        work = self._work if self._work is not None and self._work.slot.round == before else None
        loss = float(np.mean(work.losses)) if work is not None and work.losses else float("nan")
        samples = work.samples if work is not None else 0
        self.inner_steps += 1
        self.samples_trained += samples
        self._report(loss)
        return loss, samples

    def _compute(self, slot: Slot, data: PartitionData) -> Work | None:
        """This worker's task results for a slot (kept, so a retried round or ``prepare`` reuses them).

        None when the run committed the round without this worker meanwhile (checked between partitions, and
        inside ``data`` if it raises StepSuperseded): a straggler stops computing and catches up instead.
        """
        if self._work is not None and self._work.slot == slot:
            return self._work
        scheme, t, base = self._scheme_of(slot)
        tasks = scheme.assign(t)[slot.index]
        results, losses, samples = [], [], 0
        loaded: int | None = None
        indices = range(len(self.state.params))
        try:
            for task in tasks:
                if task.job != loaded:
                    self._load_params(self._params_of(task.job, slot))
                    loaded = task.job
                combined = torch.zeros(self.numel, dtype=torch.float64)
                for p, c in task.parts:
                    if self.superseded():
                        return None
                    self.model.zero_grad(set_to_none=True)
                    try:
                        loss, count = data.loss(self.model, p, scheme.partitions, base + task.job)
                    except StepSuperseded:
                        return None
                    loss.backward()
                    self.partitions_computed += 1
                    grads = [q.grad if q.grad is not None else torch.zeros_like(q) for q in self.state.params]
                    # In float64, in the task's partition order: the same bits wherever this task is computed.
                    combined.add_(flatten(grads).to(torch.float64), alpha=c)
                    losses.append(float(loss.detach()))
                    samples += count
                results.append(combined)
        finally:
            self.model.zero_grad(set_to_none=True)
            if loaded is not None:
                self.state.load_into_model(indices)
        self._work = Work(slot, results, losses, samples)
        return self._work

    def _params_of(self, job: int, slot: Slot) -> torch.Tensor:
        """w_job: kept for a job in flight; the current global parameters for the job this round starts."""
        if not slot.fresh and job in self.jobs:
            return self.jobs[job].params
        current = slot.round - (slot.round if slot.fresh else self.base)
        if job != current:
            raise ProtocolError(f"job {job} is not in flight on this worker (round {slot.round}); its state is stale")
        return flatten(self.state.globals)

    def _load_params(self, flat: torch.Tensor) -> None:
        with torch.no_grad():
            for p, value in zip(self.state.params, unflatten_like(flat, self.state.globals)):
                p.copy_(value.to(device=p.device, dtype=p.dtype))

    def _message(self, work: Work, plan: RoundPlan, roster: tuple[str, ...]) -> torch.Tensor:
        """This member's share of the round: its results weighed into the job segments, then the header."""
        scheme, t, _ = self._scheme_of(work.slot)
        i = work.slot.index
        survivors = {roster.index(pid) for pid, _ in plan.members}
        combination = scheme.combine(t, survivors)
        segments = torch.zeros((self.T + 1) * self.numel, dtype=torch.float64)
        for job, per_worker in combination.weights.items():
            k = t - job
            if not 0 <= k <= self.T:
                raise ProtocolError(f"round {t} weighs job {job}, outside the {self.T + 1} jobs a round carries")
            for index, c in per_worker.get(i, {}).items():
                segments[k * self.numel:(k + 1) * self.numel].add_(work.results[index], alpha=c)
        out = segments.to(torch.float32)
        if self.tamper is not None:
            for k in range(self.T + 1):
                view = out[k * self.numel:(k + 1) * self.numel]
                view.copy_(flatten(self.tamper(unflatten_like(view.clone(), self.state.globals))))
        header = torch.zeros(HEADER)
        header[0] = len(roster)
        header[1 + i] = 1.0
        return torch.cat([out, header])

    def _check_plan(self, plan: RoundPlan, roster: tuple[str, ...]) -> None:
        """Refuse a round this worker cannot take part in correctly (ProtocolError: nothing is sent)."""
        if self.me not in roster or any(pid not in roster for pid, _ in plan.members):
            raise ProtocolError(f"round {plan.round_id}'s members are not all in its roster {list(roster)}")
        if len(roster) > MAX_SLOTS:
            raise ProtocolError(f"seq-sgc supports at most {MAX_SLOTS} workers; round {plan.round_id}'s roster has "
                                f"{len(roster)}")
        problem = self.config.quorum_problem(plan.policy) if plan.policy else ""
        if problem:
            raise QuorumMismatch(problem)

    def _weight(self, plan: RoundPlan) -> float:
        """Every member's weight is 1: its message already carries the round's coefficients."""
        self._check_plan(plan, plan_roster(plan))
        return 1.0

    # -- applying a committed round -------------------------------------------------------------

    def _apply(self, tag: str, value: Sequence[torch.Tensor], round_id: int) -> None:
        flat = flatten(list(value))
        size = (self.T + 1) * self.numel
        if flat.numel() != size + HEADER:
            raise ProtocolError(f"round {round_id} carries {flat.numel()} values, not {size + HEADER}")
        header = flat[size:]
        survivors = [i for i in range(MAX_SLOTS) if float(header[1 + i]) > 0.5]
        if not survivors:
            raise ProtocolError(f"round {round_id} names no member in its slots")
        n = round(float(header[0]) / len(survivors))
        if not 1 <= n <= MAX_SLOTS or survivors[-1] >= n:
            raise ProtocolError(f"round {round_id} names members {survivors} of a roster of {n}")
        if self.scheme is None or self.scheme.n != n:
            self._rebuild(n)
        scheme = self.scheme
        assert scheme is not None
        t = self.rounds - self.base
        if scheme.has_job(t) and t not in self.jobs:
            self.jobs[t] = Job(flatten(self.state.globals), torch.zeros(self.numel, dtype=torch.float64))
        self.assigned_loads.append(scheme.round_load(t))
        combination = scheme.observe(t, set(range(n)) - set(survivors))
        for job in combination.weights:
            k = t - job
            self.jobs[job].partial.add_(flat[k * self.numel:(k + 1) * self.numel].to(torch.float64))
        self.rounds += 1
        for job, reason in combination.lost:
            log.warning("%s: job %d (step %d) is lost and never applied: %s", self.tag, job, self.base + job, reason)
            self.jobs.pop(job, None)
            self.jobs_lost += 1
        for job in combination.completed:
            self._apply_job(job, self.jobs.pop(job), scheme.partitions, round_id)
        for job in [j for j in self.jobs if j <= t - self.T]:  # no round carries it any more
            log.warning("%s: job %d was neither completed nor lost by round %d; dropping it", self.tag, job, t)
            del self.jobs[job]
            self.jobs_lost += 1
        with self.state.lock:
            self.state.round_id = round_id
            self.state.step = self.rounds
        self._jobs_nbytes = sum(j.params.nbytes + j.partial.nbytes for j in self.jobs.values())

    def _rebuild(self, n: int) -> None:
        """A roster of n workers: a new scheme from this round on; the jobs in flight are dropped."""
        if self.jobs:
            log.info("%s: the roster is now %d workers; dropping %d job(s) in flight", self.tag, n, len(self.jobs))
        self.jobs_dropped += len(self.jobs)
        self.jobs = {}
        self.scheme = self.new_scheme(n)
        self.base = self.rounds

    def _apply_job(self, job: int, state: Job, partitions: int, round_id: int) -> None:
        """The outer step with a completed job's gradient (its partial sum over all P partitions, divided by P)."""
        gradient = (state.partial / partitions).to(torch.float32)
        step = self.base + job
        if self.on_gradient is not None:
            self.on_gradient(step, gradient)
        if self.on_job is not None:
            self.on_job(step, state.params, gradient)
        indices = range(len(self.state.params))
        self.state.outer_step(indices, unflatten_like(gradient, self.state.globals), round_id, step=self.rounds)
        self.state.load_into_model(indices)
        self.jobs_applied += 1

    # -- state ----------------------------------------------------------------------------------

    def snapshot(self) -> StateSnapshot:
        """The run's state after the last applied round: global parameters, outer state, the jobs in flight."""
        with self._applying:
            snap = OuterOptimizer.snapshot(self)
            for j, job in sorted(self.jobs.items()):
                snap.tensors[f"{JOB_PREFIX}{j}/params"] = job.params.clone()
                snap.tensors[f"{JOB_PREFIX}{j}/partial"] = job.partial.clone()
            return snap

    def _meta(self) -> dict:
        c = self.config
        return {
            **super()._meta(),
            "seq": {
                "model": [c.scheme, c.burst, c.window, c.lam, c.code],
                "rounds": self.rounds,
                "base": self.base,
                "n": None if self.scheme is None else self.scheme.n,
                # What the scheme's next rounds read (not its whole history: a state must not grow with the run).
                "scheme": None if self.scheme is None else self.scheme.state_dict(),
                "jobs": sorted(self.jobs),
                "applied": self.jobs_applied,
                "lost": self.jobs_lost,
                "dropped": self.jobs_dropped,
            },
        }

    def load_snapshot(self, snapshot: StateSnapshot) -> None:
        """Adopt the run's state, the jobs in flight and the scheme (from its state, or an old one's history)."""
        with self._applying:
            seq = self._checked(snapshot.meta, snapshot.tensors)
            super().load_snapshot(snapshot)
            self._adopt(seq, snapshot.tensors)

    def load_state_dict(self, state: dict) -> None:
        """Restore what state_dict returned (the jobs in flight are among its global tensors)."""
        with self._applying:
            seq = self._checked(state["meta"], state["global"])
            super().load_state_dict(state)
            self._adopt(seq, state["global"])

    def _checked(self, meta: dict, tensors: dict[str, torch.Tensor]) -> SeqState:
        """The snapshot's seq-sgc state, read and checked (against this worker's configuration, and as input from
        another peer) before anything changes: ConfigError says what does not fit."""
        self._check_algorithm(meta, required=True)  # its jobs are in the state: an unnamed one cannot be read
        seq = meta.get("seq")
        if not isinstance(seq, dict):
            raise ConfigError(f"the run's state names {self.tag} but has no {self.tag} part ('seq'): the peer that "
                              "served it runs another version of loconet, or is not to be trusted")
        c = self.config
        mine = [c.scheme, c.burst, c.window, c.lam, c.code]
        if seq.get("model") != mine:
            raise ConfigError(f"the run uses scheme, burst, window, lam, code = {seq.get('model')}, this peer {mine}: "
                              "give every peer the same --scheme --burst --window --lam --code")
        jobs = meta_ints(seq, "jobs", most=self.T + 1)
        for j in jobs:
            for part, dtype in (("params", torch.float32), ("partial", torch.float64)):
                t = tensors.get(f"{JOB_PREFIX}{j}/{part}")
                if t is None or t.dtype != dtype or t.shape != (self.numel,):
                    raise ConfigError(f"the run's state lacks job {j}'s {part} as {self.numel} {dtype} values")
        rounds, base = meta_int(seq, "rounds"), meta_int(seq, "base")
        n = meta_optional_int(seq, "n", low=1, high=MAX_SLOTS)
        scheme = None if n is None else self.new_scheme(n)
        if scheme is not None:
            if "scheme" in seq:
                scheme.load_state_dict(seq["scheme"])
            else:  # a checkpoint written before 2026-12-05: the scheme's whole straggler history, replayed
                for t, stragglers in enumerate(_history_of(seq, "history", n)):
                    scheme.observe(t, stragglers)
            if scheme.next_round != rounds - base:
                raise ConfigError(f"the run's state has its scheme at round {scheme.next_round} for "
                                  f"{rounds - base} rounds of it")
        return SeqState(rounds, base, scheme, jobs, meta_int(seq, "applied"), meta_int(seq, "lost"),
                        meta_int(seq, "dropped"))

    def _adopt(self, seq: SeqState, tensors: dict[str, torch.Tensor]) -> None:
        self.rounds, self.base, self.scheme = seq.rounds, seq.base, seq.scheme
        self.jobs = {j: Job(tensors[f"{JOB_PREFIX}{j}/params"].clone(), tensors[f"{JOB_PREFIX}{j}/partial"].clone())
                     for j in seq.jobs}
        self.jobs_applied, self.jobs_lost, self.jobs_dropped = seq.applied, seq.lost, seq.dropped
        self._jobs_nbytes = sum(j.params.nbytes + j.partial.nbytes for j in self.jobs.values())
        self._work = None
