"""Training tasks: what a peer trains (model, per-peer data, loss, held-out evaluation).

``make_task(name, TaskConfig(...))`` gives one of the built-in tasks
(``"synthetic-lm"``, ``"text-lm"``) or a user task ``"package.module:function"``.
"""

from peer.tasks.base import TASK_NAMES, Batch, Task, TaskConfig, batch_stream, make_task

__all__ = ["TASK_NAMES", "Batch", "Task", "TaskConfig", "batch_stream", "make_task"]
