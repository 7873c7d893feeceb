"""Training tasks: what a peer trains (model, per-peer data, loss, held-out evaluation).

``make_task(name, TaskConfig(...))`` gives one of the registered tasks
(``"synthetic-lm"``, ``"text-lm"``, ``"digits"``; ``peer/tasks/registry.py``) or a
user task ``"package.module:function"``. How a labelled data set is divided
among peers (iid, Dirichlet) is ``peer.tasks.partition``.
"""

from peer.tasks.base import Batch, Task, TaskConfig, batch_stream
from peer.tasks.registry import make_task, register_task, task_names

__all__ = ["Batch", "Task", "TaskConfig", "batch_stream", "make_task", "register_task", "task_names"]
