"""One job attempt on the runtime loop: claim, generate, parse, stream, finish.

Everything here runs on the runtime's event loop. Redis is awaited only to claim the job's
lease (one script) and for the final write; deltas go through the :class:`StreamWriter`,
which never blocks the loop that drains the engine.

An attempt ends in exactly one terminal state, written once: ``done`` (succeeded),
``error`` (failed, or expired before it started), or ``cancelled``. It can also be stopped
without a terminal write: when its lease was lost (another worker owns the job now) or when
the worker shuts down (the job goes back to the queue for another worker).
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

import structlog
from redis.asyncio import Redis
from redis.exceptions import RedisError

from hermes_worker.contract.clock import RedisClock
from hermes_worker.contract.jobs import (
    ChatJob,
    Choice,
    ChoiceLogprobs,
    CompletionTokensDetails,
    ErrorInfo,
    FinishReason,
    JobInfo,
    JobResult,
    JobStatus,
    PromptTokensDetails,
    ResponseMessage,
    ResponseToolCall,
    Usage,
)
from hermes_worker.contract.store import Keys, job_info_from_record
from hermes_worker.errors import (
    EngineError,
    HermesError,
    InternalError,
    JobCancelled,
    JobExpired,
    JobTimeout,
)
from hermes_worker.inference.engine_api import Delta, EngineLike
from hermes_worker.inference.parsing import ParserEvent
from hermes_worker.inference.sampling import GenerationPlan
from hermes_worker.settings import Settings
from hermes_worker.worker.choices import ChoiceRun
from hermes_worker.worker.leases import Claimed, Ended, Leased, Leases
from hermes_worker.worker.stream import JobStream, StreamWriter

log = structlog.stdlib.get_logger(__name__)

# A claim whose reply did not come is sent again this many times in all, this far apart.
CLAIM_TRIES = 3
CLAIM_RETRY_S = 1.0

StopReason = Literal["cancel", "timeout", "lease_lost", "shutdown"]
FINISH_REASONS: dict[str, FinishReason] = {"stop": "stop", "length": "length", "abort": "cancelled"}
# The one place where an error becomes a job status and a terminal event.
STATUS_FOR_ERROR = {"cancelled": JobStatus.CANCELLED, "expired": JobStatus.EXPIRED}
EVENT_FOR_STATUS = {JobStatus.SUCCEEDED: "done", JobStatus.CANCELLED: "cancelled"}


@dataclass(frozen=True)
class PreparedJob:
    """A validated, rendered job, ready for the engine."""

    job_id: str
    job: ChatJob
    token_ids: list[int]
    plan: GenerationPlan


@dataclass
class Control:
    """Handle on a running generation, so cancel / deadline / shutdown can stop it."""

    task: asyncio.Task[None] | None = None
    reason: StopReason | None = None

    def stop(self, reason: StopReason) -> None:
        if self.reason is None:
            self.reason = reason
            if self.task is not None:
                self.task.cancel()  # cancelling the iteration of generate() aborts in vLLM


@dataclass
class Attempt:
    """What one attempt learned when it claimed the job and gathers while it runs."""

    job_id: str
    number: int
    token: str
    queued_at: float
    started_at: float
    stream: JobStream
    cancel_requested: bool = False
    tenant: str | None = None  # the gateway tenant that submitted the job
    output_sent: bool = False  # an event with generated output has been emitted
    prompt_tokens: int = 0
    first_token_at: float | None = None
    read_at: float | None = None  # monotonic time of its last read, from its first token on
    completion_tokens: int = 0
    reasoning_tokens: int = 0
    cached_tokens: int = 0


@dataclass(frozen=True)
class OutputPace:
    """How often a generating job reads the engine's output while the worker is busy.

    Every read costs Python on the loop (wake the task, parse, queue text), on the CPU the
    engine needs too; vLLM merges the steps a job has not read into one delta, so reading
    once per ``interval_s`` gets the same tokens in fewer, larger deltas. Reads fall on a
    common beat, so the jobs' text reaches the stream writer together and goes out in the
    same pipelines. With many jobs the beat stretches to a whole multiple of
    ``interval_s`` (at most ``max_reads_per_s`` reads a second in all), alike for every
    job. A paced job also asks vLLM for its output once per about a beat's worth of tokens
    (``stream_interval``); its first token and its last still come at once. Why, and what
    each step measured: docs/architecture.md, "Output pacing".
    """

    interval_s: float = 0.0
    min_jobs: int = 1
    max_reads_per_s: float = 0.0  # 0: no bound
    max_stream_interval: int = 1  # 1: every step handed over

    @classmethod
    def from_settings(cls, settings: Settings) -> OutputPace:
        """The pace of a worker run with ``settings`` (its ``output_pace_*`` fields)."""
        return cls(
            settings.output_pace_ms / 1000,
            settings.output_pace_min_jobs,
            settings.output_pace_max_reads_per_s,
            settings.output_pace_max_stream_interval,
        )

    def period_s(self, running: int) -> float:
        """The beat for ``running`` jobs: ``interval_s``, or the least whole multiple of it
        on which they read at most ``max_reads_per_s`` times a second."""
        if not self.max_reads_per_s:
            return self.interval_s
        beats = math.ceil(running / (self.max_reads_per_s * self.interval_s) - 1e-9)
        return self.interval_s * max(1, beats)

    def paced(self, running: int) -> bool:
        """Whether jobs read on the beat while ``running`` jobs generate."""
        return bool(self.interval_s) and running >= self.min_jobs

    def stream_interval(self, running: int, job_tokens_per_s: float) -> int:
        """The tokens vLLM gathers before it hands a job its output, for a job that starts
        with ``running`` jobs generating (itself included), each getting about
        ``job_tokens_per_s``: a beat's worth, rounded down, at most ``max_stream_interval``;
        1 (every step) when the jobs are not paced."""
        if not self.paced(running) or self.max_stream_interval <= 1:
            return 1
        per_beat = job_tokens_per_s * self.period_s(running)
        return max(1, min(self.max_stream_interval, int(per_beat)))

    def pause_s(self, running: int, attempt: Attempt, max_tokens: int, now: float) -> float:
        """How long the job waits before its next read (0: at once)."""
        if not self.paced(running) or attempt.first_token_at is None:
            return 0.0
        elapsed = now - attempt.first_token_at
        if elapsed <= 0:
            return 0.0
        period = self.period_s(running)
        # Close to max_tokens, every step is read: the job's end is not waited for.
        expected = attempt.completion_tokens / elapsed * period
        if max_tokens - attempt.completion_tokens <= 2 * expected + 1:
            return 0.0
        return period - now % period


class JobRate:
    """How fast one generating job gets tokens: the tokens of the reads of the last window
    or two, over the time since each job's read before (every job's reads pooled). A
    job's first read, which waited for its prefill, does not count; idle time does not
    either, so a burst after a quiet spell starts from the rate the last jobs had."""

    def __init__(self, window_s: float = 1.0) -> None:
        self.window_s = window_s
        self._start: float | None = None  # when the current window began
        self._current = (0, 0.0)  # tokens, job-seconds
        self._previous = (0, 0.0)

    def add(self, tokens: int, seconds: float, now: float) -> None:
        if self._start is None:
            self._start = now
        elif now - self._start >= self.window_s:
            self._previous, self._current, self._start = self._current, (0, 0.0), now
        self._current = (self._current[0] + tokens, self._current[1] + seconds)

    def per_s(self) -> float:
        """Tokens per second of a job (0 until a read after a first one)."""
        seconds = self._previous[1] + self._current[1]
        return (self._previous[0] + self._current[0]) / seconds if seconds > 0 else 0.0


class JobContext:
    """What job attempts share within one worker process."""

    def __init__(
        self,
        engine: EngineLike,
        redis: Redis,
        writer: StreamWriter,
        leases: Leases,
        keys: Keys,
        *,
        worker: str,
        model: str,
        max_generation_s: float,
        fault_injection: bool = False,
        pace: OutputPace = OutputPace(),
    ) -> None:
        self.engine, self.redis, self.writer, self.leases = engine, redis, writer, leases
        self.keys, self.worker, self.model = keys, worker, model
        self.max_generation_s = max_generation_s
        self.fault_injection = fault_injection
        self.pace = pace
        self.output_reads = 0  # deltas read from the engine (metrics: tokens per read)
        self.job_rate = JobRate()  # tokens per second of a job (a paced job's stream interval)
        self.stream_interval = 1  # the last one a job started with (metrics)
        self.controls: dict[str, Control] = {}  # running generations by job id
        self.held: dict[str, str] = {}  # leases held by this worker: job id -> token
        # When each held lease was last known good (monotonic time the claim or the renewal
        # that proved it was sent): past its TTL less a beat, the job stops (heartbeat.py).
        self.proven: dict[str, float] = {}
        # Held leases whose attempt's end is being written: the write drops the lease
        # (scripts.WRITE), so a renewal that finds it gone then has not lost it.
        self.ending: set[str] = set()
        # Redis's now without a round trip: the times this worker writes and the deadlines it
        # checks are on Redis's clock (contract/clock.py), measured at each claim and beat.
        self.clock = RedisClock()
        writer.on_fenced = self.lease_lost
        writer.clock = self.clock  # its flush grid on Redis's clock
        # Called with every result this worker writes (metrics, vitals); must not raise or block.
        self.observers: list[Callable[[JobResult], None]] = []
        self.shutting_down = False

    def lease_lost(self, job_id: str) -> None:
        """The job's lease is gone (or cannot be proven): stop its generation; it goes back
        to the queue without a terminal write (another worker owns it, or will)."""
        control = self.controls.get(job_id)
        if control is not None:
            control.stop("lease_lost")

    def drop_lease(self, job_id: str) -> None:
        """The attempt is over: its lease is no longer renewed."""
        self.held.pop(job_id, None)
        self.proven.pop(job_id, None)
        self.ending.discard(job_id)

    async def claim(self, job_id: str) -> Attempt | JobStatus | None:
        """Claim the job: an Attempt, the status it already ended with, or None when this
        worker is shutting down while another one holds the job."""
        token = f"{self.worker}:{uuid.uuid4().hex[:12]}"
        while not self.shutting_down:
            sent = time.monotonic()
            outcome = await self._claim_once(job_id, token, self.clock.now())
            if isinstance(outcome, Ended):
                return JobStatus(outcome.status)
            if isinstance(outcome, Claimed):
                self.held[job_id] = token
                self.proven[job_id] = sent
                return self._attempt(job_id, token, outcome)
            # A live lease: the job runs elsewhere. Wait for it to end or for its worker to die.
            await asyncio.sleep(min(max(outcome.ttl_ms, 50) / 1000, self.leases.ttl_ms / 3000))
        return None

    async def _claim_once(self, job_id: str, token: str, now: float) -> Claimed | Ended | Leased:
        """One claim, sent again (same token, so the same claim) when Redis fails to answer:
        a timed-out claim may have been made, and a new token would then wait out this
        worker's own lease. Still failing after CLAIM_TRIES: the error goes up (a retry)."""
        tries = 1
        while True:
            try:
                sent = time.monotonic()
                outcome = await self.leases.claim(job_id, token, now, self.worker)
                if isinstance(outcome, Claimed):  # the claim's reply carries Redis's now
                    self.clock.observe(outcome.now, sent, time.monotonic())
                return outcome
            except RedisError as exc:
                if tries == CLAIM_TRIES:
                    raise
                tries += 1
                log.warning("job %s: claim failed (%s); sending it again", job_id, exc)
                await asyncio.sleep(CLAIM_RETRY_S)

    def _attempt(self, job_id: str, token: str, claimed: Claimed) -> Attempt:
        stream = JobStream(
            job_id, next_seq=claimed.last_seq + 1, token=token, notices=claimed.notices
        )
        started_at = claimed.started_at
        attempt = Attempt(job_id, claimed.attempt, token, claimed.queued_at, started_at, stream)
        attempt.cancel_requested = claimed.cancel_requested
        attempt.tenant = claimed.tenant
        if attempt.number > 1:  # an earlier attempt died: readers drop its partial output
            self.writer.emit(stream, "restarted", {"attempt": attempt.number}, urgent=True)
        return attempt

    def job_info(self, attempt: Attempt, status: JobStatus, problems: tuple[str, ...]) -> JobInfo:
        return JobInfo(
            id=attempt.job_id,
            status=status,
            attempts=attempt.number,
            worker=self.worker,
            queued_at=attempt.queued_at,
            started_at=attempt.started_at,
            first_token_at=attempt.first_token_at,
            finished_at=self.clock.now(),
            problems=problems,
        )


async def run_attempt(ctx: JobContext, prepared: PreparedJob) -> JobStatus | None:
    """Run one attempt to its end. Returns the terminal status, or None when the job must be
    handed back to the queue (this worker is shutting down)."""
    claim = await ctx.claim(prepared.job_id)
    if not isinstance(claim, Attempt):
        return claim
    attempt = claim
    attempt.prompt_tokens = len(prepared.token_ids)
    requeue = ended = False
    # Every log line of this attempt names it (this task has a context of its own).
    structlog.contextvars.bind_contextvars(job_id=attempt.job_id, attempt=attempt.number)
    if attempt.tenant is not None:  # a gateway tenant's job: its lines name the tenant
        structlog.contextvars.bind_contextvars(tenant=attempt.tenant)
    try:
        status = await _run_claimed(ctx, attempt, prepared)
        requeue, ended = status is None, status is not None
        return status
    finally:
        ctx.drop_lease(attempt.job_id)
        if not ended:  # no terminal write flushed its events: they go out before the lease
            await ctx.writer.settle(attempt.stream)
            # (an end that was written dropped the lease with it: scripts.WRITE)
            await ctx.leases.release(attempt.job_id, attempt.token, requeue=requeue)


async def reject(ctx: JobContext, job_id: str, error: HermesError) -> JobStatus | None:
    """End a job that cannot run (bad body, prompt too long) as failed, under its lease."""
    claim = await ctx.claim(job_id)
    if not isinstance(claim, Attempt):
        return claim
    status: JobStatus | None = None
    try:
        status = await finish(ctx, claim, None, error)
        return status
    finally:
        ctx.drop_lease(job_id)
        if status is None:  # its end was not written (which drops the lease: scripts.WRITE)
            await ctx.leases.release(job_id, claim.token)


async def _run_claimed(
    ctx: JobContext, attempt: Attempt, prepared: PreparedJob
) -> JobStatus | None:
    if ctx.fault_injection:
        _inject_fault(prepared.job, attempt.number)
    if attempt.cancel_requested:
        return await finish(ctx, attempt, None, JobCancelled("cancelled before it started"))
    deadline = prepared.job.effective_deadline(attempt.queued_at)
    if deadline is not None and deadline <= attempt.started_at:
        return await finish(ctx, attempt, None, JobExpired("the deadline passed while queued"))
    ctx.writer.emit(
        attempt.stream,
        "started",
        {"attempt": attempt.number, "worker": ctx.worker, "prompt_tokens": attempt.prompt_tokens},
        soon=True,  # with the next regular flush, or at once with the first output
    )
    runs = ChoiceRun.all_of(prepared.job, prepared.plan)
    # The deadline is on Redis's clock (queued_at + timeout_s, or the body's deadline).
    left = None if deadline is None else deadline - ctx.clock.now()
    by_deadline = left is not None and left < ctx.max_generation_s
    limit = left if by_deadline and left is not None else ctx.max_generation_s
    try:
        reason = await _generate_under_control(ctx, attempt, prepared, runs, limit)
    except HermesError as exc:
        if exc.retryable:
            raise
        return await finish(ctx, attempt, runs, exc)
    except (RedisError, asyncio.CancelledError):
        raise
    except Exception as exc:  # a bug must still end the job, and the worker keeps serving
        log.exception("job %s: unexpected failure", attempt.job_id)
        return await finish(ctx, attempt, runs, InternalError(f"{type(exc).__name__}: {exc}"))
    if reason is None:
        return await finish(ctx, attempt, runs, None)
    if reason == "cancel":
        return await finish(ctx, attempt, runs, JobCancelled("cancelled while running"))
    if reason == "timeout":
        message = (
            "the job's deadline was reached during generation"
            if by_deadline
            else f"generation reached the worker's limit of {ctx.max_generation_s:g} s"
        )
        return await finish(ctx, attempt, runs, JobTimeout(message))
    log.warning("job %s stopped (%s): handing it back", attempt.job_id, reason)
    if reason == "lease_lost":  # another attempt writes this stream now: ours would mix in
        ctx.writer.discard(attempt.stream)
    return None


def _inject_fault(job: ChatJob, attempt: int) -> None:
    """Tests only (``HERMES_FAULT_INJECTION``): fail the first N attempts as transient."""
    spec = (job.metadata or {}).get("hermes_fault", "")
    kind, _, count = spec.partition(":")
    if kind == "transient" and attempt <= int(count or 1_000_000):
        raise EngineError(f"injected transient failure (attempt {attempt})")


async def _generate_under_control(
    ctx: JobContext, attempt: Attempt, prepared: PreparedJob, runs: list[ChoiceRun], limit: float
) -> StopReason | None:
    """Generate with a handle for cancel / deadline / shutdown; returns why it stopped early."""
    control = Control()
    ctx.controls[attempt.job_id] = control
    timer = asyncio.get_running_loop().call_later(max(limit, 0), control.stop, "timeout")
    control.task = asyncio.create_task(_generate(ctx, attempt, prepared, runs))
    try:
        await control.task
    except asyncio.CancelledError:
        if control.reason is None:  # this attempt itself is being cancelled: pass it on
            control.task.cancel()
            raise
    finally:
        timer.cancel()
        ctx.controls.pop(attempt.job_id, None)
    return control.reason


async def _generate(
    ctx: JobContext, attempt: Attempt, prepared: PreparedJob, runs: list[ChoiceRun]
) -> None:
    for run in runs:
        _send(ctx, attempt, run, run.parser.feed(prepared.plan.forced_prefix))
    request_id = f"{prepared.job_id}:{attempt.number}"
    # The pace compares the tokens so far with the most the job can get: every choice's.
    pace, max_tokens = ctx.pace, prepared.plan.max_tokens * len(runs)
    running = len(ctx.controls)
    interval = pace.stream_interval(running, ctx.job_rate.per_s())
    ctx.stream_interval = interval
    deltas = ctx.engine.generate(
        request_id,
        prepared.token_ids,
        prepared.plan,
        prepared.job.priority,
        stream_interval=interval,
        metadata=prepared.job.metadata,
    )
    async with contextlib.aclosing(deltas):  # leaving early aborts the engine's request
        async for delta in deltas:
            run = runs[delta.index]
            _account(ctx, attempt, run, delta)
            if delta.finished:
                run.finish_reason = delta.finish_reason
                attempt.cached_tokens = delta.num_cached_tokens
            elif all(r.done for r in runs):  # the last allowed calls closed: stop the engine
                break
            elif pause := pace.pause_s(len(ctx.controls), attempt, max_tokens, ctx.clock.now()):
                await asyncio.sleep(pause)  # the engine goes on; its steps meanwhile merge
    for run in runs:
        _send(ctx, attempt, run, run.parser.feed(prepared.plan.forced_suffix))


def _account(ctx: JobContext, attempt: Attempt, run: ChoiceRun, delta: Delta) -> None:
    ctx.output_reads += 1
    now = time.monotonic()
    if attempt.read_at is not None:  # from its first token on: how fast a job generates
        ctx.job_rate.add(delta.num_tokens, now - attempt.read_at, now)
        attempt.read_at = now
    elif delta.num_tokens:
        attempt.read_at = now
    if attempt.first_token_at is None and delta.num_tokens:
        attempt.first_token_at = ctx.clock.now()  # into the record with the result (one write)
    parser = run.parser
    was_reasoning, was_content = parser.in_reasoning, parser.in_content
    events = parser.feed(delta.text)
    if run.logprobs is not None and delta.logprobs:
        kinds = {event.type for event in events}
        content_only = was_content and parser.in_content and kinds <= {"content"}
        run.logprobs.read(delta.logprobs, content_only, "content" in kinds)
    # A delta that touches a think block counts as reasoning: exact to the delta, which is
    # one token when the job is not paced, and about a beat's worth when it is.
    if was_reasoning or parser.in_reasoning:
        attempt.reasoning_tokens += delta.num_tokens
    attempt.completion_tokens += delta.num_tokens
    ctx.writer.generated(attempt.stream, delta.num_tokens)
    _send(ctx, attempt, run, events)


def _send(ctx: JobContext, attempt: Attempt, run: ChoiceRun, events: list[ParserEvent]) -> None:
    """Write a choice's output events (the call ids and logprobs are noted for the result
    whether they are written or not: a job with ``stream`` false writes none)."""
    for event in events:
        # The first output after the first token goes at once (time to first token); text
        # before it (a forced prefix) goes with it.
        urgent = attempt.first_token_at is not None and not attempt.output_sent
        attempt.output_sent = attempt.output_sent or urgent
        if event.tool_call is not None:
            call_id = f"call_{uuid.uuid4().hex[:24]}"
            data = _tool_call(call_id, event.tool_call.name, event.tool_call.arguments)
            data["index"] = len(run.call_ids)
            run.call_ids.append(call_id)
            if run.streamed:
                ctx.writer.emit(attempt.stream, "tool_call", run.event(data), urgent=True)
        else:
            text: dict[str, Any] = {"text": event.text}
            if event.type == "content" and run.logprobs is not None:
                text["logprobs"] = run.logprobs.take()
            if run.streamed:
                ctx.writer.emit(attempt.stream, event.type, run.event(text), urgent=urgent)


def _tool_call(call_id: str, name: str, arguments: str) -> dict[str, Any]:
    return {"id": call_id, "type": "function", "function": {"name": name, "arguments": arguments}}


def _usage(attempt: Attempt) -> Usage:
    return Usage(
        prompt_tokens=attempt.prompt_tokens,
        completion_tokens=attempt.completion_tokens,
        total_tokens=attempt.prompt_tokens + attempt.completion_tokens,
        completion_tokens_details=CompletionTokensDetails(
            reasoning_tokens=attempt.reasoning_tokens
        ),
        prompt_tokens_details=PromptTokensDetails(cached_tokens=attempt.cached_tokens),
    )


def _choice(
    ctx: JobContext, attempt: Attempt, run: ChoiceRun, error: HermesError | None
) -> tuple[Choice, tuple[str, ...]]:
    """The output so far as a choice (all of it on success, the partial output otherwise)."""
    parser = run.parser
    if not parser.finished:
        _send(ctx, attempt, run, parser.finish())  # release held-back text: stream == result
    parsed = parser.result()
    calls = [
        ResponseToolCall.model_validate(_tool_call(call_id, call.name, call.arguments))
        for call_id, call in zip(run.call_ids, parsed.tool_calls, strict=True)
    ]
    finish: FinishReason
    if error is not None:
        finish = error.type if error.type in ("cancelled", "timeout") else "error"  # type: ignore[assignment]
    else:
        finish = "tool_calls" if calls else FINISH_REASONS.get(run.finish_reason or "", "stop")
    message = ResponseMessage(
        content=parsed.content, reasoning_content=parsed.reasoning, tool_calls=calls or None
    )
    logprobs = None
    if run.logprobs is not None:
        logprobs = ChoiceLogprobs.model_validate({"content": run.logprobs.content})
    choice = Choice(index=run.index, message=message, finish_reason=finish, logprobs=logprobs)
    problems = parsed.problems
    if run.tagged:
        problems = tuple(f"choice {run.index}: {problem}" for problem in problems)
    return choice, problems


async def finish(
    ctx: JobContext, attempt: Attempt, runs: list[ChoiceRun] | None, error: HermesError | None
) -> JobStatus | None:
    """Write the attempt's one terminal state; partial output is kept whatever the ending.
    None when the lease was lost first: the end was not written (another worker owns the
    job now, or will), so the job goes back to the queue."""
    status = (
        JobStatus.SUCCEEDED if error is None else STATUS_FOR_ERROR.get(error.type, JobStatus.FAILED)
    )
    choices: tuple[Choice, ...] = ()
    problems: tuple[str, ...] = ()
    usage = None
    if runs is not None:
        built = [_choice(ctx, attempt, run, error) for run in runs]
        choices = tuple(choice for choice, _ in built)
        problems = tuple(problem for _, found in built for problem in found)
        usage = _usage(attempt)
        ctx.writer.emit(attempt.stream, "usage", usage.model_dump(mode="json"))
    result = JobResult(
        id=attempt.job_id,
        created=int(attempt.started_at),
        model=ctx.model,
        choices=choices,
        usage=usage,
        job=ctx.job_info(attempt, status, problems),
        error=ErrorInfo.from_error(error) if error is not None else None,
    )
    event = EVENT_FOR_STATUS.get(status, "error")
    if status is JobStatus.SUCCEEDED:
        data: dict[str, Any] = {"finish_reason": choices[0].finish_reason}
        if len(choices) > 1:
            data["finish_reasons"] = [choice.finish_reason for choice in choices]
    else:
        data = error.to_dict() if error is not None else {}
    fields: dict[str, Any] = {
        "status": status.value,
        "first_token_at": attempt.first_token_at or "",
        "finished_at": result.job.finished_at,
        "result": result.model_dump_json(),
        "problems": list(problems),
    }
    ctx.ending.add(attempt.job_id)  # the end drops the lease: see JobContext.ending
    if not await ctx.writer.close(attempt.stream, fields, event, data):
        log.warning(
            "job %s: lease lost before its end was written; handing it back", attempt.job_id
        )
        return None
    _observe(ctx, result)
    info = result.job
    log.info(
        "job ended",
        status=status.value,
        error=error.type if error is not None else None,
        prompt_tokens=usage.prompt_tokens if usage else None,
        completion_tokens=usage.completion_tokens if usage else None,
        queue_wait_s=info.queue_wait_s,
        time_to_first_token_s=info.time_to_first_token_s,
        generation_s=info.generation_s,
    )
    return status


def _observe(ctx: JobContext, result: JobResult) -> None:
    for observer in ctx.observers:
        try:
            observer(result)
        except Exception:  # an observer's bug must not fail the job it watches
            log.exception("result observer %r failed", observer)


async def dead_letter(ctx: JobContext, job_id: str, error: HermesError) -> str:
    """Fail a job that ran out of retries (or is poison) and list it in the dead letters,
    in one script that does so only while no attempt holds its lease and it has not ended.

    It is not claimed again (that would count one more attempt): the record says how many
    attempts it had, and the failure is written after its last event. Returns ``dead``;
    ``leased`` when an attempt holds the job; or, when it has ended, its status (nothing is
    written then)."""
    record = await ctx.redis.hgetall(ctx.keys.job(job_id))
    now = ctx.clock.now()
    info = job_info_from_record(job_id, record).model_copy(
        update={"status": JobStatus.FAILED, "finished_at": now}
    )
    result = JobResult(
        id=job_id,
        created=int(info.started_at or now),
        model=ctx.model,
        job=info,
        error=ErrorInfo.from_error(error),
    )
    outcome = await ctx.leases.dead_letter(
        job_id, now, ctx.writer.result_ttl_s, result.model_dump_json(), error.to_dict()
    )
    if outcome != "dead":
        log.warning("job %s: not dead-lettered (%s)", job_id, outcome)
        return outcome
    _observe(ctx, result)
    return outcome
