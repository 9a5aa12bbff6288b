"""Command-line flags made from the :class:`Settings` fields, so that a flag's name, type and
help have one home: the field. ``hermes-worker run`` and ``hermes-worker demo`` take their
engine flags from here; each flag left out keeps the environment's value or the default."""

from __future__ import annotations

import types
from collections.abc import Callable, Mapping
from typing import Any, Literal, TypeVar, Union, get_args, get_origin

import click

from hermes_worker.settings import Settings

F = TypeVar("F", bound=Callable[..., Any])

# Flags whose name is not the field's (a shorter or older spelling users already type).
FLAG_NAMES: Mapping[str, str] = {
    "scripted_tokens_per_s": "--tokens-per-s",
    "scripted_engine_tokens_per_s": "--engine-tokens-per-s",
    "enable_prefix_caching": "--prefix-caching/--no-prefix-caching",
    "enforce_eager": "--enforce-eager/--compile",
}

# Settings that take text on the command line and parse it themselves (a size: 2GiB).
TEXT_SETTINGS = frozenset({"kv_cache_memory"})


def env_var(name: str) -> str:
    """The environment variable of the setting ``name``."""
    prefix = Settings.model_config.get("env_prefix", "")
    return f"{prefix}{name}".upper()


def _click_type(annotation: Any) -> Any:
    args = [a for a in get_args(annotation) if a is not type(None)]
    if get_origin(annotation) in (Union, types.UnionType) and len(args) == 1:
        return _click_type(args[0])
    if get_origin(annotation) is Literal:
        return click.Choice([str(a) for a in get_args(annotation)])
    if annotation in (int, float, bool):
        return annotation
    return str  # sizes and names: Settings parses and validates them


def settings_option(name: str, help_text: str | None = None) -> Callable[[F], F]:
    """A click option for the setting ``name``, passed to the command as ``name`` (None when
    left out); ``help_text`` replaces the field's description."""
    field = Settings.model_fields[name]
    kind = str if name in TEXT_SETTINGS else _click_type(field.annotation)
    flag = FLAG_NAMES.get(name) or "--" + name.replace("_", "-")
    if kind is bool and "/" not in flag:
        flag = f"{flag}/--no-{flag.removeprefix('--')}"
    text = help_text or field.description or name.replace("_", " ").capitalize() + "."
    return click.option(
        flag, name, type=None if kind is bool else kind, default=None,
        help=f"{text} [{env_var(name)}]",
    )  # fmt: skip


def settings_options(*names: str, helps: Mapping[str, str] | None = None) -> Callable[[F], F]:
    """Options for several settings, listed in ``--help`` in the order given."""

    def decorate(func: F) -> F:
        for name in reversed(names):
            func = settings_option(name, (helps or {}).get(name))(func)
        return func

    return decorate


def given(flags: Mapping[str, Any]) -> dict[str, Any]:
    """The settings the command line set: what ``settings_options`` passed, less the Nones."""
    return {name: value for name, value in flags.items() if value is not None}
