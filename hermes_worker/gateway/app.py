"""The gateway's routes, its app (:func:`create_app`) and its server (:func:`serve`).

Endpoints (docs/gateway.md has each one's behaviour):

* ``POST /v1/chat/completions``: a job, answered as a ``chat.completion`` (``stream: false``),
  as ``chat.completion.chunk`` Server-Sent Events (``stream: true``), or at once with 202 and
  the job object (``background: true``).
* ``GET /v1/jobs/{id}``, ``POST /v1/jobs/{id}/cancel``, ``GET /v1/jobs/{id}/events`` (SSE,
  resumable with ``Last-Event-ID``).
* ``GET /v1/models``, ``GET /v1/models/{model}``: what live workers serve.
* ``GET /healthz`` (Redis answers), ``GET /metrics`` (Prometheus).

The gateway keeps no state of its own: jobs go through
:class:`~producers.client.AsyncHermesClient` (one per deployment, all on one Redis
connection pool, each following its jobs' streams with one blocking XREAD), and what a later
request needs (a job, its events, who waits on it) is in Redis. Any number of gateways can
serve behind a load balancer; SIGTERM stops taking connections and lets open requests and
streams finish for ``HERMES_GATEWAY_SHUTDOWN_GRACE_S``.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import math
import re
import time
import uuid
from collections.abc import AsyncIterator, Coroutine, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from redis.asyncio import Redis
from redis.exceptions import RedisError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect

from hermes_worker.contract.clock import redis_time
from hermes_worker.contract.jobs import JobResult, JobStatus, usable_job_id
from hermes_worker.contract.store import as_text, async_client, body_digest
from hermes_worker.errors import (
    HermesError,
    InvalidRequest,
    JobAlreadyEnded,
    JobLost,
    JobNotFound,
    QueueFull,
)
from hermes_worker.gateway import sse
from hermes_worker.gateway.batches import BatchEndpoints
from hermes_worker.gateway.errors import (
    NO_RETRY,
    GatewayError,
    from_invalid_request,
    invalid,
    not_found,
    result_error,
    too_large,
)
from hermes_worker.gateway.metrics import (
    CLIENT_GONE,
    TENANT_SCOPE_KEY,
    GatewayMetrics,
    MetricsMiddleware,
)
from hermes_worker.gateway.openai_shapes import (
    ChatRequest,
    ChunkStream,
    chat_request,
    completion,
    decode_body,
    job_object,
)
from hermes_worker.gateway.routing import Deployment, Router, Target, WorkerDirectory, parse_routes
from hermes_worker.gateway.tenants import Caller, Tenants, refuse_reserved_metadata
from hermes_worker.settings import Settings
from hermes_worker.worker.logs import configure_logging, get_logger
from producers.client import (
    AsyncHermesClient,
    AsyncJobHandle,
    Submission,
    events_from_xread,
    prepare_submission,
)

log = get_logger("hermes_worker.gateway")

CHAT_ROUTE = "/v1/chat/completions"
EVENTS_ROUTE = "/v1/jobs/{job_id}/events"
# A wait for a job with a deadline gives up this long after it (the worker ends the job at
# its deadline; this covers a job no worker took in time).
DEADLINE_SLACK_S = 10.0
ATTACH_TTL_S = 3600  # a job's record of the requests waiting on it, after the last one came
STOP_TASKS_S = 5.0  # at shutdown, for the cancels of clients that left to reach Redis
HEALTH_TIMEOUT_S = 2.0
ENTRY_ID = re.compile(r"^\d{1,20}(-\d{1,20})?$")


@dataclass(frozen=True)
class Attachment:
    """A request waiting on a job whose id its client chose: while one is recorded in the
    job's ``{prefix}job:{id}:gateway`` hash (any gateway's), a client that left does not get
    the job cancelled (it, or its retry, may be back)."""

    client: AsyncHermesClient
    key: str
    token: str


def attach_key(client: AsyncHermesClient, job_id: str) -> str:
    return f"{client.keys.job(job_id)}:gateway"


def has_deadline(body: dict[str, Any]) -> bool:
    return isinstance(body.get("deadline"), int | float)


def wait_timeout(body: dict[str, Any], now: float | None) -> float | None:
    """How long to wait for a job: until its deadline (``timeout_s`` / ``deadline``) plus
    DEADLINE_SLACK_S, or for ever (the client's own timeout, or its leaving, ends it).
    ``now`` is Redis's (needed for a ``deadline``): the worker compares the deadline with
    Redis's clock, so this gateway's own clock must not shorten or stretch the wait."""
    limits = []
    if isinstance(body.get("timeout_s"), int | float):
        limits.append(float(body["timeout_s"]))
    if has_deadline(body):
        if now is None:
            raise ValueError("a deadline is waited for against Redis's now")
        limits.append(float(body["deadline"]) - now)
    return max(0.0, min(limits)) + DEADLINE_SLACK_S if limits else None


def deadline_error(job_id: str) -> GatewayError:
    return GatewayError(
        504,
        f"job {job_id} did not end by its deadline",
        type="timeout_error",
        code="deadline_exceeded",
        headers=NO_RETRY,
    )


def hermes_error(exc: HermesError, retry_after_s: int) -> GatewayError:
    """A client-side error of the producer client as an answer."""
    if isinstance(exc, InvalidRequest):
        return from_invalid_request(exc, {})
    if isinstance(exc, QueueFull):
        return GatewayError(
            429, exc.message, type="rate_limit_error", code="queue_full",
            headers={"Retry-After": str(retry_after_s)},
        )  # fmt: skip
    if isinstance(exc, JobLost):
        return GatewayError(500, exc.message, type="server_error", code="job_lost")
    if isinstance(exc, JobNotFound):
        return not_found(exc.message, "job_not_found")
    if isinstance(exc, JobAlreadyEnded):
        return GatewayError(409, exc.message, code="already_ended", headers=NO_RETRY)
    return GatewayError(500, exc.message, type="server_error", code=exc.type)


def redis_error(exc: Exception) -> GatewayError:
    return GatewayError(
        503,
        f"Redis did not answer: {type(exc).__name__}: {exc}",
        type="server_error",
        code="redis_unavailable",
        headers={"Retry-After": "1"},
    )


async def client_left(request: Request) -> None:
    """Return once the client has gone away (its body was read already)."""
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


class Gateway:
    """The state of one gateway process: Redis clients, routes, metrics, background tasks."""

    redis: Redis
    router: Router
    tenants: Tenants

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.default = Deployment(settings.queue_name, settings.key_prefix)
        self.routes = parse_routes(settings.gateway_routes, self.default)  # fails early
        self.metrics = GatewayMetrics()
        self.batch_endpoints = BatchEndpoints(self)  # /v1/files, /v1/batches, a batch runner
        self.clients: dict[Deployment, AsyncHermesClient] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self._delayed: set[asyncio.Task[None]] = set()
        # Requests following a job (a wait or a stream): at shutdown, uvicorn cancels those
        # still open after its grace and goes on at once; their cleanup (the cancel of a job
        # whose client is cut off) must run before the clients close.
        self._following = 0
        self._none_following = asyncio.Event()
        self._none_following.set()

    # --- lifecycle --------------------------------------------------------------------------

    async def start(self) -> None:
        self.redis = async_client(self.settings.redis_url)
        directory = WorkerDirectory(self.redis, self.settings.gateway_workers_cache_s)
        self.router = Router(self.routes, self.default, directory)
        self.tenants = Tenants(self.redis, self.settings)
        self.batch_endpoints.start()
        for deployment in self.router.deployments():
            settings = self.settings.model_copy(
                update={"queue_name": deployment.queue, "key_prefix": deployment.key_prefix}
            )
            self.clients[deployment] = AsyncHermesClient(settings, redis=self.redis)
        log.info(
            "gateway ready",
            queue=self.default.queue,
            key_prefix=self.default.key_prefix,
            routes=sorted(self.routes),
            auth=self.settings.gateway_auth,
        )

    async def stop(self) -> None:
        """After the server drained: let the requests it cut off clean up, drop the delayed
        cancels (a client that left during the drain may be back on another gateway), give
        the immediate ones a moment, close."""
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(STOP_TASKS_S):
                await self._none_following.wait()
        for task in list(self._delayed):
            task.cancel()
        pending = self._tasks - self._delayed
        if pending:
            await asyncio.wait(pending, timeout=STOP_TASKS_S)
        for client in self.clients.values():
            await client.aclose()
        await asyncio.to_thread(self.batch_endpoints.stop)
        await self.redis.aclose()

    @contextlib.contextmanager
    def _follows(self) -> Iterator[None]:
        """Counts a request that follows a job, for :meth:`stop`."""
        self._following += 1
        self._none_following.clear()
        try:
            yield
        finally:
            self._unfollow()

    def _unfollow(self) -> None:
        self._following -= 1
        if not self._following:
            self._none_following.set()

    def _spawn(self, work: Coroutine[Any, Any, None], *, delayed: bool = False) -> None:
        task = asyncio.create_task(work)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        if delayed:
            self._delayed.add(task)
            task.add_done_callback(self._delayed.discard)

    # --- chat completions -------------------------------------------------------------------

    async def _caller(self, request: Request) -> Caller:
        """Who sent ``request`` (401 without a valid key, 429 over its requests per minute),
        noted in the request's scope for the metrics."""
        caller = await self.tenants.admit(request.headers.get("authorization"))
        request.scope[TENANT_SCOPE_KEY] = caller.tenant
        return caller

    def _owned(self, chat: ChatRequest, caller: Caller, idempotency_key: str | None) -> ChatRequest:
        """The request as its tenant may send it: no ``hermes_*`` metadata, and a body ``id``
        scoped to the tenant (an Idempotency-Key's id already is)."""
        if not caller.scoped:
            return chat
        refuse_reserved_metadata(chat.job)
        if chat.job_id is None or idempotency_key is not None:
            return chat
        job_id = caller.job_id(chat.job_id)
        chat.job["id"] = job_id
        return dataclasses.replace(chat, job_id=job_id)

    async def chat_completions(self, request: Request) -> Response:
        caller = await self._caller(request)
        raw = await self._read_body(request)
        key = request.headers.get("idempotency-key")
        chat = chat_request(decode_body(raw), key, scope=caller.scope)
        chat = self._owned(chat, caller, key)
        target = self.router.resolve(chat.model)
        workers = await self.router.require_workers(target)
        client = self.clients[target.deployment]
        submission = self._validated(chat)
        handle = await self._submit(client, submission, chat, caller)
        model = chat.model or workers[0].model
        mode = "stream" if chat.stream else "background" if chat.background else "wait"
        created = str(handle.created).lower()
        self.metrics.jobs.labels(target.label, mode, created, caller.tenant).inc()
        log.info(
            "chat", job_id=handle.id, created=handle.created, mode=mode, model=target.label,
            tenant=caller.tenant,
        )  # fmt: skip
        headers = {"X-Hermes-Job-Id": handle.id}
        if mode == "background":
            record = await client.redis.hgetall(client.keys.job(handle.id))
            headers["Location"] = f"/v1/jobs/{handle.id}"
            return JSONResponse(job_object(handle.id, record), 202, headers=headers)
        # An absolute deadline is on Redis's clock: one TIME to know how far off it is.
        now = redis_time(await client.redis.time()) if has_deadline(submission.body) else None
        timeout = wait_timeout(submission.body, now)
        attachment = None
        if chat.keyed and not chat.background:
            attachment = await self._attach(client, handle.id)
        if chat.stream:
            return self._stream_response(
                client, handle, chat, target, model, timeout, attachment, caller.tenant
            )
        return await self._answer(request, client, handle, chat, target, model, timeout, attachment)

    async def _answer(
        self, request: Request, client: AsyncHermesClient, handle: AsyncJobHandle,
        chat: ChatRequest, target: Target, model: str, timeout: float | None,
        attachment: Attachment | None,
    ) -> Response:  # fmt: skip
        """Wait for the job's end (or the client's leaving) and answer with its completion."""
        follow = asyncio.create_task(self._follow(handle, timeout))
        left = asyncio.create_task(client_left(request))
        with self._follows():
            try:
                done, _ = await asyncio.wait({follow, left}, return_when=asyncio.FIRST_COMPLETED)
            except asyncio.CancelledError:  # the server is stopping and could not wait longer
                self._client_gone(client, handle.id, chat, target, attachment)
                raise
            finally:
                left.cancel()
                if not follow.done():
                    follow.cancel()
        if follow not in done:
            self._client_gone(client, handle.id, chat, target, attachment)
            return Response(status_code=CLIENT_GONE)
        self._detach(attachment)
        headers = {"X-Hermes-Job-Id": handle.id}
        try:
            result = follow.result()
        except TimeoutError:
            self._spawn(self._cancel(client, handle.id))
            error = deadline_error(handle.id)
            error.headers.update(headers)
            raise error from None
        if result.job.status is JobStatus.SUCCEEDED:
            return JSONResponse(completion(result, model), headers=headers)
        error = result_error(result)
        error.headers.update(headers)
        raise error

    async def _follow(self, handle: AsyncJobHandle, timeout: float | None) -> JobResult:
        """The job's result once it has ended. ``result()`` wakes once per job, not per
        stream write: the client's hub reads the ends streams of every request this gateway
        waits on (its own for the jobs it submitted; another replica's for a job that one
        submitted), in one XREAD (docs/wire-protocol.md, "Waiting for a result")."""
        return await handle.result(timeout=timeout)

    def _stream_response(
        self, client: AsyncHermesClient, handle: AsyncJobHandle, chat: ChatRequest,
        target: Target, model: str, timeout: float | None, attachment: Attachment | None,
        tenant: str,
    ) -> Response:  # fmt: skip
        """The SSE answer; when it closes, a client that left before the end (the stream did
        not reach its last chunk) has its job cancelled (see :meth:`_client_gone`)."""
        chunks = ChunkStream(handle.id, model, int(time.time()), include_usage=chat.include_usage)
        gauge = self.metrics.open_streams.labels(CHAT_ROUTE, target.label, tenant)
        gauge.inc()
        self._following += 1
        self._none_following.clear()

        def closed() -> None:
            gauge.dec()
            if chunks.failed is not None or chunks.succeeded:
                self._detach(attachment)
            else:
                self._client_gone(client, handle.id, chat, target, attachment)
            self._unfollow()

        body = self._chat_stream(client, handle, chunks, timeout)
        headers = {**sse.HEADERS, "X-Hermes-Job-Id": handle.id}
        return sse.EventStreamResponse(body, headers=headers, on_close=closed)

    async def _chat_stream(
        self, client: AsyncHermesClient, handle: AsyncJobHandle, chunks: ChunkStream,
        timeout: float | None,
    ) -> AsyncIterator[bytes]:  # fmt: skip
        """The job's events as chunks, then its end: ``[DONE]``, or an error object."""
        yield sse.data(chunks.first())
        try:
            events = sse.with_keepalive(
                handle.stream(timeout=timeout), self.settings.gateway_keepalive_s
            )
            async with contextlib.aclosing(events):
                async for event in events:
                    if event is None:
                        yield sse.KEEPALIVE
                        continue
                    for payload in chunks.feed(event):
                        yield sse.data(payload)
                    if chunks.failed is not None:
                        break
            closing = chunks.finish()
        except TimeoutError:
            self._spawn(self._cancel(client, handle.id))
            closing = chunks.fail(deadline_error(handle.id))
        except HermesError as exc:
            closing = chunks.fail(hermes_error(exc, self.settings.gateway_retry_after_s))
        except RedisError as exc:
            closing = chunks.fail(redis_error(exc))
        for payload in closing:
            yield sse.data(payload)
        if chunks.succeeded:
            yield sse.DONE

    # --- the steps of a chat request --------------------------------------------------------

    async def _read_body(self, request: Request) -> bytes:
        """The body, refused with 413 as soon as it is over ``HERMES_MAX_BODY_BYTES`` (by its
        Content-Length, before reading it) and with 408 if it is not in within
        ``HERMES_GATEWAY_BODY_TIMEOUT_S``."""
        limit = self.settings.max_body_bytes
        declared = request.headers.get("content-length", "")
        if declared.isdigit() and int(declared) > limit:
            raise too_large(int(declared), limit)
        chunks: list[bytes] = []
        size = 0
        try:
            async with asyncio.timeout(self.settings.gateway_body_timeout_s):
                async for chunk in request.stream():
                    size += len(chunk)
                    if size > limit:
                        raise too_large(None, limit)
                    chunks.append(chunk)
        except TimeoutError:
            raise GatewayError(
                408,
                f"the body did not arrive within {self.settings.gateway_body_timeout_s:g} s",
                type="request_timeout",
                code="request_timeout",
            ) from None
        return b"".join(chunks)

    def _validated(self, chat: ChatRequest) -> Submission:
        try:
            return prepare_submission(chat.job, self.settings.max_body_bytes)
        except InvalidRequest as exc:
            raise from_invalid_request(exc, chat.renames) from exc

    async def _submit(
        self, client: AsyncHermesClient, submission: Submission, chat: ChatRequest,
        caller: Caller,
    ) -> AsyncJobHandle:  # fmt: skip
        """Submit the job, once its tenant's jobs-waiting quota admits it (429 otherwise)."""
        record_key = client.keys.job(submission.job_id)
        await self.tenants.admit_job(caller, record_key)
        tenant = caller.tenant if caller.scoped else None
        try:
            handle = await client.submit(submission.body, tenant=tenant)
        except Exception as exc:
            self._spawn(self._release(caller, record_key))
            if isinstance(exc, InvalidRequest):
                raise from_invalid_request(exc, chat.renames) from exc
            raise
        if not handle.created:
            await self._check_same_body(client, submission)
        return handle

    async def _release(self, caller: Caller, record_key: str) -> None:
        with contextlib.suppress(RedisError):
            await self.tenants.release_job(caller, record_key)

    async def _check_same_body(self, client: AsyncHermesClient, submission: Submission) -> None:
        """A known id joins its job only with the same body: the same id with another body
        is a client's mistake (a reused Idempotency-Key), answered 409."""
        key = client.keys.job(submission.job_id)
        digest, stored = await client.redis.hmget(key, ["digest", "body"])
        if digest is not None:
            same = as_text(digest) == body_digest(submission.body_json)
        elif stored is not None:
            same = json.loads(stored) == submission.body
        else:
            same = True  # the record expired meanwhile: nothing to compare with
        if not same:
            raise GatewayError(
                409,
                f"job {submission.job_id} was made by a request with another body: an "
                "Idempotency-Key (or id) names one request; use a new one for another",
                code="idempotency_key_reused",
                headers=NO_RETRY,
            )

    async def _attach(self, client: AsyncHermesClient, job_id: str) -> Attachment:
        attachment = Attachment(client, attach_key(client, job_id), uuid.uuid4().hex)
        async with client.redis.pipeline(transaction=True) as pipe:
            pipe.hset(attachment.key, attachment.token, repr(time.time()))
            pipe.expire(attachment.key, ATTACH_TTL_S)
            await pipe.execute()
        return attachment

    def _detach(self, attachment: Attachment | None) -> None:
        if attachment is not None:
            self._spawn(self._hdel(attachment))

    async def _hdel(self, attachment: Attachment) -> None:
        with contextlib.suppress(RedisError):
            await attachment.client.redis.hdel(attachment.key, attachment.token)

    def _client_gone(
        self, client: AsyncHermesClient, job_id: str, chat: ChatRequest, target: Target,
        attachment: Attachment | None,
    ) -> None:  # fmt: skip
        """The client went away before its job's end: cancel the job, unless it asked for
        background; a job whose id the client chose is cancelled only if no request (a retry
        of the same) waits on it ``HERMES_GATEWAY_DISCONNECT_GRACE_S`` later."""
        if chat.background:
            return
        if attachment is None:
            self._spawn(self._cancel(client, job_id, target))
        else:
            self._spawn(self._cancel_unless_back(attachment, job_id, target), delayed=True)

    async def _cancel_unless_back(
        self, attachment: Attachment, job_id: str, target: Target
    ) -> None:
        await self._hdel(attachment)
        await asyncio.sleep(self.settings.gateway_disconnect_grace_s)
        try:
            if await attachment.client.redis.exists(attachment.key):
                return  # another request waits on the job
        except RedisError:
            return
        await self._cancel(attachment.client, job_id, target)

    async def _cancel(
        self, client: AsyncHermesClient, job_id: str, target: Target | None = None
    ) -> None:
        """Cancel a job (its client left: ``target`` names it for the metrics; or its
        deadline passed); one that already ended is left as it is."""
        try:
            outcome = await client.job(job_id).cancel()
        except (JobAlreadyEnded, JobNotFound):
            return
        except RedisError as exc:
            log.warning("cancel failed", job_id=job_id, error=str(exc))
            return
        if target is not None:
            self.metrics.disconnect_cancels.labels(target.label).inc()
        log.info("cancelled", job_id=job_id, outcome=outcome, client_left=target is not None)

    # --- jobs -------------------------------------------------------------------------------

    async def _locate(
        self, job_id: str, caller: Caller
    ) -> tuple[AsyncHermesClient, dict[Any, Any], str]:
        """The client of the deployment holding job ``job_id``, its record and its id (for a
        tenant: ``job_id`` itself, or the ``{tenant}:{id}`` of an id it chose); else 404,
        also for another tenant's job (never 403: whether it exists is not said)."""
        missing = not_found(f"no job {job_id!r} (never submitted, or expired)", "job_not_found")
        ids = caller.candidates(job_id)
        if not ids or not usable_job_id(job_id):
            raise missing
        by_prefix = {c.keys.prefix: c for c in self.clients.values()}
        found = [(client, one) for client in by_prefix.values() for one in ids]
        async with self.redis.pipeline(transaction=False) as pipe:
            for client, one in found:
                pipe.hgetall(client.keys.job(one))
            records = await pipe.execute()
        for (client, one), record in zip(found, records, strict=True):
            if record and caller.sees(record):
                return client, record, one
        raise missing

    async def get_job(self, job_id: str, request: Request) -> Response:
        caller = await self._caller(request)
        _, record, job_id = await self._locate(job_id, caller)
        return JSONResponse(job_object(job_id, record))

    async def cancel_job(self, job_id: str, request: Request) -> Response:
        caller = await self._caller(request)
        client, _, job_id = await self._locate(job_id, caller)
        outcome = await client.job(job_id).cancel()  # 409 once ended (hermes_error)
        log.info("cancelled", job_id=job_id, outcome=outcome, tenant=caller.tenant)
        record = await client.redis.hgetall(client.keys.job(job_id))
        return JSONResponse({**job_object(job_id, record), "cancel": outcome})

    async def job_events(self, job_id: str, request: Request) -> Response:
        caller = await self._caller(request)
        client, record, job_id = await self._locate(job_id, caller)
        after = request.headers.get("last-event-id") or request.query_params.get("after") or "0-0"
        if not ENTRY_ID.match(after):
            raise invalid(
                f"Last-Event-ID {after[:40]!r} is not a stream entry id (such as 1764528000000-0)",
                param="Last-Event-ID",
            )
        status = JobStatus(as_text(record.get(b"status", b"queued")))
        body = self._event_stream(
            client, client.job(job_id), after, status.is_terminal, caller.tenant
        )
        return sse.EventStreamResponse(body, headers={**sse.HEADERS, "X-Hermes-Job-Id": job_id})

    async def _event_stream(
        self, client: AsyncHermesClient, handle: AsyncJobHandle, after: str, ended: bool,
        tenant: str,
    ) -> AsyncIterator[bytes]:  # fmt: skip
        gauge = self.metrics.open_streams.labels(EVENTS_ROUTE, "-", tenant)
        gauge.inc()
        try:
            if ended:  # all of it is written: read it in one go, unless its end is not in yet
                reply = await client.redis.xread({client.keys.events(handle.id): after})
                events = events_from_xread(reply)
                for event in events:
                    yield sse.job_event(event)
                if events and events[-1].terminal:
                    return
                after = events[-1].id if events else after
            stream = sse.with_keepalive(handle.stream(after), self.settings.gateway_keepalive_s)
            async with contextlib.aclosing(stream):
                async for item in stream:
                    yield sse.KEEPALIVE if item is None else sse.job_event(item)
        except HermesError as exc:
            yield sse.data(hermes_error(exc, self.settings.gateway_retry_after_s).body())
        except RedisError as exc:
            yield sse.data(redis_error(exc).body())
        finally:
            gauge.dec()

    # --- models, health, metrics ------------------------------------------------------------

    async def list_models(self, request: Request) -> Response:
        await self._caller(request)
        return JSONResponse({"object": "list", "data": await self.router.models()})

    async def get_model(self, model: str, request: Request) -> Response:
        await self._caller(request)
        for found in await self.router.models():
            if found["id"] == model:
                return JSONResponse(found)
        raise not_found(f"The model {model!r} is not served now", "model_not_found")

    async def healthz(self) -> Response:
        try:
            async with asyncio.timeout(HEALTH_TIMEOUT_S):
                await self.redis.ping()
        except (RedisError, OSError, TimeoutError) as exc:
            error = redis_error(exc)
            return JSONResponse(error.body(), error.status, headers=error.headers)
        return JSONResponse({"status": "ok", "redis": "ok"})

    async def prometheus(self) -> Response:
        return Response(generate_latest(self.metrics.registry), media_type=CONTENT_TYPE_LATEST)


# --- the app ------------------------------------------------------------------------------


def _error_response(error: GatewayError) -> JSONResponse:
    return JSONResponse(error.body(), error.status, headers=error.headers)


def create_app(settings: Settings | None = None) -> FastAPI:
    """The gateway's ASGI app on ``settings`` (default: the ``HERMES_*`` environment)."""
    gateway = Gateway(settings if settings is not None else Settings())

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        await gateway.start()
        try:
            yield
        finally:
            await gateway.stop()

    app = FastAPI(
        title="hermes-worker gateway",
        lifespan=lifespan,
        docs_url=None,
        redoc_url=None,
        openapi_url=None,
    )
    app.state.gateway = gateway
    retry_after = gateway.settings.gateway_retry_after_s

    async def on_gateway_error(_: Request, exc: Exception) -> Response:
        assert isinstance(exc, GatewayError)
        return _error_response(exc)

    async def on_hermes_error(_: Request, exc: Exception) -> Response:
        assert isinstance(exc, HermesError)
        return _error_response(hermes_error(exc, retry_after))

    async def on_redis_error(_: Request, exc: Exception) -> Response:
        log.warning("redis error", error=f"{type(exc).__name__}: {exc}")
        return _error_response(redis_error(exc))

    async def on_http_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, StarletteHTTPException)
        if exc.status_code == 404:
            message = f"no route {request.method} {request.url.path}"
            return _error_response(GatewayError(404, message, code="unknown_route"))
        if exc.status_code == 405:
            message = f"{request.method} is not allowed on {request.url.path}"
            return _error_response(GatewayError(405, message, code="method_not_allowed"))
        return _error_response(GatewayError(exc.status_code, str(exc.detail)))

    async def on_client_gone(_: Request, __: Exception) -> Response:
        return Response(status_code=CLIENT_GONE)

    async def on_anything(_: Request, exc: Exception) -> Response:
        log.exception("internal error", error=f"{type(exc).__name__}: {exc}")
        return _error_response(
            GatewayError(500, "internal error in the gateway", type="server_error")
        )

    app.add_exception_handler(GatewayError, on_gateway_error)
    app.add_exception_handler(HermesError, on_hermes_error)
    app.add_exception_handler(RedisError, on_redis_error)
    app.add_exception_handler(StarletteHTTPException, on_http_error)
    app.add_exception_handler(ClientDisconnect, on_client_gone)
    app.add_exception_handler(Exception, on_anything)

    app.add_api_route(CHAT_ROUTE, gateway.chat_completions, methods=["POST"])
    app.add_api_route("/v1/jobs/{job_id}", gateway.get_job, methods=["GET"])
    app.add_api_route("/v1/jobs/{job_id}/cancel", gateway.cancel_job, methods=["POST"])
    app.add_api_route(EVENTS_ROUTE, gateway.job_events, methods=["GET"])
    app.add_api_route("/v1/models", gateway.list_models, methods=["GET"])
    app.add_api_route("/v1/models/{model:path}", gateway.get_model, methods=["GET"])
    gateway.batch_endpoints.register(app)
    app.add_api_route("/healthz", gateway.healthz, methods=["GET"])
    app.add_api_route("/metrics", gateway.prometheus, methods=["GET"])
    app.add_middleware(MetricsMiddleware, metrics=gateway.metrics)
    return app


def serve(settings: Settings, log_level: str = "info") -> None:
    """Run the gateway until SIGTERM / Ctrl-C: uvicorn stops taking connections, lets open
    requests and streams finish for ``HERMES_GATEWAY_SHUTDOWN_GRACE_S``, then closes what is
    left (a client cut off then is one that left: see docs/gateway.md)."""
    configure_logging(log_level.upper())
    app = create_app(settings)
    config = uvicorn.Config(
        app,
        host=settings.gateway_host,
        port=settings.gateway_port,
        log_config=None,  # our logging (configure_logging) renders uvicorn's lines too
        log_level=log_level,
        access_log=False,  # hermes_gateway_requests_total counts every request
        timeout_graceful_shutdown=math.ceil(settings.gateway_shutdown_grace_s),
        server_header=False,
        lifespan="on",
    )
    uvicorn.Server(config).run()
