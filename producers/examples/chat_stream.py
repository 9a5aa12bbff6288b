"""Submit a chat job, print its reasoning and answer as they stream, then the token usage.

Needs Redis and a running worker; the Redis URL, key prefix and queue come from the
``HERMES_*`` env vars::

    python producers/examples/chat_stream.py "Why is the sky blue?"
"""

from __future__ import annotations

import sys
from typing import Any

from producers import HermesClient, JobResult, StreamEvent

TEXT_EVENTS = ("reasoning", "content")


def chat_job(question: str, *, thinking: bool = True) -> dict[str, Any]:
    """A one-question job; ``thinking`` asks Hermes 4 to reason in a <think> block first."""
    return {
        "messages": [{"role": "user", "content": question}],
        "thinking": thinking,
        # No max_tokens: the answer may use the rest of the model's context.
        "timeout_s": 300,
    }


def delta_text(event: StreamEvent) -> str | None:
    """The text a ``reasoning`` or ``content`` event adds, or None for any other event."""
    if event.type not in TEXT_EVENTS or not isinstance(event.data, dict):
        return None
    text = event.data.get("text")
    return text if isinstance(text, str) else None


def usage_line(result: JobResult) -> str:
    usage = result.usage
    if usage is None:
        return "usage: none reported"
    reasoning = usage.completion_tokens_details.reasoning_tokens
    return (
        f"usage: {usage.prompt_tokens} prompt + {usage.completion_tokens} completion tokens"
        f" ({reasoning} reasoning), {usage.prompt_tokens_details.cached_tokens} prompt cached"
    )


def main(question: str) -> int:
    with HermesClient() as client:
        handle = client.submit(chat_job(question))
        print(f"job {handle.id}", file=sys.stderr)
        section = None
        for event in handle.stream(timeout=600):
            text = delta_text(event)
            if text is None:
                continue
            if event.type != section:  # a heading whenever the stream switches kind
                section = event.type
                print(f"\n[{section}]", flush=True)
            print(text, end="", flush=True)
        result = handle.result(timeout=60)
    print()
    if result.error is not None:
        print(f"job {result.job.status}: {result.error.type}: {result.error.message}")
        return 1
    print(usage_line(result))
    return 0


if __name__ == "__main__":
    sys.exit(main(" ".join(sys.argv[1:]) or "Why is the sky blue? Answer in two sentences."))
