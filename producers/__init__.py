"""Producer-side helpers for services that submit jobs to hermes-worker.

:class:`HermesClient` (blocking) and :class:`AsyncHermesClient` (asyncio) submit jobs,
follow their event streams and wait for results; see :mod:`producers.client`. The wire
models come along: build a :class:`ChatJob` (or a plain dict in the same OpenAI shape),
check it with :func:`parse_job`, and read a :class:`JobResult` back. Nothing here imports
the engine, torch or transformers.
"""

from hermes_worker.contract.jobs import ChatJob, JobInfo, JobResult, JobStatus, parse_job
from hermes_worker.contract.store import StreamEvent
from hermes_worker.errors import HermesError, InvalidRequest
from producers.client import (
    AsyncHermesClient,
    AsyncJobHandle,
    DeadLetter,
    HermesClient,
    JobAlreadyEnded,
    JobHandle,
    JobNotFound,
    NotInDeadLetters,
    QueueFull,
)

__all__ = [
    "AsyncHermesClient",
    "AsyncJobHandle",
    "ChatJob",
    "DeadLetter",
    "HermesClient",
    "HermesError",
    "InvalidRequest",
    "JobAlreadyEnded",
    "JobHandle",
    "JobInfo",
    "JobNotFound",
    "JobResult",
    "JobStatus",
    "NotInDeadLetters",
    "QueueFull",
    "StreamEvent",
    "parse_job",
]
