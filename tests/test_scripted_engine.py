"""The scripted engine's shared rate: jobs share ``engine_tokens_per_s`` as a GPU's batch does
(one token per running job per step), a job alone gets its own ``tokens_per_s``."""

from __future__ import annotations

import asyncio
import time

from hermes_worker.inference.sampling import GenerationPlan
from hermes_worker.testing.scripted_engine import Script, ScriptedEngine


async def run_jobs(engine: ScriptedEngine, jobs: int, tokens: int) -> tuple[float, list[list[int]]]:
    """Run ``jobs`` requests of ``tokens`` tokens at once: the wall time, and each job's
    delta sizes."""
    plan = GenerationPlan(max_tokens=tokens, sampling={"ignore_eos": True})
    sizes: list[list[int]] = [[] for _ in range(jobs)]

    async def one(index: int) -> None:
        async for delta in engine.generate(f"job-{index}:1", [1], plan, 0):
            sizes[index].append(delta.num_tokens)

    start = time.perf_counter()
    await asyncio.gather(*(one(index) for index in range(jobs)))
    return time.perf_counter() - start, sizes


def test_jobs_share_the_engine_rate_and_a_job_alone_runs_at_its_own() -> None:
    # Given an engine of 1,000 tokens a second shared, at most 100 a second for one job
    engine = ScriptedEngine(Script(tokens_per_s=100), engine_tokens_per_s=1000)
    # When 50 jobs of 20 tokens run at once (20 a second each: 1 s)
    elapsed, sizes = asyncio.run(run_jobs(engine, 50, 20))
    # Then together they got about 1,000 tokens a second, every job all its tokens
    assert 0.85 < elapsed < 1.4, elapsed
    assert all(sum(job) == 20 for job in sizes)
    # And one job alone runs at its own 100 a second, not the engine's 1,000
    elapsed, sizes = asyncio.run(run_jobs(engine, 1, 20))
    assert 0.17 < elapsed < 0.4, elapsed
    assert sum(sizes[0]) == 20


def test_without_a_shared_rate_every_job_runs_at_its_own() -> None:
    engine = ScriptedEngine(Script(tokens_per_s=100))
    elapsed, sizes = asyncio.run(run_jobs(engine, 50, 20))
    assert 0.17 < elapsed < 0.5, elapsed
    assert all(sum(job) == 20 for job in sizes)
