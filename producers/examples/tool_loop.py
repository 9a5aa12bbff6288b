"""A tool-use loop: offer Hermes 4 a ``get_weather`` tool, run the calls it makes locally,
send the results back in the next job, and stop at an answer without calls.

Needs Redis and a running worker (``HERMES_*`` env vars)::

    python producers/examples/tool_loop.py "Do I need an umbrella in Paris or Oslo today?"
"""

from __future__ import annotations

import json
import sys
from collections.abc import Sequence
from typing import Any

from hermes_worker.contract.jobs import ResponseMessage, ResponseToolCall
from hermes_worker.testing.tools import weather_tool
from producers import HermesClient, JobResult

MAX_ROUNDS = 4

# The "weather service": a table lookup, so the example runs offline.
WEATHER = {
    "paris": {"sky": "rain", "celsius": 14},
    "oslo": {"sky": "snow", "celsius": -3},
    "lisbon": {"sky": "sun", "celsius": 22},
}

TOOLS = [weather_tool()]


def get_weather(city: str) -> dict[str, Any]:
    return WEATHER.get(city.strip().lower(), {"error": f"no weather known for {city!r}"})


def run_tool(call: ResponseToolCall) -> str:
    """Run one call locally; the answer (or the error) goes back to the model as JSON text."""
    if call.function.name != "get_weather":
        return json.dumps({"error": f"unknown tool {call.function.name!r}"})
    try:
        arguments = json.loads(call.function.arguments)
    except json.JSONDecodeError:
        return json.dumps({"error": "arguments are not valid JSON"})
    return json.dumps(get_weather(str(arguments.get("city", ""))))


def with_tool_results(
    messages: Sequence[dict[str, Any]], message: ResponseMessage
) -> list[dict[str, Any]]:
    """The conversation plus the assistant's turn (with its calls) and one tool message each."""
    calls = message.tool_calls or ()
    assistant: dict[str, Any] = {
        "role": "assistant",
        "content": message.content,
        "tool_calls": [call.model_dump(mode="json") for call in calls],
    }
    if message.reasoning_content:
        assistant["reasoning_content"] = message.reasoning_content
    results = [{"role": "tool", "tool_call_id": c.id, "content": run_tool(c)} for c in calls]
    return [*messages, assistant, *results]


def weather_job(messages: Sequence[dict[str, Any]]) -> dict[str, Any]:
    return {"messages": list(messages), "tools": TOOLS, "max_tokens": 1024, "timeout_s": 300}


def tool_loop(client: HermesClient, question: str, max_rounds: int = MAX_ROUNDS) -> JobResult:
    """Submit, run the tool calls, resubmit; the last result (an answer, or round N's)."""
    messages: list[dict[str, Any]] = [{"role": "user", "content": question}]
    for _ in range(max_rounds):
        result = client.submit(weather_job(messages)).result(timeout=600)
        message = result.choices[0].message if result.choices else None
        if result.error is not None or message is None or not message.tool_calls:
            return result
        for call in message.tool_calls:
            print(f"tool call: {call.function.name}({call.function.arguments})", file=sys.stderr)
        messages = with_tool_results(messages, message)
    return result


def main(question: str) -> int:
    with HermesClient() as client:
        result = tool_loop(client, question)
    if result.error is not None:
        print(f"job {result.job.status}: {result.error.type}: {result.error.message}")
        return 1
    message = result.choices[0].message
    print(message.content if not message.tool_calls else f"gave up after {MAX_ROUNDS} rounds")
    return 0


if __name__ == "__main__":
    sys.exit(main(" ".join(sys.argv[1:]) or "Do I need an umbrella in Paris today?"))
