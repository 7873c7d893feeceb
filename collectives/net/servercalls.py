"""The tasks a gRPC server runs its calls in, and ending them after the server stopped, before the loop's other tasks.

gRPC's asyncio server runs each call's handler in a task of its own, and awaits
that task from a second task of its own, which logs ``Exception not handled by
_handle_exceptions in servicer method [...]`` with a traceback for anything but
a normal end. Cancelling the handler's task is a cancelled call to it (logged at
debug level). Cancelling the second task while it awaits a handler task that
has just ended (its wake-up already scheduled, not yet run) is not: it takes the
cancellation where it awaits, and logs it as that error.

``server.stop(grace)`` returns once gRPC's core has no call left, which can be a
loop turn before those second tasks have seen their handlers end. A shutdown
that then cancels every task of the loop (``Transport.close``, as ``asyncio.run``
does) cancelled one of them now and then: the peer stopped by SIGTERM with a
round's push stream open logged that error and its traceback (4 of 32
chaos-harness runs). ``stop_server`` stops the server and then ends the calls still
running itself, waits for them, and leaves gRPC a loop turn to see them end.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

import grpc

from collectives.asynctasks import cancel_within


class CallTasks(grpc.aio.ServerInterceptor):
    """Records the task each call of a server runs in, until it ends (``make_server(calls=...)`` installs it first,
    so the calls its other interceptors refuse are recorded too)."""

    def __init__(self) -> None:
        self._tasks: set[asyncio.Task] = set()

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler | None]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler | None:
        """The call's handler, unchanged; the task it runs in is recorded (the handler runs in the same task)."""
        task = asyncio.current_task()
        if task is not None and task not in self._tasks:
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
        return await continuation(handler_call_details)

    def running(self) -> set[asyncio.Task]:
        """The tasks of the calls not ended yet."""
        return {task for task in self._tasks if not task.done()}


async def stop_server(server: grpc.aio.Server, calls: CallTasks, grace_s: float) -> None:
    """Stop a server made with ``calls`` (within grace_s), then end its calls still running: cancel them (gRPC takes
    it as a cancelled call), wait for them (at most grace_s + 1 s), then one loop turn, so that gRPC's task awaiting
    each has seen it end.

    Call it from the server's loop before cancelling any other task. A call still running after the wait is left
    pending (as is gRPC's task awaiting it): cancelling both is quiet.
    """
    await server.stop(grace_s)
    # gRPC's task awaiting a call's task is woken straight from its end; this wait returns a turn later.
    await cancel_within(calls.running(), grace_s + 1.0)
    # A call that ended before now has its awaiting task's wake-up queued already: it runs before this turn ends.
    await asyncio.sleep(0)
