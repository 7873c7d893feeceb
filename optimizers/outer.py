"""The global side of DiLoCo-style training: fp32 global parameters and the outer optimizer.

Every peer keeps the run's global parameters (fp32, CPU) and the outer
optimizer's state; they change only when a round commits, identically on
every peer. ``GlobalState`` holds them, computes pseudo-gradients, applies
outer steps (to all parameters or to a fragment), and turns itself into the
``StateSnapshot`` a joiner fetches.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import torch

from collectives.elastic import Resynced
from collectives.errors import ConfigError, LoconetError, NonFiniteError
from collectives.statesync import StateSnapshot

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class OuterConfig:
    """The outer optimizer: SGD with (Nesterov) momentum on the averaged pseudo-gradients.

    The DiLoCo paper uses lr 0.7 and momentum 0.9; at our scale momentum 0.7
    was as good or better in every run we measured (BENCHMARKS.md), so it is
    the default.
    """

    lr: float = 0.7
    momentum: float = 0.7
    nesterov: bool = True

    def __post_init__(self) -> None:
        if self.lr <= 0:
            raise ConfigError(f"outer lr must be positive, got {self.lr}")
        if not 0 <= self.momentum < 1:
            raise ConfigError(f"outer momentum must be in [0, 1), got {self.momentum}")


class GlobalState:
    """Global parameters (fp32, CPU) and their outer optimizer, for a list of named model parameters."""

    def __init__(self, named_params: Sequence[tuple[str, torch.nn.Parameter]], config: OuterConfig) -> None:
        if not named_params:
            raise ConfigError("the model has no trainable parameters")
        self.names = [n for n, _ in named_params]
        self.params = [p for _, p in named_params]
        self.config = config
        self.globals = [p.detach().to(device="cpu", dtype=torch.float32).clone() for p in self.params]
        self.outer = torch.optim.SGD(
            self.globals, lr=config.lr, momentum=config.momentum, nesterov=config.nesterov and config.momentum > 0
        )
        self.outer_steps = 0
        self.round_id = 0
        # The run's inner step count when round_id committed (a joiner adopts it).
        self.step = 0
        # Guards globals and the outer state against a joiner's snapshot taken on another thread.
        self.lock = threading.Lock()

    def pseudo_gradients(self, indices: Sequence[int]) -> list[torch.Tensor]:
        """global - local for the given parameters (fp32, CPU)."""
        with torch.no_grad():
            return [self.globals[i] - self.params[i].detach().to(device="cpu", dtype=torch.float32) for i in indices]

    def outer_step(self, indices: Sequence[int], averaged: Sequence[torch.Tensor], round_id: int, step: int = 0) -> None:
        """Apply the outer optimizer to the given global parameters with the averaged pseudo-gradients."""
        with self.lock, torch.no_grad():
            for g in self.globals:
                g.grad = None
            for i, avg in zip(indices, averaged):
                self.globals[i].grad = avg.to(torch.float32).reshape(self.globals[i].shape)
            # Parameters without a gradient are skipped by SGD (their momentum untouched).
            self.outer.step()
            for i in indices:
                self.globals[i].grad = None
            self.outer_steps += 1
            self.round_id = round_id
            self.step = step

    def load_into_model(self, indices: Sequence[int], alpha: float = 0.0) -> None:
        """local = alpha * local + (1 - alpha) * global for the given parameters (alpha weights the local side)."""
        with torch.no_grad():
            for i in indices:
                p, g = self.params[i], self.globals[i].to(device=self.params[i].device, dtype=self.params[i].dtype)
                if alpha == 0.0:
                    p.copy_(g)
                else:
                    p.mul_(alpha).add_(g, alpha=1.0 - alpha)

    # -- state sync and checkpoints ------------------------------------------------------

    def snapshot(self, meta: dict) -> StateSnapshot:
        """A consistent copy of the global state, for a joiner or a checkpoint."""
        with self.lock:
            tensors = {f"global/{n}": g.clone() for n, g in zip(self.names, self.globals)}
            for n, g in zip(self.names, self.globals):
                buf = self.outer.state.get(g, {}).get("momentum_buffer")
                if buf is not None:
                    tensors[f"momentum/{n}"] = buf.clone()
            info = {"outer": asdict(self.config), "outer_steps": self.outer_steps, "step": self.step, **meta}
            return StateSnapshot(round_id=self.round_id, tensors=tensors, meta=info)

    def restore(self, snapshot: StateSnapshot, into_model: bool = True) -> dict:
        """Replace the global state with a snapshot's (and the model's parameters, unless told not to); return its meta."""
        missing = [n for n in self.names if f"global/{n}" not in snapshot.tensors]
        if missing:
            raise ConfigError(
                f"the received state lacks {len(missing)} parameter(s) (e.g. {missing[0]!r}): "
                "peers of a run must train the same model"
            )
        with self.lock, torch.no_grad():
            for n, g in zip(self.names, self.globals):
                src = snapshot.tensors[f"global/{n}"]
                if src.shape != g.shape:
                    raise ConfigError(f"parameter {n!r} has shape {tuple(src.shape)} in the run, {tuple(g.shape)} here")
                g.copy_(src)
                buf = snapshot.tensors.get(f"momentum/{n}")
                if buf is None:
                    self.outer.state.pop(g, None)
                else:
                    self.outer.state[g] = {"momentum_buffer": buf.clone()}
            self.outer_steps = int(snapshot.meta.get("outer_steps", 0))
            self.round_id = snapshot.round_id
            self.step = int(snapshot.meta.get("step", 0))
        if into_model:
            self.load_into_model(range(len(self.params)))
        return snapshot.meta


@dataclass
class SyncRecord:
    """What one sync attempt did (for progress displays and benchmarks)."""

    step: int
    committed: bool
    round_id: int = 0
    bytes_sent: int = 0
    # The whole sync (quorum, all-reduce, commit), and the all-reduce alone.
    wall_s: float = 0.0
    allreduce_s: float = 0.0
    reason: str = ""


class OuterOptimizer:
    """What DiLoCo and Streaming DiLoCo share: the torch.optim surface, the global state, the callbacks."""

    def __init__(self, model: torch.nn.Module, inner: torch.optim.Optimizer, peer, outer: OuterConfig) -> None:
        self.model = model
        self.inner = inner
        self.peer = peer
        self.state = GlobalState([(n, p) for n, p in model.named_parameters() if p.requires_grad], outer)
        self.inner_steps = 0
        self.history: list[SyncRecord] = []
        self.committed_rounds = 0  # rounds of history that committed, kept so nobody rescans it
        # Called as a sync begins, after every committed round (progress displays, checkpoints)
        # and after every sync that did not commit (its record says why).
        self.on_sync_start: Callable[[int], None] | None = None
        self.on_commit: Callable[[SyncRecord], None] | None = None
        self.on_miss: Callable[[SyncRecord], None] | None = None
        if hasattr(peer, "provide_state"):
            # Joiners fetch the run's state from this optimizer.
            peer.provide_state(self.snapshot)

    @property
    def param_groups(self) -> list[dict]:
        """The inner optimizer's parameter groups (so LR schedulers work)."""
        return self.inner.param_groups

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Clear the gradients, like the inner optimizer."""
        self.inner.zero_grad(set_to_none=set_to_none)

    def _sync_starts(self) -> None:
        if self.on_sync_start is not None:
            self.on_sync_start(self.inner_steps)

    def _conclude(
        self,
        result_of: Callable[[], Any],
        indices: Sequence[int],
        *,
        alpha: float,
        started: float,
        label: str,
        committed: Callable[[], None],
        missed: Callable[[], None] = lambda: None,
    ) -> bool:
        """Take a sync's outcome: on commit, the outer step on indices mixed in with alpha; record it either way.

        ``committed`` / ``missed`` update the subclass's schedule before the record is
        published, so an ``on_commit`` callback (a checkpoint) sees the state after the round.
        Returns whether the round committed.
        """
        try:
            result = result_of()
        except Resynced as exc:
            self.load_snapshot(exc.snapshot)
            self._record(SyncRecord(self.inner_steps, False, exc.snapshot.round_id, reason="resynced from the run"))
            return False
        except NonFiniteError as exc:
            self._diverged(exc)
            return False
        except LoconetError as exc:
            # Inner progress is kept; the pseudo-gradient keeps growing until a round commits.
            log.warning("%s did not commit (%s); training on locally", label, exc)
            missed()
            self._record(SyncRecord(self.inner_steps, False, reason=str(exc)))
            return False
        self.state.outer_step(indices, result.value, result.round_id, step=self.inner_steps)
        self.state.load_into_model(indices, alpha=alpha)
        committed()
        stats = getattr(result, "stats", None)
        self._record(
            SyncRecord(
                self.inner_steps,
                True,
                result.round_id,
                bytes_sent=getattr(stats, "bytes_sent", 0),
                wall_s=time.monotonic() - started,
                allreduce_s=getattr(stats, "wall_s", 0.0),
            )
        )
        return True

    def _diverged(self, exc: NonFiniteError) -> None:
        """Local training went NaN/Inf: restart it from the global state, dropping the inner steps since.

        The run's state is intact (this peer's contribution was refused before it was
        sent), so one bad step costs this peer its local progress, not the run.
        """
        log.error(
            "local training diverged at step %d (%s); restarting it from the run's global state "
            "(lower the learning rate if this repeats)", self.inner_steps, exc,
        )
        self.state.load_into_model(range(len(self.state.params)))
        self.inner.state.clear()  # moments computed from NaN would poison the next steps
        self.inner.zero_grad(set_to_none=True)  # and so would NaN gradients left for the next step
        self._forget_local_progress()
        reason = f"local training diverged; restarted from the global state: {exc}"
        self._record(SyncRecord(self.inner_steps, False, reason=reason))

    def _forget_local_progress(self) -> None:
        """Reset the subclass's count of local progress (samples since a sync) after a divergence."""
        raise NotImplementedError

    def load_snapshot(self, snapshot: StateSnapshot) -> None:
        """Adopt the run's state (the subclass adds its own schedule)."""
        raise NotImplementedError

    def _record(self, record: SyncRecord) -> None:
        self.history.append(record)
        self.committed_rounds += record.committed
        if record.committed and self.on_commit is not None:
            self.on_commit(record)
        elif not record.committed and self.on_miss is not None:
            self.on_miss(record)

    def _meta(self) -> dict:
        """What the subclass adds to the state a joiner fetches."""
        return {}

    def snapshot(self) -> StateSnapshot:
        """The run's state as of the last committed round (what a joiner fetches)."""
        return self.state.snapshot({"inner_steps": self.inner_steps, **self._meta()})

    def _adopt(self, snapshot: StateSnapshot, into_model: bool = True) -> dict:
        """Take the run's global state; count steps as the run does (so syncs and the end line up)."""
        meta = self.state.restore(snapshot, into_model=into_model)
        if into_model:
            self.inner_steps = max(self.inner_steps, self.state.step)
        return meta

    def _state_dict(self, **counters) -> dict:
        snap = self.snapshot()
        return {
            "round_id": snap.round_id,
            "global": snap.tensors,
            "meta": snap.meta,
            "inner": self.inner.state_dict(),
            "inner_steps": self.inner_steps,
            **counters,
        }

    def _load_state_dict(self, state: dict) -> dict:
        snapshot = StateSnapshot(round_id=state["round_id"], tensors=state["global"], meta=state["meta"])
        meta = self._adopt(snapshot, into_model=False)
        self.inner.load_state_dict(state["inner"])
        self.inner_steps = int(state["inner_steps"])
        return meta
