"""The CLI's one error handler: every command ends on one ``Error: <type>: <message>`` line,
never a traceback, with the exit status the README documents."""

from __future__ import annotations

from collections.abc import Callable
from functools import wraps
from typing import Any, TypeVar

import click

from hermes_worker.errors import HermesError

F = TypeVar("F", bound=Callable[..., Any])


class OneLine(click.ClickException):
    """``Error: …`` on one line whatever the message holds; exit status 1."""

    def __init__(self, message: str) -> None:
        super().__init__(" ".join(message.split()))


class TimedOut(OneLine):
    """Waiting for a job gave up before it ended."""

    exit_code = 2


class NotFinished(OneLine):
    """The job has no result yet and the caller would not wait."""

    exit_code = 3


def one_line_errors(func: F) -> F:
    """Our errors as ``<type>: <message>`` (exit 1), a wait that timed out as ``timeout``
    (exit 2), and Redis out of reach as ``redis_error`` (exit 1)."""

    @wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        from kombu.exceptions import OperationalError
        from redis.exceptions import RedisError

        try:
            return func(*args, **kwargs)
        except HermesError as exc:
            raise OneLine(f"{exc.type}: {exc.message}") from exc
        except TimeoutError as exc:
            raise TimedOut(f"timeout: {exc}") from exc
        except (RedisError, OperationalError) as exc:
            raise OneLine(f"redis_error: {type(exc).__name__}: {exc}") from exc

    return wrapper  # type: ignore[return-value]
