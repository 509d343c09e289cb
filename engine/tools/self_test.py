"""The tool-call self-test: one forced call after load, parsed back, reported in the status.

It checks the whole path a real call takes (template, grammar, sampling,
parser) on the model actually loaded, in at most `MAX_TOKENS` tokens, and
reports whether the call came back as a valid `get_weather` call.
"""

from __future__ import annotations

import json
from typing import Any

from engine.tools.formats import ToolFormat
from engine.tools.grammar import Tool, tool_grammar
from engine.tools.parse import parse_output

MAX_TOKENS = 64
CITIES = ["Paris", "London"]
TOOL = Tool(
    "get_weather",
    "The current weather in a city",
    {
        "type": "object",
        "properties": {"city": {"type": "string", "enum": CITIES}},
        "required": ["city"],
        "additionalProperties": False,
    },
)
MESSAGES: list[dict[str, Any]] = [{"role": "user", "content": "What is the weather in Paris?"}]


def template_tools() -> list[dict[str, Any]]:
    return [
        {
            "type": "function",
            "function": {
                "name": TOOL.name,
                "description": TOOL.description,
                "parameters": TOOL.parameters,
            },
        }
    ]


def grammar(fmt: ToolFormat) -> str | None:
    return tool_grammar(fmt, [TOOL], "required", parallel=False)


def check(fmt: ToolFormat, text: str, finish: str) -> tuple[bool, str | None]:
    """Whether the answer is one valid call; the reason when it is not."""
    parsed = parse_output(fmt, text, {TOOL.name: TOOL.parameters})
    if len(parsed.calls) != 1:
        why = "cut by the token limit" if finish == "length" else "no call parsed"
        return False, f"{why}: {text[:120]!r}"
    call = parsed.calls[0]
    args = json.loads(call.arguments)
    if call.name != TOOL.name or set(args) != {"city"} or args["city"] not in CITIES:
        return False, f"the call does not match the tool: {call.name} {call.arguments[:80]}"
    return True, None
