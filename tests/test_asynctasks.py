"""cancel_and_wait: every task it is given has ended when it returns, whatever the tasks do with a cancellation."""

from __future__ import annotations

import asyncio
import logging

import pytest

from collectives.asynctasks import cancel_and_wait, cancel_within

pytestmark = pytest.mark.timeout(30)


async def _stubborn(swallowed: list[str], name: str) -> None:
    """Swallow the first cancellation (as Python 3.11's asyncio.wait_for can), then wait to be cancelled again."""
    try:
        await asyncio.sleep(3600)
    except asyncio.CancelledError:
        swallowed.append(name)
    await asyncio.sleep(3600)


def test_a_task_that_swallows_a_cancellation_is_cancelled_again_until_it_ends():
    async def main() -> tuple[list[str], bool]:
        swallowed: list[str] = []
        task = asyncio.get_running_loop().create_task(_stubborn(swallowed, "a"))
        await asyncio.sleep(0)
        async with asyncio.timeout(5):
            await cancel_and_wait([task], every_s=0.01)
        return swallowed, task.cancelled()

    assert asyncio.run(main()) == (["a"], True)


def test_every_task_has_ended_on_return_the_stubborn_and_the_obedient():
    async def main() -> list[bool]:
        swallowed: list[str] = []
        loop = asyncio.get_running_loop()
        tasks = [loop.create_task(_stubborn(swallowed, "a")), loop.create_task(asyncio.sleep(3600)),
                 loop.create_task(_stubborn(swallowed, "b"))]
        await asyncio.sleep(0)
        async with asyncio.timeout(5):
            await cancel_and_wait(tasks, every_s=0.01)
        return [task.done() for task in tasks]

    assert asyncio.run(main()) == [True, True, True]


def test_tasks_already_done_are_left_as_they_are():
    async def main() -> tuple[int, bool]:
        task = asyncio.get_running_loop().create_task(asyncio.sleep(0, result=7))
        await task
        await cancel_and_wait([task])
        return task.result(), task.cancelled()

    assert asyncio.run(main()) == (7, False)


def test_an_exception_a_task_ended_with_is_retrieved_and_logged_not_raised(caplog):
    async def fails() -> None:
        raise ValueError("broken")

    async def main() -> asyncio.Task:
        task = asyncio.get_running_loop().create_task(fails(), name="the-failing-task")
        await asyncio.sleep(0)
        await cancel_and_wait([task])
        return task

    with caplog.at_level(logging.DEBUG, logger="collectives.asynctasks"):
        task = asyncio.run(main())
    assert isinstance(task.exception(), ValueError)
    assert "the-failing-task ended with ValueError('broken')" in caplog.text


def test_a_cancelled_caller_cancels_the_tasks_once_more_and_is_itself_cancelled():
    async def main() -> tuple[bool, list[str]]:
        swallowed: list[str] = []
        loop = asyncio.get_running_loop()
        task = loop.create_task(_stubborn(swallowed, "a"))
        await asyncio.sleep(0)
        waiter = loop.create_task(cancel_and_wait([task], every_s=3600))
        await asyncio.sleep(0.05)  # the task swallowed the first cancellation; the waiter waits an hour
        waiter.cancel()
        with pytest.raises(asyncio.CancelledError):
            await waiter
        await asyncio.sleep(0)
        return task.cancelled(), swallowed

    assert asyncio.run(main()) == (True, ["a"])


def test_cancel_within_cancels_each_task_once_and_leaves_one_that_runs_on_to_the_loop():
    # At shutdown the wait is bounded: a task that swallows its cancellation is not cancelled again.
    async def main() -> tuple[list[str], list[bool]]:
        swallowed: list[str] = []
        loop = asyncio.get_running_loop()
        stubborn, obedient = loop.create_task(_stubborn(swallowed, "a")), loop.create_task(asyncio.sleep(3600))
        await asyncio.sleep(0)
        await cancel_within([stubborn, obedient], timeout_s=0.05)
        ended = [stubborn.done(), obedient.cancelled()]
        await cancel_and_wait([stubborn])
        return swallowed, ended

    assert asyncio.run(main()) == (["a"], [False, True])
