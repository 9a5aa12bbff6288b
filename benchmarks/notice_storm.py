"""What a client's hub costs Redis when its jobs run on a large fleet: the notice storm.

A worker's flush names each client one of its jobs came from on that client's notice stream,
and the fleet's workers flush on the same grid steps (on Redis's clock, every
``HERMES_STREAM_MAX_FLUSH_MS`` / 5). On a fleet of 100 workers with 100 clients, each flush
names about 12 clients, so at each step each client is named by about 12 workers' flushes,
which reach Redis one after another over the milliseconds Redis takes to run them all. A hub
that reads again as soon as it has handed out what it read may wake several times a step;
benchmarks/fleet.py, which drives 4 real workers on this 2-core machine, never sees more
than 4 notices a client and step. This benchmark makes the storm without the workers:

``--workers`` virtual workers (one asyncio process, a connection each) each hold ``--jobs``
streamed jobs, each of one of ``--clients`` clients at random, under a lease; at each grid
step (``--grid-ms``, on this host's clock; each worker within ``--spread-ms`` of it) a
worker writes the events of the jobs due (each job every ``--flush-every`` steps: 500 ms at
the defaults, a streamed job's pace at a GPU node's 2,000 tokens/s over 256 slots) through
the production ``WRITE`` script, whose notices carry them. ``--readers`` of the clients run
a real ``StreamHub`` each (a process of its own), following all their jobs by notice, at
each hub read interval of ``--intervals`` (``HERMES_CLIENT_READ_INTERVAL_MS``) in turn. The
other clients' notices are written and not read (their cost is the same at every
interval). Measured over ``--window-s``: Redis's CPU, the readers' XREADs and events a
second, the notices that named them, and Redis's own time in XREAD (``INFO commandstats``;
a read's round trip costs Redis about as much again). The Redis CPU between two intervals,
over the readers, is what the pacing saves a client-second (a fleet with a client per
worker saves it per worker-second); with 8 readers it is within the noise of the writes'
CPU on a 2-core machine, and the XREAD time is the steadier figure.

    python benchmarks/notice_storm.py --intervals 0,20 --out docs/benchmarks/notice-storm
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing
import random
import sys
import tempfile
import time
import uuid
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import redis
from fleet import measured_redis, proc_cpu_s, redis_sample, write_outputs
from redis.asyncio import Redis as AsyncRedis
from serving import progress

from hermes_worker.contract import scripts
from hermes_worker.contract.store import Keys, encode_event
from producers.hub import StreamHub

TEXT = " a few words of a story"  # one flush's text: about 4 tokens


def _float_list(text: str) -> list[float]:
    values = [float(part) for part in text.split(",") if part.strip()]
    if not values or min(values) < 0:
        raise argparse.ArgumentTypeError("a comma-separated list of numbers >= 0")
    return values


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--workers", type=int, default=100, help="virtual workers")
    parser.add_argument("--clients", type=int, default=100, help="clients the jobs come from")
    parser.add_argument("--readers", type=int, default=8, help="clients that run a hub")
    parser.add_argument("--jobs", type=int, default=64, help="streamed jobs per worker")
    parser.add_argument("--grid-ms", type=float, default=100.0, help="the flush grid's step")
    parser.add_argument("--flush-every", type=int, default=5, help="steps between a job's writes")
    parser.add_argument(
        "--spread-ms", type=float, default=2.0, help="a worker's flush lands this far past a step"
    )
    parser.add_argument(
        "--intervals", type=_float_list, default=[0.0, 20.0], help="hub read intervals (ms)"
    )
    parser.add_argument("--warmup-s", type=float, default=5.0)
    parser.add_argument("--window-s", type=float, default=20.0)
    parser.add_argument("--redis-url", default=None, help="default: a redis-server of its own")
    parser.add_argument("--out", default=None, help="write PATH.json and PATH.md")
    return parser.parse_args(argv)


@dataclass
class Fleet:
    """The virtual fleet's jobs: ``owner[w][i]`` is the client of worker w's job i."""

    keys: Keys
    workers: int
    jobs: int
    clients: int
    owner: list[list[int]]

    @classmethod
    def make(cls, args: argparse.Namespace, prefix: str, seed: int = 7) -> Fleet:
        rng = random.Random(seed)
        owner = [
            [rng.randrange(args.clients) for _ in range(args.jobs)] for _ in range(args.workers)
        ]
        return cls(Keys(prefix), args.workers, args.jobs, args.clients, owner)

    @property
    def prefix(self) -> str:
        return self.keys.prefix

    def job_id(self, worker: int, job: int) -> str:
        return f"w{worker}-j{job}"

    def due(self, worker: int, step: int, every: int) -> list[int]:
        """The jobs of ``worker`` written at grid ``step``: each every ``every`` steps, the
        workers' jobs out of step with each other's."""
        return [i for i in range(self.jobs) if (i + worker) % every == step % every]

    def notices(self, client: int) -> str:
        return self.keys.notices(self.keys.ends_for(f"storm-{client}"))

    def jobs_of(self, client: int) -> list[str]:
        return [
            self.job_id(w, i)
            for w in range(self.workers)
            for i in range(self.jobs)
            if self.owner[w][i] == client
        ]


@dataclass
class Level:
    interval_ms: float
    window_s: float
    readers: int
    redis_cpu_s: float
    writes: int
    notices: int  # notices that named a reader
    hub_reads: int
    events: int
    readers_cpu_s: float
    xread_calls: int
    xread_usec: int

    def per_reader_s(self, value: float) -> float:
        return value / self.window_s / max(self.readers, 1)


# --- the writers ---------------------------------------------------------------------------


def flush_call(
    fleet: Fleet, worker: int, due: list[int], seqs: list[list[int]]
) -> tuple[list[str], list[Any]]:
    """A worker's flush of one event for each job ``due`` (their next seqs), as WRITE's
    keys and arguments."""
    keys = fleet.keys
    call_keys: list[str] = [keys.ends]
    args: list[Any] = [3600]
    for i in due:
        job_id = fleet.job_id(worker, i)
        seqs[worker][i] += 1
        fields = encode_event(seqs[worker][i], "content", {"text": TEXT})
        ops = ["x", fields["seq"], fields["type"], fields["data"]]
        call_keys += [keys.lease(job_id), keys.job(job_id), keys.events(job_id)]
        args += ["token", fleet.notices(fleet.owner[worker][i]), len(ops), *ops]
    return call_keys, args


async def write_fleet(
    url: str, fleet: Fleet, args: argparse.Namespace, readers: set[int], end_at: float,
    start_at: float,
) -> dict[str, int]:  # fmt: skip
    """Every virtual worker's flushes until ``end_at``; the writes and the notices naming a
    reader between ``start_at`` and ``end_at``."""
    seqs = [[0] * fleet.jobs for _ in range(fleet.workers)]
    tally = {"writes": 0, "notices": 0}
    step_s = args.grid_ms / 1000

    async def worker(w: int) -> None:
        client = AsyncRedis.from_url(url)
        write = client.register_script(scripts.WRITE)
        offset = random.uniform(0, args.spread_ms / 1000)
        try:
            while True:
                now = time.time()
                step = int(now / step_s) + 1
                if step * step_s >= end_at:
                    return
                await asyncio.sleep(step * step_s + offset - now)
                due = fleet.due(w, step, args.flush_every)
                if not due:
                    continue
                call_keys, call_args = flush_call(fleet, w, due, seqs)
                await write(keys=call_keys, args=call_args)
                if start_at <= time.time() < end_at:
                    tally["writes"] += 1
                    tally["notices"] += len({fleet.owner[w][i] for i in due} & readers)
        finally:
            await client.aclose()

    await asyncio.gather(*(worker(w) for w in range(fleet.workers)))
    return tally


def writer_process(url: str, fleet: Fleet, args: argparse.Namespace, readers: set[int],
                   start_at: float, end_at: float, out: Any) -> None:  # fmt: skip
    out.send(asyncio.run(write_fleet(url, fleet, args, readers, end_at, start_at)))


# --- the readers ---------------------------------------------------------------------------


async def read_client(
    url: str, fleet: Fleet, client: int, interval_s: float, ready: Any, start_at: float,
    end_at: float,
) -> dict[str, float]:  # fmt: skip
    """One client's hub following all its jobs by notice; its reads and events in the window."""
    connection = AsyncRedis.from_url(url)
    hub = StreamHub(connection, fleet.prefix, block_s=5.0, count=256, interval_s=interval_s)
    subs = [
        await hub.follow(fleet.keys.events(job), "0-0", notices=fleet.notices(client), job_id=job)
        for job in fleet.jobs_of(client)
    ]
    ready.release()
    counted = {"events": 0}

    async def consume(sub: Any) -> None:
        while True:
            batch = await sub.get(5.0)
            if start_at <= time.time() < end_at:
                counted["events"] += len(batch)

    tasks = [asyncio.create_task(consume(sub)) for sub in subs]
    await asyncio.sleep(start_at - time.time())
    reads, cpu = hub.reads, time.process_time()
    await asyncio.sleep(end_at - time.time())
    reads, cpu = hub.reads - reads, time.process_time() - cpu
    for task in tasks:
        task.cancel()
    await asyncio.wait(tasks, timeout=5)
    await hub.aclose()
    await connection.aclose()
    return {"reads": reads, "events": counted["events"], "cpu_s": cpu, "jobs": len(subs)}


def reader_process(url: str, fleet: Fleet, client: int, interval_s: float, ready: Any,
                   start_at: float, end_at: float, out: Any) -> None:  # fmt: skip
    out.send(asyncio.run(read_client(url, fleet, client, interval_s, ready, start_at, end_at)))


# --- a level -------------------------------------------------------------------------------


def run_level(args: argparse.Namespace, url: str, interval_ms: float) -> Level:
    fleet = Fleet.make(args, f"hermes-storm-{uuid.uuid4().hex[:8]}:")
    server = redis.Redis.from_url(url)
    with server.pipeline(transaction=False) as pipe:
        for w in range(fleet.workers):
            for i in range(fleet.jobs):
                pipe.set(fleet.keys.lease(fleet.job_id(w, i)), "token", ex=3600)
        pipe.execute()
    readers = list(range(args.readers))
    context = multiprocessing.get_context("fork")
    ready = context.Semaphore(0)
    # Far enough ahead for the readers to follow their jobs first.
    begin = time.time() + 3.0
    start_at, end_at = begin + args.warmup_s, begin + args.warmup_s + args.window_s
    pipes, children = [], []
    for client in readers:
        receive, send = context.Pipe(duplex=False)
        work = (url, fleet, client, interval_ms / 1000, ready, start_at, end_at, send)
        children.append(context.Process(target=reader_process, args=work))
        pipes.append(receive)
    receive, send = context.Pipe(duplex=False)
    work = (url, fleet, args, set(readers), start_at, end_at, send)
    writer = context.Process(target=writer_process, args=work)
    try:
        for child in children:
            child.start()
        for _ in children:
            ready.acquire(timeout=60)
        writer.start()
        time.sleep(max(0.0, start_at - time.time()))
        before = redis_sample(server)
        pids = [child.pid for child in children]
        readers_cpu = sum(proc_cpu_s(pid) for pid in pids if pid)
        time.sleep(max(0.0, end_at - time.time()))
        after = redis_sample(server)
        readers_cpu = sum(proc_cpu_s(pid) for pid in pids if pid) - readers_cpu
        seen = [pipe.recv() for pipe in pipes]
        written = receive.recv()
    finally:
        for child in [*children, writer]:
            child.join(30)
            if child.is_alive():
                child.kill()
        for key in server.scan_iter(f"{fleet.prefix}*", count=1000):
            server.delete(key)
        server.close()
    xread_now = after["cmd"].get("xread", {"calls": 0, "usec": 0})
    xread_was = before["cmd"].get("xread", {"calls": 0, "usec": 0})
    return Level(
        interval_ms=interval_ms,
        window_s=args.window_s,
        readers=len(readers),
        redis_cpu_s=after["cpu_s"] - before["cpu_s"],
        writes=written["writes"],
        notices=written["notices"],
        hub_reads=round(sum(one["reads"] for one in seen)),
        events=round(sum(one["events"] for one in seen)),
        readers_cpu_s=readers_cpu,
        xread_calls=xread_now["calls"] - xread_was["calls"],
        xread_usec=xread_now["usec"] - xread_was["usec"],
    )


# --- the report ----------------------------------------------------------------------------


def report(
    levels: list[Level], args: argparse.Namespace, command: str, reference: float | None
) -> str:
    base = levels[0]
    lines = [
        "# The notice storm: a client's hub on a large fleet",
        "",
        f"{args.workers} virtual workers, {args.jobs} streamed jobs each, of {args.clients} "
        f"clients; a flush every {args.grid_ms:g} ms step (within {args.spread_ms:g} ms), "
        f"each job written every {args.flush_every} steps; {args.readers} of the clients "
        f"read, each with a hub of its own; {args.window_s:g} s measured after "
        f"{args.warmup_s:g} s.",
        "",
        f"    {command}",
        "",
        *(
            [f"This machine's speed: {reference:.0f} us of Redis CPU per reference round.", ""]
            if reference
            else []
        ),
        "| hub read interval (ms) | writes/s | Redis CPU (cores) | notices per reader-second "
        "| XREADs per reader-second | events per reader-second | XREADs per notice "
        "| XREAD time per reader-second (ms) | Redis CPU saved per reader-second (ms) "
        "| readers' CPU (cores) |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for level in levels:
        saved = (base.redis_cpu_s - level.redis_cpu_s) / level.window_s / max(level.readers, 1)
        lines.append(
            f"| {level.interval_ms:g} | {level.writes / level.window_s:,.0f} "
            f"| {level.redis_cpu_s / level.window_s:.3f} "
            f"| {level.per_reader_s(level.notices):.1f} "
            f"| {level.per_reader_s(level.hub_reads):.1f} "
            f"| {level.per_reader_s(level.events):.1f} "
            f"| {level.hub_reads / max(level.notices, 1):.2f} "
            f"| {level.per_reader_s(level.xread_usec) / 1e3:.2f} "
            f"| {saved * 1e3:.2f} "
            f"| {level.readers_cpu_s / level.window_s:.2f} |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    command = "python benchmarks/notice_storm.py " + " ".join(
        sys.argv[1:] if argv is None else argv
    )
    levels = []
    with (
        tempfile.TemporaryDirectory(prefix="hermes-storm-") as tmp_name,
        measured_redis(args.redis_url, Path(tmp_name)) as (url, reference),
    ):
        for interval_ms in args.intervals:
            level = run_level(args, url, interval_ms)
            levels.append(level)
            progress(
                f"interval {interval_ms:g} ms: Redis {level.redis_cpu_s / level.window_s:.3f} "
                f"cores, {level.per_reader_s(level.hub_reads):.1f} XREADs per reader-second"
            )
    text = report(levels, args, command, reference)
    print(text)
    data = {
        "args": vars(args),
        "command": command,
        "reference_us": reference,
        "levels": [asdict(level) for level in levels],
    }
    write_outputs(args.out, text, data)
    return 0


if __name__ == "__main__":
    sys.exit(main())
