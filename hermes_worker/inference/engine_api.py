"""What the job lifecycle needs of an inference engine, in a module that imports none.

:mod:`hermes_worker.inference.engine` (vLLM) and :mod:`hermes_worker.testing.scripted_engine` both
provide :class:`EngineLike`. Execution, heartbeat and runtime use only this module, so
importing the lifecycle does not load vLLM (seconds); :func:`start_engine` imports the
engine the settings name, when the worker starts it.
"""

from __future__ import annotations

import functools
import re
from collections.abc import AsyncGenerator, Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from hermes_worker.inference.sampling import GenerationPlan
from hermes_worker.settings import Settings


@dataclass(frozen=True)
class Delta:
    """New output of one request since the last delta."""

    text: str
    num_tokens: int
    finished: bool
    finish_reason: str | None  # vLLM's: "stop", "length", "abort", or None while running
    num_cached_tokens: int
    # One entry per new token (:func:`token_logprob`) when the plan asks for logprobs.
    logprobs: Sequence[dict[str, Any]] | None = None
    index: int = 0  # the choice it belongs to (a request with several: plan.n)


# vLLM's server writes -inf (a token the sampler could not pick) as this: JSON has no -inf.
MIN_LOGPROB = -9999.0


def top_logprob(token: str, logprob: float, raw: bytes | None = None) -> dict[str, Any]:
    """One ``top_logprobs`` item in OpenAI's shape: the token, its logprob, its bytes
    (``raw``, exact where a token holds part of a UTF-8 character; else its text's)."""
    return {
        "token": token,
        "logprob": max(logprob, MIN_LOGPROB),
        "bytes": list(token.encode("utf-8", errors="replace") if raw is None else raw),
    }


def token_logprob(
    token: str,
    logprob: float,
    top: Sequence[tuple[str, float] | tuple[str, float, bytes | None]] = (),
    raw: bytes | None = None,
) -> dict[str, Any]:
    """A generated token's ``logprobs.content`` entry; ``top``: the most likely tokens at its
    place, most likely first."""
    return {**top_logprob(token, logprob, raw), "top_logprobs": [top_logprob(*t) for t in top]}


class TokenBytes:
    """The bytes of each token id, for OpenAI's ``bytes``: exact where a token holds part of
    a UTF-8 character, which its text (decoded alone: ``\ufffd`` or nothing) cannot show.
    Byte-level BPE vocabularies (Llama 3, Hermes 4) spell bytes as characters (GPT-2's
    table); SentencePiece ones have ``<0xNN>`` byte tokens; other tokens are their text."""

    BYTE_TOKEN = re.compile(r"<0x([0-9A-Fa-f]{2})>")

    def __init__(self, tokenizer: Any) -> None:
        self._tokenizer = tokenizer
        # A byte-level vocabulary has GPT-2's character for a space ("Ġ") on its own.
        byte_level = tokenizer is not None and "Ġ" in tokenizer.get_vocab()
        if byte_level:
            from transformers.convert_slow_tokenizer import bytes_to_unicode
        table = bytes_to_unicode() if byte_level else {}
        self._byte_level = {char: byte for byte, char in table.items()}

    @functools.lru_cache(maxsize=65536)  # noqa: B019  (one per engine, for its lifetime)
    def __call__(self, token_id: int) -> bytes | None:
        """The token's bytes; None when the tokenizer cannot say (its text's bytes then)."""
        if self._tokenizer is None:
            return None
        piece = self._tokenizer.convert_ids_to_tokens(token_id)
        if not isinstance(piece, str) or not piece:
            return None
        if match := self.BYTE_TOKEN.fullmatch(piece):
            return bytes([int(match.group(1), 16)])
        if self._byte_level and all(char in self._byte_level for char in piece):
            return bytes(self._byte_level[char] for char in piece)
        return None


def logprob_entries(
    token_ids: Sequence[int],
    positions: Sequence[Mapping[int, Any] | None] | None,
    top: int,
    raw: Callable[[int], bytes | None] = lambda _: None,
) -> list[dict[str, Any]]:
    """OpenAI's ``logprobs.content`` entries of new tokens from vLLM's logprobs (a mapping of
    token id to ``Logprob`` per position: the sampled token and the ``top`` most likely);
    ``raw``: a token id's bytes (:class:`TokenBytes`)."""
    entries = []
    for index, token_id in enumerate(token_ids):
        position = positions[index] if positions is not None and index < len(positions) else None
        position = position or {}
        ranked = sorted(position.items(), key=lambda item: item[1].rank or 0)
        best = [
            (p.decoded_token or "", p.logprob, raw(tid))
            for tid, p in ranked
            if (p.rank or 0) <= top
        ][:top]
        chosen = position.get(token_id)
        if chosen is None:  # vLLM always returns the sampled token; kept safe regardless
            entries.append(token_logprob("", float("-inf"), best, raw(token_id)))
        else:
            text = chosen.decoded_token or ""
            entries.append(token_logprob(text, chosen.logprob, best, raw(token_id)))
    return entries


class EngineLike(Protocol):
    """An inference engine as the runtime uses it: built and used on the runtime's loop."""

    max_model_len: int  # the most tokens a request holds, prompt and output together

    def generate(
        self,
        request_id: str,
        token_ids: list[int],
        plan: GenerationPlan,
        priority: int,
        *,
        stream_interval: int = 1,
        metadata: Mapping[str, str] | None = None,
    ) -> AsyncGenerator[Delta, None]:
        """Stream the output of one request; closing the iterator early aborts it.
        :class:`~hermes_worker.errors.EngineError` when the engine fails (retryable),
        :class:`~hermes_worker.errors.InvalidRequest` when the request is at fault.
        ``metadata``: the job's; an engine may take directions there (the scripted one does)."""
        ...

    @property
    def dead(self) -> bool:
        """True once the engine has died; the worker must exit so it is restarted."""
        ...

    def num_unfinished(self) -> int:
        """Requests the engine still holds."""
        ...

    def shutdown(self) -> None:
        """Release the engine (its processes, its memory)."""
        ...


def start_engine(settings: Settings) -> EngineLike:
    """Build the engine ``settings.engine`` names; call on the runtime loop. vLLM is
    imported here, and only for the vllm kind."""
    if settings.engine == "scripted":
        from hermes_worker.testing.scripted_engine import ScriptedEngine

        return ScriptedEngine.from_settings(settings)
    from hermes_worker.inference.engine import Engine

    return Engine.start(settings)
