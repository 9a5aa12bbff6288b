"""Server-Sent Events: framing, and keep-alive comments while a job is quiet.

A chat stream sends ``data: <chunk JSON>`` events and ends with ``data: [DONE]``, as OpenAI
does; a job's event stream sends each event with ``id:`` (its Redis stream entry id, what
``Last-Event-ID`` resumes after) and ``event:`` (its type). While nothing comes for
``HERMES_GATEWAY_KEEPALIVE_S`` seconds (a job waiting in the queue, a long prefill), a
comment line (``: keep-alive``) keeps proxies from closing the connection; SSE clients skip
comments.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncGenerator, AsyncIterator, Callable, Mapping
from typing import Any, TypeVar, cast

from starlette.responses import StreamingResponse
from starlette.types import Receive, Scope, Send

from hermes_worker.contract.store import StreamEvent

T = TypeVar("T")

DONE = b"data: [DONE]\n\n"
KEEPALIVE = b": keep-alive\n\n"
MEDIA_TYPE = "text/event-stream"
HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}  # nginx: do not buffer
PUMP_BUFFER = 16  # items read ahead of a slow client before the reader waits for it
_END = object()


class _Failure:
    def __init__(self, exc: Exception) -> None:
        self.exc = exc


def data(payload: Any) -> bytes:
    """One ``data:`` event (compact JSON, non-ASCII kept)."""
    text = json.dumps(payload, ensure_ascii=False, separators=(",", ":"))
    return f"data: {text}\n\n".encode()


def job_event(event: StreamEvent) -> bytes:
    """One job event: ``id`` (its stream entry id), ``event`` (its type), ``data`` (the event)."""
    text = json.dumps(event.to_json(), ensure_ascii=False, separators=(",", ":"))
    return f"id: {event.id}\nevent: {event.type}\ndata: {text}\n\n".encode()


async def with_keepalive(
    source: AsyncIterator[T], interval_s: float
) -> AsyncGenerator[T | None, None]:
    """The items of ``source``, and None whenever ``interval_s`` passes without one.

    ``source`` is read in a task of its own into a small buffer, so a wait that times out
    never interrupts it; when the caller stops (the client went away), that task is
    cancelled, which closes ``source`` (the job's stream stops being followed)."""
    buffer: asyncio.Queue[object] = asyncio.Queue(PUMP_BUFFER)

    async def pump() -> None:
        try:
            async for item in source:
                await buffer.put(item)
            await buffer.put(_END)
        except Exception as exc:  # handed to the reader, which raises it
            await buffer.put(_Failure(exc))

    task = asyncio.create_task(pump(), name="hermes-gateway-sse-pump")
    try:
        while True:
            try:
                item = await asyncio.wait_for(buffer.get(), interval_s)
            except TimeoutError:
                yield None
                continue
            if item is _END:
                return
            if isinstance(item, _Failure):
                raise item.exc
            yield cast(T, item)
    finally:
        task.cancel()  # not awaited: the caller may itself be being cancelled


class EventStreamResponse(StreamingResponse):
    """A streaming response of SSE bytes that closes its iterator however it ends, then
    calls ``on_close``.

    Starlette cancels a stream whose client went away while the iterator may be parked at a
    ``yield`` (or not started yet); the iterator would then be closed only when collected.
    Closing it here, then calling ``on_close``, lets the caller act at once on a stream that
    did not reach its end (the gateway cancels the job of a client that left)."""

    media_type = MEDIA_TYPE

    def __init__(
        self,
        content: AsyncIterator[bytes],
        *,
        headers: Mapping[str, str] | None = None,
        on_close: Callable[[], None] | None = None,
    ) -> None:
        super().__init__(content, headers=headers, media_type=MEDIA_TYPE)
        self.on_close = on_close

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            try:
                close = getattr(self.body_iterator, "aclose", None)
                if close is not None:
                    with contextlib.suppress(Exception):
                        await asyncio.shield(close())
            finally:
                if self.on_close is not None:
                    self.on_close()
