"""``hermes-worker bench``: the serving benchmark (``benchmarks/serving.py``) from the CLI.

The benchmark is a plain script in the source checkout, next to this package, so that it
runs without pytest or the CLI; this command finds it and hands the arguments over."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import click

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "serving.py"


@click.command(
    "bench",
    context_settings={"ignore_unknown_options": True, "help_option_names": []},
    add_help_option=False,
)
@click.argument("args", nargs=-1, type=click.UNPROCESSED)
def bench(args: tuple[str, ...]) -> None:
    """Direct engine, vllm serve, the queue, the gateway, side by side (``bench --help``)."""
    if not SCRIPT.is_file():
        raise click.ClickException(
            f"the benchmark ships with the source checkout; {SCRIPT} is not there"
        )
    # exec, not a child: signals and the exit status are the benchmark's own
    os.execv(sys.executable, [sys.executable, str(SCRIPT), *args])
