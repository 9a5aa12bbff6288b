"""Command-line flags made from the Settings fields: names, types, help and what they pass."""

from __future__ import annotations

from typing import Any

import click
import pytest
from click.testing import CliRunner

from hermes_worker.cli.options import env_var, given, settings_options
from hermes_worker.settings import Settings
from hermes_worker.worker.main import run_command

NAMES = ("max_num_seqs", "kv_cache_memory", "engine", "enable_prefix_caching", "quantization")


@click.command()
@settings_options(*NAMES)
def echo(**flags: Any) -> None:
    settings = Settings(**given(flags))
    click.echo(repr({name: getattr(settings, name) for name in given(flags)}))


def invoke(*args: str) -> str:
    result = CliRunner().invoke(echo, list(args), env={}, catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return result.output.strip()


def test_flags_reach_their_settings_typed() -> None:
    # Given flags of each kind: an int, a size as text, a choice, a bool pair, a string
    out = invoke(
        "--max-num-seqs", "8", "--kv-cache-memory", "2GiB", "--engine", "scripted",
        "--no-prefix-caching", "--quantization", "fp8",
    )  # fmt: skip
    # Then each reaches its setting, parsed as the setting parses it
    assert out == repr(
        {
            "max_num_seqs": 8,
            "kv_cache_memory": 2 << 30,
            "engine": "scripted",
            "enable_prefix_caching": False,
            "quantization": "fp8",
        }
    )


def test_a_flag_left_out_is_not_passed() -> None:
    assert invoke("--max-num-seqs", "4") == repr({"max_num_seqs": 4})


def test_a_choice_outside_the_settings_values_is_refused() -> None:
    result = CliRunner().invoke(echo, ["--engine", "tpu"])
    assert result.exit_code == 2 and "'tpu' is not one of 'vllm', 'scripted'" in result.output


@pytest.mark.parametrize("name", sorted(Settings.model_fields))
def test_env_var_names_follow_the_settings_prefix(name: str) -> None:
    assert env_var(name) == f"HERMES_{name.upper()}"


def test_run_help_names_every_flags_env_var() -> None:
    # Given the worker's command, every option made from a setting names its variable
    params = [p for p in run_command.params if p.name in Settings.model_fields]
    assert len(params) >= 15
    for param in params:
        assert isinstance(param, click.Option)
        assert param.help and param.help.endswith(f"[{env_var(str(param.name))}]"), param.name
