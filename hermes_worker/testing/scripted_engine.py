"""A stand-in for the vLLM engine that writes text on a script: no model, no vLLM.

It is an :class:`~hermes_worker.inference.engine_api.EngineLike`, so a job's whole lifecycle (claim,
stream, parse, cancel, deadline, lease, retry, shutdown) runs on real Redis in milliseconds,
in-process (tests/test_lifecycle.py) or in a worker process (``hermes-worker run --engine
scripted --tokens-per-s N``), e.g. a fleet of workers simulated on one machine.

Tokens: the text is cut into pieces (a tag such as ``<think>``, or a word with the whitespace
before it), and each piece counts as one token. Like vLLM it honours ``max_tokens``
(finish_reason ``length``), ``ignore_eos`` (the text repeats up to ``max_tokens``) and an
abort (closing the iterator); the end of the text is ``stop``. It ignores the prompt,
sampling, stop strings, structured-output constraints, priorities and ``stream_interval``: at
a set rate each delta holds the tokens due since the last read, as vLLM merges the steps a
job has not read; without a rate each delta holds one token.

Rates: a script's ``tokens_per_s`` is each job's own. An engine built with
``engine_tokens_per_s`` (``--engine-tokens-per-s``) also shares that many tokens a second
among the jobs it runs, as a GPU's batch does: it steps like vLLM, one token per running
job per step, a step every (jobs running / engine_tokens_per_s) seconds, no faster than the
engine's ``tokens_per_s`` allows (a job's own rate does not apply then, unless it is 0: no
pause, outside the batch); every job's tokens land on the same steps. 256 jobs on 2,000
tokens a second (about Hermes 4 405B in FP8 on 8 H100s) then get 7.8 tokens a second each,
one job alone the engine's ``tokens_per_s``.

Asked for logprobs, it makes up plausible ones (each token the most likely at its place, its
logprob a function of its text). Asked for ``n`` choices, it writes them side by side, a
delta per choice per step, choice i the script's ``choices[i]`` (cycled), or its ``text``.

A job picks its own :class:`Script` with the metadata key ``hermes_script``: a JSON object of
Script fields, over the engine's default script, e.g. ``{"text": "Hi", "fail_after": 2}``.
"""

from __future__ import annotations

import asyncio
import math
import os
import re
from collections.abc import AsyncGenerator, Mapping
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from hermes_worker.errors import EngineError, InvalidRequest
from hermes_worker.inference.engine_api import Delta, token_logprob
from hermes_worker.inference.sampling import GenerationPlan
from hermes_worker.settings import Settings

SCRIPT_KEY = "hermes_script"
DEFAULT_MAX_MODEL_LEN = 4096
# A tag, a word with the whitespace before it, trailing whitespace, or a lone "<".
_PIECE = re.compile(r"</?\w+>|\s*[^\s<]+|\s+|<")
_STALL_POLL_S = 0.01
EXIT_CRASHED = 86  # the status of a worker that a script's exit_after ended


class Script(BaseModel):
    """What the engine writes for a request, how fast, and how it goes wrong. Faults fire
    once that many tokens have been written (0: before the first)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    text: str = "Hello! This is the scripted engine speaking."
    tokens_per_s: float = Field(default=0.0, ge=0)  # 0: no pause between tokens
    fail_after: int | None = Field(default=None, ge=0)  # EngineError (retryable)
    stall_after: int | None = Field(default=None, ge=0)  # nothing more until aborted
    die_after: int | None = Field(default=None, ge=0)  # the engine dies, as a dead core
    # The whole worker process ends at once (os._exit), as a job that crashes its worker.
    exit_after: int | None = Field(default=None, ge=0)
    attempts: int | None = Field(default=None, ge=1)  # faults hit only these first attempts
    # A request for n choices: choice i writes choices[i % len(choices)] (default: text).
    choices: list[str] | None = Field(default=None, min_length=1)

    def over(self, raw: str) -> Script:
        """This script with the fields of the JSON object ``raw`` (a job's own) replaced."""
        try:
            own = Script.model_validate_json(raw)
        except ValidationError as exc:
            error = exc.errors()[0]
            where = "".join(f".{part}" for part in error["loc"])
            raise InvalidRequest(f"metadata.{SCRIPT_KEY}{where}: {error['msg']}") from exc
        return self.model_copy(update=own.model_dump(exclude_unset=True))

    def texts(self, n: int) -> list[str]:
        """The text of each of ``n`` choices."""
        texts = self.choices or [self.text]
        return [texts[index % len(texts)] for index in range(n)]

    def for_attempt(self, attempt: int) -> Script:
        """This script as attempt ``attempt`` runs it: without faults past ``attempts``."""
        if self.attempts is None or attempt <= self.attempts:
            return self
        faults = ("fail_after", "stall_after", "die_after", "exit_after")
        return self.model_copy(update=dict.fromkeys(faults))


class ScriptedEngine:
    """Runs every request on its :class:`Script` (the engine's default, or the job's)."""

    def __init__(
        self, script: Script | None = None, *, max_model_len: int = DEFAULT_MAX_MODEL_LEN,
        engine_tokens_per_s: float = 0.0,
    ) -> None:  # fmt: skip
        self.script = script or Script()
        self.max_model_len = max_model_len
        self._running: set[str] = set()
        self._dead = False
        self._steps = _Steps(engine_tokens_per_s, self.script.tokens_per_s)

    @classmethod
    def from_settings(cls, settings: Settings) -> ScriptedEngine:
        """The engine of a worker run with ``--engine scripted``."""
        script = Script(tokens_per_s=settings.scripted_tokens_per_s)
        return cls(
            script,
            max_model_len=settings.max_model_len or DEFAULT_MAX_MODEL_LEN,
            engine_tokens_per_s=settings.scripted_engine_tokens_per_s,
        )

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
        """Write the script's text (see the module's docstring for what is honoured)."""
        raw = (metadata or {}).get(SCRIPT_KEY)
        script = (self.script if raw is None else self.script.over(raw)).for_attempt(
            _attempt(request_id)
        )
        runs = [_pieces(text, plan) for text in script.texts(plan.n)]
        longest = max(len(pieces) for pieces, _ in runs)
        loop = asyncio.get_running_loop()
        start, sent, done = loop.time(), 0, False
        shared = self._steps.on and script.tokens_per_s > 0
        first_step = self._steps.join(loop.time()) if shared else 0
        self._running.add(request_id)
        try:
            while not done:
                await self._fault(script, sent)
                if shared:
                    due = max(sent, self._steps.at(loop.time()) - first_step)
                    if due == sent and longest:  # wait for the engine's next step
                        await asyncio.sleep(self._steps.next_in(loop.time()))
                        continue
                else:
                    due = _tokens_due(script.tokens_per_s, loop.time() - start, sent)
                if due == sent and longest:  # the next token is not due yet
                    await asyncio.sleep((sent + 1) / script.tokens_per_s - (loop.time() - start))
                    continue
                end = min(due, _next_fault(script, sent, longest))
                for index, (pieces, reason) in enumerate(runs):
                    if sent < len(pieces) or sent == len(pieces) == 0:  # not ended yet
                        step = pieces[sent:end]
                        ended = end >= len(pieces)
                        logprobs = _logprobs(step, plan)
                        yield Delta(
                            "".join(step), len(step), ended, reason if ended else None, 0,
                            logprobs, index,
                        )  # fmt: skip
                sent = end
                done = sent == longest
        finally:
            self._running.discard(request_id)
            if shared:
                self._steps.leave(loop.time())

    async def _fault(self, script: Script, sent: int) -> None:
        """Fail, die or stall here if the script says so at ``sent`` tokens."""
        if self._dead:
            raise EngineError("the scripted engine is dead")
        if script.exit_after == sent:
            os._exit(EXIT_CRASHED)
        if script.die_after == sent:
            self._dead = True
            raise EngineError(f"the scripted engine died after {sent} tokens")
        if script.fail_after == sent:
            raise EngineError(f"scripted failure after {sent} tokens")
        if script.stall_after == sent:
            while not self._dead:  # until aborted (cancelled), or another request kills us
                await asyncio.sleep(_STALL_POLL_S)
            raise EngineError("the scripted engine is dead")

    @property
    def dead(self) -> bool:
        """True once a script made the engine die; every request fails from then on."""
        return self._dead

    def num_unfinished(self) -> int:
        """Requests generating or stalled right now."""
        return len(self._running)

    def shutdown(self) -> None:
        """Nothing to release: no processes, no memory of its own."""


class _Steps:
    """The engine's steps when jobs share ``engine_tokens_per_s``: one token per running job
    per step, a step every ``jobs / engine_tokens_per_s`` seconds (at least ``1 / job_rate``).
    Counted as a float advanced lazily with the clock, at the rate of the jobs running then."""

    def __init__(self, engine_tokens_per_s: float, job_rate: float) -> None:
        self.on = engine_tokens_per_s > 0
        self._engine_rate = engine_tokens_per_s
        self._job_rate = job_rate
        self._jobs = 0
        self._count = 0.0  # steps so far (fractional: the step under way)
        self._t = 0.0  # when _count was last advanced

    def _rate(self) -> float:
        """Steps a second with the jobs running now."""
        rate = self._engine_rate / max(self._jobs, 1)
        return min(rate, self._job_rate) if self._job_rate > 0 else rate

    def at(self, now: float) -> int:
        """Whole steps done by ``now``."""
        if self._jobs:
            self._count += (now - self._t) * self._rate()
        self._t = now
        return math.floor(self._count + 1e-9)

    def next_in(self, now: float) -> float:
        """Seconds until the next step ends, at the current rate."""
        self.at(now)
        return max((math.floor(self._count + 1e-9) + 1 - self._count) / self._rate(), 0.0)

    def join(self, now: float) -> int:
        """A job joins the batch: the steps done so far (its tokens count from there)."""
        done = self.at(now)
        self._jobs += 1
        return done

    def leave(self, now: float) -> None:
        self.at(now)
        self._jobs -= 1


def _attempt(request_id: str) -> int:
    """The attempt a request id (``{job_id}:{attempt}``, see execution) names; 1 if none."""
    tail = request_id.rpartition(":")[2]
    return int(tail) if tail.isdigit() else 1


def split_tokens(text: str) -> list[str]:
    """``text`` cut into the pieces the engine counts as tokens; joined, they are ``text``."""
    pieces: list[str] = _PIECE.findall(text)
    return pieces


def _pieces(text: str, plan: GenerationPlan) -> tuple[list[str], str]:
    """The tokens a request writes and its finish reason."""
    pieces = split_tokens(text)
    repeat = bool(plan.sampling.get("ignore_eos")) and bool(pieces)
    if repeat:
        pieces *= math.ceil(plan.max_tokens / len(pieces))
    if repeat or len(pieces) > plan.max_tokens:
        return pieces[: plan.max_tokens], "length"
    return pieces, "stop"


def _logprobs(pieces: list[str], plan: GenerationPlan) -> list[dict[str, Any]] | None:
    """Plausible logprobs of ``pieces`` when the plan asks for them: each token the most
    likely at its place, its logprob a function of its text (in [-4.9, 0]), and ``top``
    made-up alternatives after it, each less likely."""
    top = plan.sampling.get("logprobs")
    if top is None:
        return None
    entries = []
    for piece in pieces:
        logprob = -(sum(piece.encode()) % 50) / 10
        alternatives = [(f"<alt{i}>", logprob - i) for i in range(1, top)]
        entries.append(token_logprob(piece, logprob, [(piece, logprob), *alternatives][:top]))
    return entries


def _tokens_due(tokens_per_s: float, elapsed_s: float, sent: int) -> int:
    """How many tokens are written by ``elapsed_s``: one more per step without a rate."""
    if tokens_per_s <= 0:
        return sent + 1
    return max(sent, math.floor(elapsed_s * tokens_per_s + 1e-9))  # 1e-9: float rounding


def _next_fault(script: Script, sent: int, last: int) -> int:
    """Where the next delta ends: at the next fault's token count, at ``last`` at most."""
    marks = (script.fail_after, script.stall_after, script.die_after, script.exit_after)
    return min([last, *(mark for mark in marks if mark is not None and mark > sent)])
