"""Stopping the worker's background tasks for sure."""

from __future__ import annotations

import asyncio
from typing import Any

import structlog

log = structlog.stdlib.get_logger(__name__)


async def cancel_and_wait(tasks: list[asyncio.Task[Any]], every_s: float = 3.0) -> None:
    """Cancel ``tasks`` and wait until they are done, cancelling again any still running
    after ``every_s``: a cancellation that a library turned into an error (one that a
    background loop catches and retries, e.g. a Redis timeout) would otherwise leave the
    task running and the shutdown waiting for ever. Logs where such a task was."""
    pending = {task for task in tasks if not task.done()}
    for task in pending:
        task.cancel()
    while pending:
        _, pending = await asyncio.wait(pending, timeout=every_s)
        for task in pending:
            where = " <- ".join(
                f"{f.f_code.co_name}:{f.f_lineno}" for f in reversed(task.get_stack())
            )
            log.warning("task %s went on after it was cancelled (at %s); again", task, where)
            task.cancel()
