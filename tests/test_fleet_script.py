"""benchmarks/fleet.py's own parts: the reference load (on a real Redis) and the report. The
fleet itself is run by hand (benchmarks/README.md)."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import redis
from conftest import TEST_REDIS_URL
from test_benchmark_script import _load

fleet = _load("fleet")


def test_the_reference_load_measures_redis_cpu_and_leaves_no_key(
    redis_client: redis.Redis,
) -> None:
    # When the reference load runs on a Redis
    us = fleet.reference_us(TEST_REDIS_URL, rounds=200, runs=1)
    # Then it gives Redis's CPU per round (a script, a woken reader, a read: microseconds to
    # a few milliseconds on any machine) and leaves none of its keys behind
    assert 1.0 < us < 10_000.0
    assert list(redis_client.scan_iter("hermes-fleet-reference*")) == []


def test_the_report_gives_the_fleets_cost_in_reference_rounds() -> None:
    args = fleet.parse_args(["--workers", "4"])
    level = fleet.Level(
        workers=4, services=4, window_s=10.0, redis_cpu_s=0.4, jobs=160, tokens=80_000, failed=0,
        events=0, worker_cpu_s=1.0, harness_cpu_s=1.0, hub_reads=800,
    )  # fmt: skip
    # Given 4 workers costing Redis 10 ms a worker-second, on a machine where a reference
    # round costs 50 us
    text = fleet.report([level], args, "python benchmarks/fleet.py --workers 4", 50.0)
    # Then the report gives both, and the cost in rounds: 10,000 us / 50 us = 200
    assert "50 us of Redis CPU per round" in text
    assert "200 at 4" in text
    assert "| 4 | 4 | 2,000 (2,000) | 16.0 | 0.040 | 10.0 |" in text
    # And without a reference (a Redis the benchmark does not own) it says nothing of it
    assert "per round" not in fleet.report([level], args, "cmd", None)


def test_the_fleets_slots_are_split_among_its_services_as_evenly_as_they_go() -> None:
    # Given 4 workers of 256 slots and 25 services, each keeping its share of them full
    lanes = fleet.split_lanes(4 * 256, 25)
    # Then every slot has a lane, and no service has more than one lane more than another
    assert sum(lanes) == 1024
    assert len(lanes) == 25
    assert max(lanes) - min(lanes) == 1
    # And one service per worker keeps each worker's worth
    assert fleet.split_lanes(4 * 256, 4) == [256] * 4


def test_a_process_started_under_another_hosts_clock_runs_its_monotonic_clock_ahead(
    tmp_path: Path,
) -> None:
    probe = [sys.executable, "-c", "import time; print(time.monotonic())"]
    # When a process starts under a host clock 500 s ahead, and another under this host's
    with fleet.host_clock(tmp_path, 500.0):
        ahead = float(subprocess.run(probe, capture_output=True, check=True, text=True).stdout)
    with fleet.host_clock(tmp_path, None):
        own = float(subprocess.run(probe, capture_output=True, check=True, text=True).stdout)
    # Then the first read its clock 500 s ahead of ours, the second as ours (a process start
    # apart), and this process's environment is as it was
    now = time.monotonic()
    assert 499.0 < ahead - now <= 500.0
    assert -5.0 < own - now <= 0.0
    assert "FLEET_MONOTONIC_OFFSET_S" not in os.environ
    assert str(tmp_path) not in os.environ.get("PYTHONPATH", "")
