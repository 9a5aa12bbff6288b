"""The output of a job attempt, choice by choice, as it streams.

A job asks for ``n`` choices (vLLM samples each on its own); each has its own parser, its
calls' ids and, when the job asked for them, the logprobs of its content tokens
(:class:`ContentLogprobs`). Execution feeds each engine delta to the choice it belongs to.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from hermes_worker.contract.jobs import ChatJob
from hermes_worker.inference.parsing import ContentParser, StreamingParser
from hermes_worker.inference.sampling import GenerationPlan

OutputParser = StreamingParser | ContentParser


@dataclass
class ChoiceRun:
    """One choice's output as it streams (a job has ``n`` of them; events of a job with
    several name theirs in ``choice``)."""

    index: int
    parser: OutputParser
    tagged: bool = False  # its events carry "choice": index (a job of several choices)
    logprobs: ContentLogprobs | None = None  # when the job asked for them
    call_ids: list[str] = field(default_factory=list)
    finish_reason: str | None = None  # vLLM's, once the engine ended it
    streamed: bool = True  # its output goes to the events stream (the job's ``stream``)

    @classmethod
    def all_of(cls, job: ChatJob, plan: GenerationPlan) -> list[ChoiceRun]:
        """The job's choices, each with its own parser."""
        # parallel_tool_calls false: one call at most; the parser says when it closed.
        max_calls = None if job.parallel_tool_calls else 1
        return [
            cls(
                index,
                ContentParser() if plan.json_document else StreamingParser(max_calls),
                tagged=plan.n > 1,
                logprobs=ContentLogprobs() if job.logprobs else None,
                streamed=job.stream,
            )
            for index in range(plan.n)
        ]

    def event(self, data: dict[str, Any]) -> dict[str, Any]:
        """An event's data, naming this choice when the job has several."""
        return {**data, "choice": self.index} if self.tagged else data

    @property
    def done(self) -> bool:
        """The engine ended it, or it needs no more output (its one allowed call closed)."""
        return self.finish_reason is not None or self.parser.complete


@dataclass
class ContentLogprobs:
    """The logprobs of a choice's content tokens, found as the output streams.

    The parser splits text, not tokens, so a read's tokens are judged together: those of a
    read that stayed in content wait (``pending``) until content text goes out, and ride
    on that content event; a read that touched a think block or a call, and wrote no
    content, drops them with whatever waited (whitespace or a partial tag before the block).
    Tokens still waiting at the end (trailing whitespace, the end-of-turn token) are not
    content. Reads of one token (an unpaced job) make this exact."""

    content: list[dict[str, Any]] = field(default_factory=list)
    pending: list[dict[str, Any]] = field(default_factory=list)

    def read(self, entries: Sequence[dict[str, Any]], content_only: bool, wrote: bool) -> None:
        """A read's tokens: ``content_only``: it stayed in content; ``wrote``: it made
        content text."""
        if content_only or wrote:
            self.pending.extend(entries)
        else:
            self.pending.clear()

    def take(self) -> list[dict[str, Any]]:
        """The tokens behind a content event going out now."""
        taken, self.pending = self.pending, []
        self.content.extend(taken)
        return taken
