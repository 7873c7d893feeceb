"""The round machinery of sequential gradient coding: tasks, per-round combinations, job status, loads.

A sequential scheme (``collectives/gradcoding/seqcoding.py``) runs jobs j = 0, 1, ...: job j is the gradient of step
j, it starts in round j and must be complete by the end of round j+T. Each round, ``assign`` says which
``Task``s every worker computes (each a combination of one job's partition gradients). The round's
surviving workers' results are then summed, weighted by ``combine``: a ``RoundCombination`` with one
partial sum per job, whose coefficients depend only on the stragglers up to this round. ``observe``
accepts the round. ``simulate`` replays a whole straggler pattern the way the all-reduce would sum it.

A scheme keeps what its decisions read: the stragglers and job outcomes of its last ``kept_rounds`` rounds
(``KEPT_ROUNDS``, at least W + T), so a run of an unbounded job stream does not grow with its rounds.
``state_dict`` is what a new worker needs to go on exactly as the others (the rounds its decisions can
still read, the jobs in flight, the repeats and chunks planned); ``load_state_dict`` checks it, as it may
come from another peer.

The plain gradient codes come from ``collectives/gradcoding/gradcodes.py`` through ``gradcode``. Any object with
``PlainCode``'s interface works too: tests use their own.
"""

from __future__ import annotations

import itertools
import math
from collections import deque
from collections.abc import Callable, Sequence
from collections.abc import Set as AbstractSet
from dataclasses import dataclass, field
from fractions import Fraction
from typing import Any, Protocol

from collectives.checks import is_whole
from collectives.errors import ConfigError, LoconetError
from collectives.gradcoding import gradcodes
from collectives.gradcoding.stragglermodel import BurstyModel, Pattern

Parts = tuple[tuple[int, float], ...]
Weights = dict[int, dict[int, dict[int, float]]]

PENDING, COMPLETE, LOST = "pending", "complete", "lost"
# The status of a job older than the rounds a scheme keeps (or than the state it was restored from).
UNKNOWN = "unknown"
# A scheme keeps the stragglers and job outcomes of this many recent rounds (at least W + T: what it reads).
KEPT_ROUNDS = 1000


class JobLost(LoconetError):
    """A job cannot be completed: its stragglers broke the scheme's model. Wait for more workers or drop the job."""

    def __init__(self, job: int, round_id: int, reason: str) -> None:
        self.job, self.round_id, self.reason = job, round_id, reason
        super().__init__(f"job {job} cannot complete (round {round_id}): {reason}")


class SchedulingError(LoconetError, ValueError):
    """A scheme was driven out of order: assign and observe round t, then round t+1, with workers 0..n-1."""


class PlainCode(Protocol):
    """What the schemes need of a plain gradient code over n partitions (``gradcode`` adapts gradcodes')."""

    n: int
    s: int

    def row(self, worker: int) -> Parts:
        """The worker's coded task: (partition, coefficient) pairs."""

    def decode(self, members: Sequence[int]) -> dict[int, float] | None:
        """Coefficients of the members' results that sum every partition once, or None if undecodable."""


CodeFactory = Callable[[int, int], PlainCode]


@dataclass(frozen=True)
class _GradcodesCode:
    code: gradcodes.GradientCode
    n: int
    s: int

    def row(self, worker: int) -> Parts:
        return tuple(zip(self.code.support(worker), self.code.coefficients(worker)))

    def decode(self, members: Sequence[int]) -> dict[int, float] | None:
        try:
            a = gradcodes.decode(self.code, list(members))
        except gradcodes.Undecodable:
            return None
        return {m: float(c) for m, c in zip(members, a)}


def gradcode(n: int, s: int, kind: str = gradcodes.AUTO) -> PlainCode:
    """The plain GC(n, s) code of ``collectives.gradcoding.gradcodes``: ``auto`` (frc when s+1 divides n), ``frc``,
    ``cyclic``."""
    return _GradcodesCode(gradcodes.build_code(n, s, kind), n, s)


@dataclass(frozen=True)
class Task:
    """One result a worker computes: a combination of job ``job``'s partition gradients.

    ``kind`` is ``coded`` (a GC task), ``repeat`` (SR-SGC: a coded task again, B rounds later), ``chunk``
    (M-SGC: D1 chunk ``index``), ``rechunk`` (M-SGC: D1 chunk ``index`` again) or ``group`` (M-SGC: the
    coded task of D2 group ``index``).
    """

    job: int
    parts: Parts
    kind: str
    index: int = 0

    @property
    def size(self) -> int:
        """How many partition gradients computing this task takes."""
        return len(self.parts)


@dataclass(frozen=True)
class RoundCombination:
    """How round t's results are summed: ``weights[job][worker][task index]``, and what the round decided."""

    round: int
    weights: Weights
    completed: tuple[int, ...] = ()
    lost: tuple[tuple[int, str], ...] = ()

    @property
    def lost_jobs(self) -> tuple[int, ...]:
        """The jobs this round makes impossible to complete."""
        return tuple(job for job, _ in self.lost)


@dataclass
class Draft:
    """A round's combination while it is being planned."""

    t: int
    weights: Weights = field(default_factory=dict)
    completed: set[int] = field(default_factory=set)
    lost: dict[int, str] = field(default_factory=dict)

    def add(self, job: int, worker: int, index: int, coefficient: float) -> None:
        """Weigh the worker's task ``index`` into job's sum (a zero weight is left out)."""
        if coefficient != 0:
            self.weights.setdefault(job, {}).setdefault(worker, {})[index] = coefficient

    def done(self) -> RoundCombination:
        """The combination, without the weights of jobs this round loses (their sums are discarded)."""
        weights = {job: w for job, w in sorted(self.weights.items()) if job not in self.lost}
        return RoundCombination(self.t, weights, tuple(sorted(self.completed - set(self.lost))),
                                tuple(sorted(self.lost.items())))


class SequentialScheme:
    """Rounds in order, job status, loads; subclasses say what is computed and how results are weighted.

    Drive it with, for t = 0, 1, ...: ``assign(t)`` (the workers compute), then ``combine(t, survivors)``
    to check a candidate set of survivors, then ``observe(t, stragglers)`` to accept the round.
    """

    name = "scheme"

    def __init__(self, model: BurstyModel, jobs: int | None, T: int, partitions: int, load: Fraction) -> None:
        if jobs is not None and jobs < 0:
            raise ConfigError(f"jobs must be >= 0, or None for an unbounded stream, got {jobs}")
        self.model, self.n, self.jobs = model, model.n, jobs
        self.T, self.partitions, self.load = T, partitions, load
        self.next_round = 0
        self.kept_rounds = max(KEPT_ROUNDS, model.W + T + 1)
        # The stragglers of the recent observed rounds (the last of them is round next_round - 1).
        self.history: deque[frozenset[int]] = deque(maxlen=self.kept_rounds)
        self._status: dict[int, str] = {}  # job -> COMPLETE or LOST, for the jobs of the kept rounds
        self._completed_in: dict[int, tuple[int, ...]] = {}
        self._known_from = 0  # jobs before this one: UNKNOWN (forgotten, or before a restored state)
        self._assigned: tuple[int, dict[int, list[Task]]] | None = None

    @property
    def history_start(self) -> int:
        """The round of ``history[0]``."""
        return self.next_round - len(self.history)

    def stragglers_since(self, r: int) -> list[frozenset[int]]:
        """The stragglers of the kept rounds from round r to the last observed one."""
        return list(itertools.islice(self.history, max(0, r - self.history_start), None))

    def has_job(self, j: int) -> bool:
        """Whether job j exists (it starts in round j)."""
        return j >= 0 and (self.jobs is None or j < self.jobs)

    def assign(self, t: int) -> dict[int, list[Task]]:
        """What each worker computes in round t, decided from the stragglers of rounds < t."""
        if t != self.next_round:
            raise SchedulingError(f"round {t} cannot be assigned now: the next round is {self.next_round}")
        if self._assigned is None or self._assigned[0] != t:
            self._assigned = (t, self._tasks(t))
        return self._assigned[1]

    def combine(self, t: int, survivors: AbstractSet[int]) -> RoundCombination:
        """How round t's results from ``survivors`` are weighted into per-job sums; records nothing."""
        tasks = self.assign(t)
        if any(not 0 <= w < self.n for w in survivors):
            raise SchedulingError(f"round {t}: survivors {sorted(survivors)} are not all among workers 0..{self.n - 1}")
        draft = Draft(t)
        self._plan(draft, tasks, frozenset(survivors))
        return draft.done()

    def observe(self, t: int, stragglers: AbstractSet[int]) -> RoundCombination:
        """Accept round t with these stragglers; returns its combination (``combine`` of the others)."""
        if any(not 0 <= w < self.n for w in stragglers):
            raise SchedulingError(
                f"round {t}: stragglers {sorted(stragglers)} are not all among workers 0..{self.n - 1}"
            )
        survivors = frozenset(range(self.n)) - frozenset(stragglers)
        combination = self.combine(t, survivors)
        self._commit(t, survivors, combination)
        self.history.append(frozenset(range(self.n)) - survivors)
        self._status.update({job: COMPLETE for job in combination.completed})
        self._status.update({job: LOST for job in combination.lost_jobs})
        self._completed_in[t] = combination.completed
        self.next_round = t + 1
        self._forget(t + 1 - self.kept_rounds)
        return combination

    def _forget(self, before: int) -> None:
        """Drop the outcomes of the jobs and rounds before round ``before``."""
        while self._known_from < before:
            self._status.pop(self._known_from, None)
            self._completed_in.pop(self._known_from, None)
            self._known_from += 1

    def completed(self, t: int) -> list[int]:
        """The jobs completed in round t (one of the kept rounds): their last contribution was summed in round t."""
        return list(self._completed_in.get(t, ()))

    def status(self, job: int) -> str:
        """``pending``, ``complete`` or ``lost``; ``unknown`` for a job older than the kept rounds."""
        if self.has_job(job) and job < self._known_from:
            return UNKNOWN
        return self._status.get(job, PENDING)

    def state_dict(self) -> dict:
        """What a scheme restored with ``load_state_dict`` needs to go on exactly as this one (JSON-able)."""
        first = max(0, self.next_round - self.T - 1)  # the oldest job its next rounds look at
        return {
            "next_round": self.next_round,
            "history": [sorted(s) for s in self.stragglers_since(self.next_round - self.model.W)],
            "done": [[job, self._status[job]] for job in sorted(self._status) if job >= first],
            **self._extra_state(),
        }

    def load_state_dict(self, state: Any) -> None:
        """Go on from ``state_dict``'s state (a fresh scheme of the same configuration); ConfigError if it is
        malformed or out of range, nothing changed then."""
        if not isinstance(state, dict):
            raise ConfigError(f"a {self.name} state must be a JSON object, got {type(state).__name__}")
        next_round = checked_count(state.get("next_round"), "next_round", math.inf)
        history = checked_list(state.get("history"), "history", min(self.model.W, next_round))
        stragglers = [frozenset(checked_workers(s, self.n, "history")) for s in history]
        first = max(0, next_round - self.T - 1)
        done: dict[int, str] = {}
        for entry in checked_list(state.get("done"), "done", self.T + 1):
            if not (isinstance(entry, list) and len(entry) == 2 and entry[1] in (COMPLETE, LOST)):
                raise ConfigError(f"a {self.name} state's job outcome must be [job, complete|lost], got {entry!r:.80}")
            job = checked_count(entry[0], "a done job", next_round - 1)
            if job < first or not self.has_job(job):
                raise ConfigError(f"a {self.name} state names job {job}, outside its jobs in flight {first}..")
            done[job] = entry[1]
        self._load_extra(state, next_round)
        self.next_round, self._known_from = next_round, first
        self.history = deque(stragglers, maxlen=self.kept_rounds)
        self._status, self._completed_in, self._assigned = done, {}, None

    def _extra_state(self) -> dict:
        """The subclass's part of state_dict."""
        return {}

    def _load_extra(self, state: dict, next_round: int) -> None:
        """Check and take the subclass's part of a state (before the base class changes anything)."""

    def round_load(self, t: int, mean: bool = False) -> Fraction:
        """Partitions a worker computes in round t, as a fraction of one job's: the max over workers, or the mean."""
        sizes = [sum(task.size for task in tasks) for tasks in self.assign(t).values()]
        sizes += [0] * (self.n - len(sizes))
        return Fraction(sum(sizes), self.n * self.partitions) if mean else Fraction(max(sizes), self.partitions)

    def _tasks(self, t: int) -> dict[int, list[Task]]:
        raise NotImplementedError

    def _plan(self, draft: Draft, tasks: dict[int, list[Task]], survivors: frozenset[int]) -> None:
        raise NotImplementedError

    def _commit(self, t: int, survivors: frozenset[int], combination: RoundCombination) -> None:
        """Keep what later rounds need (the history and job status are kept by the base class)."""


def checked_count(value: Any, what: str, most: float) -> int:
    """A whole number in [0, most] from a state, or ConfigError."""
    if not is_whole(value, 0, most):
        raise ConfigError(f"a scheme state's {what} must be a whole number in [0, {most}], got {value!r:.80}")
    return value


def checked_list(value: Any, what: str, most: float) -> list:
    """A list of at most ``most`` entries from a state, or ConfigError."""
    if not isinstance(value, list) or len(value) > most:
        raise ConfigError(f"a scheme state's {what} must be a list of at most {most} entries, got {value!r:.80}")
    return value


def checked_workers(value: Any, n: int, what: str) -> set[int]:
    """Distinct worker indices in [0, n) from a state, or ConfigError."""
    workers = {checked_count(w, f"{what} worker", n - 1) for w in checked_list(value, what, n)}
    if len(workers) != len(value):
        raise ConfigError(f"a scheme state's {what} names a worker twice: {value!r:.80}")
    return workers


def checked_code(codes: CodeFactory, n: int, s: int) -> PlainCode:
    """The factory's GC(n, s) code, refused if it is for another (n, s)."""
    code = codes(n, s)
    if (code.n, code.s) != (n, s):
        raise ConfigError(f"the code factory returned a GC({code.n}, {code.s}) code for GC({n}, {s})")
    return code


@dataclass
class Simulation:
    """What a scheme did with a pattern: per job, each partition's total coefficient and (optionally) the sum."""

    coverage: dict[int, dict[int, float]] = field(default_factory=dict)
    sums: dict[int, Any] = field(default_factory=dict)
    completed_at: dict[int, int] = field(default_factory=dict)
    lost: dict[int, tuple[int, str]] = field(default_factory=dict)
    loads: list[Fraction] = field(default_factory=list)
    mean_loads: list[Fraction] = field(default_factory=list)

    @property
    def realized_load(self) -> Fraction:
        """The largest share of a job's data any worker computed in any round."""
        return max(self.loads, default=Fraction(0))


def simulate(scheme: SequentialScheme, pattern: Pattern, gradient: Callable[[int, int], Any] | None = None,
             strict: bool = False) -> Simulation:
    """Run a fresh scheme through a straggler pattern, summing results the way the all-reduce would.

    ``gradient(job, partition)`` gives a partition's gradient (anything that adds and scales). With
    ``strict``, the first lost job raises ``JobLost``.
    """
    sim = Simulation()
    for t, stragglers in enumerate(pattern):
        tasks = scheme.assign(t)
        sim.loads.append(scheme.round_load(t))
        sim.mean_loads.append(scheme.round_load(t, mean=True))
        combination = scheme.observe(t, stragglers)
        for job, per_worker in combination.weights.items():
            coverage = sim.coverage.setdefault(job, {})
            for w, per_task in per_worker.items():
                for i, c in per_task.items():
                    task = tasks[w][i]
                    for p, e in task.parts:
                        coverage[p] = coverage.get(p, 0) + c * e
                    if gradient is not None:
                        result = sum(e * gradient(job, p) for p, e in task.parts)  # what worker w computed
                        sim.sums[job] = sim.sums[job] + c * result if job in sim.sums else c * result
        sim.completed_at.update({job: t for job in combination.completed})
        for job, reason in combination.lost:
            sim.lost[job] = (t, reason)
            if strict:
                raise JobLost(job, t, reason)
    return sim
