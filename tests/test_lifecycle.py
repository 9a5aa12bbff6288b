"""A job's whole lifecycle on real Redis with the scripted engine, in milliseconds.

In-process tests run the worker's own :class:`Runtime` (validation, rendering, claim,
generation, parsing, stream and terminal writes, heartbeat, cancel listener) on
``--engine scripted``; the test plays the Celery task: it hands the queued message's body to
``Runtime.run_job`` in a thread, as the task does. What Celery itself decides (a retry, the
dead letters) and a dead engine's exit run in real ``hermes-worker run --engine scripted``
processes at the end, which start in seconds (no vLLM).
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
from lifecycle_fixtures import (
    CALL,
    CONTENT,
    REASONING,
    STORY,
    TERMINAL,
    TEXT,
    TOOLS,
    Harness,
    assert_one_ending,
    job,
    output_of,
    wait_until,
)
from worker_fixtures import (
    WorkerProcess,
    patient_redis,
    running_scripted_worker,
)

from hermes_worker.contract import scripts
from hermes_worker.contract.jobs import JobStatus
from hermes_worker.errors import EngineError, ForgedMessage
from hermes_worker.testing.scripted_engine import split_tokens
from hermes_worker.worker import runtime as runtime_module
from hermes_worker.worker.runtime import EXIT_ENGINE_DEAD
from producers.client import HermesClient


def test_the_job_lifecycle_and_the_scripted_engine_import_no_vllm() -> None:
    # Given a fresh interpreter, When it imports the worker with the scripted engine
    modules = ["hermes_worker.worker.main", "hermes_worker.testing.scripted_engine"]
    probe = f"import sys, {', '.join(modules)}; print('vllm' in sys.modules)"
    out = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, check=True, timeout=60
    )
    # Then vLLM was not loaded: only hermes_worker.inference.engine imports it, when a worker
    # starts it
    assert out.stdout.strip() == "False", out.stderr


# --- success ---------------------------------------------------------------------------------


def test_reasoning_content_and_a_tool_call_stream_as_the_result_says(harness: Harness) -> None:
    # Given a worker, and a job whose script thinks, talks and calls a tool
    runtime = harness.start()
    handle = harness.client.submit(job({"text": TEXT}, tools=TOOLS))
    # When it is delivered
    status = harness.deliver(runtime, handle.id).result(timeout=5)
    # Then it succeeded with the three parts parsed
    result = handle.result(timeout=1)
    assert status is JobStatus.SUCCEEDED
    message = result.choices[0].message
    assert (message.reasoning_content, message.content) == (REASONING, CONTENT)
    assert message.tool_calls is not None and len(message.tool_calls) == 1
    call = message.tool_calls[0]
    assert (call.function.name, json.loads(call.function.arguments)) == (
        CALL["name"],
        CALL["arguments"],
    )
    assert result.choices[0].finish_reason == "tool_calls"
    # And every scripted token was counted, those of the think block as reasoning
    assert result.usage is not None
    assert result.usage.completion_tokens == len(split_tokens(TEXT))
    reasoning = result.usage.completion_tokens_details
    assert reasoning is not None
    assert reasoning.reasoning_tokens == len(split_tokens(f"<think>{REASONING}</think>"))
    # And the stream, joined, is the result
    events = harness.events(handle.id)
    assert output_of(events, "reasoning") == REASONING
    assert output_of(events, "content") == CONTENT
    [streamed_call] = [e.data for e in events if e.type == "tool_call"]
    assert streamed_call == {**call.model_dump(mode="json"), "index": 0}
    assert events[0].type == "started"
    assert_one_ending(harness, handle.id, "done")


def test_a_job_that_will_not_be_streamed_writes_only_its_end_and_the_same_result(
    harness: Harness,
) -> None:
    # Given a worker, and two jobs whose script thinks, talks and calls a tool, with
    # logprobs, one of them saying nobody will stream it
    runtime = harness.start()
    body = job({"text": TEXT}, tools=TOOLS, logprobs=True)
    streamed = harness.client.submit(body)
    quiet = harness.client.submit({**body, "stream": False})
    # When both run
    for handle in (streamed, quiet):
        assert harness.deliver(runtime, handle.id).result(timeout=5) is JobStatus.SUCCEEDED
    # Then the quiet one wrote none of its output to its stream, only its bookkeeping
    # and its end, where the other wrote it all
    output = {"reasoning", "content", "tool_call"}
    assert not output & set(harness.types(quiet.id))
    assert harness.types(quiet.id)[0] == "started"
    assert output <= set(harness.types(streamed.id))
    assert_one_ending(harness, quiet.id, "done")
    # And its result is the same: reasoning, content, the call and the logprobs
    ours, theirs = quiet.result(timeout=1).choices[0], streamed.result(timeout=1).choices[0]
    assert (ours.message.reasoning_content, ours.message.content) == (REASONING, CONTENT)
    assert ours.message.content == theirs.message.content
    assert ours.message.tool_calls is not None and theirs.message.tool_calls is not None
    assert [c.function for c in ours.message.tool_calls] == [
        c.function for c in theirs.message.tool_calls
    ]
    assert ours.logprobs is not None and theirs.logprobs is not None
    assert [e.token for e in ours.logprobs.content] == [e.token for e in theirs.logprobs.content]
    assert ours.logprobs.content  # the content's tokens, not an empty list
    # And a reader of its stream gets its end
    assert [e.type for e in quiet.stream(timeout=1)][-1] == "done"


@pytest.mark.parametrize(("ignore_eos", "max_tokens"), [(False, 4), (True, 40)])
def test_max_tokens_cuts_the_output_with_finish_reason_length(
    harness: Harness, ignore_eos: bool, max_tokens: int
) -> None:
    # Given a job asking for fewer tokens than its script has (or, ignoring EOS, more)
    runtime = harness.start()
    body = job({"text": STORY}, max_tokens=max_tokens, ignore_eos=ignore_eos)
    handle = harness.client.submit(body)
    # When it runs, Then it got exactly max_tokens tokens, cut by length
    assert harness.deliver(runtime, handle.id).result(timeout=5) is JobStatus.SUCCEEDED
    result = handle.result(timeout=1)
    assert result.usage is not None and result.usage.completion_tokens == max_tokens
    assert result.choices[0].finish_reason == "length"
    expected = "".join((split_tokens(STORY) * 4)[:max_tokens]).strip()
    assert result.choices[0].message.content == expected


# --- cancel ----------------------------------------------------------------------------------


def test_a_running_job_cancelled_by_its_producer_stops_with_its_partial_output(
    harness: Harness,
) -> None:
    # Given a job generating (its script stalls after three tokens)
    runtime = harness.start()
    handle = harness.client.submit(job({"text": STORY, "stall_after": 3}))
    task = harness.deliver(runtime, handle.id)
    harness.wait_for_output(handle.id)
    # When its producer cancels it
    assert handle.cancel() == "cancelling"
    # Then the attempt ends cancelled, keeping what was written
    assert task.result(timeout=5) is JobStatus.CANCELLED
    result = handle.result(timeout=1)
    assert result.error is not None and result.error.type == "cancelled"
    assert result.choices[0].finish_reason == "cancelled"
    assert result.choices[0].message.content == "".join(split_tokens(STORY)[:3])
    assert_one_ending(harness, handle.id, "cancelled")
    # And the engine holds the request no more (the vitals of a heartbeat after the end)
    vitals_key = harness.keys.worker("w1")
    finished_at = result.job.finished_at or 0
    wait_until(lambda: float(harness.redis.hget(vitals_key, "heartbeat_at") or 0) > finished_at)
    assert harness.redis.hget(vitals_key, "engine_unfinished") == b"0"


def test_a_job_cancelled_while_queued_never_starts_when_delivered(harness: Harness) -> None:
    # Given a queued job that its producer cancelled
    runtime = harness.start()
    handle = harness.client.submit(job({"text": STORY}))
    assert handle.cancel() == "cancelled"
    # When its message still reaches a worker, Then it is skipped: no attempt, no start
    assert harness.deliver(runtime, handle.id).result(timeout=5) is JobStatus.CANCELLED
    assert harness.types(handle.id) == ["cancelled"]
    assert handle.result(timeout=1).job.attempts == 0


# --- deadlines -------------------------------------------------------------------------------


def test_a_deadline_reached_while_generating_fails_the_job_as_timed_out(
    harness: Harness,
) -> None:
    # Given a job with 0.3 s to live whose script stalls after two tokens
    runtime = harness.start()
    handle = harness.client.submit(job({"text": STORY, "stall_after": 2}, timeout_s=0.3))
    # When it runs, Then its deadline stops it, with its partial output
    assert harness.deliver(runtime, handle.id).result(timeout=5) is JobStatus.FAILED
    result = handle.result(timeout=1)
    assert result.error is not None and result.error.type == "timeout"
    assert result.choices[0].finish_reason == "timeout"
    assert result.usage is not None and result.usage.completion_tokens == 2
    assert result.job.finished_at is not None and result.job.queued_at is not None
    assert 0.3 <= result.job.finished_at - result.job.queued_at < 0.3 + 0.5
    assert_one_ending(harness, handle.id, "error")


def test_a_deadline_passed_while_queued_expires_the_job_unstarted(harness: Harness) -> None:
    # Given a job whose 50 ms passed while it waited in the queue
    runtime = harness.start()
    handle = harness.client.submit(job({"text": STORY}, timeout_s=0.05))
    time.sleep(0.1)
    # When it is delivered, Then it expires without ever starting
    assert harness.deliver(runtime, handle.id).result(timeout=5) is JobStatus.EXPIRED
    assert harness.types(handle.id) == ["error"]
    result = handle.result(timeout=1)
    assert result.error is not None and result.error.type == "expired"
    assert result.choices == ()


# --- lease lost, shutdown --------------------------------------------------------------------


def test_an_attempt_whose_lease_another_holder_took_stops_writing(harness: Harness) -> None:
    # Given a job generating under w1's lease
    runtime = harness.start()
    handle = harness.client.submit(job({"text": STORY, "stall_after": 2}))
    task = harness.deliver(runtime, handle.id)
    harness.wait_for_output(handle.id)
    # When another worker holds its lease now (w1's expired and was taken)
    harness.redis.set(harness.keys.lease(handle.id), "w9:other")
    # Then w1's attempt stops at its next heartbeat, handing the job back
    assert task.result(timeout=5) is None
    # And it wrote nothing more: no ending, no record change, the other's lease kept
    written = harness.events(handle.id)
    assert not {e.type for e in written} & set(TERMINAL)
    assert harness.record(handle.id)["status"] == "running"
    assert "result" not in harness.record(handle.id)
    time.sleep(0.4)  # a heartbeat later
    assert harness.events(handle.id) == written
    assert harness.redis.get(harness.keys.lease(handle.id)) == b"w9:other"


def test_a_job_whose_writes_redis_refuses_for_good_does_not_hold_up_the_others(
    harness: Harness,
) -> None:
    # Given a worker, and two jobs whose writes go out in the same flushes, one of them
    # with a key of another type where its events stream goes (every write of it fails
    # inside the script, whatever the tries)
    runtime = harness.start()
    bad = harness.client.submit(job({"text": STORY}))
    good = harness.client.submit(job({"text": STORY}))
    harness.redis.set(harness.keys.events(bad.id), "not a stream")
    # When both run
    bad_task = harness.deliver(runtime, bad.id)
    good_task = harness.deliver(runtime, good.id)
    # Then the other job streams and ends as if nothing happened, each event once
    assert good_task.result(timeout=10) is JobStatus.SUCCEEDED
    assert output_of(harness.events(good.id), "content") == STORY
    seqs = [event.seq for event in harness.events(good.id)]
    assert seqs == list(range(1, len(seqs) + 1))
    # And the refused job's attempt stops, its key untouched, without a result
    assert bad_task.result(timeout=10) is None
    assert harness.redis.get(harness.keys.events(bad.id)) == b"not a stream"
    assert "result" not in harness.record(bad.id)
    # And the worker writes on for the jobs that come after
    later = harness.client.submit(job({"text": STORY}))
    assert harness.deliver(runtime, later.id).result(timeout=10) is JobStatus.SUCCEEDED
    assert output_of(harness.events(later.id), "content") == STORY


def test_shutdown_hands_a_running_job_back_and_another_worker_finishes_it(
    harness: Harness,
) -> None:
    # Given a job stalled on w1 (its script stalls on the first attempt only)
    w1 = harness.start()
    handle = harness.client.submit(job({"text": STORY, "stall_after": 2, "attempts": 1}))
    task = harness.deliver(w1, handle.id)
    harness.wait_for_output(handle.id)
    # When w1 shuts down with a 0.1 s grace period
    w1.begin_shutdown(grace_s=0.1)
    # Then the job goes back to the queue, unended and without a lease
    assert task.result(timeout=5) is None
    assert harness.record(handle.id)["status"] == "queued"
    assert harness.redis.exists(harness.keys.lease(handle.id)) == 0
    assert not set(harness.types(handle.id)) & set(TERMINAL)
    # And when w2 gets it, it runs as attempt 2 and the stream tells one story
    w2 = harness.start()
    assert harness.deliver(w2, handle.id).result(timeout=5) is JobStatus.SUCCEEDED
    result = handle.result(timeout=1)
    assert (result.job.attempts, result.job.worker) == (2, "w2")
    assert result.choices[0].message.content == STORY
    assert harness.types(handle.id).count("restarted") == 1
    assert output_of(harness.events(handle.id), "content") == STORY
    assert_one_ending(harness, handle.id, "done")


def test_a_job_whose_lease_cannot_be_renewed_stops_before_the_lease_could_expire(
    harness: Harness, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Given a job generating on w1 (lease 0.9 s, a beat every 0.3 s)
    runtime = harness.start()
    handle = harness.client.submit(job({"text": STORY, "stall_after": 2}))
    task = harness.deliver(runtime, handle.id)
    harness.wait_for_output(handle.id)
    # When every renewal from now on fails (Redis unreachable for this worker)
    leases = runtime._context.leases

    async def unreachable(held: dict[str, str]) -> tuple[set[str], set[str]]:
        raise redis.exceptions.ConnectionError("Redis is unreachable")

    renewed_at = time.monotonic()
    monkeypatch.setattr(leases, "renew", unreachable)
    # Then the worker stops the job itself before its lease could run out: handed back,
    # not ended
    assert task.result(timeout=5) is None
    assert time.monotonic() - renewed_at < 0.9
    assert not set(harness.types(handle.id)) & set(TERMINAL)


def test_a_jobs_end_drops_its_lease_in_the_same_call_with_no_release_after(
    harness: Harness,
) -> None:
    # Given a worker whose commands outside pipelines are seen
    runtime = harness.start()
    ctx = runtime._context
    sent: list[tuple[Any, ...]] = []
    execute = ctx.redis.execute_command

    async def seen(*args: Any, **options: Any) -> Any:
        sent.append(args[:2])
        return await execute(*args, **options)

    ctx.redis.execute_command = seen  # type: ignore[method-assign]
    try:
        # When a job runs to its end, and a job that cannot run fails
        handle = harness.client.submit(job({"text": STORY}))
        assert harness.deliver(runtime, handle.id).result(timeout=10) is JobStatus.SUCCEEDED
        bad = harness.client.submit(job({"txet": STORY}))  # a script the engine refuses
        assert harness.deliver(runtime, bad.id).result(timeout=10) is JobStatus.FAILED
    finally:
        del ctx.redis.execute_command
    # Then both leases went with the end written (scripts.WRITE), and no release call was made
    for job_id in (handle.id, bad.id):
        assert harness.redis.exists(harness.keys.lease(job_id)) == 0
    scripts_sent = {args[1] for args in sent if args[0] == "EVALSHA"}
    assert ctx.leases._claim.sha in scripts_sent  # (the attempts' own calls were seen)
    assert ctx.leases._release.sha not in scripts_sent


def test_a_workers_lease_renewals_are_one_call_whatever_the_number_of_jobs(
    harness: Harness,
) -> None:
    # Given 40 leases held by one worker
    runtime = harness.start()
    ctx = runtime._context
    held = {f"job-{i}": f"token-{i}" for i in range(40)}
    for job_id, token in held.items():
        harness.redis.set(harness.keys.lease(job_id), token, px=10_000)
    harness.redis.set(harness.keys.lease("job-7"), "someone-else")
    harness.redis.hset(harness.keys.job("job-3"), "cancel_requested", "1")
    # (Redis knows the script, as after a worker's first renewal: a fresh Redis needs a
    # SCRIPT LOAD once, which a test that ran first in this Redis would have made.)
    harness.redis.script_load(scripts.RENEW)
    sent: list[object] = []

    async def renew() -> tuple[set[str], set[str]]:
        execute = ctx.redis.execute_command

        async def counted(*args: Any, **options: Any) -> Any:
            if asyncio.current_task() is renewing:  # not the heartbeat's own commands
                sent.append(args[0])
            return await execute(*args, **options)

        renewing = asyncio.current_task()

        ctx.redis.execute_command = counted  # type: ignore[method-assign]
        try:
            return await ctx.leases.renew(held)
        finally:
            del ctx.redis.execute_command

    # When the heartbeat renews them
    lost, cancelled = runtime._call(renew())
    # Then it is one command, which renewed each lease still held, found the one lost and
    # the cancel request
    assert len(sent) == 1
    assert (lost, cancelled) == ({"job-7"}, {"job-3"})
    assert 500 < harness.redis.pttl(harness.keys.lease("job-1")) <= 900  # was 10 s
    assert harness.redis.get(harness.keys.lease("job-7")) == b"someone-else"


def test_a_job_held_by_a_live_attempt_is_not_dead_lettered(harness: Harness) -> None:
    # Given a job that another attempt holds the lease of
    runtime = harness.start()
    handle = harness.client.submit(job({"text": STORY}))
    harness.redis.set(harness.keys.lease(handle.id), "w9:running", px=10_000)
    before = harness.record(handle.id)
    # When a copy out of retries would dead-letter it
    runtime.dead_letter(handle.id, EngineError("out of retries"))
    # Then nothing is written: not failed, no event, not listed, the lease kept
    assert harness.record(handle.id) == before
    assert harness.events(handle.id) == []
    assert harness.client.dead_letters() == []
    assert harness.redis.get(harness.keys.lease(handle.id)) == b"w9:running"


# --- deliveries: counted first, the job's own body only ----------------------------------------


def test_a_message_with_another_body_than_its_jobs_is_refused_and_the_job_untouched(
    harness: Harness,
) -> None:
    # Given a queued job
    runtime = harness.start()
    handle = harness.client.submit(job({"text": STORY}))
    before = harness.record(handle.id)
    # When a message carrying its id but another body is delivered
    forged = {**job({"text": "FORGED"}), "id": handle.id}
    task = harness.tasks.submit(runtime.run_job, forged, handle.id)
    # Then it is refused, and the job's record is as it was: not counted, not claimed
    with pytest.raises(ForgedMessage, match=handle.id):
        task.result(timeout=5)
    assert harness.record(handle.id) == before
    assert harness.events(handle.id) == []
    # And the job's own message still runs, once
    assert harness.deliver(runtime, handle.id).result(timeout=5) is JobStatus.SUCCEEDED
    assert handle.result(timeout=1).choices[0].message.content == STORY


def test_deliveries_that_never_came_back_make_a_job_poison(harness: Harness) -> None:
    # Given a job whose last deliveries each ended their worker (max_deliveries 3)
    runtime = harness.start()
    handle = harness.client.submit(job({"text": STORY}))
    harness.redis.hset(harness.keys.job(handle.id), "deliveries", 3)
    # When it is delivered again, Then it fails as poison without running, dead-lettered
    assert harness.deliver(runtime, handle.id).result(timeout=5) is JobStatus.FAILED
    result = handle.result(timeout=1)
    assert result.error is not None and result.error.type == "poison"
    assert "3 times" in result.error.message
    assert result.job.attempts == 0
    assert harness.types(handle.id) == ["error"]
    assert [letter.id for letter in harness.client.dead_letters()] == [handle.id]


def test_a_delivery_that_ends_the_job_or_hands_it_back_is_not_a_crash(harness: Harness) -> None:
    # Given a job that stalls on its first attempt
    w1 = harness.start()
    handle = harness.client.submit(job({"text": STORY, "stall_after": 2, "attempts": 1}))
    task = harness.deliver(w1, handle.id)
    harness.wait_for_output(handle.id)
    # While it runs, its delivery counts
    assert harness.record(handle.id)["deliveries"] == "1"
    # When it is handed back (a shutdown), the count is taken back
    w1.begin_shutdown(grace_s=0.0)
    assert task.result(timeout=5) is None
    assert harness.record(handle.id)["deliveries"] == "0"
    # And when another worker ends it, it was delivered once more, and never poison
    assert harness.deliver(harness.start(), handle.id).result(timeout=5) is JobStatus.SUCCEEDED
    assert harness.record(handle.id)["deliveries"] == "1"


# --- engine errors: retry, dead letter, death ------------------------------------------------


def test_an_engine_error_goes_up_to_be_retried_and_the_retry_succeeds(harness: Harness) -> None:
    # Given a job whose first attempt fails in the engine after two tokens
    runtime = harness.start()
    handle = harness.client.submit(job({"text": STORY, "fail_after": 2, "attempts": 1}))
    # When it is delivered, Then the task gets a retryable error and the job did not end
    with pytest.raises(EngineError, match="after 2 tokens") as failed:
        harness.deliver(runtime, handle.id).result(timeout=5)
    assert failed.value.retryable
    assert not set(harness.types(handle.id)) & set(TERMINAL)
    assert harness.redis.exists(harness.keys.lease(handle.id)) == 0
    # And when Celery delivers it again, attempt 2 succeeds with the whole text
    assert harness.deliver(runtime, handle.id).result(timeout=5) is JobStatus.SUCCEEDED
    result = handle.result(timeout=1)
    assert result.job.attempts == 2
    assert result.choices[0].message.content == STORY
    assert output_of(harness.events(handle.id), "content") == STORY
    assert harness.types(handle.id).count("restarted") == 1
    assert_one_ending(harness, handle.id, "done")


def test_a_job_failing_every_attempt_is_dead_lettered_once_out_of_retries(
    harness: Harness,
) -> None:
    # Given a job whose every attempt fails in the engine (max_retries 1: two attempts)
    runtime = harness.start()
    handle = harness.client.submit(job({"text": STORY, "fail_after": 1}))
    errors = []
    for _ in range(1 + harness.settings.max_retries):
        with pytest.raises(EngineError) as failed:
            harness.deliver(runtime, handle.id).result(timeout=5)
        errors.append(failed.value)
    # When the task, out of retries, dead-letters it (worker.py decides when; the Celery
    # level is tested in a worker process below)
    runtime.dead_letter(handle.id, errors[-1])
    # Then it failed for good once, with every attempt counted, and is listed
    result = handle.result(timeout=1)
    assert result.job.status is JobStatus.FAILED
    assert result.error is not None and result.error.type == "engine_error"
    assert result.job.attempts == 2
    assert [letter.id for letter in harness.client.dead_letters()] == [handle.id]
    assert_one_ending(harness, handle.id, "error")


def test_a_dead_engine_fails_every_running_job_and_exits_the_worker(
    harness: Harness, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Given a worker whose exit on a dead engine is recorded instead of taken
    exited = threading.Event()
    monkeypatch.setattr(runtime_module, "_exit_engine_dead", exited.set)
    runtime = harness.start()
    # And a job stalled on it
    stalled = harness.client.submit(job({"text": STORY, "stall_after": 1}))
    waiting = harness.deliver(runtime, stalled.id)
    harness.wait_for_output(stalled.id)
    # When another job's script kills the engine
    killer = harness.client.submit(job({"text": STORY, "die_after": 2}))
    with pytest.raises(EngineError, match="died"):
        harness.deliver(runtime, killer.id).result(timeout=5)
    # Then the stalled job fails too, the worker exits, and neither job ended: both are left
    # unacknowledged, without a lease, for a live worker
    with pytest.raises(EngineError, match="dead"):
        waiting.result(timeout=5)
    assert exited.wait(1)
    for handle in (stalled, killer):
        assert not set(harness.types(handle.id)) & set(TERMINAL)
        assert harness.redis.exists(harness.keys.lease(handle.id)) == 0


def test_a_bad_script_fails_the_job_as_an_invalid_request(harness: Harness) -> None:
    # Given a job whose script names a field the engine does not know
    runtime = harness.start()
    handle = harness.client.submit(job({"txet": STORY}))
    # When it runs, Then it fails for good, naming the field, without a retry
    assert harness.deliver(runtime, handle.id).result(timeout=5) is JobStatus.FAILED
    result = handle.result(timeout=1)
    assert result.error is not None and result.error.type == "invalid_request_error"
    assert "metadata.hermes_script.txet" in result.error.message


# --- real worker processes on the scripted engine ----------------------------------------------


@pytest.fixture(scope="module")
def scripted_worker(
    test_model_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[WorkerProcess]:
    """``hermes-worker run --engine scripted --tokens-per-s 200``, one retry per job."""
    log_path = tmp_path_factory.mktemp("scripted-worker") / "worker.log"
    with running_scripted_worker(test_model_dir, log_path, 200, HERMES_MAX_RETRIES="1") as process:
        yield process


def client_of(worker: WorkerProcess) -> HermesClient:
    return HermesClient(worker.settings, redis=patient_redis(worker.settings.redis_url))


def test_a_scripted_worker_process_serves_jobs_at_its_set_rate(
    scripted_worker: WorkerProcess,
) -> None:
    # Given a worker run with --engine scripted --tokens-per-s 200
    with client_of(scripted_worker) as client:
        # When a producer submits a job of 100 tokens
        handle = client.submit(job({"text": STORY}, max_tokens=100, ignore_eos=True))
        result = handle.result(timeout=30)
        streamed = list(handle.stream(timeout=5))
    # Then it gets them all, at about the set rate (100 tokens at 200/s: 0.5 s), streamed
    assert result.job.status is JobStatus.SUCCEEDED
    assert result.usage is not None and result.usage.completion_tokens == 100
    assert result.job.generation_s is not None and 0.45 <= result.job.generation_s < 5
    content = result.choices[0].message.content
    assert "".join(e.data["text"] for e in streamed if e.type == "content") == content
    assert "kv cache" not in scripted_worker.log()  # no KV cache sized for this engine


def test_celery_retries_a_failed_attempt_and_dead_letters_a_job_out_of_retries(
    scripted_worker: WorkerProcess,
) -> None:
    with client_of(scripted_worker) as client:
        # Given a job failing once and a job failing every attempt (HERMES_MAX_RETRIES=1)
        once = client.submit(job({"text": STORY, "fail_after": 3, "attempts": 1}))
        always = client.submit(job({"text": STORY, "fail_after": 3}))
        # When the worker has run them
        retried, lost = once.result(timeout=30), always.result(timeout=30)
        letters = [letter.id for letter in client.dead_letters()]
    # Then the first succeeded on its retry; the second failed after two, dead-lettered
    assert (retried.job.status, retried.job.attempts) == (JobStatus.SUCCEEDED, 2)
    assert retried.choices[0].message.content == STORY
    assert (lost.job.status, lost.job.attempts) == (JobStatus.FAILED, 2)
    assert lost.error is not None and lost.error.type == "engine_error"
    assert letters == [always.id]


def test_a_scripted_worker_whose_engine_dies_exits_for_a_restart(
    scripted_worker: WorkerProcess,
) -> None:
    # Given the scripted worker (last in this module: the one it ends is not started again)
    with client_of(scripted_worker) as client:
        # When a job's script kills its engine
        handle = client.submit(job({"text": STORY, "die_after": 1}))
        # Then the worker exits with the engine-dead status, the job not ended
        code = scripted_worker.process.wait(30)
        assert code == EXIT_ENGINE_DEAD, scripted_worker.log()[-3000:]
        assert client.job(handle.id).poll() is None
    assert "the engine died" in scripted_worker.log()
