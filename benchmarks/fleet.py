"""A fleet of simulated GPU workers on one Redis: what Redis spends per token, per job, per worker.

Each simulated worker is a real ``hermes-worker run`` process on the scripted engine
(``--engine scripted``, no model): its Celery consumer, lease claims and renewals, stream
writer, heartbeats and vitals are the production code, only the engine is a stand-in that
writes at a GPU node's pace: ``--slots`` jobs (256) sharing ``--engine-tokens-per-s``
tokens a second (2,000: about Hermes 4 405B in FP8 on 8 H100s), one token per running job per
engine step (``scripted_engine_tokens_per_s``, see hermes_worker/testing/scripted_engine.py).
All workers take jobs from one queue, as a fleet does. Beside each worker runs a service, a
process of its own (so that no client's reads wait for another's CPU): an
``AsyncHermesClient`` (its hub: one XREAD for the streams it reads and the ends it awaits)
with one lane per slot, each submitting a ``--job-tokens`` job (500, ``ignore_eos``) as soon
as its last one has ended, so the fleet's slots stay full. A ``--stream-share`` of
the lanes (a quarter) reads each job's stream as a chat UI does, then its result; the others
only await the result (the ends stream), as a batch producer or the gateway's ``stream:
false`` does, and their jobs say so (``stream`` false: no output written as it comes;
``--awaited-stream``: they do not). The first job of each lane is shorter (1 to
``--job-tokens`` tokens), as if the fleet had been running: the jobs end spread out from
the start.

Redis is a ``redis-server`` of the benchmark's own on a free port (so nothing else's load
counts; or ``--redis-url``). For each fleet size in ``--workers`` (1,2,4: as many as the
machine can drive at full pace) the workers start, the load runs ``--warmup-s``, then over
``--window-s`` it measures Redis's CPU (``INFO cpu``, user + system), its commands (``INFO
commandstats``: calls and microseconds per command; commands a Lua script runs are counted
too, and inside the script's own time), the tokens generated (counted in the streamed jobs'
text as it arrives: every job gets one token per engine step, so they are a fair sample),
the jobs ended, the CPU of the workers and of the services, and the services' XREADs. A
worker that fell behind its pace would under-report Redis's cost: the table gives each
level's tokens a second per worker against the target. The derived figures: Redis CPU per
1,000 tokens, per job and per worker-second, and the fleet at which Redis would use half a
core (0.5 s / s over Redis CPU per token times the target pace). Redis's cost grows linearly
with the fleet only as long as the per-worker figure stays flat from level to level: the
table shows it per level, and the XREADs per client-second beside it (a client follows jobs
on every worker). On its own Redis it first measures the machine's speed (``reference_us``)
and gives the fleet's cost in rounds of that reference load too. Each worker runs on a
monotonic clock of its own (this host's, shifted by a random offset: ``host_clock``), as
workers on separate hosts do, unless ``--same-clock``: on one host their timers would fall
in step where a real fleet's do not. ``--services N`` splits the fleet's slots among N
services instead (more services a worker, more clients each flush names);
benchmarks/notice_storm.py shows what a 100-worker fleet's notices do to one client.

    python benchmarks/fleet.py --workers 1,2,4 --warmup-s 15 --window-s 40 \
        --out docs/benchmarks/fleet
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import multiprocessing
import os
import random
import statistics
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import redis
from serving import _stop, clean_redis, progress, resolve_model, start_worker

from hermes_worker.cli.services import LocalRedis
from hermes_worker.settings import Settings
from hermes_worker.testing.scripted_engine import SCRIPT_KEY, split_tokens
from hermes_worker.worker.stream import TEXT_EVENTS
from producers.client import AsyncHermesClient

CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def _int_list(text: str) -> list[int]:
    values = [int(part) for part in text.split(",") if part.strip()]
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError("a comma-separated list of positive integers")
    return values


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--workers", type=_int_list, default=[1, 2, 4], help="fleet sizes")
    parser.add_argument("--slots", type=int, default=256, help="jobs each worker runs at once")
    parser.add_argument(
        "--engine-tokens-per-s", type=float, default=2000.0, help="tokens/s a worker's slots share"
    )
    parser.add_argument(
        "--job-tokens-per-s", type=float, default=40.0, help="a job alone at most (one stream)"
    )
    parser.add_argument("--job-tokens", type=int, default=500, help="tokens per job")
    parser.add_argument(
        "--stream-share", type=float, default=0.25, help="share of jobs whose stream is read"
    )
    parser.add_argument(
        "--awaited-stream",
        action="store_true",
        help="the jobs only awaited keep stream true (their output written as it comes, as "
        "before 2026-12-04); by default they say stream false",
    )
    parser.add_argument(
        "--ends-readers",
        type=int,
        default=0,
        help="more clients, each awaiting one job that never ends: they read the ends stream "
        "as the services of a larger fleet would (its cost grows with clients x ends)",
    )
    parser.add_argument(
        "--services",
        type=int,
        default=0,
        help="service processes (clients) per level, the fleet's slots split among them; 0: "
        "one per worker. A worker's flush names every client one of its jobs came from: "
        "more services a worker, more notices a flush and more hubs woken a worker-second "
        "(benchmarks/notice_storm.py makes a large fleet's notices to one client)",
    )
    parser.add_argument(
        "--max-flush-ms",
        type=float,
        default=Settings.model_fields["stream_max_flush_ms"].default,
        help="the workers' HERMES_STREAM_MAX_FLUSH_MS: a streamed job's text is written this "
        "often at a GPU's pace (lower: more flushes, more notices a client-second)",
    )
    parser.add_argument(
        "--read-interval-ms",
        type=float,
        default=Settings.model_fields["client_read_interval_ms"].default,
        help="the services' HERMES_CLIENT_READ_INTERVAL_MS: their hubs' blocking reads start "
        "at least this far apart (0: at once)",
    )
    parser.add_argument(
        "--same-clock",
        action="store_true",
        help="the workers keep this host's monotonic clock; by default each gets its own "
        "(shifted by a random offset), as workers on separate hosts have",
    )
    parser.add_argument("--warmup-s", type=float, default=20.0)
    parser.add_argument("--window-s", type=float, default=60.0, help="measured seconds per level")
    parser.add_argument("--redis-url", default=None, help="default: a redis-server of its own")
    parser.add_argument("--model", default="tiny", help="the tokenizer the workers load")
    parser.add_argument("--out", default=None, help="write PATH.json and PATH.md")
    return parser.parse_args(argv)


# --- measuring -----------------------------------------------------------------------------


def proc_cpu_s(pid: int) -> float:
    """User + system CPU seconds of a process (all its threads)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS


def redis_sample(server: redis.Redis) -> dict[str, Any]:
    cpu = server.info("cpu")
    stats = server.info("commandstats")
    commands = {
        name.removeprefix("cmdstat_"): {"calls": int(v["calls"]), "usec": int(v["usec"])}
        for name, v in stats.items()
    }
    return {"cpu_s": float(cpu["used_cpu_user"]) + float(cpu["used_cpu_sys"]), "cmd": commands}


@dataclass
class Tally:
    """What the lanes saw: jobs ended, stream events read and the tokens in them."""

    jobs: int = 0
    failed: int = 0
    events: int = 0
    streamed_tokens: int = 0

    def copy(self) -> Tally:
        return Tally(self.jobs, self.failed, self.events, self.streamed_tokens)


@dataclass
class Level:
    workers: int
    services: int
    window_s: float
    redis_cpu_s: float
    jobs: int
    tokens: int
    failed: int
    events: int
    worker_cpu_s: float
    harness_cpu_s: float
    hub_reads: int
    commands: dict[str, dict[str, int]] = field(default_factory=dict)

    @property
    def tokens_per_worker_s(self) -> float:
        return self.tokens / self.window_s / self.workers

    @property
    def redis_core(self) -> float:
        """Redis CPU seconds per second."""
        return self.redis_cpu_s / self.window_s

    @property
    def per_worker_s(self) -> float:
        """Redis CPU seconds per worker-second."""
        return self.redis_core / self.workers

    @property
    def calls(self) -> int:
        return sum(c["calls"] for c in self.commands.values())

    def fleet_at_half_core(self, target_tokens_s: float) -> float:
        """Workers at the target pace for which Redis uses 0.5 core (from cost per token:
        a worker that fell short of its pace is counted at the pace)."""
        per_token = self.redis_cpu_s / max(self.tokens, 1)
        return 0.5 / (per_token * target_tokens_s)


# --- this machine's speed -------------------------------------------------------------------

# A script like the flush's: one event and one lease check per job, four jobs.
REFERENCE_SCRIPT = """
for i = 1, 4 do
  redis.call('GET', KEYS[2])
  redis.call('XADD', KEYS[1], '*', 'seq', i, 'type', 'content', 'data', ARGV[1])
end
return 1
"""


def reference_us(url: str, rounds: int = 2000, runs: int = 3) -> float:
    """Redis CPU per round of a fixed load shaped like the fleet's (a script that writes
    four events into a stream another connection is blocked on, that reader woken and
    blocking again, and a plain read of a record), median of ``runs``, on a Redis nothing
    else uses. This VM's speed changes 2x from day to day: the fleet's cost divided by this
    compares runs made on different days."""
    client, reader = redis.Redis.from_url(url), redis.Redis.from_url(url)
    key, record = f"hermes-fleet-reference:{uuid.uuid4().hex}", "hermes-fleet-reference:rec"
    lease = "hermes-fleet-reference:lease"
    client.hset(record, mapping={"status": "running", "result": "x" * 200})
    client.set(lease, "token")
    write = client.register_script(REFERENCE_SCRIPT)
    data = json.dumps({"text": " a few words of text"})
    figures = []
    try:
        for _ in range(runs):
            woken = threading.Semaphore(0)
            thread = threading.Thread(
                target=_follow, args=(reader, key, rounds, woken), daemon=True
            )
            thread.start()
            time.sleep(0.2)  # the reader is blocked
            before = redis_sample(client)["cpu_s"]
            for _ in range(rounds):
                write(keys=[key, lease], args=[data])
                woken.acquire(timeout=5)
                client.hmget(record, ["status", "result"])
            used = redis_sample(client)["cpu_s"] - before
            thread.join(10)
            figures.append(used / rounds * 1e6)
            client.delete(key)
    finally:
        client.delete(key, record, lease)
        client.close()
        reader.close()
    return statistics.median(figures)


def _follow(reader: redis.Redis, key: str, rounds: int, woken: threading.Semaphore) -> None:
    """The reference load's reader: blocked on ``key``, woken ``rounds`` times."""
    last: Any = "$"
    for _ in range(rounds):
        reply = None
        while not reply:
            reply = reader.xread({key: last}, block=5000)
        last = reply[0][1][-1][0]
        woken.release()


# --- the load ------------------------------------------------------------------------------


# Every token of the text a space and a word: cut into tokens again after the text has been
# joined (a stream entry holds several deltas, the text repeats), it gives the same count.
SCRIPT = json.dumps({"text": " Once upon a time a fleet of workers wrote stories."})


def job_body(tokens: int, stream: bool) -> dict[str, Any]:
    body = {
        "messages": [{"role": "user", "content": "Tell me a story."}],
        "max_tokens": tokens,
        "ignore_eos": True,
        "metadata": {SCRIPT_KEY: SCRIPT},
    }
    return body if stream else {**body, "stream": False}


async def lane(
    client: AsyncHermesClient, args: argparse.Namespace, streams: bool, tally: Tally,
    stop: asyncio.Event,
) -> None:  # fmt: skip
    tokens = random.randint(1, args.job_tokens)  # as if the fleet had been running
    while not stop.is_set():
        handle = await client.submit(job_body(tokens, streams or args.awaited_stream))
        if streams:
            async for event in handle.stream():
                tally.events += 1
                if event.type in TEXT_EVENTS:
                    tally.streamed_tokens += len(split_tokens(event.data["text"]))
        result = await handle.result()
        tally.jobs += 1
        tally.failed += result.job.status != "succeeded"
        tokens = args.job_tokens


async def service(
    settings: Settings, args: argparse.Namespace, lanes: int, start_at: float, end_at: float
) -> dict[str, float]:
    """A service: its client keeps ``lanes`` of the fleet's slots full; what it saw between
    ``start_at`` and ``end_at`` (wall clock), and its CPU then."""
    tally = Tally()
    client = AsyncHermesClient(settings)
    streaming = max(1, round(lanes * args.stream_share))
    stop = asyncio.Event()
    tasks = [
        asyncio.create_task(lane(client, args, slot < streaming, tally, stop))
        for slot in range(lanes)
    ]
    try:
        await asyncio.sleep(start_at - time.time())
        seen, cpu, reads = tally.copy(), time.process_time(), client.hub.reads
        await asyncio.sleep(end_at - time.time())
        end, cpu, reads = tally.copy(), time.process_time() - cpu, client.hub.reads - reads
        for task in tasks:
            if task.done() and task.exception() is not None:
                raise task.exception()  # type: ignore[misc]
    finally:
        # The flag too: Python 3.11's wait_for can swallow a cancel that lands as its wait
        # ends (a lane would then go on with another job).
        stop.set()
        for task in tasks:
            task.cancel()
        await asyncio.wait(tasks, timeout=10)
        with contextlib.suppress(Exception):
            await client.aclose()
    return {
        "jobs": end.jobs - seen.jobs,
        "failed": end.failed - seen.failed,
        "events": end.events - seen.events,
        # Every job runs at the same pace (one token per engine step), so the streamed jobs
        # are a fair sample of the tokens generated: counted as they are generated, not at
        # a job's end (the lanes' first jobs are shorter).
        "tokens": (end.streamed_tokens - seen.streamed_tokens) * lanes / streaming,
        "cpu_s": cpu,
        "hub_reads": reads,
    }


async def ends_readers(settings: Settings, count: int, end_at: float) -> None:
    """``count`` clients, each awaiting the result of a job that never ends until
    ``end_at``: each one's hub reads the deployment's shared ends stream meanwhile (the
    job has no record), where the fleet's jobs, each ending on its service's own ends
    stream, no longer wake it."""
    clients = [AsyncHermesClient(settings) for _ in range(count)]
    waits = [
        asyncio.create_task(client.job(f"never-{uuid.uuid4().hex}").result(timeout=3600))
        for client in clients
    ]
    await asyncio.sleep(end_at - time.time())
    for wait in waits:
        wait.cancel()
    await asyncio.wait(waits, timeout=10)
    for client in clients:
        with contextlib.suppress(Exception):
            await client.aclose()


def ends_readers_process(settings: Settings, count: int, end_at: float) -> None:
    asyncio.run(ends_readers(settings, count, end_at))


def service_process(
    settings: Settings, args: argparse.Namespace, lanes: int, start_at: float, end_at: float,
    out: Any,
) -> None:  # fmt: skip
    out.send(asyncio.run(service(settings, args, lanes, start_at, end_at)))


def split_lanes(slots: int, services: int) -> list[int]:
    """The fleet's ``slots`` among ``services`` as evenly as they go."""
    share, extra = divmod(slots, services)
    return [share + (i < extra) for i in range(services)]


def drive(settings: list[Settings], args: argparse.Namespace, pids: list[int]) -> Level:
    """Each service in a process of its own (as services are: one client's XREADs wait
    for no other's CPU); measure over the window after the warm-up."""
    server = redis.Redis.from_url(settings[0].redis_url)
    start_at = time.time() + args.warmup_s
    end_at = start_at + args.window_s
    context = multiprocessing.get_context("fork")
    pipes, children = [], []
    services = args.services or len(settings)
    for lanes in split_lanes(args.slots * len(settings), services):
        receive, send = context.Pipe(duplex=False)
        work = (settings[0], args, lanes, start_at, end_at, send)
        child = context.Process(target=service_process, args=work)
        child.start()
        pipes.append(receive)
        children.append(child)
    if args.ends_readers:
        readers = (settings[0], args.ends_readers, end_at)
        children.append(context.Process(target=ends_readers_process, args=readers))
        children[-1].start()
    try:
        time.sleep(max(0.0, start_at - time.time()))
        before, workers_cpu = redis_sample(server), sum(map(proc_cpu_s, pids))
        time.sleep(max(0.0, end_at - time.time()))
        after, worker_cpu = redis_sample(server), sum(map(proc_cpu_s, pids)) - workers_cpu
        seen = [pipe.recv() for pipe in pipes]
    finally:
        for child in children:
            child.join(30)
            if child.is_alive():
                child.kill()
        server.close()
    commands = {}
    for name, now in after["cmd"].items():
        was = before["cmd"].get(name, {"calls": 0, "usec": 0})
        if now["calls"] > was["calls"]:
            commands[name] = {k: now[k] - was[k] for k in ("calls", "usec")}

    def total(name: str) -> float:
        return sum(one[name] for one in seen)

    return Level(
        workers=len(settings),
        services=services,
        window_s=args.window_s,
        redis_cpu_s=after["cpu_s"] - before["cpu_s"],
        jobs=round(total("jobs")),
        tokens=round(total("tokens")),
        failed=round(total("failed")),
        events=round(total("events")),
        worker_cpu_s=worker_cpu,
        harness_cpu_s=total("cpu_s"),
        hub_reads=round(total("hub_reads")),
        commands=commands,
    )


def worker_settings(args: argparse.Namespace, model: str, url: str, tag: str) -> Settings:
    return Settings(
        model=model,
        redis_url=url,
        key_prefix=f"hermes-fleet-{tag}:",
        queue_name=f"hermes-fleet-{tag}",
        engine="scripted",
        scripted_tokens_per_s=args.job_tokens_per_s,
        scripted_engine_tokens_per_s=args.engine_tokens_per_s,
        concurrency=args.slots,
        client_read_interval_ms=args.read_interval_ms,
        stream_max_flush_ms=args.max_flush_ms,
        max_model_len=args.job_tokens + 512,
        shutdown_grace_s=1.0,
    )


# Imported first by a worker started under host_clock: its time.monotonic runs ahead by
# FLEET_MONOTONIC_OFFSET_S, as another host's monotonic clock would (a shift of a constant
# changes no interval this process measures; what it changes is where its own steps fall
# against the other workers', such as its stream writer's flush grid without a measurement
# of Redis's clock).
HOST_CLOCK = """import os
import time

_offset = float(os.environ.get("FLEET_MONOTONIC_OFFSET_S") or 0)
if _offset:
    _monotonic = time.monotonic
    time.monotonic = lambda: _monotonic() + _offset
"""


@contextlib.contextmanager
def host_clock(tmp: Path, offset_s: float | None) -> Iterator[None]:
    """Start the processes made inside with their monotonic clock ``offset_s`` ahead
    (None: this host's own): a ``sitecustomize`` on their PYTHONPATH."""
    if offset_s is None:
        yield
        return
    shim = tmp / "host-clock"
    shim.mkdir(exist_ok=True)
    (shim / "sitecustomize.py").write_text(HOST_CLOCK)
    saved = {name: os.environ.get(name) for name in ("PYTHONPATH", "FLEET_MONOTONIC_OFFSET_S")}
    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(shim), saved["PYTHONPATH"]]))
    os.environ["FLEET_MONOTONIC_OFFSET_S"] = repr(offset_s)
    try:
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def run_level(args: argparse.Namespace, model: str, url: str, n: int, tmp: Path) -> Level:
    """``n`` workers on one queue (one deployment, as a fleet runs), and beside each its
    service: a client of its own (its own connection and hub, reading the deployment's one
    ends stream)."""
    tag = uuid.uuid4().hex[:8]
    base = worker_settings(args, model, url, tag)
    settings = [base] * n
    workers = []
    for i, one in enumerate(settings):
        with host_clock(tmp, None if args.same_clock else random.uniform(0, 1000)):
            workers.append(start_worker(one, tmp / f"worker-{tag}-{i}.log"))
    try:
        for worker in workers:
            worker.wait_ready(120)
        progress(f"{n} workers ready; load for {args.warmup_s + args.window_s:.0f} s")
        return drive(settings, args, [w.pid for w in workers])
    finally:
        for worker in workers:
            _stop(worker, grace=10)
        clean_redis(base)


# --- the report ----------------------------------------------------------------------------


def report(
    levels: list[Level], args: argparse.Namespace, command: str, reference: float | None
) -> str:
    target = args.engine_tokens_per_s
    lines = [
        "# A fleet of simulated GPU workers on one Redis",
        "",
        f"Each worker: {args.slots} slots sharing {target:,.0f} tokens/s (the scripted engine), "
        f"jobs of {args.job_tokens} tokens, {args.stream_share:.0%} of them streamed, the "
        f"others {'with' if args.awaited_stream else 'without'} their output written as it "
        f"comes (stream {str(args.awaited_stream).lower()}); {args.window_s:.0f} s measured "
        f"per level after {args.warmup_s:.0f} s of warm-up; the services' hubs read "
        f"{args.read_interval_ms:g} ms apart at least; streamed text written "
        f"{args.max_flush_ms:g} ms after it came at the latest; "
        + (
            "every worker on this host's monotonic clock (`--same-clock`)."
            if args.same_clock
            else "each worker's monotonic clock shifted by an offset of its own, as on "
            "separate hosts."
        ),
        "",
        f"    {command}",
        "",
        *(
            [
                f"This machine's speed: {reference:.0f} us of Redis CPU per round of the "
                "reference load (`reference_us`: a script writing four events to a stream "
                "another connection blocks on, that reader woken, a record read); Redis CPU "
                "per worker-second in those rounds (a figure that compares days): "
                + ", ".join(
                    f"{level.per_worker_s * 1e6 / reference:.0f} at {level.workers}"
                    for level in levels
                )
                + ".",
                "",
            ]
            if reference
            else []
        ),
        "| workers | services | tokens/s per worker (target) | jobs/s | Redis CPU (cores) "
        "| Redis CPU per worker-second (ms) | per 1k tokens (ms) | per job (ms) "
        "| commands per job | workers at 0.5 core | workers' CPU (cores) "
        "| clients' CPU (cores) | XREADs per client-second |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for level in levels:
        lines.append(
            f"| {level.workers} | {level.services} "
            f"| {level.tokens_per_worker_s:,.0f} ({target:,.0f}) "
            f"| {level.jobs / level.window_s:.1f} | {level.redis_core:.3f} "
            f"| {level.per_worker_s * 1e3:.1f} "
            f"| {level.redis_cpu_s / max(level.tokens, 1) * 1e6:.2f} "
            f"| {level.redis_cpu_s / max(level.jobs, 1) * 1e3:.3f} "
            f"| {level.calls / max(level.jobs, 1):.1f} "
            f"| {level.fleet_at_half_core(target):.0f} "
            f"| {level.worker_cpu_s / level.window_s:.2f} "
            f"| {level.harness_cpu_s / level.window_s:.2f} "
            f"| {level.hub_reads / level.window_s / level.services:.1f} |"
        )
    top = levels[-1]
    lines += [
        "",
        f"Commands per job at {top.workers} workers (calls; Redis's own microseconds per call "
        "and per job; a script's commands are inside its EVALSHA time):",
        "",
        "| command | calls per job | us per call | us per job |",
        "| --- | --- | --- | --- |",
    ]
    ranked = sorted(top.commands.items(), key=lambda item: -item[1]["usec"])
    for name, c in ranked:
        lines.append(
            f"| {name} | {c['calls'] / max(top.jobs, 1):.2f} "
            f"| {c['usec'] / max(c['calls'], 1):.1f} | {c['usec'] / max(top.jobs, 1):.1f} |"
        )
    return "\n".join(lines) + "\n"


@contextlib.contextmanager
def measured_redis(redis_url: str | None, tmp: Path) -> Iterator[tuple[str, float | None]]:
    """The Redis to load and this machine's speed on it: ``redis_url``, or a
    ``redis-server`` of its own (nothing else's load counts), measured first with the
    reference load (None on a Redis it does not own)."""
    if redis_url:
        yield redis_url, None
        return
    own = LocalRedis.start(tmp / "redis")
    try:
        reference = reference_us(own.url)
        progress(f"reference load: {reference:.0f} us of Redis CPU a round")
        yield own.url, reference
    finally:
        own.stop()


def write_outputs(path: str | None, text: str, data: dict[str, Any]) -> None:
    """The report as PATH.md and ``data`` as PATH.json, when a path is given."""
    if path:
        out = Path(path)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.with_suffix(".md").write_text(text)
        out.with_suffix(".json").write_text(json.dumps(data, indent=1) + "\n")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    command = "python benchmarks/fleet.py " + " ".join(sys.argv[1:] if argv is None else argv)
    levels = []
    with tempfile.TemporaryDirectory(prefix="hermes-fleet-") as tmp_name:
        tmp = Path(tmp_name)
        model = resolve_model(args.model, tmp)
        with measured_redis(args.redis_url, tmp) as (url, reference):
            for n in args.workers:
                level = run_level(args, model, url, n, tmp)
                levels.append(level)
                progress(
                    f"{n} workers: {level.tokens_per_worker_s:,.0f} tokens/s each, Redis "
                    f"{level.redis_core:.3f} cores, {level.per_worker_s * 1e3:.1f} ms per "
                    f"worker-second"
                )
    text = report(levels, args, command, reference)
    print(text)
    data = {
        "args": vars(args),
        "command": command,
        "reference_us": reference,
        "levels": [
            {**asdict(level), "per_worker_s": level.per_worker_s,
             "fleet_at_half_core": level.fleet_at_half_core(args.engine_tokens_per_s)}
            for level in levels
        ],
    }  # fmt: skip
    write_outputs(args.out, text, data)
    return 0


if __name__ == "__main__":
    sys.exit(main())
