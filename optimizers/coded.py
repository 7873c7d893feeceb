"""Synchronous SGD that does not wait for stragglers: gradient coding, and the baselines it is measured against.

Every step is one round. The run's data is cut into n partitions, n the
number of workers in the round's roster (the live peers, in peer-id order,
that the coordinator's quorum policy names as the round's candidates); batch
t of partition j is the same for every worker that computes it. The decoded
(or averaged) gradient of a round is applied by every worker with the same
optimizer (the outer optimizer of ``optimizers/outer_optim.py``, plain SGD
by default), so the workers stay identical; a worker the round went on
without applies the round's result instead of its own (``CaughtUp``).

- ``coded-sgd --stragglers s`` (Tandon et al. 2017): worker i computes the
  gradients of the s+1 partitions supp(B_i) of the code B built from (n, s)
  (``collectives/gradcoding/gradcodes.py``: fractional repetition when (s+1) divides n,
  a cyclic MDS code over the reals otherwise) and sends their combination
  B_i g. The round is formed by the first workers that can decode (quorum
  ``coded:s``); each member weighs its contribution by its decoding
  coefficient a_i / n with the ``sum`` aggregator, so the round's result is
  exactly the mean of the n partition gradients: the same gradient as
  waiting for all n uncoded workers.
- ``sync-sgd``: worker i computes partition i only and the round averages
  its members' gradients. With quorum ``all`` it waits for every worker;
  with ``allbut:s`` it takes the first n-s and ignores the rest (the mean of
  what arrived: biased toward fast workers' data); with ``--dynamic-k`` and
  quorum ``backup``, every worker chooses k each step (dynamic backup
  workers, ``optimizers/backup.py``) and names it in the round's tag: the same
  k where they applied the same rounds; the pending round's k stands for a
  worker whose roster lags (docs/gradient-coding.md).

Membership changes n. The roster a worker encoded for is the last round's;
when a round's roster differs (a join, a leave), the worker computes its
contribution again for the new roster before sending (``prepare``), so B
and the partitions are rebuilt at the round boundary, deterministically.

Used from ``loconet peer --algorithm coded-sgd --stragglers 1`` with the
coordinator's ``--quorum coded:1``, or from Python: the training loop calls
``train_step(data)`` (not ``step``), where ``data`` gives the loss of any
partition's batch (``PartitionData``).
"""

from __future__ import annotations

import logging
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, ClassVar, Protocol

import numpy as np
import torch

from collectives.errors import ConfigError, ProtocolError, QuorumMismatch
from collectives.gradcoding.gradcodes import CODE_KINDS, Undecodable, code_for, decode
from collectives.membership.roundplan import BACKUP_TAG_KEY, RoundPlan
from collectives.reduce.parts import flatten, unflatten_like
from optimizers.backup import BackupConfig, BackupWorkers, RoundObservation
from optimizers.outer import OuterOptimizer
from optimizers.outer_optim import OuterConfig
from optimizers.statemeta import meta_dict, meta_strs
from optimizers.syncconfig import SyncConfig
from optimizers.syncrecord import RECENT_SYNCS

log = logging.getLogger(__name__)

# Plain SGD on the decoded gradient: what synchronous data-parallel training applies.
SGD_OUTER = OuterConfig(name="sgd", lr=0.1, momentum=0.0, nesterov=False)
# A dynamic-k round carries each member's ready time in its slot (the roster index): at most this many workers.
BACKUP_SLOTS = 64


class StepSuperseded(Exception):
    """Raised by a PartitionData that stops computing a step the run has committed without this worker."""


class PartitionData(Protocol):
    """Where a worker's batches come from: any partition's batch, by step (the same batch on every worker)."""

    def loss(self, model: torch.nn.Module, partition: int, partitions: int, step: int) -> tuple[torch.Tensor, int]:
        """The loss of batch ``step`` of partition ``partition`` of ``partitions`` on model, and its samples."""
        ...


@dataclass(frozen=True)
class StepRoundConfig(SyncConfig):
    """What every one-round-per-step algorithm shares: a round each step, fp32 rounds, plain SGD on the result.

    fp32 because the decoded gradient is then the full gradient within float rounding (docs/gradient-coding.md
    has the error int8 adds after decoding). The round sums its members' weighted contributions.
    """

    sync_every: int = field(default=1, init=False, metadata={"cli": False})
    codec: str = field(default="none", metadata={"help": "codec of the gradient rounds (see docs/gradient-coding.md)"})
    aggregator: str = field(default="sum", init=False, metadata={"cli": False})
    outer: OuterConfig = field(default_factory=lambda: SGD_OUTER)


@dataclass(frozen=True)
class SyncSGDConfig(StepRoundConfig):
    """Synchronous SGD, one round per step: the round averages its members' gradients."""

    TAG: ClassVar[str] = "sync-sgd"

    aggregator: str = field(default="mean", init=False, metadata={"cli": False})
    dynamic_k: bool = field(
        default=False,
        metadata={"help": "dynamic backup workers: choose each step how many workers to wait for (quorum backup)"},
    )
    backup_c: float = field(
        default=BackupConfig.lr_smoothness,
        metadata={"help": "dynamic k: c = lr x L, the smoothness the choice assumes, in (0, 2); smaller favours a "
                  "smaller k (see docs/gradient-coding.md)"},
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        if not 0.0 < self.backup_c < 2.0:
            raise ConfigError(f"backup_c (c = lr x L) must be in (0, 2), got {self.backup_c}: at 2 or more the "
                              "smoothness bound promises no decrease even without noise")

    def expected_quorum(self) -> str | None:
        """The coordinator's quorum policy this algorithm's rounds need (None: any; all waits for every worker)."""
        return "backup" if self.dynamic_k else None

    def quorum_problem(self, policy: str) -> str:
        """With dynamic k, any policy but ``backup`` cannot serve (it does not read the k the workers chose)."""
        if self.dynamic_k and policy_name(policy) != "backup":
            return f"sync-sgd --dynamic-k needs the coordinator's --quorum backup, and the run's is {policy!r}"
        return ""


@dataclass(frozen=True)
class CodedSGDConfig(StepRoundConfig):
    """Gradient-coded synchronous SGD: the exact full gradient from any n-s of n workers."""

    TAG: ClassVar[str] = "coded-sgd"

    stragglers: int = field(default=1, metadata={"help": "stragglers s the code tolerates (each worker holds s+1 "
                                                          "partitions; the coordinator needs --quorum coded:s)"})
    code: str = field(default="auto", metadata={"help": "the code: auto (frc when s+1 divides n, else cyclic), frc "
                                                       "(coded-sgd only), cyclic", "choices": CODE_KINDS})

    def __post_init__(self) -> None:
        super().__post_init__()
        if not isinstance(self.stragglers, int) or self.stragglers < 0:
            raise ConfigError(f"stragglers must be a whole number >= 0, got {self.stragglers!r}")
        if self.code not in CODE_KINDS:
            raise ConfigError(f"code must be auto, frc or cyclic, got {self.code!r}")

    def expected_quorum(self) -> str | None:
        """The coordinator's quorum policy this algorithm's rounds need: ``coded:s`` (and the code)."""
        return f"coded:{self.stragglers}" + (f",code={self.code}" if self.code != "auto" else "")

    def round_settings(self) -> tuple[str, ...]:
        """With the outer step's, the code: a worker encoding with another decodes the others' rounds wrong."""
        return (*super().round_settings(), f"stragglers {self.stragglers}", f"code {self.code}")

    def quorum_problem(self, policy: str) -> str:
        """Any policy but ``coded:s`` (this s) with this code cannot serve: the rounds must hold a decodable set of
        the roster, as the coordinator checks it with its code and the workers build it with theirs."""
        s = self.stragglers
        if policy_name(policy) != "coded" or policy_argument(policy) != str(s):
            return f"coded-sgd --stragglers {s} needs the coordinator's --quorum coded:{s}, and the run's is {policy!r}"
        needed = self.expected_quorum()
        if policy != needed:
            # Found by a chaos run: coded:1 (auto) with --code frc workers formed rounds over 7 workers, which
            # fractional repetition cannot encode for, and 337 of 400 steps did not commit.
            return (f"coded-sgd --code {self.code} needs the coordinator's --quorum {needed} (the coordinator checks "
                    f"rounds with the workers' code), and the run's is {policy!r}")
        return ""


def policy_name(policy: str) -> str:
    """The name of a quorum policy's text (``coded`` of ``coded:1,code=frc``)."""
    return policy.partition(":")[0]


def policy_argument(policy: str) -> str:
    """The first argument of a quorum policy's text (``1`` of ``coded:1,code=frc``; "" without one)."""
    return policy.partition(":")[2].partition(",")[0]


def plan_roster(plan: RoundPlan) -> tuple[str, ...]:
    """The workers a round's code is built over: its candidates (the live peers), or its members without them."""
    return tuple(plan.candidates) if plan.candidates else tuple(sorted(pid for pid, _ in plan.members))


class CodedSGD(OuterOptimizer):
    """Synchronous SGD over the run, coded (``CodedSGDConfig``) or not (``SyncSGDConfig``): one round per step."""

    config: CodedSGDConfig | SyncSGDConfig
    # A joiner takes the roster and the backup workers' estimates from the state it fetches (_checked_meta), not
    # only the parameters: even before the first commit it fetches.
    INITIAL_STATE_IS_THE_RUNS = False

    def __init__(
        self,
        model: torch.nn.Module,
        inner: torch.optim.Optimizer,
        peer: Any,
        config: CodedSGDConfig | SyncSGDConfig | None = None,
        **overrides: Any,
    ) -> None:
        """``inner`` is not stepped: the decoded gradient is applied by the outer optimizer, the same on every
        worker."""
        config = replace(config or CodedSGDConfig(), **overrides)
        super().__init__(model, inner, peer, config)
        self.tag = type(config).TAG
        self.coded = isinstance(config, CodedSGDConfig)
        # The roster of the last round this worker took part in (None: not known yet, encode once the plan is).
        self.roster: tuple[str, ...] | None = None
        dynamic = getattr(config, "dynamic_k", False)
        self.backup = BackupWorkers(BackupConfig(lr_smoothness=config.backup_c)) if dynamic else None  # type: ignore
        # Called with (step, flat gradient) before each round's gradient is applied, the global parameters
        # still those of that step: benchmarks compare it with the full gradient.
        self.on_gradient: Callable[[int, torch.Tensor], None] | None = None
        # Dynamic k: the k of each recent round this worker applied.
        self.ks: deque[int] = deque(maxlen=RECENT_SYNCS)
        # Where each step's time went: computing the contribution, then the round.
        self.compute_s = 0.0
        self._step_started = time.monotonic()

    @property
    def global_step(self) -> int:
        """Steps applied: the same on every worker (step t trains on batch t of every partition)."""
        return self.state.step

    @property
    def me(self) -> str:
        """This worker's peer id (known once the peer joined; "local" for a run of one)."""
        return getattr(self.peer, "peer_id", None) or "local"

    # -- what the base class asks ------------------------------------------------------------

    def round_indices(self, tag: str) -> Sequence[int]:
        """Every round carries every parameter's gradient."""
        if tag.partition(":")[0] != self.tag:
            raise ConfigError(
                f"this peer runs {self.tag!r} rounds, not {tag!r}: every peer must run the same algorithm"
            )
        return range(len(self.state.params))

    def _layout(self, tag: str) -> list[torch.Tensor]:
        """The gradient, then (dynamic k) the round's statistics: mean squared norm and the ready-time slots."""
        layout = list(self.state.globals)
        if self.backup is not None:
            layout.append(torch.empty(1 + BACKUP_SLOTS))
        return layout

    def step(self, closure: Any = None, samples: int = 1, *, loss: Any = None) -> Any:
        """Not used: a coded step picks its own partitions' batches (``train_step``)."""
        raise ConfigError(f"{self.tag} trains through train_step(data), which picks each partition's batch; "
                          "step() cannot choose the data a code needs")

    def _apply(self, tag: str, value: Sequence[torch.Tensor], round_id: int) -> None:
        """The decoded gradient, applied by the outer optimizer; a dynamic-k round's statistics update the estimator
        (called under ``_applying``, as every round's apply is)."""
        flat = flatten(list(value))
        numel = self.state.numel(range(len(self.state.params)))
        gradient = flat[:numel]
        if self.backup is not None:
            self._observe(gradient, flat[numel:])
        if self.on_gradient is not None:
            self.on_gradient(self.global_step, gradient)
        indices = self.round_indices(tag)
        step = self.global_step + 1
        self.state.outer_step(indices, unflatten_like(gradient, self.state.globals), round_id, step=step)
        self.state.load_into_model(indices)

    # -- one step ------------------------------------------------------------------------

    def train_step(self, data: PartitionData) -> tuple[float, int]:
        """Compute this worker's contribution to step ``global_step``, reduce it with the run, apply the result.

        Returns the mean loss of the batches this worker computed, and their samples.
        """
        started = time.monotonic()
        step = self.global_step
        taken = self.inner_steps
        # Computed before asking for the round: the quorum forms from the workers that are ready.
        known = self.roster is not None and self.me in self.roster
        first = self._encode(self.roster, step, data) if known else None  # type: ignore[arg-type]
        work = [first] if first is not None else []
        self.compute_s = time.monotonic() - started
        ready_s = max(time.monotonic() - self._step_started, 1e-9)
        sent: list[tuple[str, ...]] = []

        def prepare(plan: RoundPlan, flat: torch.Tensor) -> torch.Tensor:
            roster = plan_roster(plan)
            self._check_plan(plan, roster)
            if not work or work[-1].roster != roster:
                # A new roster (the first round, a join, a leave) changes B and the partitions; or the
                # computation was stopped early, and this round (of the same step) still wants it.
                log.info("%s step %d: encoding for a roster of %d worker(s)", self.tag, step, len(roster))
                encoded = self._encode(roster, step, data)
                if encoded is None:
                    raise ProtocolError(f"step {step} was committed while this worker encoded it")
                work.append(encoded)
            sent.append(roster)
            return self._message(work[-1], roster, ready_s)

        numel = self.state.numel(range(len(self.state.params)))
        placeholder = work[0].flat if work else torch.zeros(numel)
        tensors = [placeholder] + ([torch.zeros(1 + BACKUP_SLOTS)] if self.backup is not None else [])
        tag = self._round_tag()
        self._sync_starts()

        def call() -> Any:
            return self.peer.sync(
                tensors, weight=self._weight, tag=tag, codec=self.codec, aggregator=self.aggregator, prepare=prepare,
                **self._settings_for(self.peer.sync),
            )

        if self._conclude(call, tag, started=started, label=f"{self.tag} step {step}") and sent:
            self.roster = sent[-1]
        done = work[-1] if work else None
        loss = float(np.mean(done.losses)) if done is not None and done.losses else float("nan")
        samples = done.samples if done is not None else 0
        # One step more, or the run's step if this one caught up with rounds it was late for: as the training
        # loop counts (TrainLoop), not one more on top of the catch-up (which showed as 201 of 200 steps).
        self.inner_steps = max(taken + 1, self.global_step)
        self.samples_trained += samples
        self._report(loss)
        self._step_started = time.monotonic()
        return loss, samples

    def superseded(self) -> bool:
        """Whether the run has committed a round this worker has not applied: the step it computes is void.

        Read from the peer's last word from the coordinator (its heartbeats); a peer without one never is.
        """
        run_round = getattr(self.peer, "run_round", None)
        return run_round is not None and run_round() > self.state.round_id

    # -- encoding and decoding -------------------------------------------------------------

    def _code(self, n: int) -> Any:
        config = self.config
        assert isinstance(config, CodedSGDConfig)
        return code_for(n, config.stragglers, config.code)

    def partitions_of(self, roster: tuple[str, ...]) -> tuple[tuple[int, ...], tuple[float, ...]]:
        """The partitions this worker computes for a roster, and the coefficients it combines them with."""
        i = roster.index(self.me)
        if not self.coded:
            return (i,), (1.0,)
        code = self._code(len(roster))
        support = code.support(i)
        return support, code.coefficients(i)

    def _encode(self, roster: tuple[str, ...], step: int, data: PartitionData) -> Encoded | None:
        """This worker's contribution for a roster: its partitions' gradients at step, combined by its code row.

        None when the run committed the step without this worker meanwhile (checked between partitions, and
        inside ``data`` if it raises StepSuperseded): a straggler stops computing and catches up instead.
        """
        if self.me not in roster:
            raise ProtocolError(f"{self.me} is not in the round's roster {list(roster)}")
        partitions, coefficients = self.partitions_of(roster)
        combined = torch.zeros(self.state.numel(range(len(self.state.params))), dtype=torch.float64)
        losses, samples = [], 0
        for j, c in zip(partitions, coefficients):
            if self.superseded():
                return None
            self.model.zero_grad(set_to_none=True)
            try:
                loss, count = data.loss(self.model, j, len(roster), step)
            except StepSuperseded:
                return None
            loss.backward()
            grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in self.state.params]
            # Accumulated in float64 in partition order: the same bits on every worker holding these partitions.
            combined.add_(flatten(grads).to(torch.float64), alpha=c)
            losses.append(float(loss.detach()))
            samples += count
        self.model.zero_grad(set_to_none=True)
        return Encoded(roster, combined.to(torch.float32), losses, samples)

    def _message(self, work: Encoded, roster: tuple[str, ...], ready_s: float) -> torch.Tensor:
        """What this worker sends for a round: its combined gradient (through ``tamper``), then dynamic k's
        statistics."""
        gradient = work.flat
        if self.tamper is not None:
            gradient = flatten(self.tamper(unflatten_like(gradient, self.state.globals)))
        parts = [gradient]
        if self.backup is not None:
            index = roster.index(self.me)
            if index >= BACKUP_SLOTS:
                raise ProtocolError(f"dynamic k supports at most {BACKUP_SLOTS} workers; this roster has {len(roster)}")
            stats = torch.zeros(1 + BACKUP_SLOTS)
            stats[0] = float(gradient.double().square().sum())
            stats[1 + index] = ready_s
            parts.append(stats)
        return torch.cat(parts)

    def _check_plan(self, plan: RoundPlan, roster: tuple[str, ...]) -> None:
        """Refuse a round this worker cannot take part in correctly (ProtocolError: nothing is sent)."""
        if self.me not in roster or any(pid not in roster for pid, _ in plan.members):
            raise ProtocolError(f"round {plan.round_id}'s members are not all in its roster {list(roster)}")
        # A plan without a policy comes from a coordinator older than policies in plans: nothing to check.
        problem = self.config.quorum_problem(plan.policy) if plan.policy else ""
        if problem:
            raise QuorumMismatch(problem)

    def _weight(self, plan: RoundPlan) -> float:
        """This member's weight: 1 for a mean; for a code, its decoding coefficient a_i / n (the sum is then the
        mean)."""
        roster = plan_roster(plan)
        self._check_plan(plan, roster)
        if not self.coded:
            return 1.0
        members = [roster.index(pid) for pid, _ in plan.members]
        try:
            a = decode(self._code(len(roster)), members)
        except Undecodable as exc:
            raise ProtocolError(f"round {plan.round_id}: {exc}") from None
        return float(a[members.index(roster.index(self.me))]) / len(roster)

    # -- dynamic backup workers -------------------------------------------------------------

    def _round_tag(self) -> str:
        """The round's tag; with dynamic k, the k every worker chose (the coordinator's backup policy reads it)."""
        if self.backup is None or self.roster is None:
            return self.tag
        return f"{self.tag}{BACKUP_TAG_KEY}{self.backup.choose_k(len(self.roster))}"

    def _observe(self, gradient: torch.Tensor, stats: torch.Tensor) -> None:
        """Feed a committed round's statistics to the estimator (identical on every worker)."""
        assert self.backup is not None
        slots = stats[1:].double()
        arrived = slots > 0
        k = int(arrived.sum())
        if k == 0:
            return
        # The mean aggregator divided every slot by k.
        times = sorted(float(t) * k for t in slots[arrived])
        self.ks.append(k)
        n = len(self.roster) if self.roster is not None else k
        self.backup.observe(RoundObservation(
            n=max(n, k), k=k, mean_grad_sq_norm=float(gradient.double().square().sum()),
            member_sq_norm_mean=float(stats[0]), arrival_s=tuple(times),
        ))

    # -- state ----------------------------------------------------------------------------

    def _meta(self) -> dict:
        meta: dict = {"algorithm": self.tag, "roster": list(self.roster) if self.roster is not None else None}
        if self.backup is not None:
            meta["backup"] = self.backup.state_dict()
        return meta

    def _checked_meta(self, meta: dict) -> Callable[[], None]:
        roster = meta_strs(meta, "roster", None) if meta.get("roster") is not None else None
        take_window = (self.backup.checked_state(meta_dict(meta, "backup"))
                       if self.backup is not None and meta.get("backup") is not None else lambda: None)

        def take() -> None:
            take_window()
            self.roster = tuple(roster) if roster else None

        return take


@dataclass
class Encoded:
    """A worker's contribution to one step for one roster: the combined gradient, and what computing it saw."""

    roster: tuple[str, ...]
    flat: torch.Tensor
    losses: list[float]
    samples: int
