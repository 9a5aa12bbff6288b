"""A burst of jobs reaching a worker: the consumer taking them in batches, next to one each.

Many producers often submit at the same moment (a batch job, a fan-out, the next wave of a
closed loop). Every job of a burst then waits for Celery's consumer to take it off the
queue. This runs a real worker (``hermes-worker run``, the tiny test checkpoint or
``--model``) once per ``--batches`` value (``HERMES_DELIVERY_BATCH``; 1 is stock kombu: one
BRPOP and one bookkeeping round trip per message), alternating over ``--rounds``, and
submits ``--waves`` bursts of ``--jobs`` one-token jobs at once. Per value: how far apart
the burst's jobs were claimed (first to last claim), how long a job waited from the burst's
start to its claim, and the broker commands per job (``INFO commandstats``).

    python benchmarks/burst.py --jobs 32 --waves 8 --rounds 2 --batches 1,64
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import redis
from bench_report import percentile
from serving import (
    READY_TIMEOUT_S,
    _stop,
    clean_redis,
    engine_settings,
    parse_args,
    progress,
    resolve_model,
    start_worker,
)

from producers.client import AsyncHermesClient

COMMANDS = ("brpop", "evalsha")
BODY = {"messages": [{"role": "user", "content": "hello there"}], "max_tokens": 1}


def command_calls(server: redis.Redis) -> dict[str, int]:
    stats = server.info("commandstats")
    return {name: int(stats.get(f"cmdstat_{name}", {}).get("calls", 0)) for name in COMMANDS}


async def one_worker(
    args: argparse.Namespace, model: str, batch: int, tmp: Path
) -> dict[str, list[float]]:
    """Start a worker with ``batch``, run the bursts, stop it: spreads, waits, commands."""
    tag = uuid.uuid4().hex[:8]
    settings = engine_settings(parse_args(["--concurrency", str(args.jobs)]), model, tag)
    settings = settings.model_copy(update={"delivery_batch": batch})
    worker = start_worker(settings, tmp / f"worker-{tag}.log")
    server = redis.Redis.from_url(settings.redis_url)
    out: dict[str, list[float]] = {"spread": [], "wait": [], "brpop": [], "evalsha": []}
    try:
        await asyncio.to_thread(worker.wait_ready, READY_TIMEOUT_S)
        async with AsyncHermesClient(settings) as client:
            await (await client.submit(dict(BODY))).result(timeout=120)  # warm
            for _ in range(args.waves):
                await asyncio.sleep(1)  # the last burst's acks and releases land first
                before = command_calls(server)
                start = time.time()
                handles = await asyncio.gather(
                    *(client.submit(dict(BODY)) for _ in range(args.jobs))
                )
                results = await asyncio.gather(*(h.result(timeout=300) for h in handles))
                after = command_calls(server)
                claims = sorted(r.job.started_at for r in results if r.job.started_at)
                out["spread"].append((claims[-1] - claims[0]) * 1000)
                out["wait"] += [(claim - start) * 1000 for claim in claims]
                for name in COMMANDS:  # the whole server's, others included
                    out[name].append((after[name] - before[name]) / args.jobs)
    finally:
        _stop(worker)
        clean_redis(settings)
        server.close()
    return out


async def run(args: argparse.Namespace) -> list[dict[str, Any]]:
    batches = [int(b) for b in args.batches.split(",")]
    totals: dict[int, dict[str, list[float]]] = {b: {} for b in batches}
    with tempfile.TemporaryDirectory(prefix="hermes-burst-") as tmp_name:
        model = resolve_model(args.model, Path(tmp_name))
        for turn in range(args.rounds):
            for batch in batches[turn % len(batches) :] + batches[: turn % len(batches)]:
                got = await one_worker(args, model, batch, Path(tmp_name))
                for key, values in got.items():
                    totals[batch].setdefault(key, []).extend(values)
                progress(f"round {turn + 1}, batch {batch}: done")
    return [
        {
            "batch": batch,
            "spread_p50_ms": statistics.median(t["spread"]),
            "spread_max_ms": max(t["spread"]),
            "wait_p50_ms": percentile(t["wait"], 50),
            "wait_p90_ms": percentile(t["wait"], 90),
            "brpop_per_job": statistics.mean(t["brpop"]),
            "evalsha_per_job": statistics.mean(t["evalsha"]),
        }
        for batch, t in totals.items()
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="tiny")
    parser.add_argument("--jobs", type=int, default=32, help="jobs per burst")
    parser.add_argument("--waves", type=int, default=8, help="bursts per worker")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--batches", default="1,64", help="HERMES_DELIVERY_BATCH values")
    args = parser.parse_args()
    rows = asyncio.run(run(args))
    print(
        f"{args.jobs} one-token jobs per burst, {args.waves} bursts x {args.rounds} rounds\n"
        "| delivery batch | claim spread p50 (max), ms | burst start to claim p50 / p90, ms "
        "| BRPOP per job | EVALSHA per job |\n|---|---|---|---|---|"
    )
    for row in rows:
        print(
            f"| {row['batch']} | {row['spread_p50_ms']:.0f} ({row['spread_max_ms']:.0f}) "
            f"| {row['wait_p50_ms']:.0f} / {row['wait_p90_ms']:.0f} "
            f"| {row['brpop_per_job']:.2f} | {row['evalsha_per_job']:.2f} |"
        )


if __name__ == "__main__":
    main()
