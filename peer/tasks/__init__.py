"""Training tasks: what a peer trains (model, per-peer data, loss, held-out evaluation).

``make_task(name, TaskConfig(...))`` gives one of the registered tasks
(``"synthetic-lm"``, ``"text-lm"``; ``peer/tasks/registry.py``) or a user
task ``"package.module:function"``.
"""

from peer.tasks.base import Batch, Task, TaskConfig, batch_stream
from peer.tasks.registry import make_task, register_task, task_names

TASK_NAMES = task_names()

__all__ = ["TASK_NAMES", "Batch", "Task", "TaskConfig", "batch_stream", "make_task", "register_task", "task_names"]
