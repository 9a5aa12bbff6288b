"""Logging: one structlog pipeline for our lines and for vLLM's, Celery's and kombu's.

* ``json`` (one JSON object per line: production, log shippers) or ``console`` (readable,
  coloured in a terminal). ``HERMES_LOG_FORMAT`` picks; by default a terminal gets
  ``console`` and anything else ``json``.
* Every line carries ``timestamp`` (UTC ISO 8601), ``level``, ``logger`` and ``worker``;
  the lines of a job also carry ``job_id`` and ``attempt`` (bound with :func:`job_context`,
  which survives the hop from a Celery thread to the runtime loop: asyncio copies the
  context into the task it runs).
* Standard-library loggers (vLLM, Celery, kombu, ours) are rendered by the same
  processors. vLLM configures logging in each of its processes (the engine core is
  spawned), so it is pointed at a logging config (``VLLM_LOGGING_CONFIG_PATH``) whose
  formatter is :func:`child_formatter`: the engine core's lines come out the same way.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import tempfile
from collections.abc import Iterator, MutableMapping
from contextlib import contextmanager
from typing import Any, Literal

import structlog

Format = Literal["json", "console"]
_FORMAT_ENV = "HERMES_LOG_FORMAT"
_WORKER_ENV = "HERMES_LOG_WORKER"  # passed to vLLM's processes with the format


def log_format(requested: str | None = None) -> Format:
    value = (requested or os.environ.get(_FORMAT_ENV) or "").lower()
    if value in ("json", "console"):
        return value  # type: ignore[return-value]
    if value:
        raise ValueError(f"{_FORMAT_ENV} must be json or console, not {value!r}")
    return "console" if sys.stderr.isatty() else "json"


def _static(**fields: Any) -> Any:
    def add(_: Any, __: str, event: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
        for key, value in fields.items():
            event.setdefault(key, value)
        return event

    return add


def _shared(worker: str | None) -> list[Any]:
    chain: list[Any] = [
        structlog.contextvars.merge_contextvars,
        structlog.stdlib.add_logger_name,
        structlog.stdlib.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
    ]
    if worker:
        chain.append(_static(worker=worker))
    return chain


def make_formatter(fmt: Format, worker: str | None) -> structlog.stdlib.ProcessorFormatter:
    renderer: Any
    tail: list[Any] = [structlog.stdlib.ProcessorFormatter.remove_processors_meta]
    if fmt == "json":
        tail += [structlog.processors.format_exc_info, structlog.processors.EventRenamer("msg")]
        renderer = structlog.processors.JSONRenderer(default=str)
    else:
        renderer = structlog.dev.ConsoleRenderer(colors=sys.stderr.isatty())
    return structlog.stdlib.ProcessorFormatter(
        foreign_pre_chain=_shared(worker), processors=[*tail, renderer]
    )


def configure_logging(
    level: str | int = "INFO", fmt: str | None = None, worker: str | None = None
) -> Format:
    """Route every logger of this process (and of vLLM's children) through structlog."""
    chosen = log_format(fmt)
    structlog.configure(
        processors=[
            *_shared(worker),
            structlog.stdlib.PositionalArgumentsFormatter(),
            structlog.processors.StackInfoRenderer(),
            structlog.stdlib.ProcessorFormatter.wrap_for_formatter,
        ],
        logger_factory=structlog.stdlib.LoggerFactory(),
        wrapper_class=structlog.stdlib.BoundLogger,
        cache_logger_on_first_use=True,
    )
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(make_formatter(chosen, worker))
    root = logging.getLogger()
    root.handlers = [handler]
    root.setLevel(level)
    # vLLM (already imported here) gave its logger a handler of its own: use ours instead.
    vllm = logging.getLogger("vllm")
    vllm.handlers = []
    vllm.propagate = True
    _configure_vllm_children(chosen, worker, level)
    return chosen


def _configure_vllm_children(fmt: Format, worker: str | None, level: str | int) -> None:
    os.environ[_FORMAT_ENV] = fmt
    if worker:
        os.environ[_WORKER_ENV] = worker
    config = {
        "version": 1,
        "disable_existing_loggers": False,
        "formatters": {"hermes": {"()": "hermes_worker.worker.logs.child_formatter"}},
        "handlers": {
            "hermes": {
                "class": "logging.StreamHandler",
                "formatter": "hermes",
                "stream": "ext://sys.stderr",
            }
        },
        "loggers": {
            "vllm": {
                "handlers": ["hermes"],
                "level": logging.getLevelName(level) if isinstance(level, int) else level,
                "propagate": False,
            }
        },
    }
    fd, path = tempfile.mkstemp(prefix="hermes-vllm-logging-", suffix=".json")
    with os.fdopen(fd, "w") as file:
        json.dump(config, file)
    os.environ["VLLM_CONFIGURE_LOGGING"] = "1"
    os.environ["VLLM_LOGGING_CONFIG_PATH"] = path


def child_formatter() -> logging.Formatter:
    """The formatter vLLM's processes build from the config above (dictConfig ``()``)."""
    return make_formatter(log_format(), os.environ.get(_WORKER_ENV))


@contextmanager
def job_context(**fields: Any) -> Iterator[None]:
    """Bind fields (``job_id``, ``attempt``) to every log line in this context."""
    with structlog.contextvars.bound_contextvars(**fields):
        yield


def get_logger(name: str) -> Any:
    return structlog.stdlib.get_logger(name)
