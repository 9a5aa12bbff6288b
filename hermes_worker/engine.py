"""The inference engine: one vLLM ``AsyncLLM`` per worker. The only module that imports vLLM.

Facts this module is built around (see DESIGN.md):

* ``AsyncLLM`` binds its output handler to the event loop it first runs on, so it is built
  and used on one persistent loop (the runtime's loop thread), never across ``asyncio.run``.
* ``generate`` applies none of the checkpoint's sampling defaults: everything is passed.
* Prompts go in as token ids (``TokensPrompt``) so BOS is not added a second time.
* ``skip_special_tokens=False`` keeps ``<think>`` / ``<tool_call>`` for the parser.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import structlog
from vllm import SamplingParams, TokensPrompt
from vllm.engine.arg_utils import AsyncEngineArgs
from vllm.exceptions import VLLMClientError
from vllm.sampling_params import RequestOutputKind, StructuredOutputsParams
from vllm.v1.engine.async_llm import AsyncLLM
from vllm.v1.engine.exceptions import EngineDeadError, EngineGenerateError

from hermes_worker.errors import EngineError, InvalidRequest
from hermes_worker.sampling import GenerationPlan
from hermes_worker.settings import Settings

log = structlog.stdlib.get_logger(__name__)


@dataclass(frozen=True)
class Delta:
    """New output of one request since the last delta."""

    text: str
    num_tokens: int
    finished: bool
    finish_reason: str | None  # vLLM's: "stop", "length", "abort", or None while running
    num_cached_tokens: int


def engine_args(settings: Settings) -> AsyncEngineArgs:
    """vLLM engine arguments from our settings; quantization is read from the checkpoint."""
    if not settings.model:
        raise ValueError("no model: pass --model or set HERMES_MODEL")
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
        gpu_memory_utilization=settings.gpu_memory_utilization,
        enable_prefix_caching=settings.enable_prefix_caching,
        enforce_eager=settings.enforce_eager,
        seed=settings.seed,
        # Job priorities (0 most urgent) reach the scheduler unchanged.
        scheduling_policy="priority",
        disable_log_stats=True,
    )


def sampling_params(plan: GenerationPlan, stream_interval: int = 1) -> SamplingParams:
    """vLLM's sampling parameters for ``plan``. ``stream_interval`` > 1: vLLM hands over the
    output once per that many tokens (the first and the last at once) instead of every step."""
    structured = None
    if plan.constraint is not None:
        if plan.constraint.kind == "json_object":
            structured = StructuredOutputsParams(json_object=True)
        else:
            structured = StructuredOutputsParams(json=plan.constraint.schema)
    return SamplingParams(
        n=1,
        max_tokens=plan.max_tokens,
        skip_special_tokens=False,
        spaces_between_special_tokens=False,
        output_kind=RequestOutputKind.DELTA,
        stream_interval=stream_interval,
        structured_outputs=structured,
        **plan.sampling,
    )


class Engine:
    """A started ``AsyncLLM``; create it with :meth:`start` on the loop that will use it."""

    def __init__(self, llm: Any) -> None:
        self._llm = llm
        self.max_model_len: int = llm.model_config.max_model_len

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
    ) -> AsyncIterator[Delta]:
        """Stream the output of one request; closing the iterator early aborts the request.
        ``stream_interval``: see :func:`sampling_params` (1, every step, is vLLM's default)."""
        prompt = TokensPrompt(prompt_token_ids=token_ids)
        params = sampling_params(plan, stream_interval)
        try:
            async for out in self._llm.generate(
                prompt, params, request_id=request_id, priority=priority
            ):
                completion = out.outputs[0]
                yield Delta(
                    text=completion.text,
                    num_tokens=len(completion.token_ids),
                    finished=out.finished,
                    finish_reason=completion.finish_reason,
                    num_cached_tokens=out.num_cached_tokens or 0,
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
