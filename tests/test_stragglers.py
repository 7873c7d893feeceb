"""Straggler patterns (seeded, reproducible) and a harness-started peer slowed down by one (no processes)."""

from __future__ import annotations

import collections
import pickle
from types import SimpleNamespace

import pytest
import torch

import peer.harness.control as control_module
from collectives.errors import ConfigError
from collectives.gradcoding.stragglermodel import BurstyModel, conforms
from peer.harness.control import Control, write_control
from peer.stragglers import (
    NONE,
    BurstyStragglers,
    NoStragglers,
    PersistentStraggler,
    RandomStragglers,
    StragglerPattern,
)

# -- the patterns -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "text,pattern",
    [
        ("none", NoStragglers()),
        ("random,x=4", RandomStragglers(x=4.0)),
        ("random,x=2.5,seed=7", RandomStragglers(x=2.5, seed=7)),
        ("persistent,worker=2,x=3", PersistentStraggler(worker=2, x=3.0)),
        ("bursty,B=1,W=2,lambda=1,x=4", BurstyStragglers(B=1, W=2, lam=1, x=4.0)),
        ("bursty,B=2,W=5,lambda=3,x=4,p=0.2,seed=9", BurstyStragglers(B=2, W=5, lam=3, x=4.0, p=0.2, seed=9)),
    ],
)
def test_a_pattern_parses_from_its_text_and_writes_the_same_text_back(text, pattern):
    parsed = StragglerPattern.parse(text)
    assert parsed == pattern
    assert parsed.spec == str(parsed) == text
    assert StragglerPattern.parse(parsed.spec) == parsed


@pytest.mark.parametrize(
    "text,canonical",
    [
        ("random,seed=0,x=4.0", "random,x=4"),
        ("bursty,x=4,lambda=1,W=2,B=1,seed=3", "bursty,B=1,W=2,lambda=1,x=4,seed=3"),
        (" persistent, x=3, worker=0 ", "persistent,worker=0,x=3"),
    ],
)
def test_options_may_come_in_any_order_and_the_spec_is_canonical(text, canonical):
    assert StragglerPattern.parse(text).spec == canonical


@pytest.mark.parametrize(
    "text,message",
    [
        ("slow,x=4", "unknown straggler pattern 'slow'"),
        ("random", "random needs x="),
        ("random,x=1", "x is how many times slower a straggler is and must be above 1"),
        ("random,x=fast", "x= needs a number, got 'fast'"),
        ("random,x=nan", "x= must be finite"),
        ("random,x=4,seed=-1", "seed must be an integer >= 0"),
        ("random,x=4,seed=1.5", "seed= needs an integer"),
        ("random,x=4,worker=1", "random takes x=, seed=, not worker="),
        ("random,x=4,x=5", "x= is given twice"),
        ("random,x", "cannot read 'x', write KEY=VALUE"),
        ("persistent,x=3", "persistent needs worker="),
        ("persistent,worker=-1,x=3", "worker must be a worker number >= 0"),
        ("none,x=2", "none takes no options, not x="),
        ("bursty,B=1,W=2,x=4", "bursty needs lambda="),
        ("bursty,B=2,W=2,lambda=1,x=4", "a burst (B=2) must be shorter than its window (W=2)"),
        ("bursty,B=0,W=2,lambda=1,x=4", "B must be an integer >= 1"),
        ("bursty,B=1,W=2,lambda=0,x=4", "lambda must be an integer >= 1"),
        ("bursty,B=1,W=2,lambda=1,x=4,p=1.5", "p is a probability in (0, 1]"),
    ],
)
def test_bad_pattern_text_is_a_config_error_that_lists_what_to_write(text, message):
    with pytest.raises(ConfigError) as info:
        StragglerPattern.parse(text)
    assert message in str(info.value)


def test_the_error_for_an_unknown_pattern_lists_every_accepted_form():
    with pytest.raises(ConfigError) as info:
        StragglerPattern.parse("often")
    assert str(info.value).endswith(
        "write one of: none; random,x=X[,seed=N]; persistent,worker=I,x=X; "
        "bursty,B=B,W=W,lambda=L,x=X[,p=P][,seed=N]"
    )


def test_nobody_straggles_without_a_pattern():
    assert NONE.stragglers(5, 4) == frozenset()
    assert [NONE.slowdown(5, w, 4) for w in range(4)] == [1.0] * 4


def test_a_persistent_straggler_is_slow_at_every_step_and_only_it():
    pattern = StragglerPattern.parse("persistent,worker=1,x=3")
    assert {pattern.stragglers(step, 4) for step in range(50)} == {frozenset({1})}
    assert [pattern.slowdown(7, w, 4) for w in range(4)] == [1.0, 3.0, 1.0, 1.0]
    assert pattern.stragglers(0, 1) == frozenset(), "worker 1 is not among a single worker"


def test_a_random_pattern_slows_exactly_one_worker_at_each_step_by_x():
    pattern = StragglerPattern.parse("random,x=4,seed=3")
    for step in range(200):
        slowdowns = [pattern.slowdown(step, w, 6) for w in range(6)]
        assert sorted(slowdowns) == [1.0] * 5 + [4.0]
        assert pattern.stragglers(step, 6) == {slowdowns.index(4.0)}


def test_a_random_pattern_is_the_same_whatever_the_order_of_the_questions():
    a, b = StragglerPattern.parse("random,x=4,seed=3"), StragglerPattern.parse("random,x=4,seed=3")
    forwards = [a.stragglers(step, 6) for step in range(100)]
    backwards = [b.stragglers(step, 6) for step in reversed(range(100))][::-1]
    assert forwards == backwards


def test_a_random_pattern_depends_on_its_seed():
    first = [RandomStragglers(x=4, seed=1).straggler(step, 6) for step in range(100)]
    second = [RandomStragglers(x=4, seed=2).straggler(step, 6) for step in range(100)]
    assert first != second


def test_a_random_pattern_picks_every_worker_about_equally_often():
    counts = collections.Counter(RandomStragglers(x=4, seed=0).straggler(step, 6) for step in range(6000))
    assert sorted(counts) == list(range(6))
    # 1000 expected each; a binomial's standard deviation is about 29, so the seeded run is well inside 10%.
    assert all(900 <= c <= 1100 for c in counts.values()), counts


@pytest.mark.parametrize(
    "text,n",
    [
        ("bursty,B=1,W=2,lambda=1,x=4", 6),
        ("bursty,B=2,W=4,lambda=2,x=4", 6),
        ("bursty,B=3,W=8,lambda=2,x=4,seed=5", 12),
        ("bursty,B=4,W=5,lambda=3,x=4,p=1", 6),
        ("bursty,B=1,W=3,lambda=2,x=4,p=0.5", 4),
        ("bursty,B=5,W=6,lambda=1,x=4,p=0.3,seed=1", 3),
    ],
)
def test_a_bursty_pattern_conforms_to_its_b_w_lambda_model_over_a_long_run(text, n):
    pattern = StragglerPattern.parse(text)
    steps = [pattern.stragglers(step, n) for step in range(3000)]
    assert conforms(steps, BurstyModel(n, pattern.B, pattern.W, min(pattern.lam, n)))
    assert sum(map(len, steps)) > 300, "the run has stragglers to speak of"
    assert all(s <= set(range(n)) for s in steps)


def test_a_bursty_pattern_has_bursts_longer_than_one_step_when_b_allows_them():
    pattern = StragglerPattern.parse("bursty,B=3,W=6,lambda=2,x=4")
    steps = [pattern.stragglers(step, 6) for step in range(2000)]
    runs = [w for t in range(2, 2000) for w in steps[t] if w in steps[t - 1] and w in steps[t - 2]]
    assert runs, "some worker straggles three steps in a row"


def test_a_bursty_pattern_saturated_by_p_1_uses_its_whole_budget():
    # B=1, W=2, lambda=1: at most one straggler in any two steps, so at best every other step has one.
    pattern = StragglerPattern.parse("bursty,B=1,W=2,lambda=1,x=4,p=1")
    steps = [pattern.stragglers(t, 6) for t in range(1000)]
    assert sum(map(len, steps)) == 500
    assert all(len(steps[t]) + len(steps[t + 1]) == 1 for t in range(999))


def test_a_bursty_pattern_is_the_same_whatever_the_order_of_the_questions():
    text = "bursty,B=2,W=4,lambda=2,x=4,seed=11"
    in_order = StragglerPattern.parse(text)
    forwards = [in_order.stragglers(step, 6) for step in range(300)]
    late_first = StragglerPattern.parse(text)
    assert late_first.stragglers(299, 6) == forwards[299]
    assert [late_first.stragglers(step, 6) for step in reversed(range(300))][::-1] == forwards


def test_a_bursty_pattern_depends_on_its_seed_and_on_n():
    def run(text, n):
        pattern = StragglerPattern.parse(text)
        return [pattern.stragglers(step, n) for step in range(300)]

    assert run("bursty,B=2,W=4,lambda=2,x=4,seed=1", 6) != run("bursty,B=2,W=4,lambda=2,x=4,seed=2", 6)
    assert run("bursty,B=2,W=4,lambda=2,x=4", 6) != run("bursty,B=2,W=4,lambda=2,x=4", 7)


def test_a_bursty_pattern_survives_pickling_with_the_steps_it_generated():
    pattern = StragglerPattern.parse("bursty,B=2,W=4,lambda=2,x=4")
    before = [pattern.stragglers(step, 6) for step in range(100)]
    copy = pickle.loads(pickle.dumps(pattern))
    assert copy == pattern
    assert [copy.stragglers(step, 6) for step in range(200)][:100] == before


def test_a_bursty_straggler_is_x_times_slower_and_the_others_are_not():
    pattern = StragglerPattern.parse("bursty,B=2,W=4,lambda=2,x=4")
    for step in range(100):
        slow = pattern.stragglers(step, 6)
        assert [pattern.slowdown(step, w, 6) for w in range(6)] == [4.0 if w in slow else 1.0 for w in range(6)]


@pytest.mark.parametrize(
    "steps,conform",
    [
        ([{0}, {0}, set(), set(), {1}], True),  # a burst of 2, then another worker once the window moved on
        ([{0}, {0}, set(), {1}], False),  # ... but not while the window still holds the first burst
        ([{0}, {0}, {0}], False),  # a burst of 3 > B
        ([{0}, set(), {0}], False),  # two straggles 3 steps apart are not inside one burst of 2
        ([{0}, set(), set(), {0}], True),  # ... but 4 apart they are in different windows
        ([{0}, {1}], False),  # two distinct stragglers in one window > lambda
        ([{0}, set(), set(), {1}], True),
    ],
)
def test_conforms_checks_every_window_of_w_steps(steps, conform):
    assert conforms([frozenset(s) for s in steps], BurstyModel(2, B=2, W=3, lam=1)) is conform


# -- a peer slowed down by a pattern (Control) --------------------------------------------------

MODEL = torch.nn.Linear(1, 1)


class Clock:
    """time.monotonic and time.sleep for Control: the clock moves only when told to, or by a sleep."""

    def __init__(self) -> None:
        self.now = 0.0
        self.sleeps: list[float] = []

    def monotonic(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.now += seconds


@pytest.fixture
def clock(monkeypatch) -> Clock:
    fake = Clock()
    monkeypatch.setattr(control_module, "time", fake)
    return fake


class Recorder:
    def __init__(self) -> None:
        self.events: list[dict] = []

    def __call__(self, event: str, **fields) -> None:
        self.events.append({"event": event, **fields})


def peer_control(tmp_path, model: torch.nn.Module | None = None) -> tuple[Control, SimpleNamespace, Recorder]:
    """A Control reading its file at every step, attached to a fake optimizer (its step count) and loop."""
    control = Control(str(tmp_path / "peer.control.json"), poll_s=0.0)
    optimizer = SimpleNamespace(tamper=None, inner_steps=0)
    emit = Recorder()
    control.attach(optimizer, SimpleNamespace(model=model, batches=iter(())), emit)
    return control, optimizer, emit


def take_steps(clock: Clock, control: Control, optimizer, steps: int, step_s: float = 2.0) -> list[float]:
    """Steps of step_s seconds each (the optimizer counts them); the sleep after each (0.0: none)."""
    slept = []
    for _ in range(steps):
        clock.now += step_s
        optimizer.inner_steps += 1
        before = len(clock.sleeps)
        control.after_step(MODEL)
        slept.append(clock.sleeps[before] if len(clock.sleeps) > before else 0.0)
    return slept


def test_a_peer_following_a_random_pattern_sleeps_before_exactly_the_steps_it_straggles_in(tmp_path, clock):
    control, optimizer, emit = peer_control(tmp_path)
    write_control(tmp_path / "peer.control.json", {"straggle": "random,x=4,seed=5", "worker": 2, "n": 6})
    slept = take_steps(clock, control, optimizer, 60)
    pattern = RandomStragglers(x=4, seed=5)
    # After step k-1 the optimizer has taken k steps: the sleep delays step k, which the pattern slows or not.
    assert slept == [6.0 if pattern.straggler(k, 6) == 2 else 0.0 for k in range(1, 61)]
    assert 0 < control.slowed == slept.count(6.0) < 60
    assert emit.events == [
        {"event": "straggle-started", "pattern": "random,x=4,seed=5", "worker": 2, "n": 6, "step": 1}
    ]


def test_every_worker_of_a_pattern_agrees_on_the_one_straggler_of_each_step(tmp_path, clock):
    slow_steps = []
    for worker in range(4):
        (tmp_path / f"w{worker}").mkdir()
        control, optimizer, _ = peer_control(tmp_path / f"w{worker}")
        write_control(
            tmp_path / f"w{worker}" / "peer.control.json", {"straggle": "random,x=3", "worker": worker, "n": 4}
        )
        slow_steps.append([s > 0 for s in take_steps(clock, control, optimizer, 40)])
    assert all(sum(column) == 1 for column in zip(*slow_steps)), "at each step exactly one of the 4 peers sleeps"


def test_the_sleep_scales_the_forward_and_backward_pass_not_the_wait_for_the_round(tmp_path, clock):
    model = torch.nn.Linear(3, 1)
    control, optimizer, _ = peer_control(tmp_path, model)
    write_control(tmp_path / "peer.control.json", {"straggle": "persistent,worker=0,x=3", "worker": 0, "n": 2})
    clock.now = 10.0
    control.after_step(model)  # reads the file; no computation was timed yet, so it sleeps 2 x the whole step
    assert clock.sleeps == [20.0]
    clock.now = 100.0
    loss = model(torch.ones(1, 3)).sum()  # the forward starts at 100 s...
    clock.now = 101.5
    loss.backward()  # ... and the last gradient arrives at 101.5 s
    clock.now = 130.0  # the round waited for slower peers until 130 s
    optimizer.inner_steps += 1
    control.after_step(model)
    assert clock.sleeps == [20.0, 3.0], "x-1 = 2 times the 1.5 s of computation"


def test_an_evaluation_forward_does_not_count_as_the_steps_computation(tmp_path, clock):
    model = torch.nn.Linear(3, 1)
    control, _, _ = peer_control(tmp_path, model)
    write_control(tmp_path / "peer.control.json", {"straggle": "persistent,worker=0,x=2", "worker": 0, "n": 1})
    control.after_step(model)
    clock.now = 50.0
    with torch.no_grad():
        model(torch.ones(1, 3))  # an evaluation between steps
    clock.now = 60.0
    loss = model(torch.ones(1, 3)).sum()
    clock.now = 62.0
    loss.backward()
    clock.now = 70.0
    control.after_step(model)
    assert clock.sleeps[-1] == 2.0, "the step's computation ran from 60 s to 62 s; from 50 s it would sleep 12 s"


def test_a_peers_own_slowdown_and_a_pattern_multiply(tmp_path, clock):
    control, optimizer, _ = peer_control(tmp_path)
    write_control(
        tmp_path / "peer.control.json", {"slowdown": 2, "straggle": "persistent,worker=1,x=3", "worker": 1, "n": 3}
    )
    assert take_steps(clock, control, optimizer, 2, step_s=1.0) == [5.0, 5.0]
    assert control.slowdown() == 6.0


def test_removing_the_pattern_stops_the_slowdown_and_says_how_many_steps_it_slowed(tmp_path, clock):
    control, optimizer, emit = peer_control(tmp_path)
    write_control(tmp_path / "peer.control.json", {"straggle": "persistent,worker=0,x=2", "worker": 0, "n": 2})
    assert take_steps(clock, control, optimizer, 3, step_s=1.0) == [1.0, 1.0, 1.0]
    write_control(tmp_path / "peer.control.json", {"straggle": None, "worker": 0, "n": 2})
    assert take_steps(clock, control, optimizer, 2, step_s=1.0) == [0.0, 0.0]
    assert emit.events[1] == {
        "event": "straggle-stopped",
        "pattern": "persistent,worker=0,x=2",
        "step": 4,
        "steps_slowed": 3,
    }
    assert control.pattern is None


def test_without_an_optimizer_the_control_counts_the_steps_itself(tmp_path, clock):
    control = Control(str(tmp_path / "peer.control.json"), poll_s=0.0)
    write_control(tmp_path / "peer.control.json", {"straggle": "random,x=2,seed=1", "worker": 0, "n": 3})
    slept = []
    for _ in range(30):
        clock.now += 1.0
        before = len(clock.sleeps)
        control.after_step(MODEL)
        slept.append(len(clock.sleeps) > before)
    pattern = RandomStragglers(x=2, seed=1)
    assert slept == [pattern.straggler(k, 3) == 0 for k in range(1, 31)]


@pytest.mark.parametrize(
    "control_file,reason",
    [
        ({"straggle": "random", "worker": 0, "n": 3}, "random needs x="),
        ({"straggle": "random,x=4", "worker": 3, "n": 3}, "worker 3 of n=3: the worker number must be in 0..n-1"),
    ],
)
def test_a_pattern_the_peer_cannot_follow_is_refused_and_the_peer_is_not_slowed(tmp_path, clock, control_file, reason):
    control, optimizer, emit = peer_control(tmp_path)
    write_control(tmp_path / "peer.control.json", control_file)
    assert take_steps(clock, control, optimizer, 5) == [0.0] * 5
    assert [e["event"] for e in emit.events] == ["straggle-refused"]
    assert reason in emit.events[0]["reason"]


def test_a_gated_peer_waits_for_the_start_line_after_joining_and_a_stop_ends_the_wait(tmp_path):
    # The harness draws the start line once every initial peer joined: a peer with a round per step formed round 1
    # before the last registered, and one command ended at two losses.
    import threading

    control = Control(poll_s=0.0, train_when=str(tmp_path / "peer0.start"))
    stop = threading.Event()
    waiting = threading.Thread(target=lambda: setattr(control, "trained", control.before_training(stop)))
    waiting.start()
    waiting.join(timeout=0.3)
    assert waiting.is_alive()  # no start line yet
    (tmp_path / "peer0.start").touch()
    waiting.join(timeout=30)
    assert control.trained is True
    stop.set()
    assert Control(train_when=str(tmp_path / "peer1.start")).before_training(stop) is False
    # No start line: a joiner, a peer the harness started again, a gated peer of another tool.
    assert Control(start_when=str(tmp_path / "peer2.gate")).before_training(threading.Event()) is True
