"""benchmarks/notice_storm.py's own parts: the virtual fleet's jobs and flushes (through the
real WRITE script, on a real Redis) and the report. The storm itself is run by hand
(benchmarks/README.md)."""

from __future__ import annotations

import json

import redis
from test_benchmark_script import _load

from hermes_worker.contract import scripts
from hermes_worker.contract.store import Keys

storm = _load("notice_storm")


def test_every_job_of_the_virtual_fleet_has_one_client_and_is_written_once_in_its_round(
) -> None:  # fmt: skip
    args = storm.parse_args(["--workers", "6", "--jobs", "10", "--clients", "4"])
    fleet = storm.Fleet.make(args, "p:")
    # Then the clients' jobs are all the fleet's jobs, each once
    every = [fleet.job_id(w, i) for w in range(6) for i in range(10)]
    owned = [job for client in range(4) for job in fleet.jobs_of(client)]
    assert sorted(owned) == sorted(every)
    # And over flush_every steps each worker writes each of its jobs once
    for w in range(6):
        written = [i for step in range(100, 105) for i in fleet.due(w, step, 5)]
        assert sorted(written) == list(range(10))


def test_a_virtual_flush_goes_through_write_and_names_each_client_once(
    keys: Keys, redis_client: redis.Redis
) -> None:
    args = storm.parse_args(["--workers", "2", "--jobs", "6", "--clients", "3"])
    fleet = storm.Fleet.make(args, keys.prefix)
    write = redis_client.register_script(scripts.WRITE)
    for i in range(6):
        redis_client.set(keys.lease(fleet.job_id(1, i)), "token")
    seqs = [[0] * 6 for _ in range(2)]
    # When worker 1 flushes all its jobs twice
    for _ in range(2):
        call_keys, call_args = storm.flush_call(fleet, 1, list(range(6)), seqs)
        assert write(keys=call_keys, args=call_args) == [1] * 6
    # Then each job's stream holds seqs 1 and 2
    for i in range(6):
        entries = redis_client.xrange(keys.events(fleet.job_id(1, i)))
        assert [int(fields[b"seq"]) for _, fields in entries] == [1, 2]
    # And each client its jobs came from has one notice a flush, naming its jobs, carrying
    # their events
    for client in range(3):
        mine = [fleet.job_id(1, i) for i in range(6) if fleet.owner[1][i] == client]
        notices = redis_client.xrange(fleet.notices(client))
        if not mine:
            assert notices == []
            continue
        assert [fields[b"ids"].decode().split() for _, fields in notices] == [mine, mine]
        carried = [k.decode() for k in notices[0][1] if k != b"ids"]
        assert sorted(name.split()[0] for name in carried) == sorted(mine)
        assert all(json.loads(notices[0][1][k.encode()]) for k in carried)


def test_the_report_gives_what_each_interval_saves_against_the_first() -> None:
    args = storm.parse_args(["--intervals", "0,50"])

    def level(interval_ms: float, cpu_s: float, reads: int) -> object:
        return storm.Level(
            interval_ms=interval_ms, window_s=10.0, readers=8, redis_cpu_s=cpu_s, writes=10_000,
            notices=10_000, hub_reads=reads, events=10_400, readers_cpu_s=2.0, xread_calls=reads,
            xread_usec=reads * 30,
        )  # fmt: skip

    # Given 8 readers that read 3,000 times in 10 s unpaced, 1,600 paced, for 0.04 s of
    # Redis CPU less
    text = storm.report([level(0, 2.70, 3000), level(50, 2.66, 1600)], args, "cmd", 120.0)
    # Then the rows give the reads per reader-second and per notice, and the CPU saved
    # per reader-second: 0.04 s / 10 s / 8 = 0.5 ms
    # and Redis's own XREAD time per reader-second: 3,000 x 30 us / 10 s / 8 = 1.125 ms
    assert "| 0 | 1,000 | 0.270 | 125.0 | 37.5 | 130.0 | 0.30 | 1.12 | 0.00 | 0.20 |" in text
    assert "| 50 | 1,000 | 0.266 | 125.0 | 20.0 | 130.0 | 0.16 | 0.60 | 0.50 | 0.20 |" in text
