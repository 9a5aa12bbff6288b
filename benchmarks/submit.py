"""Submitting side by side: the asyncio client's ``submit`` next to Celery's own ``send_task``.

A producer service submits from an event loop, many requests at once. Two ways, in one run,
interleaved over rounds, on a Redis of their own keys (database 13, removed afterwards):

* **celery**: what a plain Celery producer pays: ``send_task`` (``hermes_worker.contract.queue.
  send_job``) in a thread, since it blocks. No validation, no job record.
* **submit**: ``AsyncHermesClient.submit``: validation, the job record and the Celery
  message in one Lua call.

Each way runs ``--lanes`` coroutines submitting ``--jobs`` jobs in all, closed loop; the
table gives submits/s, the producer's CPU per submit and the latency of one submit.
No worker runs: the jobs are removed with their queue.

    python benchmarks/submit.py --jobs 1600 --lanes 32 --rounds 3
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from serving import clean_redis

from hermes_worker.contract.queue import make_celery, send_job
from hermes_worker.settings import Settings
from producers.client import AsyncHermesClient

REDIS_URL = "redis://127.0.0.1:6379/13"
SYSTEM = "You are a helpful assistant who answers in one short paragraph. " * 8


def job() -> dict[str, Any]:
    return {
        "messages": [
            {"role": "system", "content": SYSTEM},
            {"role": "user", "content": f"Tell me about Redis lists ({uuid.uuid4().hex[:8]})."},
        ],
        "max_tokens": 64,
    }


@dataclass
class Tally:
    """One way's submits, pooled over rounds."""

    wall_s: float = 0.0
    cpu_s: float = 0.0
    latencies: list[float] = field(default_factory=list)

    def row(self, name: str) -> str:
        n, lat = len(self.latencies), sorted(self.latencies)
        p50, p99 = statistics.median(lat), lat[min(n - 1, int(n * 0.99))]
        return (
            f"| {name} | {n / self.wall_s:,.0f} | {self.cpu_s / n * 1e3:.2f} "
            f"| {p50 * 1e3:.1f} | {p99 * 1e3:.1f} |"
        )


def settings() -> Settings:
    tag = uuid.uuid4().hex[:8]
    return Settings(redis_url=REDIS_URL, key_prefix=f"bench-{tag}:", queue_name=f"bench-{tag}")


async def drive(one: Callable[[], Awaitable[None]], jobs: int, lanes: int, tally: Tally) -> None:
    async def timed() -> None:
        started = time.perf_counter()
        await one()
        tally.latencies.append(time.perf_counter() - started)

    async def lane(count: int) -> None:
        for _ in range(count):
            await timed()

    await one()  # warm: connections, scripts loaded, Celery's producer pool
    cpu, wall = time.process_time(), time.perf_counter()
    await asyncio.gather(*(lane(jobs // lanes) for _ in range(lanes)))
    tally.wall_s += time.perf_counter() - wall
    tally.cpu_s += time.process_time() - cpu


async def run_way(name: str, jobs: int, lanes: int, tally: Tally) -> None:
    s = settings()
    try:
        if name == "celery":
            app = make_celery(s)

            async def one() -> None:
                body = {**job(), "id": uuid.uuid4().hex}
                await asyncio.to_thread(send_job, app, body, body["id"], 5, s.queue_name)

            await drive(one, jobs, lanes, tally)
        else:
            async with AsyncHermesClient(s) as client:

                async def one() -> None:
                    await client.submit(job())

                await drive(one, jobs, lanes, tally)
    finally:
        clean_redis(s)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--jobs", type=int, default=1600, help="submits per way and round")
    parser.add_argument("--lanes", type=int, default=32, help="concurrent submitters")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args(argv)
    ways = {"celery": Tally(), "submit": Tally()}
    for turn in range(args.rounds):
        order = list(ways) if turn % 2 == 0 else list(reversed(ways))
        for name in order:
            asyncio.run(run_way(name, args.jobs, args.lanes, ways[name]))
            print(f"[submit bench] round {turn + 1}: {name} done", file=sys.stderr)
    print(f"{args.jobs} submits x {args.rounds} rounds, {args.lanes} at once\n")
    print("| way | submits/s | producer CPU ms/submit | p50 ms | p99 ms |")
    print("| --- | --- | --- | --- | --- |")
    for name, tally in ways.items():
        print(tally.row(name))
    return 0


if __name__ == "__main__":
    sys.exit(main())
