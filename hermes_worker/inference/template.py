"""Prompt rendering: a job's messages, tools and Hermes flags -> prompt text and token ids.

The checkpoint's own chat template wins when it has one (the real Hermes 4 checkpoints
do); otherwise the Hermes 4 fallback shipped in ``templates/hermes4.jinja`` is used.
Either way the template runs in Jinja's immutable sandbox: message text is data handed
to the template, so template syntax inside a message is printed, never executed, and text
that spells a special token is tokenized as text (``special_tokens.py``).

Earlier assistant turns reach every template in the shape the model produced them: one
``content`` holding the reasoning as a ``<think>`` block (kept only with ``keep_cots``),
the answer, and the tool calls as ``<tool_call>`` blocks (:func:`assistant_history`). The
official Hermes 4 template reads only ``content`` and, with ``thinking`` on and
``keep_cots`` off, cuts each turn at its first ``</think>``; a turn without one fails it.
"""

from __future__ import annotations

import json
import threading
from dataclasses import dataclass
from datetime import datetime
from functools import lru_cache
from pathlib import Path
from typing import Any, Literal, NoReturn, Protocol

import jinja2
import jinja2.ext
import jinja2.nodes
from jinja2.sandbox import ImmutableSandboxedEnvironment

from hermes_worker.contract.jobs import ChatJob, content_text
from hermes_worker.errors import ModelLoadError, TemplateError
from hermes_worker.inference.special_tokens import (
    Shield,
    compile_guard,
    encode_pieces,
    restore,
    special_token_texts,
)
from hermes_worker.inference.templates import fallback_template
from hermes_worker.inference.tokenizer import load_tokenizer


class Tokenizer(Protocol):
    """What rendering needs of a tokenizer (a Hugging Face tokenizer or vLLM's wrapper of one)."""

    chat_template: Any
    bos_token: Any

    def encode(
        self, text: str, add_special_tokens: bool = ..., split_special_tokens: bool = ...
    ) -> list[int]: ...


@dataclass(frozen=True)
class RenderedPrompt:
    """The exact prompt a job sends to the engine."""

    text: str
    token_ids: list[int]
    template_source: Literal["checkpoint", "fallback"]


class _GenerationTag(jinja2.ext.Extension):
    """Accepts ``{% generation %}…{% endgeneration %}`` (used by some HF templates) as a no-op."""

    tags = {"generation"}  # noqa: RUF012 - jinja reads this class attribute by name

    def parse(self, parser: jinja2.parser.Parser) -> jinja2.nodes.Node:
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jinja2.nodes.Scope(body, lineno=lineno)


def _raise_exception(message: str) -> NoReturn:
    raise jinja2.exceptions.TemplateError(message)


def _tojson(
    value: Any,
    ensure_ascii: bool = False,
    indent: int | None = None,
    separators: tuple[str, str] | None = None,
    sort_keys: bool = False,
) -> str:
    # Jinja's built-in tojson escapes <, > and & for HTML; a prompt wants the JSON as is.
    return json.dumps(
        value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys
    )


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


@lru_cache(maxsize=16)
def compile_template(source: str) -> jinja2.Template:
    """Compile a chat template in the immutable sandbox, with the helpers HF templates expect."""
    env = ImmutableSandboxedEnvironment(
        trim_blocks=True,
        lstrip_blocks=True,
        extensions=[jinja2.ext.loopcontrols, _GenerationTag],
    )
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    try:
        return env.from_string(source)
    except jinja2.TemplateSyntaxError as exc:
        message = f"chat template does not compile: {exc.message} (line {exc.lineno})"
        raise TemplateError(message) from exc


EMPTY_THINK = "<think> </think>"


def assistant_history(
    message: dict[str, Any], *, thinking: bool, keep_cots: bool
) -> dict[str, Any]:
    """An earlier assistant turn as one ``content``, the way the model wrote it.

    Reasoning (``reasoning_content``, or a ``<think>`` block a client echoed in ``content``)
    is kept only with ``keep_cots``. With ``thinking`` on and nothing kept, the turn opens
    with an empty think block: the official template cuts each turn at its first ``</think>``
    and fails on a turn that has none.
    """
    turn = {k: v for k, v in message.items() if k not in ("reasoning_content", "tool_calls")}
    content: str = message.get("content") or ""
    if not keep_cots and "</think>" in content:
        content = content.rsplit("</think>", 1)[1].lstrip()
    pieces = [content] if content else []
    reasoning = message.get("reasoning_content")
    if keep_cots and reasoning:
        pieces.insert(0, f"<think>\n{reasoning}\n</think>")
    for call in message.get("tool_calls") or ():
        shown = {"name": call["function"]["name"], "arguments": call["function"]["arguments"]}
        pieces.append(f"<tool_call>\n{json.dumps(shown, ensure_ascii=False)}\n</tool_call>")
    text = "\n".join(pieces)
    if thinking and not keep_cots:  # nothing before holds a </think> of its own now
        text = f"{EMPTY_THINK}\n{text}" if text else EMPTY_THINK
    turn["content"] = text
    return turn


def _template_messages(job: ChatJob) -> list[dict[str, Any]]:
    """Messages in the shape HF chat templates expect: plain-string content, mapping
    arguments, earlier assistant turns as the model wrote them."""
    out: list[dict[str, Any]] = []
    for message in job.messages:
        item = message.model_dump(mode="json", exclude_none=True)
        item["content"] = content_text(getattr(message, "content", None))
        for call in item.get("tool_calls") or []:
            call["function"]["arguments"] = json.loads(call["function"]["arguments"])
        if item["role"] == "assistant":
            item = assistant_history(item, thinking=job.thinking, keep_cots=job.keep_cots)
        out.append(item)
    return out


def _shows_tools(job: ChatJob) -> bool:
    # tool_choice "none" means the model must not call tools, so it is not shown any.
    return bool(job.tools) and job.effective_tool_choice != "none"


def _template_tools(job: ChatJob) -> list[dict[str, Any]] | None:
    if not _shows_tools(job):
        return None
    return [tool.model_dump(mode="json", exclude_none=True) for tool in job.tools or ()]


def _pick_template(chat_template: Any, has_tools: bool) -> str | None:
    # Some checkpoints carry named templates; "tool_use" is the HF name for the tools variant.
    if isinstance(chat_template, dict):
        if has_tools and "tool_use" in chat_template:
            return str(chat_template["tool_use"])
        return str(chat_template["default"]) if "default" in chat_template else None
    return str(chat_template) if chat_template else None


class PromptRenderer:
    """Renders jobs for one tokenizer; build once per worker, reuse for every job (from any
    thread: tokenizing takes a lock of the renderer's own)."""

    def __init__(self, tokenizer: Tokenizer, *, force_fallback: bool = False) -> None:
        self.tokenizer = tokenizer
        own = None if force_fallback else getattr(tokenizer, "chat_template", None)
        self._own_template = own
        self._fallback = fallback_template()
        added = getattr(tokenizer, "added_tokens_decoder", {}).values()
        self._guard = compile_guard(special_token_texts((t.content, t.special) for t in added))
        self._encode_lock = threading.Lock()  # HF tokenizers are not safe to share across threads

    @classmethod
    def from_pretrained(cls, model: str | Path, *, force_fallback: bool = False) -> PromptRenderer:
        """Load the tokenizer (and its chat template) of a local checkpoint directory."""
        try:
            tokenizer = load_tokenizer(Path(model))
        except (OSError, ValueError) as exc:
            raise ModelLoadError(f"cannot load a tokenizer from {model}: {exc}") from exc
        return cls(tokenizer, force_fallback=force_fallback)

    def template_for(self, job: ChatJob) -> tuple[str, Literal["checkpoint", "fallback"]]:
        own = _pick_template(self._own_template, _shows_tools(job))
        return (own, "checkpoint") if own else (self._fallback, "fallback")

    def render_text(self, job: ChatJob) -> str:
        """The prompt text, ending with the assistant header the model continues from."""
        source, _ = self.template_for(job)
        return restore(self._render(source, job, Shield(self._guard)))

    def render(self, job: ChatJob, suffix: str = "") -> RenderedPrompt:
        """Prompt text and token ids; ids are what the engine gets, so BOS is never added twice.
        ``suffix``: text of our own after the template's (a forced call's opening tag)."""
        source, origin = self.template_for(job)
        pieces = self._render(source, job, Shield(self._guard))
        if suffix:
            pieces.append((suffix, False))
        with self._encode_lock:
            ids = encode_pieces(pieces, self._encode)
        return RenderedPrompt(text=restore(pieces), token_ids=ids, template_source=origin)

    def special_tokens(self, token_ids: list[int]) -> list[str]:
        """The special tokens among ``token_ids``, in order: the prompt's structure."""
        added = getattr(self.tokenizer, "added_tokens_decoder", {})
        return [added[i].content for i in token_ids if i in added and added[i].special]

    def _encode(self, text: str, as_plain_text: bool) -> list[int]:
        # The template writes <|begin_of_text|> itself; letting the tokenizer add special
        # tokens too would put BOS in twice (the OpenAI server makes the same choice).
        if as_plain_text:
            return list(
                self.tokenizer.encode(text, add_special_tokens=False, split_special_tokens=True)
            )
        return list(self.tokenizer.encode(text, add_special_tokens=False))

    def _render(self, source: str, job: ChatJob, shield: Shield) -> list[tuple[str, bool]]:
        template = compile_template(source)
        bos = self.tokenizer.bos_token
        try:
            text = template.render(
                messages=shield.protect(_template_messages(job)),
                tools=shield.protect(_template_tools(job)),
                add_generation_prompt=True,
                thinking=job.thinking,
                keep_cots=job.keep_cots,
                bos_token=bos if isinstance(bos, str) else "",
                eos_token=getattr(self.tokenizer, "eos_token", None) or "",
            )
        except jinja2.TemplateError as exc:
            raise TemplateError(f"chat template failed: {exc}") from exc
        return shield.pieces(text)
