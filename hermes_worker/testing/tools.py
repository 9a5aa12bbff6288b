"""The ``get_weather`` tool the demo, the example tool loop and the tests offer the model:
one definition, in OpenAI's function-tool shape."""

from __future__ import annotations

import copy
from typing import Any

_WEATHER_TOOL: dict[str, Any] = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Current weather for a city",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string"}},
            "required": ["city"],
        },
    },
}


def weather_tool() -> dict[str, Any]:
    """A fresh copy of the tool (callers may change theirs)."""
    return copy.deepcopy(_WEATHER_TOOL)
