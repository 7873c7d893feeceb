"""The global side of DiLoCo-style training: fp32 global parameters and the outer optimizer.

Every peer keeps the run's global parameters (fp32, on the host) and the
outer optimizer's state; they change only when a round commits, identically
on every peer, whatever device and dtype the model itself uses (the copies
between the two: ``optimizers/transfers.py``). ``GlobalState`` holds them, computes pseudo-gradients, applies
outer steps (to all parameters or to a fragment), and turns itself into the
``StateSnapshot`` a joiner fetches: the global parameters, and the outer
optimizer's whole state (every state tensor, step counts, hyperparameters;
``optimizers/outer_optim.py``).
"""

from __future__ import annotations

import hashlib
import threading
from collections.abc import Sequence
from dataclasses import asdict

import torch

from collectives.errors import ConfigError
from collectives.statesync import StateSnapshot
from optimizers.outer_optim import OuterConfig, load_optimizer_state, make_outer_optimizer, optimizer_state
from optimizers.statemeta import meta_int
from optimizers.transfers import DeviceTransfers

GLOBAL_PREFIX = "global/"


class GlobalState:
    """Global parameters (fp32, host) and their outer optimizer, for a list of named model parameters on any device."""

    def __init__(self, named_params: Sequence[tuple[str, torch.nn.Parameter]], config: OuterConfig) -> None:
        if not named_params:
            raise ConfigError("the model has no trainable parameters")
        self.names = [n for n, _ in named_params]
        self.params = [p for _, p in named_params]
        self.config = config
        self.transfers = DeviceTransfers(self.params)
        self.globals = [self.transfers.host_copy(p) for p in self.params]
        self.outer = make_outer_optimizer(self.globals, config)
        self.outer_steps = 0
        self.round_id = 0
        # The run's inner step count when round_id committed (a joiner adopts it).
        self.step = 0
        # Guards globals and the outer state against a joiner's snapshot taken on another thread.
        self.lock = threading.Lock()

    def numel(self, indices: Sequence[int]) -> int:
        """Elements of the given parameters together (the size of their round)."""
        return sum(self.globals[i].numel() for i in indices)

    def nbytes(self) -> int:
        """Bytes of the tensors a joiner fetches: global parameters and outer optimizer state."""
        with self.lock:
            state = sum(
                v.numel() * v.element_size()
                for entry in self.outer.state.values()
                for v in entry.values()
                if isinstance(v, torch.Tensor)
            )
            return state + sum(g.numel() * g.element_size() for g in self.globals)

    def pseudo_gradients(self, indices: Sequence[int], on_device: bool = False) -> list[torch.Tensor]:
        """global - local for the given parameters, in fp32: on the host, or (on_device) where the model lives."""
        return self.transfers.pseudo_gradients(self.globals, self.params, indices, on_device=on_device)

    def outer_step(
        self, indices: Sequence[int], averaged: Sequence[torch.Tensor], round_id: int, step: int = 0
    ) -> None:
        """Apply the outer optimizer to the given global parameters with the averaged pseudo-gradients."""
        with self.lock, torch.no_grad():
            for g in self.globals:
                g.grad = None
            for i, avg in zip(indices, averaged):
                self.globals[i].grad = avg.to(device="cpu", dtype=torch.float32).reshape(self.globals[i].shape)
            # Parameters without a gradient are skipped by torch's optimizers (their state untouched).
            self.outer.step()
            for i in indices:
                self.globals[i].grad = None
            self.outer_steps += 1
            self.round_id = round_id
            self.step = step

    def load_into_model(self, indices: Sequence[int], alpha: float = 0.0) -> None:
        """local = alpha * local + (1 - alpha) * global for the given parameters (alpha weights the local side)."""
        self.transfers.load(self.globals, self.params, indices, alpha=alpha)

    def digest(self) -> str:
        """SHA-256 of the global parameters (equal on peers that applied the same rounds)."""
        h = hashlib.sha256()
        with self.lock:
            for g in self.globals:
                h.update(g.numpy())  # contiguous fp32: hashed in place, no copy
        return h.hexdigest()

    # -- state sync and checkpoints ------------------------------------------------------

    def snapshot(self, meta: dict) -> StateSnapshot:
        """A consistent copy of the global state, for a joiner or a checkpoint."""
        with self.lock:
            tensors = {f"{GLOBAL_PREFIX}{n}": g.clone() for n, g in zip(self.names, self.globals)}
            outer_tensors, outer_meta = optimizer_state(self.outer, self.names)
            tensors.update(outer_tensors)
            info = {
                "outer": asdict(self.config),
                "outer_state": outer_meta,
                "outer_steps": self.outer_steps,
                "step": self.step,
                **meta,
            }
            return StateSnapshot(round_id=self.round_id, tensors=tensors, meta=info)

    def restore(self, snapshot: StateSnapshot, into_model: bool = True) -> dict:
        """Replace the global state with a snapshot's (and the model's parameters, unless told not to); return its
        meta."""
        missing = [n for n in self.names if f"{GLOBAL_PREFIX}{n}" not in snapshot.tensors]
        if missing:
            raise ConfigError(
                f"the received state lacks {len(missing)} parameter(s) (e.g. {missing[0]!r}): "
                "peers of a run must train the same model"
            )
        for n, g in zip(self.names, self.globals):
            src = snapshot.tensors[f"{GLOBAL_PREFIX}{n}"]
            if src.shape != g.shape:
                raise ConfigError(f"parameter {n!r} has shape {tuple(src.shape)} in the run, {tuple(g.shape)} here")
        # Read before anything is replaced: the metadata may come from another peer (optimizers/statemeta.py).
        outer_steps, step = meta_int(snapshot.meta, "outer_steps", 0), meta_int(snapshot.meta, "step", 0)
        with self.lock, torch.no_grad():
            # The optimizer state is checked (kind, parameters) before anything is replaced.
            load_optimizer_state(self.outer, self.names, snapshot.tensors, snapshot.meta.get("outer_state"))
            for n, g in zip(self.names, self.globals):
                g.copy_(snapshot.tensors[f"{GLOBAL_PREFIX}{n}"])
            self.outer_steps = outer_steps
            self.round_id = snapshot.round_id
            self.step = step
        if into_model:
            self.load_into_model(range(len(self.params)))
        return snapshot.meta
