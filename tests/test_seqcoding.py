"""Sequential gradient coding (collectives/gradcoding/seqcoding.py) and the bursty straggler model
(collectives/gradcoding/stragglermodel.py).

The schemes are checked the way loconet runs them: no master keeps individual results; each round the
survivors' results are summed with the round's coefficients into one partial sum per job. Every job must
be complete by round j+T with every partition counted exactly once, for every pattern the (B, W, λ) model
allows. Most tests use a fractional repetition stand-in (coefficients 0 and 1, so sums of integer gradients
compare exactly); the last ones use collectives/gradcoding/gradcodes.py's codes, cyclic MDS within float error.
"""

from __future__ import annotations

import copy
import itertools
import json
import random
from dataclasses import dataclass
from fractions import Fraction
from functools import partial

import pytest

from collectives.errors import ConfigError
from collectives.gradcoding import seqrounds
from collectives.gradcoding.seqcoding import (
    COMPLETE,
    LOST,
    PENDING,
    UNKNOWN,
    JobLost,
    MultiplexedSGC,
    PlainGC,
    SchedulingError,
    SelectiveRepeatSGC,
    gradcode,
    make_scheme,
    simulate,
)
from collectives.gradcoding.stragglermodel import BurstyModel, allows, bursty_pattern, conforms, first_violation


@dataclass(frozen=True)
class Repetition:
    """Fractional repetition GC(n, s): worker w computes its group's s+1 partitions; one survivor per group decodes.

    A stand-in with the seqcoding ``PlainCode`` interface, independent of collectives/gradcoding/gradcodes.py.
    """

    n: int
    s: int

    def row(self, worker: int) -> tuple[tuple[int, int], ...]:
        g = worker // (self.s + 1)
        return tuple((p, 1) for p in range(g * (self.s + 1), (g + 1) * (self.s + 1)))

    def decode(self, members):
        chosen: dict[int, int] = {}
        for w in sorted(members):
            chosen.setdefault(w // (self.s + 1), w)
        if len(chosen) < self.n // (self.s + 1):
            return None
        return {w: int(chosen[w // (self.s + 1)] == w) for w in members}


def repetition(n: int, s: int) -> Repetition:
    assert n % (s + 1) == 0, f"fractional repetition needs s+1 | n, got n={n}, s={s}"
    return Repetition(n, s)


def code_s(name: str, model: BurstyModel) -> int | None:
    """The s of the plain code a scheme uses (None: it uses none)."""
    if name == "sr-sgc":
        return -(-model.lam // ((model.W - 1) // model.B + 1))
    if name == "m-sgc" and model.lam == model.n:
        return None
    return model.lam


def fits(name: str, model: BurstyModel) -> bool:
    """Whether fractional repetition exists for the scheme's code (and plain GC can tolerate λ at all)."""
    s = code_s(name, model)
    return s is None or (s < model.n and model.n % (s + 1) == 0)


def grid() -> list[tuple[str, BurstyModel]]:
    cases = []
    for name in ("gc", "sr-sgc", "m-sgc"):
        for n, B in itertools.product((4, 6), (1, 2, 3)):
            for W in sorted({B + 1, 2 * B + 1, 2 * B + 2}):  # B | W-1 (the paper's SR-SGC) and not
                for lam in range(n + 1):
                    model = BurstyModel(n, B, W, lam)
                    if fits(name, model):
                        cases.append((name, model))
    return cases


GRID = grid()


def patterns(model: BurstyModel, rounds: int) -> list[list[frozenset[int]]]:
    """Seeded random conforming patterns (sparse and dense), and the aligned and rotating worst cases."""
    found = [bursty_pattern(model.n, model.B, model.W, model.lam, rounds, seed, "random", start, stay)
             for seed, (start, stay) in enumerate([(0.1, 0.5), (0.3, 0.7), (0.6, 0.9), (0.9, 1.0)] * 2)]
    found += [bursty_pattern(model.n, model.B, model.W, model.lam, rounds, seed, mode)
              for seed in range(3) for mode in ("aligned", "rotating")]
    return found


def gradient(job: int, partition: int) -> int:
    """An integer fake gradient: distinct for every (job, partition), so a miscount shows in the sum."""
    return 1 + 1000 * job + 7 * partition + (partition * partition) % 13


def check_exact(scheme, pattern) -> None:
    """Every job whose deadline lies in the pattern completes by j+T with each partition counted exactly once."""
    sim = simulate(scheme, pattern, gradient)
    assert not sim.lost
    for j in range(len(pattern) - scheme.T):
        if not scheme.has_job(j):
            continue
        assert scheme.status(j) == COMPLETE
        assert j <= sim.completed_at[j] <= j + scheme.T
        assert sim.coverage[j] == {p: 1 for p in range(scheme.partitions)}
        assert sim.sums[j] == sum(gradient(j, p) for p in range(scheme.partitions))


# -- the straggler model ----------------------------------------------------------------------


@pytest.mark.parametrize("B, W, lam, pattern, ok", [
    (2, 3, 1, [{0}, {0}, set(), set(), {0}], True),           # a burst of 2, and another 3 rounds after it ended
    (2, 3, 1, [{0}, set(), {0}], False),                      # two bursts inside one window of 3
    (2, 3, 1, [{0}, {0}, {0}], False),                        # a burst of 3 > B
    (2, 3, 1, [{0}, {1}], False),                             # 2 distinct stragglers in a window, lambda 1
    (2, 3, 2, [{0}, {0, 1}, {1}], True),                      # overlapping bursts of 2 by two workers
    (2, 3, 2, [{0}, {1}, {0, 1}], False),                     # worker 0: rounds 0 and 2 are not one burst
    (2, 3, 2, [{0}, {1}, {2}], False),                        # 3 distinct in rounds 0..2
    (2, 3, 2, [{0}, {1}, set(), {2}], True),                  # worker 0 left the window of rounds 1..3
    (1, 2, 1, [{0}, {0}], False),                             # B = 1: no two straggles in a row
    (1, 2, 1, [{0}, set(), {0}], True),
    (1, 3, 3, [{0, 1, 2}, set(), set(), {0, 1, 2}], True),
    (1, 3, 3, [{0, 1, 2}, set(), {0}], False),
])
def test_conformance_follows_both_conditions_of_every_window(B, W, lam, pattern, ok):
    model = BurstyModel(3, B, W, lam)
    assert conforms(pattern, model) is ok
    assert (first_violation(pattern, model) is None) is ok


def test_a_violation_names_the_round_and_the_worker():
    violation = first_violation([{0}, set(), {0}], BurstyModel(3, 2, 3, 1))
    assert (violation.round, violation.worker) == (2, 0)
    assert "burst" in violation.reason


def test_allows_checks_one_more_round():
    model = BurstyModel(3, 2, 3, 1)
    assert allows([{0}], {0}, model)
    assert not allows([{0}], {1}, model)
    assert not allows([{0}, {0}], {0}, model)


@pytest.mark.parametrize("B, W, lam", [(0, 2, 1), (2, 2, 1), (3, 2, 1), (1, 2, -1), (1, 2, 7)])
def test_a_bad_model_is_a_config_error(B, W, lam):
    with pytest.raises(ConfigError):
        BurstyModel(6, B, W, lam)


@pytest.mark.parametrize("mode", ["random", "aligned", "rotating"])
@pytest.mark.parametrize("n, B, W, lam", [(4, 1, 2, 1), (6, 2, 3, 2), (6, 3, 5, 4), (8, 2, 7, 8), (5, 1, 4, 0)])
def test_generated_patterns_conform_and_are_reproducible(mode, n, B, W, lam):
    model = BurstyModel(n, B, W, lam)
    for seed in range(5):
        pattern = bursty_pattern(n, B, W, lam, 60, seed, mode)
        assert len(pattern) == 60 and conforms(pattern, model)
        assert pattern == bursty_pattern(n, B, W, lam, 60, seed, mode)
        assert any(pattern) == (lam > 0)


def test_the_aligned_worst_case_uses_the_whole_budget_as_often_as_allowed():
    pattern = bursty_pattern(6, 2, 3, 2, 12, seed=0, mode="aligned")
    sizes = [len(s) for s in pattern]
    assert sizes == [2, 2, 0, 0] * 3  # bursts of B=2 rounds by lambda=2 workers, every W+B-1 = 4 rounds
    assert len(set().union(*pattern)) == 2


def test_random_patterns_differ_by_seed():
    assert bursty_pattern(6, 2, 3, 2, 50, 1) != bursty_pattern(6, 2, 3, 2, 50, 2)


# -- exactness under the model ----------------------------------------------------------------


@pytest.mark.parametrize("name, model", GRID, ids=[f"{name}-n{m.n}-B{m.B}-W{m.W}-l{m.lam}" for name, m in GRID])
def test_every_job_completes_by_its_deadline_with_each_partition_once(name, model):
    rounds = 36
    for pattern in patterns(model, rounds):
        scheme = make_scheme(name, model, repetition, jobs=rounds - (model.W - 2 + model.B))
        check_exact(scheme, pattern)


def all_conforming(model: BurstyModel, rounds: int):
    """Every conforming pattern of ``rounds`` rounds (depth-first, one round at a time)."""
    subsets = [frozenset(c) for k in range(model.lam + 1) for c in itertools.combinations(range(model.n), k)]

    def extend(prefix):
        if len(prefix) == rounds:
            yield prefix
            return
        for s in subsets:
            if allows(prefix, s, model):
                yield from extend([*prefix, s])

    yield from extend([])


@pytest.mark.parametrize("name, model, rounds", [
    ("m-sgc", BurstyModel(4, 2, 3, 1), 8),
    ("m-sgc", BurstyModel(2, 1, 3, 1), 12),
    ("m-sgc", BurstyModel(2, 1, 2, 2), 8),   # no coded groups: only repeated chunks
    ("sr-sgc", BurstyModel(4, 1, 3, 2), 7),
    ("sr-sgc", BurstyModel(4, 2, 3, 2), 5),
    ("sr-sgc", BurstyModel(4, 2, 5, 2), 6),
    ("sr-sgc", BurstyModel(4, 2, 4, 2), 6),  # B does not divide W-1
])
def test_exhaustively_every_conforming_pattern_of_a_few_rounds(name, model, rounds):
    count = 0
    for pattern in all_conforming(model, rounds):
        check_exact(make_scheme(name, model, repetition, jobs=rounds - (model.W - 2 + model.B)), pattern)
        count += 1
    assert count > 800


# -- loads ------------------------------------------------------------------------------------


@pytest.mark.parametrize("n, B, W, lam, gc, sr, m", [
    (6, 2, 3, 2, Fraction(1, 2), Fraction(1, 3), Fraction(1, 4)),     # the worked example of the docs
    (100, 2, 3, 2, Fraction(3, 100), Fraction(2, 100), Fraction(3, 200)),
    (6, 1, 2, 1, Fraction(1, 3), Fraction(1, 3), Fraction(2, 9)),
    (4, 1, 3, 1, Fraction(1, 2), Fraction(1, 2), Fraction(3, 10)),
    (20, 2, 5, 3, Fraction(1, 5), Fraction(1, 10), Fraction(1, 15)),
])
def test_the_load_formulas(n, B, W, lam, gc, sr, m):
    model = BurstyModel(n, B, W, lam)
    codes = Repetition  # only the formulas are read here
    assert PlainGC(model, codes).load == gc == Fraction(lam + 1, n)
    assert SelectiveRepeatSGC(model, codes).load == sr
    assert MultiplexedSGC(model, codes).load == m == Fraction((lam + 1) * (W - 1 + B), n * (B + (W - 1) * (lam + 1)))


def test_m_sgc_without_coded_groups_when_every_worker_may_straggle():
    model = BurstyModel(4, 2, 3, 4)
    scheme = MultiplexedSGC(model, repetition)
    assert scheme.groups == 0 and scheme.load == Fraction(3 + 1, 4 * 2) and scheme.partitions == 8


@pytest.mark.parametrize("name, model", GRID, ids=[f"{name}-n{m.n}-B{m.B}-W{m.W}-l{m.lam}" for name, m in GRID])
def test_the_realized_load_is_the_formula(name, model):
    pattern = bursty_pattern(model.n, model.B, model.W, model.lam, 40, seed=3, mode="random", start=0.5)
    sim = simulate(make_scheme(name, model, repetition), pattern)
    steady = sim.loads[model.W + model.B:]
    if name == "m-sgc" and model.lam == model.n:
        # No coded groups: a D2 slot holds a repeated chunk or nothing, so the formula is the most it can be.
        assert max(steady) <= make_scheme(name, model, repetition).load
    else:
        assert set(steady) == set(sim.mean_loads[model.W + model.B:]) == {make_scheme(name, model, repetition).load}


@pytest.mark.parametrize("n, B, W, lam", [(6, 2, 3, 2), (6, 1, 2, 1), (4, 1, 3, 1), (6, 3, 4, 2), (6, 2, 5, 5)])
def test_m_sgc_computes_less_than_plain_gc_for_the_same_tolerance(n, B, W, lam):
    model = BurstyModel(n, B, W, lam)
    pattern = bursty_pattern(n, B, W, lam, 40, seed=1, mode="rotating")
    m = simulate(MultiplexedSGC(model, repetition, jobs=40 - (W - 2 + B)), pattern, gradient)
    gc = simulate(PlainGC(model, repetition, jobs=40), pattern, gradient)
    assert not m.lost and not gc.lost
    assert m.realized_load < gc.realized_load == Fraction(lam + 1, n)
    assert m.realized_load == Fraction((lam + 1) * (W - 1 + B), n * (B + (W - 1) * (lam + 1)))


def test_an_m_sgc_round_is_w_minus_1_plus_b_equal_mini_tasks():
    model = BurstyModel(6, 2, 3, 2)
    scheme = MultiplexedSGC(model, repetition)
    for t in range(6):
        tasks = scheme.assign(t)
        scheme.observe(t, set())
    assert [len(tasks[w]) for w in range(6)] == [4] * 6
    assert {task.size for task in tasks[0]} == {3}
    assert sorted(task.job for task in tasks[0]) == [2, 3, 4, 5]  # W-1+B = 4 jobs in flight
    assert [task.kind for task in tasks[0]] == ["chunk", "chunk", "group", "group"]


# -- stragglers beyond the model ----------------------------------------------------------------


def test_plain_gc_reports_the_job_a_whole_group_of_stragglers_loses():
    model = BurstyModel(4, 1, 2, 1)
    pattern = [set(), set(), set(), {0, 1}, set(), set()]
    sim = simulate(PlainGC(model, repetition, jobs=6), pattern, gradient)
    assert list(sim.lost) == [3] and 3 not in sim.completed_at
    with pytest.raises(JobLost) as caught:
        simulate(PlainGC(model, repetition, jobs=6), pattern, strict=True)
    assert (caught.value.job, caught.value.round_id) == (3, 3)


def test_m_sgc_reports_a_burst_too_long_to_repeat():
    model = BurstyModel(4, 1, 2, 1)  # T = 1: one chunk per worker, one coded group
    pattern = [set(), set(), {0}, {0}, set(), set(), set()]
    scheme = MultiplexedSGC(model, repetition, jobs=6)
    sim = simulate(scheme, pattern, gradient)
    assert list(sim.lost) == [2] and sim.lost[2][0] == 3 and "D1 chunk" in sim.lost[2][1]
    assert scheme.status(2) == LOST
    for j in (0, 1, 3, 4, 5):
        assert sim.sums[j] == sum(gradient(j, p) for p in range(scheme.partitions))


def test_m_sgc_reports_a_coded_group_with_too_few_results():
    model = BurstyModel(4, 1, 2, 1)
    pattern = [set(), set(), {0, 1}, set(), set()]  # round 2 is job 1's coded round and job 2's chunk round
    sim = simulate(MultiplexedSGC(model, repetition, jobs=4), pattern, gradient)
    # Job 1's coded group has 2 of the 4 results; job 2's will too, as workers 0 and 1 must repeat their chunks.
    assert {job: sim.lost[job][0] for job in sim.lost} == {1: 2, 2: 2}
    assert all("group" in reason for _, reason in sim.lost.values())
    assert sim.completed_at == {0: 1, 3: 4}


def test_sr_sgc_reports_a_planned_repeater_that_straggles():
    model = BurstyModel(4, 1, 2, 2)  # s = 1, T = 1
    scheme = SelectiveRepeatSGC(model, repetition, jobs=5)
    pattern = [set(), {0, 1}, {0}, set(), set(), set()]  # worker 0 straggles twice in a row (B = 1)
    sim = simulate(scheme, pattern, gradient)
    assert list(sim.lost) == [1] and "repeaters" in sim.lost[1][1]
    assert scheme.status(1) == LOST


def test_combine_tells_a_runtime_to_wait_for_a_worker_before_it_accepts_the_round():
    model = BurstyModel(4, 1, 2, 2)
    scheme = SelectiveRepeatSGC(model, repetition, jobs=5)
    for t, stragglers in enumerate([set(), {0, 1}]):
        scheme.assign(t)
        scheme.observe(t, stragglers)
    scheme.assign(2)
    assert scheme.combine(2, {1, 2, 3}).lost_jobs == (1,)  # a planned repeater is missing
    assert scheme.combine(2, {1, 2, 3}).lost_jobs == (1,)  # combine records nothing
    assert scheme.status(1) == PENDING
    waited = scheme.observe(2, set())
    assert waited.lost == () and 1 in waited.completed


# -- the API ----------------------------------------------------------------------------------


def test_rounds_are_assigned_and_observed_in_order():
    scheme = SelectiveRepeatSGC(BurstyModel(4, 1, 2, 1), repetition)
    with pytest.raises(SchedulingError):
        scheme.assign(1)
    scheme.assign(0)
    with pytest.raises(SchedulingError):
        scheme.observe(0, {9})
    scheme.observe(0, set())
    with pytest.raises(SchedulingError):
        scheme.observe(0, set())


def test_sr_sgc_repeats_only_what_the_code_cannot_spare_and_weights_each_round_finally():
    model = BurstyModel(6, 2, 3, 2)  # s = 1: groups {0,1} {2,3} {4,5}
    scheme = SelectiveRepeatSGC(model, repetition)
    assert scheme.T == 2
    scheme.assign(0)
    first = scheme.observe(0, {0, 1})  # group {0,1} lost for job 0
    assert first.completed == () and set(first.weights[0]) == {2, 4}
    scheme.assign(1)
    scheme.observe(1, set())
    repeats = scheme.assign(2)
    assert [(w, t.kind, t.job) for w in range(6) for t in repeats[w] if t.kind == "repeat"] == [(0, "repeat", 0)]
    last = scheme.observe(2, set())
    assert last.weights[0] == {0: {0: 1}} and 0 in last.completed
    assert set(last.weights[2]) == {1, 2, 4}  # worker 0's job-2 task was replaced; worker 1 covers its group


def test_plain_gc_is_sequential_coding_with_no_delay():
    model = BurstyModel(6, 2, 3, 2)
    scheme = PlainGC(model, repetition)
    assert scheme.T == 0 and scheme.load == Fraction(1, 2)
    check_exact(PlainGC(model, repetition, jobs=30), bursty_pattern(6, 2, 3, 2, 30, seed=4))


def test_a_scheme_can_be_copied_to_try_a_round():
    model = BurstyModel(4, 2, 3, 1)
    scheme = MultiplexedSGC(model, repetition)
    scheme.assign(0)
    trial = copy.deepcopy(scheme)
    trial.observe(0, {1})
    assert scheme.next_round == 0 and trial.next_round == 1


def test_unknown_scheme_is_a_config_error():
    with pytest.raises(ConfigError):
        make_scheme("lt-sgc", BurstyModel(4, 1, 2, 1), repetition)


@pytest.mark.parametrize("name, model", [
    ("m-sgc", BurstyModel(6, 2, 3, 2)), ("sr-sgc", BurstyModel(6, 2, 3, 2)), ("gc", BurstyModel(6, 2, 3, 2)),
    ("m-sgc", BurstyModel(8, 1, 4, 3)), ("sr-sgc", BurstyModel(8, 1, 3, 3)),
])
def test_with_the_projects_fractional_repetition_codes_the_sums_are_exact(name, model):
    for pattern in patterns(model, 30)[::3]:
        check_exact(make_scheme(name, model, partial(gradcode, kind="frc"), jobs=30 - model.W + 2 - model.B), pattern)


@pytest.mark.parametrize("name, model", [
    ("m-sgc", BurstyModel(5, 2, 3, 2)), ("m-sgc", BurstyModel(7, 1, 4, 3)), ("sr-sgc", BurstyModel(5, 1, 3, 4)),
    ("sr-sgc", BurstyModel(7, 2, 5, 4)), ("gc", BurstyModel(5, 1, 2, 2)),
])
def test_with_cyclic_mds_codes_the_sums_match_within_float_error(name, model):
    for pattern in patterns(model, 30)[::3]:
        scheme = make_scheme(name, model, partial(gradcode, kind="cyclic"), jobs=30 - (model.W - 2 + model.B))
        sim = simulate(scheme, pattern, gradient)
        assert not sim.lost
        for j in range(scheme.jobs):
            assert sim.completed_at[j] <= j + scheme.T
            assert sim.sums[j] == pytest.approx(sum(gradient(j, p) for p in range(scheme.partitions)), rel=1e-9)
            assert sim.coverage[j] == pytest.approx({p: 1.0 for p in range(scheme.partitions)}, abs=1e-9)
        assert sim.realized_load == scheme.load


def test_sr_sgc_when_b_does_not_divide_w_minus_1_takes_the_windows_of_xb_plus_1_rounds():
    # x = floor((W-1)/B) = 1, s = ceil(5/2) = 3. Bλ/(W-1+B) would give s = 2, and an MDS code with s = 2
    # loses jobs on this conforming pattern: 3 then 2 new stragglers every other round outgrow 2 per round.
    model = BurstyModel(6, 2, 4, 5)
    pattern = [frozenset({0, 1, 2}) if t % 4 == 0 else frozenset({3, 4}) if t % 4 == 2 else frozenset()
               for t in range(24)]
    assert conforms(pattern, model)
    scheme = SelectiveRepeatSGC(model, partial(gradcode, kind="cyclic"), jobs=22)
    assert scheme.s == 3 and scheme.load == Fraction(4, 6)
    sim = simulate(scheme, pattern, gradient)
    assert not sim.lost and all(sim.completed_at[j] <= j + 2 for j in range(22))
    assert all(sim.sums[j] == pytest.approx(sum(gradient(j, p) for p in range(6)), rel=1e-9) for j in range(22))


# -- a scheme's state: bounded, and restored exactly ------------------------------------------------------


def broken_pattern(model: BurstyModel, rounds: int, seed: int) -> list[frozenset[int]]:
    """Seeded stragglers that ignore the model: jobs get lost, repeats and rechunks get planned."""
    rng = random.Random(seed)
    return [frozenset(w for w in range(model.n) if rng.random() < 0.3) for _ in range(rounds)]


STATE_CASES = [(name, model) for name, model in GRID if model.n == 4][::3] + [
    ("sr-sgc", BurstyModel(7, 2, 5, 4)), ("m-sgc", BurstyModel(5, 2, 3, 2))]


@pytest.mark.parametrize("name, model", STATE_CASES, ids=[f"{n}-n{m.n}-B{m.B}-W{m.W}-l{m.lam}" for n, m in STATE_CASES])
def test_a_scheme_restored_from_any_rounds_state_goes_on_exactly_as_the_original(name, model):
    codes = partial(gradcode, kind="cyclic") if model.n in (5, 7) else repetition
    rounds = 3 * (model.W + model.B) + 4
    for pattern in [patterns(model, rounds)[0], broken_pattern(model, rounds, 1), broken_pattern(model, rounds, 2)]:
        original = make_scheme(name, model, codes)
        states, steps = [], []
        for t, stragglers in enumerate(pattern):
            states.append(json.loads(json.dumps(original.state_dict())))
            steps.append((original.assign(t), original.observe(t, stragglers)))
        for k in range(rounds):
            restored = make_scheme(name, model, codes)
            restored.load_state_dict(states[k])
            for t in range(k, rounds):
                assert (restored.assign(t), restored.observe(t, pattern[t])) == steps[t], (k, t)


def test_a_scheme_keeps_only_its_recent_rounds(monkeypatch):
    monkeypatch.setattr(seqrounds, "KEPT_ROUNDS", 5)
    model = BurstyModel(4, 1, 2, 1)
    scheme = SelectiveRepeatSGC(model, repetition)
    for t in range(40):
        scheme.assign(t)
        scheme.observe(t, {t % 4} if t % 3 == 0 else set())
    assert scheme.kept_rounds == 5 and len(scheme.history) == 5 and scheme.history_start == 35
    assert max(len(scheme._status), len(scheme._completed_in)) <= 5
    assert (scheme.status(34), scheme.status(35), scheme.status(39)) == (UNKNOWN, COMPLETE, COMPLETE)
    assert len(json.dumps(scheme.state_dict())) < 200  # the same at any round


@pytest.mark.parametrize(
    "change",
    [
        {"next_round": -1}, {"next_round": "3"}, {"next_round": True},
        {"history": [[0], [1], [2]]},  # more than W rounds
        {"history": [[9]]}, {"history": [[1, 1]]}, {"history": "x"},
        {"done": [[0, "complete"]]},  # a job no longer in flight
        {"done": [[5, "complete"]]},  # a job not started
        {"done": [[4, "pending"]]}, {"done": [[4]]},
        {"repeats": [[4, [[0, 1.0]]]]},  # a repeat for a round already past
        {"repeats": [[5, [[0, 1.0], [0, 1.0]]]]}, {"repeats": [[5, [[9, 1.0]]]]}, {"repeats": [[5, [[0, "1"]]]]},
        {"repeats": None},
    ],
)
def test_a_malformed_sr_sgc_state_is_refused_and_changes_nothing(change):
    model = BurstyModel(4, 1, 2, 2)
    good = {"next_round": 5, "history": [[], [1]], "done": [[4, "complete"]], "repeats": [[5, [[1, 1.0]]]]}
    fresh = SelectiveRepeatSGC(model, repetition)
    fresh.load_state_dict(good)  # the good state is taken
    scheme = SelectiveRepeatSGC(model, repetition)
    with pytest.raises(ConfigError, match="state"):
        scheme.load_state_dict({**good, **change})
    assert (scheme.next_round, list(scheme.history), scheme._repeats) == (0, [], {})


@pytest.mark.parametrize(
    "delivered",
    [
        [[1, [[0], [0]]]],
        [[1, [[0], [0], [0], [5]]]],
        [[9, [[], [], [], []]]],
        [[1, [[], [], [], []]], [1, [[], [], [], []]]],
    ],
)
def test_a_malformed_m_sgc_state_is_refused(delivered):
    scheme = MultiplexedSGC(BurstyModel(4, 1, 3, 1), repetition)
    with pytest.raises(ConfigError, match="state"):
        scheme.load_state_dict({"next_round": 3, "history": [], "done": [], "delivered": delivered})
    assert scheme.next_round == 0
