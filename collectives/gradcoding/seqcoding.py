"""Sequential gradient coding: schedules that finish job j (the gradient of step j) by round j+T.

Krishnan, Ebrahimi and Khisti, "Sequential Gradient Coding For Straggler Mitigation" (ICLR 2023). Job j
starts in round j and must be complete by the end of round j+T. Stragglers follow the (B, W, λ)-bursty
model (``collectives/gradcoding/stragglermodel.py``). Spending the delay T buys a lower computational load than plain
gradient coding (GC) needs for the same tolerance. Three schemes share one API:

- ``PlainGC`` (T = 0): every round, each worker computes its GC(n, λ) task for the round's job. Load (λ+1)/n.
- ``SelectiveRepeatSGC`` (SR-SGC, T = B): GC(n, s) with s = ceil(λ/(x+1)), x = floor((W-1)/B). When job j
  misses more coded results than the code can spare, some of the workers it missed compute their own job-j
  task again in round j+B instead of their job-(j+B) task. Load (s+1)/n.
- ``MultiplexedSGC`` (M-SGC, T = W-2+B): each job's data is split into D1 (plain chunks, W-1 per worker,
  one per round) and D2 (B groups, each GC(n, λ)-coded). Each round every worker does W-1+B equal
  mini-tasks, one for each of the W-1+B jobs in flight. In a job's B D2 rounds, a worker still missing D1
  chunks (lost while it straggled) computes them again instead of its coded task. Load
  (λ+1)(W-1+B) / (n(B + (W-1)(λ+1))); for λ = n it is (W-1+B) / (n(W-1)), since then there is no D2.

No master keeps individual results. Each round, the surviving workers' results are *summed* with one
coefficient per task, into one partial sum per job. The coefficients of round t depend only on the
stragglers of rounds <= t, and a round's contribution to a job is final when the round ends:

- D1 chunks and repeated chunks are weighted 1, the first time they arrive (a chunk is repeated only if
  it never arrived);
- each GC-coded group of M-SGC is decoded within its one round;
- SR-SGC decodes job j from round j's results and round j+B's repeats. Its repeaters are chosen at the end
  of round j, and their coefficients are fixed with round j's: decode over (round j's contributors ∪
  repeaters). Under the model no repeater straggles in round j+B: each straggled in an earlier round of
  the same busy period, at most W-1 rounds before j+B, so its next burst starts later.

A job whose stragglers break the model may become impossible to complete: a group with too few coded
results, a chunk still missing after its last repeat slot, a planned repeater that straggles. ``combine``
reports such a job (``lost``) before the round is accepted, so a runtime can wait for more workers. A lost
job is never reported complete, and its partial sum must be discarded. Every sum is over *all* partitions
(divide by their count for a mean). Loads are exact ``Fraction``s of one job's data.
"""

from __future__ import annotations

import math
from fractions import Fraction
from typing import Any

from collectives.checks import is_finite_number
from collectives.errors import ConfigError
from collectives.gradcoding.seqrounds import (
    COMPLETE,
    LOST,
    PENDING,
    UNKNOWN,
    CodeFactory,
    Draft,
    JobLost,
    Parts,
    PlainCode,
    RoundCombination,
    SchedulingError,
    SequentialScheme,
    Simulation,
    Task,
    checked_code,
    checked_count,
    checked_list,
    checked_workers,
    gradcode,
    simulate,
)
from collectives.gradcoding.stragglermodel import BurstyModel

__all__ = [
    "COMPLETE", "LOST", "PENDING", "SCHEMES", "UNKNOWN", "CodeFactory", "JobLost", "MultiplexedSGC", "PlainCode",
    "PlainGC", "RoundCombination", "SchedulingError", "SelectiveRepeatSGC", "SequentialScheme", "Simulation", "Task",
    "gradcode", "make_scheme", "simulate",
]

SCHEMES = ("gc", "sr-sgc", "m-sgc")


class PlainGC(SequentialScheme):
    """Gradient coding, one job per round (T = 0): any s stragglers per round; s = λ covers the model."""

    name = "gc"

    def __init__(self, model: BurstyModel, codes: CodeFactory = gradcode, jobs: int | None = None,
                 s: int | None = None) -> None:
        self.s = model.lam if s is None else s
        if not 0 <= self.s < model.n:
            raise ConfigError(f"plain GC tolerates 0 <= s < n={model.n} stragglers, got s={self.s}")
        super().__init__(model, jobs, 0, model.n, Fraction(self.s + 1, model.n))
        self.code = checked_code(codes, model.n, self.s)

    def _tasks(self, t: int) -> dict[int, list[Task]]:
        if not self.has_job(t):
            return {w: [] for w in range(self.n)}
        return {w: [Task(t, self.code.row(w), "coded")] for w in range(self.n)}

    def _plan(self, draft: Draft, tasks: dict[int, list[Task]], survivors: frozenset[int]) -> None:
        if not self.has_job(draft.t):
            return
        a = self.code.decode(sorted(survivors))
        if a is None:
            draft.lost[draft.t] = f"{self.n - len(survivors)} stragglers, GC({self.n}, {self.s}) cannot decode"
            return
        for w in survivors:
            draft.add(draft.t, w, 0, a.get(w, 0))
        draft.completed.add(draft.t)


class SelectiveRepeatSGC(SequentialScheme):
    """SR-SGC: GC(n, s) each round, and in round t+B repeats of job t's tasks it cannot spare (T = B)."""

    name = "sr-sgc"

    def __init__(self, model: BurstyModel, codes: CodeFactory = gradcode, jobs: int | None = None) -> None:
        # A (B, W, λ) pattern also conforms to (B, W', λ) for W' = xB+1 <= W; the paper takes B | W-1 (W' = W).
        x = (model.W - 1) // model.B
        self.s = math.ceil(model.lam / (x + 1))
        if self.s >= model.n:
            raise ConfigError(f"SR-SGC needs s = ceil(lambda/(x+1)) < n, got s={self.s} for n={model.n}")
        super().__init__(model, jobs, model.B, model.n, Fraction(self.s + 1, model.n))
        self.code = checked_code(codes, model.n, self.s)
        self._repeats: dict[int, dict[int, float]] = {}  # round -> repeater -> its decoding coefficient

    def _tasks(self, t: int) -> dict[int, list[Task]]:
        repeaters = self._repeats.get(t, {})
        tasks: dict[int, list[Task]] = {}
        for w in range(self.n):
            if w in repeaters:
                tasks[w] = [Task(t - self.model.B, self.code.row(w), "repeat")]
            else:
                tasks[w] = [Task(t, self.code.row(w), "coded")] if self.has_job(t) else []
        return tasks

    def _plan(self, draft: Draft, tasks: dict[int, list[Task]], survivors: frozenset[int]) -> None:
        t, B = draft.t, self.model.B
        repeaters = self._repeats.get(t, {})
        if repeaters and self.status(t - B) == PENDING:
            late = sorted(set(repeaters) - survivors)
            if late:
                draft.lost[t - B] = f"planned repeaters {late} straggled in round {t}"
            else:
                for w, c in repeaters.items():
                    draft.add(t - B, w, 0, c)
                draft.completed.add(t - B)
        if self.has_job(t):
            a, again = self._decoding(t, survivors)
            if a is None:
                draft.lost[t] = f"GC({self.n}, {self.s}) cannot decode even with every worker"
                return
            for w in survivors - set(repeaters):
                draft.add(t, w, 0, a.get(w, 0))
            if not again:
                draft.completed.add(t)

    def _commit(self, t: int, survivors: frozenset[int], combination: RoundCombination) -> None:
        if self.has_job(t) and t not in combination.lost_jobs:
            a, again = self._decoding(t, survivors)
            if again and a is not None:
                self._repeats[t + self.model.B] = {w: a[w] for w in again}
        self._repeats.pop(t, None)

    def _extra_state(self) -> dict:
        return {"repeats": [[r, [[w, c] for w, c in by.items()]] for r, by in sorted(self._repeats.items())]}

    def _load_extra(self, state: dict, next_round: int) -> None:
        repeats: dict[int, dict[int, float]] = {}
        for entry in checked_list(state.get("repeats"), "repeats", self.model.B):
            if not (isinstance(entry, list) and len(entry) == 2):
                raise ConfigError(
                    f"an SR-SGC state's repeat must be [round, [[worker, coefficient], ...]], got {entry!r:.80}"
                )
            r = checked_count(entry[0], "repeat round", next_round + self.model.B - 1)
            pairs = checked_list(entry[1], "repeaters", self.n)
            if r < next_round or r in repeats or not all(isinstance(p, list) and len(p) == 2 for p in pairs):
                raise ConfigError(f"an SR-SGC state's repeats of round {r} are not [[worker, coefficient], ...] "
                                  f"for a round from {next_round} on, once")
            checked_workers([w for w, _ in pairs], self.n, "repeaters")
            repeats[r] = {w: _coefficient(c) for w, c in pairs}  # in the order planned, as the others hold them
        self._repeats = repeats

    def _decoding(self, t: int, survivors: frozenset[int]) -> tuple[dict[int, float] | None, list[int]]:
        """Job t's decoding coefficients, and the workers that must repeat their job-t task in round t+B."""
        repeating = self._repeats.get(t, {})
        members = sorted(survivors - set(repeating))
        a = self.code.decode(members)
        if a is not None:
            return a, []
        # Prefer workers the model keeps fast in round t+B: those that straggled in rounds t+B-W+1..t.
        recent = [*self.stragglers_since(t + self.model.B - self.model.W + 1), frozenset(range(self.n)) - survivors]
        safe = set().union(*recent)
        order = sorted((w for w in range(self.n) if w not in members), key=lambda w: (w not in safe, w))
        again: list[int] = []
        for w in order:
            again.append(w)
            if self.code.decode(sorted(members + again)) is not None:
                break
        else:
            return None, []
        for w in reversed(list(again)):  # drop repeaters the others can do without
            if self.code.decode(sorted(members + [v for v in again if v != w])) is not None:
                again.remove(w)
        a = self.code.decode(sorted(members + again))
        assert a is not None
        return a, [w for w in again if a.get(w, 0) != 0]


class MultiplexedSGC(SequentialScheme):
    """M-SGC: D1 chunks plus B GC(n, λ)-coded D2 groups per job, W-1+B mini-tasks per round (T = W-2+B)."""

    name = "m-sgc"

    def __init__(self, model: BurstyModel, codes: CodeFactory = gradcode, jobs: int | None = None) -> None:
        n, B, W, lam = model.n, model.B, model.W, model.lam
        self.groups = B if lam < n else 0
        # A mini-task is lam+1 partitions: a D1 chunk, or a coded task over lam+1 of a group's n partitions.
        self.unit = lam + 1 if self.groups else 1
        self.chunks = W - 1
        partitions = n * self.chunks * self.unit + n * self.groups
        load = Fraction((W - 1 + B) * self.unit, partitions)
        super().__init__(model, jobs, W - 2 + B, partitions, load)
        self.code = checked_code(codes, n, lam) if self.groups else None
        self._delivered: dict[int, list[set[int]]] = {}  # job -> worker -> D1 chunks that arrived

    def chunk(self, worker: int, k: int) -> Parts:
        """D1 chunk k of a worker: unit consecutive partitions, each with coefficient 1."""
        first = (worker * self.chunks + k) * self.unit
        return tuple((p, 1) for p in range(first, first + self.unit))

    def group_row(self, b: int, worker: int) -> Parts:
        """The worker's coded task of D2 group b: its GC(n, λ) row over the group's n partitions."""
        assert self.code is not None
        offset = self.n * self.chunks * self.unit + b * self.n
        return tuple((offset + p, c) for p, c in self.code.row(worker))

    def _missing(self, job: int, worker: int, upto: int) -> list[int]:
        """The worker's D1 chunks of job whose round came by round ``upto`` and that never arrived."""
        delivered = self._delivered.get(job, [set()] * self.n)[worker]
        return [k for k in range(self.chunks) if job + k <= upto and k not in delivered]

    def _tasks(self, t: int) -> dict[int, list[Task]]:
        tasks: dict[int, list[Task]] = {w: [] for w in range(self.n)}
        for m in range(self.chunks + self.model.B):
            j = t - m
            if not self.has_job(j) or self.status(j) != PENDING:
                continue
            for w in range(self.n):
                if m < self.chunks:
                    tasks[w].append(Task(j, self.chunk(w, m), "chunk", m))
                elif missing := self._missing(j, w, t - 1):
                    tasks[w].append(Task(j, self.chunk(w, missing[0]), "rechunk", missing[0]))
                elif self.groups:
                    b = m - self.chunks
                    tasks[w].append(Task(j, self.group_row(b, w), "group", b))
        return tasks

    def _plan(self, draft: Draft, tasks: dict[int, list[Task]], survivors: frozenset[int]) -> None:
        t = draft.t
        coded: dict[tuple[int, int], list[tuple[int, int]]] = {}
        arrived: dict[int, list[set[int]]] = {}
        for w in sorted(survivors):
            for i, task in enumerate(tasks[w]):
                if task.kind == "group":
                    coded.setdefault((task.job, task.index), []).append((w, i))
                else:
                    draft.add(task.job, w, i, 1)
                    arrived.setdefault(task.job, [set() for _ in range(self.n)])[w].add(task.index)
        assert self.code is not None or not coded
        for (job, b), members in sorted(coded.items()):
            a = self.code.decode([w for w, _ in members]) if self.code else None
            if a is None:
                draft.lost[job] = (f"D2 group {b}: {len(members)} coded results in round {t}, "
                                   f"GC({self.n}, {self.model.lam}) cannot decode them")
                continue
            for w, i in members:
                draft.add(job, w, i, a.get(w, 0))
        for j in range(t - self.T, t + 1):
            if not self.has_job(j) or self.status(j) != PENDING or j in draft.lost:
                continue
            last = j + self.T
            slots_left = last - max(t, j + self.chunks - 1)
            now = arrived.get(j, [set()] * self.n)
            missing = [len([k for k in self._missing(j, w, t) if k not in now[w]]) for w in range(self.n)]
            if max(missing) > slots_left:
                w = missing.index(max(missing))
                draft.lost[j] = (f"worker {w} still misses {missing[w]} D1 chunks after round {t}, "
                                 f"with {slots_left} repeat slots left")
            elif short := self._short_group(j, t, missing):
                draft.lost[j] = short
            elif t == last or (not self.groups and t >= j + self.chunks - 1 and max(missing) == 0):
                draft.completed.add(j)

    def _short_group(self, j: int, t: int, missing: list[int]) -> str:
        """Why a later coded group of job j will be undecodable even if no worker straggles after round t, or ''."""
        if not any(missing) or self.code is None:
            return ""
        start = max(t + 1, j + self.chunks)  # the job's first repeat slot after round t
        for b in range(self.groups):
            u = j + self.chunks + b
            # Without more stragglers, a worker missing m chunks repeats them in the next m slots, then codes.
            ready = [w for w in range(self.n) if u >= start + missing[w]]
            if u > t and self.code.decode(ready) is None:
                return (f"D2 group {b} (round {u}): only {len(ready)} workers will have their D1 chunks done, "
                        f"GC({self.n}, {self.model.lam}) cannot decode them")
        return ""

    def _extra_state(self) -> dict:
        return {
            "delivered": [[j, [sorted(c) for c in per_worker]] for j, per_worker in sorted(self._delivered.items())]
        }

    def _load_extra(self, state: dict, next_round: int) -> None:
        delivered: dict[int, list[set[int]]] = {}
        for entry in checked_list(state.get("delivered"), "delivered", self.T + 1):
            if not (isinstance(entry, list) and len(entry) == 2):
                raise ConfigError(f"an M-SGC state's delivered chunks must be [job, [[chunk, ...] per worker]], "
                                  f"got {entry!r:.80}")
            job = checked_count(entry[0], "delivered job", max(0, next_round - 1))
            per_worker = checked_list(entry[1], "delivered chunks", self.n)
            if job < next_round - 1 - self.T or job in delivered or len(per_worker) != self.n:
                raise ConfigError(f"an M-SGC state's delivered chunks of job {job} are not one list per worker "
                                  f"of a job in flight, once")
            delivered[job] = [
                {checked_count(k, "chunk", self.chunks - 1) for k in checked_list(c, "chunks", self.chunks)}
                for c in per_worker
            ]
        self._delivered = delivered

    def _commit(self, t: int, survivors: frozenset[int], combination: RoundCombination) -> None:
        for w in survivors:
            for task in self.assign(t)[w]:
                if task.kind in ("chunk", "rechunk"):
                    self._delivered.setdefault(task.job, [set() for _ in range(self.n)])[w].add(task.index)
        for job in [j for j in self._delivered if j < t - self.T]:
            del self._delivered[job]


def _coefficient(value: Any) -> float:
    """A finite decoding coefficient from a state, or ConfigError."""
    if not is_finite_number(value):
        raise ConfigError(f"a scheme state's coefficient must be a finite number, got {value!r:.80}")
    return float(value)


def make_scheme(name: str, model: BurstyModel, codes: CodeFactory = gradcode,
                jobs: int | None = None) -> SequentialScheme:
    """The scheme called ``name`` (``gc``, ``sr-sgc`` or ``m-sgc``) for the straggler model."""
    if name == "gc":
        return PlainGC(model, codes, jobs)
    if name == "sr-sgc":
        return SelectiveRepeatSGC(model, codes, jobs)
    if name == "m-sgc":
        return MultiplexedSGC(model, codes, jobs)
    raise ConfigError(f"unknown sequential coding scheme {name!r}; choose one of {', '.join(SCHEMES)}")
