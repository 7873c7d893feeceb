"""User tasks: ``"package.module:function"`` names a function that builds a task from a TaskConfig.

The module is imported with ``importlib`` from ``sys.path``. The current
working directory is searched too: if it is not on ``sys.path`` already (as
under the ``loconet`` console script), it is appended, last, so a module of
the user's next to where ``loconet`` was started is found, but never shadows an
installed module of the same name.

``function(config)`` must return either

- a ``peer.tasks.Task`` instance (subclass it: implement ``build_model`` and
  ``batches`` and ``eval_set`` or ``evaluate``), or
- a lighter object with callables ``build_model()``, ``batches(rank, world)``
  (or ``batches(rank, world, start=0)``, which lets a resumed peer jump to its
  batch ``start`` instead of drawing and discarding the batches before it)
  and ``evaluate(model)``, and optionally ``loss(model, batch)``,
  ``entropy_floor`` (attribute or property) and ``samples_per_batch()``. It is
  wrapped in a ``Task``; without ``loss``, the next-token cross-entropy of
  ``Task.loss`` is used.

A class that takes a TaskConfig is such a function too (``"mymod:MyTask"``).
"""

from __future__ import annotations

import inspect
import re
from collections.abc import Iterator
from typing import Any

import torch

from collectives.errors import ConfigError
from peer.plugins import import_user_module, said
from peer.tasks.base import Batch, Task, TaskConfig, batch_stream, evaluating

_SPEC = re.compile(r"^([A-Za-z_][A-Za-z0-9_]*(?:\.[A-Za-z_][A-Za-z0-9_]*)*):([A-Za-z_][A-Za-z0-9_]*)$")
REQUIRED = ("build_model", "batches", "evaluate")


def load_user_task(spec: str, config: TaskConfig) -> Task:
    """Import ``module``, call ``function(config)`` and return the Task it builds (see the module docstring)."""
    match = _SPEC.match(spec.strip())
    if match is None:
        raise ConfigError(
            f"bad user task {spec!r}: expected 'package.module:function' (a dotted module path, one colon, "
            f"a function name), e.g. 'mytasks:make_task', or a built-in task's name (loconet peer --help lists them)"
        )
    module_name, function_name = match.groups()
    module = import_user_module(module_name, f"user task {spec!r}")
    function = getattr(module, function_name, None)
    if function is None:
        names = sorted(
            n
            for n, v in vars(module).items()
            if callable(v) and not n.startswith("_") and getattr(v, "__module__", None) == module.__name__
        )
        raise ConfigError(
            f"user task {spec!r}: module {module_name!r} ({getattr(module, '__file__', '?')}) has no "
            f"{function_name!r}; callables it defines: {', '.join(names) or 'none'}"
        )
    if not callable(function):
        raise ConfigError(
            f"user task {spec!r}: {function_name!r} is a value of type {type(function).__name__}, "
            "not a function or class"
        )
    try:
        inspect.signature(function).bind(config)
    except TypeError as e:
        raise ConfigError(f"user task {spec!r}: {function_name} must take one argument, a TaskConfig ({e})") from e
    except ValueError:
        pass  # no signature to check (some builtins): just call it
    try:
        made = function(config)
    except Exception as e:  # the user's code failed: say where, in one line (-v shows the traceback)
        raise ConfigError(f"user task {spec!r}: {function_name}(config) raised {said(e)}") from e
    if isinstance(made, Task):
        _check_subclass(made, spec)
        task = made
    else:
        missing = [m for m in REQUIRED if not callable(getattr(made, m, None))]
        if missing:
            raise ConfigError(
                f"user task {spec!r}: {function_name}(config) returned an object of type {type(made).__name__}, not "
                f"a peer.tasks.Task nor an object with {', '.join(REQUIRED)} (missing: {', '.join(missing)})"
            )
        task = WrappedTask(made, config, name=spec)
    try_task(task, spec)
    return task


def _check_subclass(task: Task, spec: str) -> None:
    """A Task subclass must have run Task.__init__ and say how it is evaluated."""
    if not hasattr(task, "config"):
        raise ConfigError(f"user task {spec!r}: {type(task).__name__}.__init__ must call super().__init__(config)")
    cls = type(task)
    if cls.evaluate is Task.evaluate and cls.eval_set is Task.eval_set:
        raise ConfigError(f"user task {spec!r}: {cls.__name__} defines neither eval_set() nor evaluate(); "
                          "define one, or every peer would train to its end and fail at its evaluation")


def try_task(task: Task, spec: str) -> None:
    """Build the user task's model and score one training batch, so that a broken model, batch stream or loss is one
    ConfigError naming the step before any peer starts (not a traceback inside every peer's first step)."""
    def step(what: str, call):
        try:
            return call()
        except ConfigError:
            raise
        except Exception as e:
            raise ConfigError(f"user task {spec!r}: {what} raised {said(e)}") from e

    model = step("build_model()", task.build_model)
    if not isinstance(model, torch.nn.Module):
        raise ConfigError(f"user task {spec!r}: build_model() returned a {type(model).__name__}, not a torch.nn.Module")
    params = list(model.named_parameters())
    if not params:
        raise ConfigError(f"user task {spec!r}: the model has no parameters to train")
    complex_ = [name for name, p in params if p.is_complex()]
    if complex_:
        raise ConfigError(f"user task {spec!r}: parameter {complex_[0]} is complex; rounds average real tensors "
                          "(keep its real and imaginary parts as two real parameters)")
    batch = step("the first batch of batches(0, 1)", lambda: next(batch_stream(task, 0, 1), None))
    if batch is None:
        raise ConfigError(f"user task {spec!r}: batches(0, 1) yielded no batch; it must yield batches without end "
                          "(a peer draws as many as it trains: loop over your data again, e.g. itertools.cycle)")
    with torch.no_grad():
        loss = step("loss(model, first batch)", lambda: task.loss(model, batch))
    if not isinstance(loss, torch.Tensor) or loss.numel() != 1:
        shape = tuple(loss.shape) if isinstance(loss, torch.Tensor) else type(loss).__name__
        raise ConfigError(f"user task {spec!r}: loss(model, batch) must return a scalar tensor, got {shape}")


class WrappedTask(Task):
    """A Task around a duck-typed user object (build_model, batches, evaluate, optional loss/entropy_floor)."""

    def __init__(self, inner: Any, config: TaskConfig, name: str) -> None:
        super().__init__(config)
        self.inner = inner
        self.name = str(getattr(inner, "name", name))
        if getattr(inner, "classes", None) is not None:
            # A classification task's label count (what a labelflip attack flips).
            self.classes = int(inner.classes)

    def build_model(self) -> torch.nn.Module:
        """The user object's model."""
        return self.inner.build_model()

    def model_settings(self) -> tuple[str, ...]:
        """The user object's, when it says (a tuple of strings); () otherwise."""
        own = getattr(self.inner, "model_settings", None)
        return tuple(str(part) for part in own()) if callable(own) else ()

    def batches(self, rank: int, world: int, start: int = 0) -> Iterator[Batch]:
        """The user object's batch stream for peer ``rank`` of ``world``, from batch number ``start``."""
        return batch_stream(self.inner, rank, world, start)

    def loss(self, model: torch.nn.Module, batch: Batch) -> torch.Tensor:
        """The user object's loss if it has one, else next-token cross-entropy."""
        own = getattr(self.inner, "loss", None)
        return own(model, batch) if callable(own) else super().loss(model, batch)

    def evaluate(self, model: torch.nn.Module) -> float:
        """The user object's evaluation, run without grad in eval mode (modes restored after)."""
        with evaluating(model):
            return float(self.inner.evaluate(model))

    @property
    def entropy_floor(self) -> float | None:
        """The user object's ``entropy_floor`` if it has one, else None."""
        floor = getattr(self.inner, "entropy_floor", None)
        return None if floor is None else float(floor)

    def samples_per_batch(self) -> int:
        """The user object's ``samples_per_batch()`` if it has one, else the configured batch size."""
        own = getattr(self.inner, "samples_per_batch", None)
        return int(own()) if callable(own) else self.config.batch_size

    def batch_samples(self, batch: Batch) -> int:
        """The user object's ``batch_samples(batch)`` if it has one, else ``samples_per_batch()``."""
        own = getattr(self.inner, "batch_samples", None)
        return int(own(batch)) if callable(own) else self.samples_per_batch()

    def accuracy(self, model: torch.nn.Module) -> float | None:
        """The user object's ``accuracy(model)`` (without grad, in eval mode) if it has one, else None."""
        own = getattr(self.inner, "accuracy", None)
        if not callable(own):
            return None
        with evaluating(model):
            return float(own(model))

    def partition_size(self, rank: int, world: int) -> int | None:
        """The user object's ``partition_size(rank, world)`` if it has one, else None."""
        own = getattr(self.inner, "partition_size", None)
        return int(own(rank, world)) if callable(own) else None
