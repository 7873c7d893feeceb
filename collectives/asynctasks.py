"""Ending asyncio tasks for sure: cancel them, wait, and cancel again any that runs on.

A task can swallow a cancellation: on Python 3.11, ``asyncio.wait_for`` returns its awaitable's result when
the cancellation arrives as that awaitable completes, and drops the cancellation. Cancelling once and then
awaiting the task (or gathering it) then waits for as long as the task chooses to run; a peer's close once
waited 30 s for a heartbeat loop that beat on. Every place that stops its own tasks goes through here;
``cancel_within`` is the bounded kind, for a shutdown that must end in time.
``consume_exception`` is the done-callback for work nobody waits for: its outcome is retrieved, so asyncio
reports nothing at exit.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterable

log = logging.getLogger(__name__)

RECANCEL_EVERY_S = 0.5  # how long a cancelled task may run on before it is cancelled again


async def cancel_and_wait(tasks: Iterable[asyncio.Future], every_s: float = RECANCEL_EVERY_S) -> None:
    """Cancel every task and return once all have ended, cancelling again those still running every every_s.

    What the tasks raised is retrieved (and logged at debug level), so asyncio reports nothing at exit. If the
    caller is cancelled meanwhile, the tasks are cancelled once more and the caller's cancellation goes on."""
    tasks = list(tasks)
    pending = {task for task in tasks if not task.done()}
    try:
        while pending:
            for task in pending:
                task.cancel()
            _, pending = await asyncio.wait(pending, timeout=every_s)
    except asyncio.CancelledError:
        for task in pending:
            task.cancel()
        raise
    for task in tasks:
        if not task.cancelled() and task.exception() is not None:
            name = task.get_name() if isinstance(task, asyncio.Task) else repr(task)
            log.debug("%s ended with %r", name, task.exception())


async def cancel_within(tasks: Iterable[asyncio.Future], timeout_s: float) -> None:
    """Cancel every task once and wait for them for at most timeout_s (at shutdown, where a task that runs on is
    left to the loop's end rather than waited for). Nothing here refers to the tasks once it returns."""
    pending = [task for task in tasks if not task.done()]
    for task in pending:
        task.cancel()
    if pending:
        await asyncio.wait(pending, timeout=timeout_s)


def consume_exception(future: asyncio.Future) -> None:
    """Done-callback for work whose caller has gone or does not need its outcome: retrieve it, ignore it."""
    if not future.cancelled():
        future.exception()
