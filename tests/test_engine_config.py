"""Engine configuration for the production shape (tensor parallel 8, FP8 weights and KV cache).
No GPU here: these check what reaches vLLM's engine arguments, not that it runs."""

from __future__ import annotations

import importlib
from types import ModuleType

import pytest

from hermes_worker.contract.jobs import parse_job
from hermes_worker.inference.sampling import plan_generation
from hermes_worker.settings import Settings


def engine() -> ModuleType:
    """``hermes_worker.inference.engine``, imported by the tests that call it: it loads vLLM
    (7-8 s of CPU), which each pytest-xdist worker of the fast tier would otherwise pay only
    to collect this file."""
    return importlib.import_module("hermes_worker.inference.engine")


def test_405b_fp8_on_8_gpus_reaches_the_engine_arguments() -> None:
    settings = Settings(
        model="NousResearch/Hermes-4-405B-FP8",
        tensor_parallel_size=8,
        kv_cache_dtype="fp8",
        max_model_len=32768,
        max_num_seqs=256,
        max_num_batched_tokens=16384,
        gpu_memory_utilization=0.92,
    )
    args = engine().engine_args(settings)
    assert args.model == "NousResearch/Hermes-4-405B-FP8"
    assert args.tensor_parallel_size == 8
    assert args.kv_cache_dtype == "fp8"
    assert args.quantization is None  # FP8 is read from the checkpoint's config
    assert (args.max_model_len, args.max_num_seqs, args.max_num_batched_tokens) == (
        32768,
        256,
        16384,
    )
    assert args.gpu_memory_utilization == 0.92
    assert args.kv_cache_memory_bytes is None  # on GPUs the fraction is vLLM's own knob
    assert args.enable_prefix_caching is True
    assert args.scheduling_policy == "priority"


def test_engine_settings_come_from_hermes_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HERMES_MODEL", "/models/hermes-4-70b-fp8")
    monkeypatch.setenv("HERMES_TENSOR_PARALLEL_SIZE", "4")
    monkeypatch.setenv("HERMES_KV_CACHE_DTYPE", "fp8_e4m3")
    monkeypatch.setenv("HERMES_ENABLE_PREFIX_CACHING", "false")
    monkeypatch.setenv("HERMES_KV_CACHE_MEMORY", "512MiB")
    args = engine().engine_args(Settings())
    assert (args.model, args.tensor_parallel_size, args.kv_cache_dtype) == (
        "/models/hermes-4-70b-fp8",
        4,
        "fp8_e4m3",
    )
    assert args.enable_prefix_caching is False
    assert args.kv_cache_memory_bytes == 512 * 2**20


def test_a_kv_cache_amount_reaches_the_engine_and_the_fraction_only_when_set() -> None:
    vllm_default = engine().AsyncEngineArgs.gpu_memory_utilization  # the dataclass field's default
    # Given an amount only
    args = engine().engine_args(Settings(model="m", kv_cache_memory="2GiB"))
    # Then vLLM gets it in bytes, and its own fraction stays its default
    assert args.kv_cache_memory_bytes == 2 * 2**30
    assert args.gpu_memory_utilization == vllm_default == 0.92
    # Given a fraction only: the fraction, and no amount
    args = engine().engine_args(Settings(model="m", gpu_memory_utilization=0.3))
    assert (args.gpu_memory_utilization, args.kv_cache_memory_bytes) == (0.3, None)
    # Given neither: vLLM's defaults for both
    args = engine().engine_args(Settings(model="m"))
    assert (args.gpu_memory_utilization, args.kv_cache_memory_bytes) == (vllm_default, None)


def test_no_model_is_a_clear_error() -> None:
    with pytest.raises(ValueError, match="no model"):
        engine().engine_args(Settings(model=None))


def test_sampling_params_keep_tags_and_stream_deltas() -> None:
    from vllm.sampling_params import RequestOutputKind

    job = parse_job({"messages": [{"role": "user", "content": "hi"}], "max_tokens": 7})
    params = engine().sampling_params(plan_generation(job, 5, 100))
    assert params.skip_special_tokens is False
    assert params.output_kind == RequestOutputKind.DELTA
    assert (params.max_tokens, params.temperature, params.top_p, params.top_k) == (7, 0.6, 0.95, 20)
    assert params.structured_outputs is None


def test_forced_call_becomes_a_json_schema_constraint() -> None:
    tool = {"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}
    job = parse_job(
        {
            "messages": [{"role": "user", "content": "hi"}],
            "tools": [tool],
            "tool_choice": "required",
        }
    )
    params = engine().sampling_params(plan_generation(job, 5, 100))
    # The call's schema reaches the engine as a grammar (see test_structured_whitespace.py)
    assert params.structured_outputs is not None
    assert params.structured_outputs.grammar and '"\\"f\\""' in params.structured_outputs.grammar
