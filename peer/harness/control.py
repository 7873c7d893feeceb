"""What the harness asks of a peer process it started: when to join, to train slower, to blow up, to lie.

The runtime has one narrow hook for this (``peer.runtime.daemon.PeerHooks``);
``loconet peer --start-when FILE --control FILE`` (options the harness passes,
hidden from ``--help``) plugs a ``Control`` into it:

- ``--start-when FILE``: the peer stays idle until FILE exists (the harness
  starts joiners early, since Python's start-up takes seconds, then opens
  their gate at the scheduled moment);
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
  without classes) is logged as an error and emitted as ``byzantine-refused``.
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

log = logging.getLogger(__name__)


def _emit_nothing(event: str, **fields: Any) -> None:
    """The event sink before ``attach``."""


class Control:
    """The harness's controls of one peer process (implements the runtime's PeerHooks)."""

    def __init__(self, control_file: str | None = None, start_when: str | None = None, poll_s: float = 1.0) -> None:
        self.path = control_file
        self.gate = start_when
        # Seconds between reads of the control file.
        self.poll_s = poll_s
        self.factor = 1.0
        self.diverged = 0
        # The attack this peer carries out now (None: it is honest), and the contributions it corrupted.
        self.attack: Attack | None = None
        self.attack_text: str | None = None
        self.corrupted = 0
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
            if stop.wait(0.05):
                return False
        self._last = time.monotonic()
        return True

    def after_step(self, model: torch.nn.Module) -> str | None:
        """Apply the control file after a step; returns "diverge-injected" when the parameters were just set to NaN."""
        now = time.monotonic()
        took = now - self._last
        event = None
        if self.path and now - self._checked >= self.poll_s:
            self._checked = now
            try:
                wanted = self._read()
                self.factor = max(1.0, float(wanted.get("slowdown", 1.0)))
                diverge = int(wanted.get("diverge", 0))
                byzantine = wanted.get("byzantine") or None
            except (OSError, ValueError, AttributeError, TypeError):
                self.factor, diverge, byzantine = 1.0, self.diverged, self.attack_text
            if byzantine != self.attack_text:
                self._become(byzantine)
            if diverge > self.diverged:
                self.diverged = diverge
                with torch.no_grad():
                    for p in model.parameters():
                        p.fill_(float("nan"))
                event = "diverge-injected"
        if self.factor > 1.0:
            time.sleep(took * (self.factor - 1.0))
        self._last = time.monotonic()
        return event

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
                raise ConfigError(f"labelflip needs a classification task (one with classes); {type(loop.task).__name__} has none")
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


def control_from(ns: argparse.Namespace) -> Control | None:
    """The Control those options ask for, or None when the peer was not started by a harness."""
    if ns.control is None and ns.start_when is None:
        return None
    return Control(ns.control, ns.start_when)


def write_control(path: os.PathLike, control: dict) -> None:
    """Atomically replace a peer's control file (the peer reads it about once a second)."""
    tmp = f"{os.fspath(path)}.tmp"
    with open(tmp, "w") as f:
        json.dump(control, f)
    os.replace(tmp, path)
