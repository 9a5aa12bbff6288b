"""Stopping background tasks: :func:`hermes_worker.worker.tasks.cancel_and_wait`."""

from __future__ import annotations

import asyncio

from hermes_worker.worker.tasks import cancel_and_wait


class Flaky(Exception):
    """An error a background loop catches and retries (a Redis timeout, say)."""


def test_a_task_that_turned_its_first_cancellation_into_an_error_is_stopped_all_the_same() -> None:
    swallowed: list[int] = []

    async def background_loop() -> None:
        while True:
            try:
                try:
                    await asyncio.sleep(10)
                except asyncio.CancelledError:
                    if swallowed:  # the second time it goes
                        raise
                    asyncio.current_task().uncancel()  # type: ignore[union-attr]
                    raise Flaky from None  # a library's conversion
            except Flaky:
                swallowed.append(1)  # caught and retried, as a loop does with Redis errors

    async def main() -> tuple[bool, bool]:
        stubborn = asyncio.create_task(background_loop())
        plain = asyncio.create_task(asyncio.sleep(10))
        await asyncio.sleep(0)
        await asyncio.wait_for(cancel_and_wait([stubborn, plain], every_s=0.05), timeout=5)
        return stubborn.cancelled(), plain.cancelled()

    # Given a loop that caught its first cancellation as an error and went on, When stopped,
    # Then it is cancelled again until it ends, and the plain task is cancelled at once
    assert asyncio.run(main()) == (True, True)
    assert swallowed == [1]
