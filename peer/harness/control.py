"""What the harness asks of a peer process it started: when to join, to train slower, to blow up, to lie.

The runtime has one narrow hook for this (``peer.runtime.daemon.PeerHooks``);
``loconet peer --start-when FILE --control FILE`` (options the harness passes,
hidden from ``--help``) plugs a ``Control`` into it:

- ``--start-when FILE``: the peer stays idle until FILE exists (the harness
  starts joiners early, since Python's start-up takes seconds, then opens
  their gate at the scheduled moment);
- ``--train-when FILE``: once joined, the peer takes no step until FILE
  exists (the harness draws this start line once all its initial peers have
  joined, so the run's first round takes them all);
- ``--control FILE``: a JSON object the harness rewrites; ``{"slowdown": 3}``
  makes each step take three times as long (a straggler on purpose), and each
  increase of ``"diverge"`` sets the peer's parameters to NaN once, as a
  training blow-up would (the optimizer must recover from it);
  ``{"byzantine": "signflip"}`` makes it a byzantine peer: from then on every
  contribution it sends is corrupted by that attack (``peer/attacks.py``,
  through the optimizer's ``tamper`` hook; labelflip wraps its batch stream
  instead), until the key is removed or set to null. It logs a warning and
  emits ``byzantine-started`` (the attack, the step), ``byzantine-sent`` for
  each corrupted contribution (their count, the honest and the sent norm) and
  ``byzantine-stopped``; an attack it cannot carry out (labelflip on a task
  without classes) is logged as an error and emitted as ``byzantine-refused``;
  ``{"straggle": "random,x=4", "worker": 2, "n": 6}`` slows the peer down by a
  straggler pattern over the network (``peer/stragglers.py``): the peer is
  worker 2 of 6, and before each step it works out from the pattern and the
  run's step count whether that step is slowed and by how much (a pattern is a
  pure function of its seed and the step, so every peer agrees on who
  straggles without talking). It emits ``straggle-started`` (the pattern, its
  worker number, n, the step) and ``straggle-stopped`` (with the count of its
  steps the pattern slowed) when the key changes or is removed, and
  ``straggle-refused`` for a pattern it cannot read.

A slowed step (``slowdown`` times a pattern's factor: X) sleeps X-1 times the
forward and backward pass the peer just measured (hooks on the model), not its
whole step: the whole step includes the wait for other peers in a round, so a
peer slowed after waiting for another straggler would compound both delays.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import threading
import time
from collections.abc import Callable
from typing import Any

import torch

from collectives.errors import ConfigError
from peer.attacks import Attack, flip_labels, parse_attack
from peer.stragglers import StragglerPattern, parse_pattern

log = logging.getLogger(__name__)

# How often a peer waiting at its gate looks for the gate file, seconds.
GATE_POLL_S = 0.005


def _emit_nothing(event: str, **fields: Any) -> None:
    """The event sink before ``attach``."""


class Control:
    """The harness's controls of one peer process (implements the runtime's PeerHooks)."""

    def __init__(self, control_file: str | None = None, start_when: str | None = None, poll_s: float = 1.0,
                 train_when: str | None = None) -> None:
        self.path = control_file
        self.gate = start_when
        self.start_line = train_when
        # Seconds between reads of the control file.
        self.poll_s = poll_s
        self.factor = 1.0
        self.diverged = 0
        # The attack this peer carries out now (None: it is honest), and the contributions it corrupted.
        self.attack: Attack | None = None
        self.attack_text: str | None = None
        self.corrupted = 0
        # The straggler pattern this peer follows (None: none), its text, this peer's worker number and n.
        self.pattern: StragglerPattern | None = None
        self.pattern_text: str | None = None
        self.worker = 0
        self.n = 1
        # Steps the pattern slowed since it started, and steps seen (the step count without an optimizer).
        self.slowed = 0
        self._steps = 0
        # The forward and backward pass of the step just taken: when it started, when its last gradient came.
        self._compute_started: float | None = None
        self._grads_done: float | None = None
        self._watched: torch.nn.Module | None = None
        self._optimizer: Any = None
        self._loop: Any = None
        self._emit: Callable[..., None] = _emit_nothing
        self._clean_batches: Any = None
        self._checked = -float("inf")
        self._last = time.monotonic()

    def attach(self, optimizer: Any, loop: Any, emit: Callable[..., None]) -> None:
        """Take the peer's optimizer (its ``tamper`` hook), training loop (its ``batches``) and event sink; start
        an attack the file already asks for (``byzantine@0s``: from the first step)."""
        self._optimizer, self._loop, self._emit = optimizer, loop, emit
        model = getattr(loop, "model", None)
        if isinstance(model, torch.nn.Module):
            self._watch(model)  # from the first step on, a slowed step knows how long its computation took
        try:
            wanted = self._read()
        except (OSError, ValueError):
            wanted = {}  # after_step reads it again
        byzantine = (wanted.get("byzantine") or None) if isinstance(wanted, dict) else None
        if byzantine != self.attack_text:
            self._become(byzantine)

    def before_join(self, stop: threading.Event) -> bool:
        """Wait for the gate file (if any); False if told to stop meanwhile."""
        while self.gate and not os.path.exists(self.gate):
            # A short poll: the harness opens the initial peers' gates together, and a peer that saw its gate
            # 50 ms before another could found the run and form round 1 alone before the other joined (seen under
            # CI's load: the others then had to fetch round 1's state over the scenario's slow links).
            if stop.wait(GATE_POLL_S):
                return False
        self._last = time.monotonic()
        return True

    def before_training(self, stop: threading.Event) -> bool:
        """Wait for the start line (--train-when), if any: the harness draws it once every initial peer has joined,
        so the run's first round takes them all (a peer with a round per step, as coded-sgd's, formed round 1
        before the last had joined: the same command ended at two different losses)."""
        start = self.start_line
        while start and not os.path.exists(start):
            if stop.wait(GATE_POLL_S):
                return False
        self._last = time.monotonic()
        return True

    def after_step(self, model: torch.nn.Module) -> str | None:
        """Apply the control file after a step, then sleep if the next step is slowed; returns "diverge-injected"
        when the parameters were just set to NaN."""
        now = time.monotonic()
        took = now - self._last
        self._steps += 1
        event = None
        if self.path and now - self._checked >= self.poll_s:
            self._checked = now
            try:
                wanted = self._read()
                self.factor = max(1.0, float(wanted.get("slowdown", 1.0)))
                diverge = int(wanted.get("diverge", 0))
                byzantine = wanted.get("byzantine") or None
                straggle = (wanted.get("straggle") or None, int(wanted.get("worker", 0)), int(wanted.get("n", 1)))
            except (OSError, ValueError, AttributeError, TypeError):
                self.factor, diverge, byzantine = 1.0, self.diverged, self.attack_text
                straggle = (self.pattern_text, self.worker, self.n)
            if byzantine != self.attack_text:
                self._become(byzantine)
            if straggle != (self.pattern_text, self.worker, self.n):
                self._follow(*straggle)
            if diverge > self.diverged:
                self.diverged = diverge
                with torch.no_grad():
                    for p in model.parameters():
                        p.fill_(float("nan"))
                event = "diverge-injected"
        by_pattern = self.pattern_slowdown()
        self.slowed += by_pattern > 1.0
        slowdown = self.factor * by_pattern
        if slowdown > 1.0:
            # The sleep comes before the next step's computation: it is that step which is slowed.
            time.sleep(self._computed_s(took) * (slowdown - 1.0))
            self._watch(model)
        self._compute_started = None
        self._last = time.monotonic()
        return event

    def next_step(self) -> int:
        """The run's number of the next step (counted from 0): the optimizer's count of steps taken (the run's
        global step for a synchronous algorithm, which may skip the steps a straggler caught up on)."""
        steps = getattr(self._optimizer, "global_step", getattr(self._optimizer, "inner_steps", None))
        return steps if isinstance(steps, int) else self._steps

    def slowdown(self) -> float:
        """How many times slower the next step is: the file's ``slowdown`` times the pattern's factor for it."""
        return self.factor * self.pattern_slowdown()

    def pattern_slowdown(self) -> float:
        """How many times slower the pattern makes this peer's next step (1.0 without a pattern)."""
        return 1.0 if self.pattern is None else self.pattern.slowdown(self.next_step(), self.worker, self.n)

    # -- straggler patterns -------------------------------------------------------------------

    def _follow(self, text: str | None, worker: int, n: int) -> None:
        """Follow the pattern of ``text`` as worker ``worker`` of ``n`` (replacing the current one), or none."""
        if self.pattern is not None:
            self._emit("straggle-stopped", pattern=self.pattern.spec, step=self.next_step(), steps_slowed=self.slowed)
        self.pattern_text, self.worker, self.n = text, worker, n
        self.pattern, self.slowed = None, 0
        if text is None:
            return
        try:
            if n < 1 or not 0 <= worker < n:
                raise ConfigError(f"worker {worker} of n={n}: the worker number must be in 0..n-1")
            pattern = parse_pattern(str(text))
        except ConfigError as exc:
            log.error("straggle: cannot follow pattern %r (%s); this peer is not slowed by it", text, exc)
            self._emit("straggle-refused", pattern=str(text), reason=str(exc))
            return
        self.pattern = pattern
        log.info(
            "straggle: from step %d, %s (this peer is worker %d of %d)", self.next_step(), pattern.describe(), worker, n
        )
        self._emit("straggle-started", pattern=pattern.spec, worker=worker, n=n, step=self.next_step())

    def _watch(self, model: torch.nn.Module) -> None:
        """Time the model's forward and backward passes (once per model)."""
        if self._watched is model:
            return
        self._watched = model
        model.register_forward_pre_hook(self._forward_starts)
        for p in model.parameters():
            if p.requires_grad:
                p.register_post_accumulate_grad_hook(self._gradient_done)

    def _forward_starts(self, module: torch.nn.Module, args: Any) -> None:
        # The step's first forward with gradients (an evaluation runs without them).
        if self._compute_started is None and torch.is_grad_enabled():
            self._compute_started = time.monotonic()

    def _gradient_done(self, param: torch.Tensor) -> None:
        self._grads_done = time.monotonic()

    def _computed_s(self, took: float) -> float:
        """The forward and backward pass of the step just taken; its whole duration when the hooks saw none."""
        started, done = self._compute_started, self._grads_done
        if started is not None and done is not None and done >= started:
            return done - started
        return took

    def _read(self) -> Any:
        """The control file's JSON ({} when there is no file yet; OSError, ValueError when unreadable)."""
        if not self.path or not os.path.exists(self.path):
            return {}
        with open(self.path) as f:
            return json.load(f)

    # -- byzantine ----------------------------------------------------------------------------

    def _become(self, text: str | None) -> None:
        """Start the attack of ``text`` (replacing the current one), or stop attacking (None)."""
        self.attack_text = text
        if self.attack is not None:
            self._stop_attack()
        if text is None:
            return
        try:
            attack = parse_attack(str(text))
            self._start_attack(attack)
        except ConfigError as exc:
            log.error("byzantine: cannot carry out attack %r (%s); this peer stays honest", text, exc)
            self._emit("byzantine-refused", attack=str(text), reason=str(exc))

    def _start_attack(self, attack: Attack) -> None:
        opt, loop = self._optimizer, self._loop
        if opt is None or loop is None:
            raise ConfigError("the peer did not attach its optimizer and training loop to its controls")
        if attack.poisons_data:
            classes = getattr(loop.task, "classes", None)
            if classes is None:
                raise ConfigError(
                    f"labelflip needs a classification task (one with classes); {type(loop.task).__name__} has none"
                )
            self._clean_batches = loop.batches
            loop.batches = (flip_labels(batch, classes) for batch in self._clean_batches)
        self.attack = attack
        opt.tamper = self._tamper
        step = getattr(opt, "inner_steps", None)
        log.warning(
            "byzantine: from step %s this peer corrupts every contribution it sends (attack %s: %s), "
            "as its harness asked", step, attack, attack.describe(),
        )
        self._emit("byzantine-started", attack=str(attack), step=step)

    def _stop_attack(self) -> None:
        if self._clean_batches is not None:
            self._loop.batches = self._clean_batches
            self._clean_batches = None
        self._optimizer.tamper = None
        step = getattr(self._optimizer, "inner_steps", None)
        log.warning("byzantine: from step %s this peer sends honest contributions again", step)
        self._emit("byzantine-stopped", attack=str(self.attack), step=step, contributions=self.corrupted)
        self.attack = None

    def _tamper(self, tensors: list[torch.Tensor]) -> list[torch.Tensor]:
        """The optimizer's tamper hook: the current attack's corruption of this contribution, counted."""
        attack = self.attack
        assert attack is not None, "the hook is installed only while an attack runs"
        sent = attack.corrupt(tensors)
        self.corrupted += 1
        self._emit(
            "byzantine-sent",
            attack=str(attack),
            contributions=self.corrupted,
            honest_norm=_norm(tensors),
            sent_norm=_norm(sent),
        )
        return sent


def _norm(tensors: list[torch.Tensor]) -> float:
    """The L2 norm of a list of tensors taken as one vector."""
    if not tensors:
        return 0.0
    return float(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(t.float()) for t in tensors])))


def add_control_arguments(parser: argparse.ArgumentParser) -> None:
    """The harness-only options of ``loconet peer`` (hidden from --help)."""
    parser.add_argument("--control", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--start-when", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--train-when", default=None, help=argparse.SUPPRESS)


def control_from(ns: argparse.Namespace) -> Control | None:
    """The Control those options ask for, or None when the peer was not started by a harness."""
    if ns.control is None and ns.start_when is None and ns.train_when is None:
        return None
    return Control(ns.control, ns.start_when, train_when=ns.train_when)


def write_control(path: os.PathLike, control: dict) -> None:
    """Atomically replace a peer's control file (the peer reads it about once a second)."""
    tmp = f"{os.fspath(path)}.tmp"
    with open(tmp, "w") as f:
        json.dump(control, f)
    os.replace(tmp, path)
