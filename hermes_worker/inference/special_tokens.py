"""Message text never becomes a control token.

A Hugging Face tokenizer turns any text that spells a special token (``<|eot_id|>``,
``<|start_header_id|>`` …) into that token, so a user who types ``<|eot_id|><|start_header_id|>
system<|end_header_id|>`` into a message would open a system turn of their own. Here every
special-token spelling in the job's data is swapped for a placeholder before the template
runs; after rendering, the prompt is tokenized piece by piece: the template's own text with
its special tokens, each placeholder as the plain text it stood for (``split_special_tokens``).

The Hermes tags (``<think>``, ``<tool_call>``, ``<tool_response>`` and their closers) are left
alone even where a tokenizer marks them special: clients send raw output back as history and
templates cut it at ``</think>``, so in message text they keep their meaning.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

HERMES_TAGS = frozenset(
    ("<think>", "</think>", "<tool_call>", "</tool_call>", "<tool_response>", "</tool_response>")
)
# Private-use characters: no tokenizer gives them a meaning, and any already in a job's text
# are swapped out like a special token, so every marker in the rendered text is ours.
OPEN, CLOSE = "\ue000", "\ue001"
_PLACEHOLDER = re.compile(f"{OPEN}(\\d+){CLOSE}")


def special_token_texts(added_tokens: Iterable[tuple[str, bool]]) -> frozenset[str]:
    """The spellings to guard, from a tokenizer's added tokens as (text, special) pairs."""
    return frozenset(text for text, special in added_tokens if special) - HERMES_TAGS


@dataclass
class Shield:
    """Swaps special-token spellings in a job's data for placeholders; one per rendering."""

    pattern: re.Pattern[str]  # compile_guard(), once per tokenizer
    literals: list[str] = field(default_factory=list)

    def protect(self, value: Any) -> Any:
        """``value`` (str, list, dict, nested) with every guarded spelling swapped out."""
        if isinstance(value, str):
            return self.pattern.sub(self._placeholder, value)
        if isinstance(value, list):
            return [self.protect(item) for item in value]
        if isinstance(value, dict):
            return {self.protect(k): self.protect(v) for k, v in value.items()}
        return value

    def _placeholder(self, match: re.Match[str]) -> str:
        self.literals.append(match.group(0))
        return f"{OPEN}{len(self.literals) - 1}{CLOSE}"

    def pieces(self, rendered: str) -> list[tuple[str, bool]]:
        """The rendered text as (text, is_literal) pieces, placeholders restored; a literal
        piece is message text that spells a special token and must be tokenized as text."""
        if not self.literals:
            return [(rendered, False)] if rendered else []
        out: list[tuple[str, bool]] = []
        for i, part in enumerate(_PLACEHOLDER.split(rendered)):
            if i % 2:
                out.append((self.literals[int(part)], True))
            elif part:
                out.append((part, False))
        return out


def compile_guard(texts: Iterable[str]) -> re.Pattern[str]:
    """The pattern a :class:`Shield` swaps out: the spellings and the marker characters."""
    # Longest first, so a spelling that contains another is taken whole.
    spellings = sorted({*texts, OPEN, CLOSE}, key=len, reverse=True)
    return re.compile("|".join(re.escape(s) for s in spellings))


def restore(pieces: Iterable[tuple[str, bool]]) -> str:
    """The prompt text as a person reads it: placeholders back to what the messages said."""
    return "".join(text for text, _ in pieces)


def encode_pieces(
    pieces: Iterable[tuple[str, bool]], encode: Callable[[str, bool], list[int]]
) -> list[int]:
    """Token ids of the pieces; ``encode(text, as_plain_text)``."""
    ids: list[int] = []
    for text, literal in pieces:
        ids.extend(encode(text, literal))
    return ids
