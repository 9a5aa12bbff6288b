"""What fencing stream writes costs Redis: one Lua call that checks the lease, next to a bare
XADD.

Every stream write of an attempt goes through ``contract.scripts.WRITE``, which checks that
the job's lease still holds the attempt's token before it writes (docs/reliability.md,
"Fenced writes"). This starts a private ``redis-server`` and writes ``--writes`` events of a
16-token text, ``--jobs`` jobs per flush, as bare ``XADD`` (a pipeline), through the script
once per job (a pipeline of calls, as the stream writer did before 2026-12-04) and through
one call of the script for the flush's jobs (``batched``: as the writer does now),
alternating over ``--rounds``, and prints the Redis CPU (``INFO cpu``) per write of each.

    python benchmarks/fenced_writes.py --writes 20000 --jobs 64 --rounds 2
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import redis

from hermes_worker.cli.services import LocalRedis
from hermes_worker.contract import scripts
from hermes_worker.contract.store import encode_event


def redis_cpu_s(client: redis.Redis) -> float:
    info = client.info("cpu")
    return float(info["used_cpu_user"]) + float(info["used_cpu_sys"])


def write_all(client: redis.Redis, way: str, writes: int, jobs: int) -> float:
    """Redis CPU seconds for ``writes`` events written ``way`` (``xadd``, ``script`` or
    ``batched``)."""
    fenced = client.register_script(scripts.WRITE)
    client.set("lease", "token")
    client.delete(*(f"events:{j}" for j in range(jobs)))
    before = redis_cpu_s(client)
    for batch in range(writes // jobs):
        pipe = client.pipeline(transaction=False)
        keys: list[str] = ["ends"]
        args: list[object] = [60]
        for job in range(jobs):
            fields = encode_event(batch + 1, "content", {"text": "word " * 16})
            if way == "xadd":
                pipe.xadd(f"events:{job}", fields)  # type: ignore[arg-type]
                continue
            keys += ["lease", f"record:{job}", f"events:{job}"]
            args += ["token", "", 4, "x", fields["seq"], fields["type"], fields["data"]]
            if way == "script":
                fenced(keys=keys, args=args, client=pipe)
                keys, args = ["ends"], [60]
        if way == "batched":
            fenced(keys=keys, args=args, client=pipe)
        pipe.execute()
    return redis_cpu_s(client) - before


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--writes", type=int, default=20000)
    parser.add_argument("--jobs", type=int, default=64, help="jobs per pipeline")
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as directory:
        server = LocalRedis.start(Path(directory))
        try:
            client = redis.Redis.from_url(server.url)
            for turn in range(args.rounds):
                for way in ("xadd", "script", "batched"):
                    used = write_all(client, way, args.writes, args.jobs)
                    per_write_us = used / args.writes * 1e6
                    print(f"round {turn + 1} {way:6s} {per_write_us:5.1f} us of Redis CPU a write")
        finally:
            server.stop()


if __name__ == "__main__":
    main()
