"""Split Hermes 4 output into reasoning, content and tool calls, as it streams.

The model's raw text (special-token tags kept) holds optional ``<think>…</think>``
blocks, plain content, and ``<tool_call>{"name": …, "arguments": {…}}</tool_call>``
calls. One small state machine with three modes reads it:

* **content**: ``<think>`` and ``<tool_call>`` are tags; anything else, stray closing
  tags included, is content text.
* **think**: only ``</think>`` is a tag; a ``<tool_call>`` here is reasoning text.
* **call**: text is collected raw until ``</tool_call>`` appears outside a JSON string,
  so a closing tag or a brace inside a string value does not end the call.

A call that does not hold a well-formed ``{"name", "arguments"}`` object goes back into
the content, tags and all, and a line goes into ``problems``; it never sinks the other
calls. We do not use vLLM's hermes tool parser because it drops everything after the
first call, fails every call when one is malformed, and reports calls inside
``<think>`` (see docs/architecture.md, "Output parsing").

Calls are numbered from 1 in order of appearance, good or not, so a problem such as
``tool call 2: invalid JSON (Expecting ',' delimiter at char 13)`` points at one call
(the char offset counts in the stripped text between the tags). Two choices of ours:
``NaN`` and ``Infinity``, which Python's json accepts, make a call malformed, since no
client could read the arguments back; and an unclosed final call is judged on its text
as is, so output cut off inside a closing tag (``…}</tool_ca``) is malformed.

Streaming is exact: the text of the events, joined, equals the one-shot result for any
chunking. To get there the parser holds back only a suffix that could still become a
tag and whitespace that could turn out to be trailing (content and each reasoning block
are stripped). Each delta is scanned once, so a stream costs time linear in its length.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from enum import Enum
from typing import Any, Literal

THINK_OPEN = "<think>"
THINK_CLOSE = "</think>"
CALL_OPEN = "<tool_call>"
CALL_CLOSE = "</tool_call>"

EventType = Literal["reasoning", "content", "tool_call"]

# Inside a JSON string only a quote (end) or a backslash (escape) matters.
_IN_STRING = re.compile(r'["\\]')
# Outside one, a quote opens a string and the closing tag ends the call.
_OUT_OF_STRING = re.compile(r'"|</tool_call>')


@dataclass(frozen=True)
class ParsedToolCall:
    """One tool call; ``arguments`` is a JSON object as ``json.dumps(…, ensure_ascii=False)``."""

    name: str
    arguments: str


@dataclass(frozen=True)
class ParserEvent:
    """A piece of streamed output: ``text`` for reasoning/content, ``tool_call`` for calls."""

    type: EventType
    text: str | None = None
    tool_call: ParsedToolCall | None = None


@dataclass(frozen=True)
class ParsedCompletion:
    """A whole output, split. Empty reasoning or content is ``None``."""

    reasoning: str | None
    content: str | None
    tool_calls: tuple[ParsedToolCall, ...]
    problems: tuple[str, ...]


class _Mode(Enum):
    CONTENT = "content"
    THINK = "think"
    CALL = "call"


def parse_completion(text: str) -> ParsedCompletion:
    """Parse a complete output; the same machine as streaming, fed in one piece."""
    parser = StreamingParser()
    parser.feed(text)
    parser.finish()
    return parser.result()


class _Trimmer:
    """Passes text through with the whole run's outer whitespace removed, as it streams.

    Leading whitespace is dropped; whitespace after the last visible character is held
    until more visible text proves it was not trailing.
    """

    __slots__ = ("held", "started")

    def __init__(self) -> None:
        self.started = False
        self.held: list[str] = []

    def push(self, text: str) -> str:
        if not self.started:
            text = text.lstrip()
            if not text:
                return ""
        core = text.rstrip()
        if not core:
            self.held.append(text)
            return ""
        out = "".join(self.held) + core if self.held else core
        self.held = [text[len(core) :]] if len(core) < len(text) else []
        self.started = True
        return out


class StreamingParser:
    """Incremental parser for one output: ``feed`` each delta, then ``finish`` once.

    ``feed`` and ``finish`` return the events that became certain; ``result`` gives the
    aggregate after ``finish``. An unclosed final call whose text is a well-formed call
    counts as a call without a problem: a ``</tool_call>`` stop string or a stop at the
    end-of-turn token both end output that way.

    ``max_calls`` (OpenAI's ``parallel_tool_calls: false`` is 1): once that many well-formed
    calls have closed, the output is :attr:`complete` and any text after the last is
    dropped (a malformed call does not count: it is content).
    """

    def __init__(self, max_calls: int | None = None) -> None:
        self._mode = _Mode.CONTENT
        self._pending = ""  # a suffix held back for the next delta, rescanned in _mode
        self._finished = False
        self._max_calls = max_calls
        self._complete = False  # the last call allowed has closed: the rest is not read
        self._result: ParsedCompletion | None = None
        # Aggregate, kept raw so result() follows the definition, not the event stream.
        self._content_raw: list[str] = []
        self._blocks: list[str] = []
        self._block_raw: list[str] = []
        self._calls: list[ParsedToolCall] = []
        self._problems: list[str] = []
        self._call_count = 0
        # Call mode.
        self._call_raw: list[str] = []
        self._in_string = False
        # Emission.
        self._content_trim = _Trimmer()
        self._block_trim = _Trimmer()
        self._reasoning_emitted = False
        self._events: list[ParserEvent] = []
        self._run_type: EventType | None = None
        self._run_parts: list[str] = []

    def feed(self, delta: str) -> list[ParserEvent]:
        """Consume the next piece of output; return the events it made certain."""
        if self._finished:
            raise RuntimeError("StreamingParser.feed() called after finish()")
        if self._complete:
            return []
        text = self._pending + delta if self._pending else delta
        self._pending = ""
        self._scan(text, final=False)
        return self._take_events()

    def finish(self) -> list[ParserEvent]:
        """Mark the end of output: release held-back text and close what is still open."""
        if self._finished:
            raise RuntimeError("StreamingParser.finish() called twice")
        self._finished = True
        text, self._pending = self._pending, ""
        self._scan(text, final=True)
        if self._mode is _Mode.THINK:
            self._close_think()
        elif self._mode is _Mode.CALL:
            self._close_call(closed=False)
        return self._take_events()

    @property
    def finished(self) -> bool:
        return self._finished

    @property
    def in_reasoning(self) -> bool:
        """Whether the text fed so far ends inside a ``<think>`` block (for token accounting)."""
        return self._mode is _Mode.THINK

    @property
    def in_content(self) -> bool:
        """Whether the text fed so far ends in content: outside a think block and a call."""
        return self._mode is _Mode.CONTENT and not self._complete

    @property
    def complete(self) -> bool:
        """True once ``max_calls`` calls have closed: the output needs no more text (what
        follows is not read), so its generation can stop."""
        return self._complete

    def result(self) -> ParsedCompletion:
        """The whole output, split; only valid after ``finish``."""
        if not self._finished:
            raise RuntimeError("StreamingParser.result() called before finish()")
        if self._result is None:
            reasoning = "\n".join(s for s in (b.strip() for b in self._blocks) if s)
            content = "".join(self._content_raw).strip()
            self._result = ParsedCompletion(
                reasoning=reasoning or None,
                content=content or None,
                tool_calls=tuple(self._calls),
                problems=tuple(self._problems),
            )
        return self._result

    # -- scanning: each returns the position where scanning goes on ------------------

    def _scan(self, text: str, final: bool) -> None:
        pos, end = 0, len(text)
        while pos < end and not self._complete:
            if self._mode is _Mode.CONTENT:
                pos = self._scan_content(text, pos, final)
            elif self._mode is _Mode.THINK:
                pos = self._scan_think(text, pos, final)
            else:
                pos = self._scan_call(text, pos, final)

    def _scan_content(self, text: str, pos: int, final: bool) -> int:
        end = len(text)
        i = text.find("<", pos)
        while i != -1:
            if text.startswith(THINK_OPEN, i):
                self._add_content(text[pos:i])
                self._mode = _Mode.THINK
                return i + len(THINK_OPEN)
            if text.startswith(CALL_OPEN, i):
                self._add_content(text[pos:i])
                self._mode = _Mode.CALL
                return i + len(CALL_OPEN)
            if not final and end - i < len(CALL_OPEN):
                rest = text[i:]
                if CALL_OPEN.startswith(rest) or THINK_OPEN.startswith(rest):
                    self._add_content(text[pos:i])
                    self._pending = rest
                    return end
            i = text.find("<", i + 1)
        self._add_content(text[pos:])
        return end

    def _scan_think(self, text: str, pos: int, final: bool) -> int:
        close = text.find(THINK_CLOSE, pos)
        if close != -1:
            self._add_reasoning(text[pos:close])
            self._close_think()
            return close + len(THINK_CLOSE)
        end = len(text)
        keep = end if final else end - _partial_tag_len(text, pos, THINK_CLOSE)
        self._add_reasoning(text[pos:keep])
        self._pending = text[keep:]
        return end

    def _scan_call(self, text: str, pos: int, final: bool) -> int:
        start, end = pos, len(text)
        while pos < end:
            if self._in_string:
                m = _IN_STRING.search(text, pos)
                if m is None:
                    break
                if m.group() == '"':
                    self._in_string = False
                    pos = m.end()
                elif m.end() < end or final:
                    pos = min(m.end() + 1, end)  # skip the escaped character
                else:
                    # A backslash ends the delta: rescan it with the character it escapes.
                    self._call_raw.append(text[start : m.start()])
                    self._pending = "\\"
                    return end
            else:
                m = _OUT_OF_STRING.search(text, pos)
                if m is None:
                    keep = end if final else end - _partial_tag_len(text, pos, CALL_CLOSE)
                    self._call_raw.append(text[start:keep])
                    self._pending = text[keep:]
                    return end
                if m.group() == '"':
                    self._in_string = True
                    pos = m.end()
                else:
                    self._call_raw.append(text[start : m.start()])
                    self._close_call(closed=True)
                    return m.end()
        self._call_raw.append(text[start:])
        return end

    # -- state changes ---------------------------------------------------------------

    def _close_think(self) -> None:
        self._blocks.append("".join(self._block_raw))
        self._block_raw = []
        self._block_trim = _Trimmer()
        self._mode = _Mode.CONTENT

    def _close_call(self, closed: bool) -> None:
        raw = "".join(self._call_raw)
        self._call_raw = []
        self._in_string = False
        self._mode = _Mode.CONTENT
        self._call_count += 1
        verdict = _check_call(raw)
        if isinstance(verdict, ParsedToolCall):
            self._calls.append(verdict)
            self._flush_run()
            self._events.append(ParserEvent(type="tool_call", tool_call=verdict))
            if len(self._calls) == self._max_calls:
                self._complete, self._pending = True, ""
        elif closed:
            self._problems.append(f"tool call {self._call_count}: {verdict}")
            self._add_content(CALL_OPEN + raw + CALL_CLOSE)
        else:
            self._problems.append(f"tool call {self._call_count}: not closed and {verdict}")
            self._add_content(CALL_OPEN + raw)

    # -- emission --------------------------------------------------------------------

    def _add_content(self, text: str) -> None:
        if text:
            self._content_raw.append(text)
            self._emit("content", self._content_trim.push(text))

    def _add_reasoning(self, text: str) -> None:
        if not text:
            return
        self._block_raw.append(text)
        first_in_block = not self._block_trim.started
        out = self._block_trim.push(text)
        if out:
            # The separator goes out only once the next block proves to be non-empty.
            if first_in_block and self._reasoning_emitted:
                out = "\n" + out
            self._reasoning_emitted = True
            self._emit("reasoning", out)

    def _emit(self, kind: EventType, text: str) -> None:
        # Runs of one kind within a delta become one event.
        if not text:
            return
        if kind != self._run_type:
            self._flush_run()
            self._run_type = kind
        self._run_parts.append(text)

    def _flush_run(self) -> None:
        if self._run_type is not None:
            self._events.append(ParserEvent(type=self._run_type, text="".join(self._run_parts)))
            self._run_type = None
            self._run_parts = []

    def _take_events(self) -> list[ParserEvent]:
        self._flush_run()
        events, self._events = self._events, []
        return events


class ContentParser:
    """For output constrained to a JSON document (``response_format``): all of it is content.

    Inside such a document ``<think>`` or ``<tool_call>`` can only be string data, so nothing
    is split out. Same interface and stripping as :class:`StreamingParser`, so the joined
    events equal the result here too.
    """

    in_reasoning = False
    in_content = True
    complete = False

    def __init__(self) -> None:
        self._trim = _Trimmer()
        self._raw: list[str] = []
        self._finished = False

    @property
    def finished(self) -> bool:
        return self._finished

    def feed(self, delta: str) -> list[ParserEvent]:
        if self._finished:
            raise RuntimeError("ContentParser.feed() called after finish()")
        self._raw.append(delta)
        text = self._trim.push(delta)
        return [ParserEvent(type="content", text=text)] if text else []

    def finish(self) -> list[ParserEvent]:
        if self._finished:
            raise RuntimeError("ContentParser.finish() called twice")
        self._finished = True
        return []

    def result(self) -> ParsedCompletion:
        if not self._finished:
            raise RuntimeError("ContentParser.result() called before finish()")
        content = "".join(self._raw).strip()
        return ParsedCompletion(reasoning=None, content=content or None, tool_calls=(), problems=())


def _partial_tag_len(text: str, start: int, tag: str) -> int:
    """Length of the longest suffix of ``text[start:]`` that is a proper prefix of ``tag``."""
    for size in range(min(len(tag) - 1, len(text) - start), 0, -1):
        if text.endswith(tag[:size]):
            return size
    return 0


def _reject_constant(token: str) -> Any:
    # json accepts NaN and Infinity, but they are not JSON and clients would choke on them.
    raise ValueError(f"{token} is not valid JSON")


def _load_json(text: str) -> tuple[Any, str | None]:
    """``(value, None)``, or ``(None, reason)`` when ``text`` is not valid JSON.

    Raw control characters (a newline, a tab) inside strings are let through: models write
    them, and so does xgrammar's grammar for a ``maxLength`` string (0.2.8). The arguments
    are written out again with ``json.dumps``, which escapes them, so clients get valid JSON.
    """
    try:
        return json.loads(text, parse_constant=_reject_constant, strict=False), None
    except json.JSONDecodeError as exc:
        # Some messages already end in "at" ("Unterminated string starting at").
        where = "char" if exc.msg.endswith(" at") else "at char"
        return None, f"{exc.msg} {where} {exc.pos}"
    except RecursionError:
        return None, "nested too deeply"
    except ValueError as exc:  # _reject_constant, or an integer too long to convert
        return None, str(exc)


def _check_call(raw: str) -> ParsedToolCall | str:
    """The call held in ``raw``, or why it is malformed."""
    obj, error = _load_json(raw.strip())
    if error is not None:
        return f"invalid JSON ({error})"
    if not isinstance(obj, dict):
        return "not a JSON object"
    name = obj.get("name")
    if not isinstance(name, str) or not name:
        return '"name" must be a non-empty string'
    arguments = obj.get("arguments")
    if isinstance(arguments, str):
        arguments, error = _load_json(arguments)
        if error is not None or not isinstance(arguments, dict):
            return '"arguments" is a string that does not hold a JSON object'
    elif arguments is None:
        arguments = {}
    elif not isinstance(arguments, dict):
        return '"arguments" must be a JSON object, a string holding one, or null'
    return ParsedToolCall(name=name, arguments=json.dumps(arguments, ensure_ascii=False))
