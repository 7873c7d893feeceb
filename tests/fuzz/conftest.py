"""The fuzzing harness: Hypothesis settings, a time budget, and a count of the examples each target ran.

Every fuzz target is a pytest test that takes the ``fuzz`` fixture and calls
``fuzz.run(check, strategies...)``: ``check`` is called with generated inputs
and must hold for every one (it raises to report a crash).

Two modes, chosen by the environment:

- quick (the default, in the normal suite): one small, derandomised batch of
  examples per target (``QUICK_EXAMPLES``), so each file takes a second or two
  and never flakes.
- fuzz (``LOCONET_FUZZ_SECONDS=S``): random batches per target until the
  target's share of S seconds is spent; S is the fuzzing time of the whole
  ``tests/fuzz`` run, split over the targets collected in proportion to their
  ``fuzz_weight`` marks (1 unless marked: slow targets get more). A per-example
  Hypothesis deadline reports an input that is slow to be refused.

In both modes an example that uses ``HANG_CPU_S`` of CPU is stopped and reported
as a hang (an endless loop never reaches a deadline); waiting code bounds its
own waits (asyncio timeouts in the targets).

At the end of the session every target's count of examples is printed, one JSON
object per line starting with ``FUZZ``, then the total; each target's line (as
it ends, so also from pytest-xdist workers) and the total are appended to the
file named by ``LOCONET_FUZZ_REPORT`` when it is set. CI quotes the total ("N
examples without a crash"). Hypothesis' example database is off. A failure
prints its input: shrunk in quick mode; in fuzz mode as found (shrinking could
take minutes, past the budget), with a ``@reproduce_failure`` blob that replays
it: ``LOCONET_FUZZ_REPRODUCE=BLOB pytest tests/fuzz/FILE -k TARGET`` replays
it.
"""

from __future__ import annotations

import json
import math
import os
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta

import hypothesis
import pytest
from hypothesis import HealthCheck, Phase, given, reproduce_failure, settings
from hypothesis import strategies as st
from hypothesis.strategies import SearchStrategy

SECONDS_ENV = "LOCONET_FUZZ_SECONDS"
REPORT_ENV = "LOCONET_FUZZ_REPORT"
# The blob of a failure's "@reproduce_failure(VERSION, b'BLOB')" line: the selected targets replay it.
REPRODUCE_ENV = "LOCONET_FUZZ_REPRODUCE"
QUICK_EXAMPLES = 30
# In fuzz mode each batch is sized to take about this long, so the budget is kept to within one batch.
# (A batch cannot be cut short: skipping the rest of its examples would make Hypothesis see a flaky strategy.)
BATCH_SECONDS = 1.0
# A fuzz target's pytest-timeout: twice its share of the budget, plus this.
TIMEOUT_SLACK_S = 300
# CPU seconds one example may take before it counts as a hang (an endless loop never reaches a deadline).
HANG_CPU_S = 5.0


class FuzzHang(Exception):
    """An example ran for HANG_CPU_S of CPU time: the code under test is probably looping forever."""


def _hang(signum, frame) -> None:
    raise FuzzHang(f"one example used more than {HANG_CPU_S:g} s of CPU: an endless loop?")


_COMMON = {
    "database": None,
    "suppress_health_check": [HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much],
}
# Quick mode shrinks a failure to a small input (no explain phase: it traces every example, slow here).
settings.register_profile(
    "loconet-fuzz-quick", max_examples=QUICK_EXAMPLES, deadline=None, derandomize=True,
    phases=(Phase.explicit, Phase.generate, Phase.shrink), **_COMMON,
)
# Fuzz mode reports a failure as found, with the blob that replays it: shrinking may take minutes, past the budget.
settings.register_profile(
    "loconet-fuzz", max_examples=100, deadline=timedelta(seconds=5), derandomize=False, print_blob=True,
    phases=(Phase.explicit, Phase.generate), **_COMMON,
)

_RESULTS = pytest.StashKey[list]()
_TARGETS = pytest.StashKey[float]()


def fuzz_seconds() -> float:
    """The whole run's fuzzing budget from LOCONET_FUZZ_SECONDS (0: quick mode)."""
    text = os.environ.get(SECONDS_ENV, "").strip()
    if not text:
        return 0.0
    try:
        seconds = float(text)
    except ValueError:
        raise pytest.UsageError(f"{SECONDS_ENV} must be a number of seconds, got {text!r}") from None
    if not math.isfinite(seconds) or seconds < 0:
        raise pytest.UsageError(f"{SECONDS_ENV} must be a non-negative number of seconds, got {text!r}")
    return seconds


@dataclass
class Fuzzer:
    """Runs one target's property in quick mode or for its share of the budget, and counts the examples."""

    target: str
    seconds: float  # this target's budget; 0: quick mode
    quick_examples: int = QUICK_EXAMPLES
    examples: int = 0
    elapsed_s: float = 0.0
    crashed: bool = False

    def run(self, check: Callable[..., None], *strategies: SearchStrategy, **named: SearchStrategy) -> int:
        """Call check on generated inputs (quick batch, or batches until the budget is spent); return the count."""
        mode = settings.get_profile("loconet-fuzz" if self.seconds else "loconet-fuzz-quick")

        # One strategy for all the inputs: Hypothesis prints them, as one value, when check fails.
        inputs = st.tuples(st.tuples(*strategies), st.fixed_dictionaries(named))

        def batch_of(size: int) -> Callable[[], None]:
            # A new function per batch: Hypothesis takes one settings object per function.
            @settings(mode, max_examples=size)
            @given(inputs)
            def counted(inputs: tuple[tuple, dict]) -> None:
                self.examples += 1
                args, kwargs = inputs
                # CPU time, not wall time: SIGALRM is pytest-timeout's, and waiting code has its own timeouts.
                previous = signal.signal(signal.SIGPROF, _hang)
                signal.setitimer(signal.ITIMER_PROF, HANG_CPU_S)
                try:
                    check(*args, **kwargs)
                finally:
                    signal.setitimer(signal.ITIMER_PROF, 0)
                    signal.signal(signal.SIGPROF, previous)

            replay = os.environ.get(REPRODUCE_ENV)
            return reproduce_failure(hypothesis.__version__, replay.encode())(counted) if replay else counted

        started = time.monotonic()
        batch = self.quick_examples if not self.seconds else 20
        try:
            while True:
                before, t0 = self.examples, time.monotonic()
                batch_of(batch)()
                left = self.seconds - (time.monotonic() - started)
                if left <= 0:
                    break
                # The slower of the last batch's mean and the whole run's: a batch of a few quick examples must not
                # size the next one for hundreds (a coordinator example takes 0.01 s to seconds; one such batch of
                # 129 took 30 s of a 40 s budget, and in CI the budget's 13 s share ran for 65 s).
                per_example = max(
                    (time.monotonic() - t0) / max(1, self.examples - before),
                    (time.monotonic() - started) / max(1, self.examples),
                )
                batch = int(min(BATCH_SECONDS, left) / max(per_example, 1e-5)) or 1
        except BaseException:
            self.crashed = True
            raise
        finally:
            self.elapsed_s += time.monotonic() - started
        return self.examples

    def add(self, examples: int, seconds: float, crashed: bool = False) -> None:
        """Count examples run outside ``run`` (an atheris process)."""
        self.examples += examples
        self.elapsed_s += seconds
        self.crashed |= crashed

    def record(self) -> dict:
        """This target's line of the report."""
        return {
            "target": self.target,
            "mode": "fuzz" if self.seconds else "quick",
            "examples": self.examples,
            "seconds": round(self.elapsed_s, 2),
            "crashed": self.crashed,
        }


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "fuzz_weight(w): this fuzz target gets w shares of the budget (default 1)")
    config.stash[_RESULTS] = []
    config.stash[_TARGETS] = 0.0


def _weight(item: pytest.Item) -> float:
    marker = item.get_closest_marker("fuzz_weight")
    return float(marker.args[0]) if marker is not None else 1.0


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Add up the fuzz targets' weights (the budget is split among them in proportion) and give each target a
    pytest-timeout above its share, for a hang outside any example (a batch overruns by one batch at most)."""
    targets = [item for item in items if "fuzz" in getattr(item, "fixturenames", ())]
    weights = config.stash[_TARGETS] = sum(_weight(item) for item in targets)
    for item in targets:
        share = fuzz_seconds() * _weight(item) / weights
        item.add_marker(pytest.mark.timeout(TIMEOUT_SLACK_S + 2 * share))


@pytest.fixture
def fuzz(request: pytest.FixtureRequest):
    """The Fuzzer of this test (its budget: its weight's share of LOCONET_FUZZ_SECONDS); its count is reported."""
    total = fuzz_seconds()
    weights = request.config.stash.get(_TARGETS, 0.0) or 1.0
    fuzzer = Fuzzer(request.node.nodeid, total * _weight(request.node) / weights)
    yield fuzzer
    if fuzzer.examples or fuzzer.crashed:
        record = fuzzer.record()
        request.config.stash[_RESULTS].append(record)
        _append_report([json.dumps(record, sort_keys=True)])  # at once: also from pytest-xdist workers


def pytest_terminal_summary(terminalreporter, exitstatus: int, config: pytest.Config) -> None:
    """Print each target's example count (JSON lines) and the total; append them to LOCONET_FUZZ_REPORT if set."""
    results = config.stash.get(_RESULTS, [])
    if not results:
        return
    total = {
        "total_examples": sum(r["examples"] for r in results),
        "targets": len(results),
        "crashed": sum(r["crashed"] for r in results),
        "seconds": round(sum(r["seconds"] for r in results), 2),
    }
    lines = [json.dumps(r, sort_keys=True) for r in results] + [json.dumps(total, sort_keys=True)]
    terminalreporter.section("fuzz targets")
    for line in lines:
        terminalreporter.write_line(f"FUZZ {line}")
    _append_report(lines[-1:])


def _append_report(lines: list[str]) -> None:
    path = os.environ.get(REPORT_ENV)
    if path:
        with open(path, "a", encoding="utf-8") as out:
            out.writelines(line + "\n" for line in lines)
