"""A chat's function tools: checking what the user wrote, and their part of a request.

The user writes OpenAI function tools as JSON (a list of `{"type": "function",
"function": {name, description, parameters}}`); `parse_tools` accepts exactly
what the engine accepts (docs/api.md "Tool calling") and says in plain words
what is wrong otherwise, so a request never fails on the user's tools.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any

import jsonschema
from jsonschema.exceptions import SchemaError

from engine.errors import PeregrineError
from engine.structured.schema import SchemaError as EngineSchemaError
from engine.structured.schema import check_schema as engine_check_schema

# The names the engine (and OpenAI) accept.
NAME_PATTERN = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")
CHOICES = ("auto", "required", "none")
NAMED_PREFIX = "function:"

EXAMPLE = """[
  {
    "type": "function",
    "function": {
      "name": "get_weather",
      "description": "The weather forecast for a city",
      "parameters": {
        "type": "object",
        "properties": {
          "city": {"type": "string"},
          "days": {"type": "integer", "minimum": 1, "maximum": 7}
        },
        "required": ["city", "days"]
      }
    }
  }
]"""


class ToolSpecError(PeregrineError):
    """Tools or a tool_choice that cannot be sent, in words that say where and why."""


@dataclass(frozen=True)
class ToolSettings:
    """A chat's tools, checked: what the editor saves and the request sends."""

    text: str
    tools: list[dict[str, Any]]
    enabled: bool
    choice: str  # "auto", "required", "none" or "function:NAME"

    def request_fields(self, after_tool_result: bool = False) -> dict[str, Any]:
        """The `tools` and `tool_choice` fields of a chat request; empty when off.

        After a tool result a forcing choice ("required", a named tool) becomes
        "auto", as the OpenAI Agents SDK's reset_tool_choice does: forcing a call
        again would make the model call forever instead of answering.
        """
        if not self.enabled or not self.tools:
            return {}
        choice: Any = self.choice
        if after_tool_result and choice != "none":
            choice = "auto"
        elif choice.startswith(NAMED_PREFIX):
            choice = {"type": "function", "function": {"name": choice[len(NAMED_PREFIX) :]}}
        return {"tools": self.tools, "tool_choice": choice}


def tool_names(tools: list[dict[str, Any]]) -> list[str]:
    return [str(t["function"]["name"]) for t in tools]


def parse_tools(text: str) -> list[dict[str, Any]]:
    """The tools in `text` (empty text: none); raises ToolSpecError saying what is wrong."""
    if not text.strip():
        return []
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ToolSpecError(
            f"The tools are not valid JSON: {exc.msg} at line {exc.lineno}, column {exc.colno}."
        ) from exc
    except RecursionError as exc:
        raise ToolSpecError("The tools are nested too deeply to read.") from exc
    if isinstance(value, dict):
        raise ToolSpecError("The tools must be a list: put the tool in square brackets, [ {…} ].")
    if not isinstance(value, list):
        raise ToolSpecError(f"The tools must be a list of tools, not {_kind(value)}.")
    seen: set[str] = set()
    tools = []
    for index, tool in enumerate(value, start=1):
        tools.append(_check_tool(index, tool, seen))
    return tools


def check_settings(text: str, enabled: bool, choice: str) -> ToolSettings:
    """Checks a whole tools setting as the editor saves it; raises ToolSpecError."""
    tools = parse_tools(text)
    names = tool_names(tools)
    if choice.startswith(NAMED_PREFIX):
        name = choice[len(NAMED_PREFIX) :]
        if name not in names:
            raise ToolSpecError(
                f'"Always call {name}" needs a tool named {name}; there is none in the list.'
            )
    elif choice not in CHOICES:
        raise ToolSpecError(f"Unknown tool choice {choice!r}; choose auto, required or none.")
    if enabled and not tools:
        raise ToolSpecError("Add at least one tool before turning tools on.")
    return ToolSettings(text, tools, enabled, choice)


def settings_of(text: str, enabled: bool, choice: str) -> ToolSettings:
    """A stored setting as it is sent; one that no longer checks out is sent as off.

    Stored settings were checked when saved, so this only guards against a
    database edited by hand.
    """
    try:
        return check_settings(text, enabled, choice)
    except ToolSpecError:
        return ToolSettings(text, [], False, "auto")


def summary(arguments: str, limit: int = 80) -> str:
    """A one-line summary of a call's arguments: `city: "Paris", days: 3`."""
    try:
        value = json.loads(arguments)
    except (ValueError, RecursionError):
        value = None
    if isinstance(value, dict):
        parts = [f"{k}: {json.dumps(v, ensure_ascii=False)}" for k, v in value.items()]
        text = ", ".join(parts)
    else:
        text = " ".join(arguments.split())
    return text if len(text) <= limit else text[: limit - 1].rstrip() + "…"


def pretty(text: str) -> str:
    """JSON text indented for reading; other text as it is."""
    try:
        value = json.loads(text)
    except (ValueError, RecursionError):
        return text
    if not isinstance(value, dict | list):
        return text
    return json.dumps(value, indent=2, ensure_ascii=False)


def _check_tool(index: int, tool: Any, seen: set[str]) -> dict[str, Any]:
    where = f"Tool {index}"
    if not isinstance(tool, dict):
        raise ToolSpecError(f"{where} must be an object, not {_kind(tool)}.")
    if tool.get("type") != "function":
        raise ToolSpecError(f'{where} needs "type": "function" (the only kind of tool).')
    function = tool.get("function")
    if not isinstance(function, dict):
        raise ToolSpecError(f'{where} needs a "function" object with its name and parameters.')
    name = function.get("name")
    if not isinstance(name, str) or not NAME_PATTERN.match(name):
        raise ToolSpecError(
            f"{where} needs a name of 1 to 64 letters, digits, _ . or - (got {json.dumps(name)})."
        )
    where = f"Tool {index} ({name})"
    if name in seen:
        raise ToolSpecError(f"{where}: another tool has the same name.")
    seen.add(name)
    unknown = sorted(set(function) - {"name", "description", "parameters", "strict"})
    if unknown:
        raise ToolSpecError(f"{where}: unknown field {', '.join(map(repr, unknown))}.")
    if "description" in function and not isinstance(function["description"], str):
        raise ToolSpecError(f"{where}: the description must be text.")
    parameters = function.get("parameters", {"type": "object", "properties": {}})
    if not isinstance(parameters, dict):
        raise ToolSpecError(f"{where}: parameters must be a JSON Schema object.")
    if parameters.get("type", "object") != "object":
        raise ToolSpecError(f'{where}: parameters must have "type": "object".')
    try:
        jsonschema.Draft202012Validator.check_schema(parameters)
    except SchemaError as exc:
        path = "/".join(str(p) for p in exc.absolute_path) or "the top"
        raise ToolSpecError(
            f"{where}: parameters is not a valid JSON Schema at {path}: {exc.message}."
        ) from exc
    try:
        # The engine holds calls to the schema with a grammar; it refuses (400) what
        # the grammar cannot enforce, so the editor says so first.
        engine_check_schema(parameters)
    except EngineSchemaError as exc:
        raise ToolSpecError(f"{where}: parameters: {exc}.") from exc
    out: dict[str, Any] = {"type": "function", "function": {**function, "parameters": parameters}}
    return out


def _kind(value: Any) -> str:
    names = {bool: "true/false", int: "a number", float: "a number", str: "text"}
    names.update({list: "a list", dict: "an object", type(None): "null"})
    return names.get(type(value), type(value).__name__)
