"""The tasks a peer can train, by name; a new task is one module plus one ``register_task`` line.

``make_task(name, config)`` gives a registered task (``synthetic-lm``,
``text-lm``, ``digits``, or one a plugin registered) or a user task named
``"package.module:function"`` (``peer/tasks/user.py``). Registration happens
at import time only; the table is read-only afterwards.
"""

from __future__ import annotations

from collections.abc import Callable

from collectives.errors import ConfigError
from peer.tasks.base import Task, TaskConfig
from peer.tasks.digits import DigitsTask
from peer.tasks.synthetic import SyntheticLMTask
from peer.tasks.text import TextLMTask
from peer.tasks.user import load_user_task

_TASKS: dict[str, Callable[[TaskConfig], Task]] = {}


def register_task(name: str, factory: Callable[[TaskConfig], Task]) -> None:
    """Make ``factory(config)`` available as the task ``name``; registering the same one again is a no-op."""
    if not name or ":" in name or name != name.strip():
        raise ConfigError(f"task names are words without ':' (that marks a user task), got {name!r}")
    if not callable(factory):
        raise ConfigError(f"the factory of task {name!r} must be callable (a function of the task's config, or a "
                          f"Task class), got {type(factory).__name__}")
    known = _TASKS.get(name)
    if known is not None and known is not factory:
        raise ConfigError(f"task {name!r} is already registered by {known!r}; pick another name")
    _TASKS[name] = factory


def task_names() -> tuple[str, ...]:
    """The registered task names, built-in ones first."""
    return tuple(_TASKS)


def make_task(name: str, config: TaskConfig) -> Task:
    """The task called ``name``: a registered one or a user task ``"package.module:function"``."""
    factory = _TASKS.get(name)
    if factory is not None:
        return factory(config)
    if ":" in name:
        return load_user_task(name, config)
    raise ConfigError(
        f"unknown task {name!r}; choose one of {', '.join(_TASKS)} "
        "or a user task given as 'package.module:function' (a function taking a TaskConfig and returning a Task)"
    )


def check_task(name: str, config: TaskConfig) -> None:
    """Raise the ConfigError a peer would raise for this task and config, before any process starts.

    Builds the task (its data, not its model), which is cheap for every built-in task (digits
    imports scikit-learn and loads its 1,797 bundled images), so a
    parent (harness, demo, bench) reports a bad --task, --data or size in one line itself.
    """
    make_task(name, config)


def task_help() -> str:
    """What --task takes: the registered tasks (those that read --data say so), a plugin's, or a user task."""
    names = [f"{name} (--data)" if getattr(factory, "reads_data", False) else name for name, factory in _TASKS.items()]
    return f"{', '.join(names)}, a plugin's registered task, or package.module:function"


for _builtin in (SyntheticLMTask, TextLMTask, DigitsTask):
    register_task(_builtin.name, _builtin)

DEFAULT_TASK = SyntheticLMTask.name
"""The task every command trains unless told otherwise (--task)."""

TASK_HELP = task_help()
"""What --task takes, for every command's help: built when the built-in tasks are registered, before any plugin
is loaded (a plugin's tasks are named by the help's "a plugin's registered task")."""
