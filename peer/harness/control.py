"""What the harness asks of a peer process it started: when to join, to train slower, or to blow up.

The runtime has one narrow hook for this (``peer.runtime.daemon.PeerHooks``);
``loconet peer --start-when FILE --control FILE`` (options the harness passes,
hidden from ``--help``) plugs a ``Control`` into it:

- ``--start-when FILE``: the peer stays idle until FILE exists (the harness
  starts joiners early, since Python's start-up takes seconds, then opens
  their gate at the scheduled moment);
- ``--control FILE``: a JSON object the harness rewrites; ``{"slowdown": 3}``
  makes each step take three times as long (a straggler on purpose), and each
  increase of ``"diverge"`` sets the peer's parameters to NaN once, as a
  training blow-up would (the optimizer must recover from it).
"""

from __future__ import annotations

import argparse
import json
import os
import threading
import time

import torch


class Control:
    """The harness's controls of one peer process (implements the runtime's PeerHooks)."""

    def __init__(self, control_file: str | None = None, start_when: str | None = None) -> None:
        self.path = control_file
        self.gate = start_when
        self.factor = 1.0
        self.diverged = 0
        self._checked = 0.0
        self._last = time.monotonic()

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
        if self.path and now - self._checked >= 1.0:
            self._checked = now
            try:
                with open(self.path) as f:
                    wanted = json.load(f)
                self.factor = max(1.0, float(wanted.get("slowdown", 1.0)))
                diverge = int(wanted.get("diverge", 0))
            except (OSError, ValueError, AttributeError, TypeError):
                self.factor, diverge = 1.0, self.diverged
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
