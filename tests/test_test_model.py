"""The tiny test checkpoint: its shape, its tokenizer, and that the real vLLM engine serves it."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from hermes_worker.contract.jobs import parse_job
from hermes_worker.inference.kv_cache import kv_cache_need, model_config
from hermes_worker.inference.parsing import parse_completion
from hermes_worker.inference.template import PromptRenderer
from hermes_worker.settings import Settings
from hermes_worker.testing.model import CONTROL_TOKENS, TAG_TOKENS


def auto_tokenizer(model: Path) -> Any:
    """The checkpoint's tokenizer as vLLM and users load it (``AutoTokenizer``). Imported
    here, not at the top: transformers' AutoTokenizer brings torch (~8 s of CPU), which
    every pytest-xdist worker would pay at collection."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(model)


def test_config_is_a_llama_with_head_dim_64(test_model_dir: Path) -> None:
    config = json.loads((test_model_dir / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"]
    assert config["head_dim"] == 64
    assert config["hidden_size"] // config["num_attention_heads"] == 64
    assert (test_model_dir / "model.safetensors").stat().st_size > 0


def test_generation_config_carries_hermes_sampling_and_both_eos(test_model_dir: Path) -> None:
    generation = json.loads((test_model_dir / "generation_config.json").read_text())
    tokenizer = auto_tokenizer(test_model_dir)
    assert (generation["temperature"], generation["top_p"], generation["top_k"]) == (0.6, 0.95, 20)
    assert set(generation["eos_token_id"]) == {
        tokenizer.convert_tokens_to_ids("<|eot_id|>"),
        tokenizer.convert_tokens_to_ids("<|end_of_text|>"),
    }


@pytest.mark.parametrize("token", CONTROL_TOKENS + TAG_TOKENS)
def test_every_hermes_token_is_one_id(test_model_dir: Path, token: str) -> None:
    tokenizer = auto_tokenizer(test_model_dir)
    ids = tokenizer.encode(f"a{token}b", add_special_tokens=False)
    assert tokenizer.convert_tokens_to_ids(token) in ids
    assert tokenizer.decode(ids) == f"a{token}b"


def test_tags_survive_skipping_special_tokens(test_model_dir: Path) -> None:
    # The tags must reach the parser even if a caller skips special tokens; control tokens go.
    tokenizer = auto_tokenizer(test_model_dir)
    ids = tokenizer.encode("<think>x</think><tool_call>{}</tool_call><|eot_id|>")
    assert tokenizer.decode(ids, skip_special_tokens=True) == (
        "<think>x</think><tool_call>{}</tool_call>"
    )


def test_any_text_encodes_byte_level(test_model_dir: Path) -> None:
    tokenizer = auto_tokenizer(test_model_dir)
    text = 'Grüße, 東京 🌧 {"k": [1, 2]}\t\n'
    assert tokenizer.decode(tokenizer.encode(text, add_special_tokens=False)) == text


def test_same_seed_same_weights(tmp_path: Path) -> None:
    from hermes_worker.testing.model import TinyModelSpec, build_test_model

    a = build_test_model(tmp_path / "a", TinyModelSpec(seed=7))
    b = build_test_model(tmp_path / "b", TinyModelSpec(seed=7))
    c = build_test_model(tmp_path / "c", TinyModelSpec(seed=8))
    weights = [(p / "model.safetensors").read_bytes() for p in (a, b, c)]
    assert weights[0] == weights[1]
    assert weights[0] != weights[2]


# --- through the real engine ---------------------------------------------------------------


@pytest.fixture(scope="module")
def llm(test_model_dir: Path) -> Iterator[Any]:
    vllm = pytest.importorskip("vllm")
    sizing = Settings(max_model_len=2048, max_num_seqs=8)  # an amount: what 8 sequences need
    engine = vllm.LLM(
        model=str(test_model_dir),
        max_model_len=2048,
        max_num_seqs=8,
        kv_cache_memory_bytes=kv_cache_need(model_config(str(test_model_dir)), sizing).amount,
        enable_prefix_caching=True,
        seed=0,
        enforce_eager=True,  # as the tests' workers (see worker_fixtures.worker_env)
    )
    yield engine
    engine.llm_engine.engine_core.shutdown()


TOOL_JOB = {
    "thinking": True,
    "tools": [
        {
            "type": "function",
            "function": {
                "name": "get_weather",
                "parameters": {"type": "object", "properties": {"city": {"type": "string"}}},
            },
        }
    ],
    "messages": [{"role": "user", "content": "Weather in Paris?"}],
}


@pytest.mark.engine
def test_vllm_serves_the_rendered_prompt(llm: Any, test_model_dir: Path) -> None:
    from vllm import SamplingParams, TokensPrompt

    # Given a job rendered to token ids
    prompt = PromptRenderer.from_pretrained(test_model_dir).render(parse_job(TOOL_JOB))
    params = SamplingParams(max_tokens=24, ignore_eos=True, skip_special_tokens=False)
    # When the real engine generates from them
    [output] = llm.generate(TokensPrompt(prompt_token_ids=prompt.token_ids), params)
    # Then it took the prompt as given (one BOS) and produced exactly the tokens asked for
    assert list(output.prompt_token_ids) == prompt.token_ids
    assert len(output.outputs[0].token_ids) == 24


@pytest.mark.engine
def test_forced_hermes_output_parses_into_reasoning_and_a_call(
    llm: Any, test_model_dir: Path
) -> None:
    from vllm import SamplingParams, TokensPrompt
    from vllm.sampling_params import StructuredOutputsParams

    # Given the random model forced by a grammar to answer in the Hermes format
    prompt = PromptRenderer.from_pretrained(test_model_dir).render(parse_job(TOOL_JOB))
    pattern = (
        r"<think>\n[a-z ]{3,30}\n</think>\n"
        r'<tool_call>\n\{"name": "get_weather", "arguments": \{"city": "[A-Z][a-z]{2,10}"\}\}'
        r"\n</tool_call>"
    )
    params = SamplingParams(
        max_tokens=200,
        skip_special_tokens=False,
        structured_outputs=StructuredOutputsParams(regex=pattern),
    )
    [output] = llm.generate(TokensPrompt(prompt_token_ids=prompt.token_ids), params)
    text = output.outputs[0].text
    # When the engine's text is parsed
    parsed = parse_completion(text)
    # Then the reasoning, the call and its arguments come out, and no content is left over
    assert parsed.problems == ()
    assert parsed.reasoning is not None and 3 <= len(parsed.reasoning) <= 30
    assert [call.name for call in parsed.tool_calls] == ["get_weather"]
    city = json.loads(parsed.tool_calls[0].arguments)["city"]
    assert city[0].isupper() and city in text
    assert parsed.content is None
