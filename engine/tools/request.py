"""What a request asks of tools: which tools, which choice, and the grammar that enforces it.

Shared by the OpenAI route and the Anthropic one (engine/wire/anthropic.py
converts its blocks to these same objects).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from engine.errors import PeregrineError
from engine.tools.formats import ToolFormat
from engine.tools.grammar import ChoiceMode, Tool, checked_parameters, tool_grammar
from engine.wire.openai import ChatCompletionRequest, ChatMessage

EMPTY_PARAMETERS: dict[str, Any] = {"type": "object", "properties": {}}


class ToolRequestError(PeregrineError):
    """A tools field the engine cannot serve; `param` names it."""

    def __init__(self, message: str, param: str) -> None:
        super().__init__(message)
        self.param = param


@dataclass(frozen=True)
class ToolRequest:
    tools: list[Tool]
    mode: ChoiceMode
    named: str | None = None  # the one function a named tool_choice asks for
    parallel: bool = True

    def template_tools(self) -> list[dict[str, Any]] | None:
        """OpenAI's tool objects for the chat template (none under tool_choice "none")."""
        if self.mode == "none" and self.named is None:
            return None
        return [
            {
                "type": "function",
                "function": {
                    "name": t.name,
                    **({"description": t.description} if t.description else {}),
                    "parameters": t.parameters,
                },
            }
            for t in self.tools
        ]

    def schemas(self) -> dict[str, Any] | None:
        """Tool name -> parameters schema, for the parser; None when no call may be made."""
        if self.mode == "none":
            return None
        return {t.name: t.parameters for t in self.tools}

    def grammar(self, fmt: ToolFormat) -> str | None:
        """The grammar for this choice in the model's format (SchemaError on a bad schema)."""
        tools = checked_parameters(self.tools)
        if self.named is not None:
            tools = [t for t in tools if t.name == self.named]
        return tool_grammar(fmt, tools, self.mode, parallel=self.parallel)


def tool_request(
    tools: Sequence[Tool],
    choice: str | None,
    named: str | None,
    parallel: bool | None,
    *,
    choice_param: str = "tool_choice",
) -> ToolRequest | None:
    """Checks a tool choice against the tools; None when the request has no tools."""
    if not tools:
        if named is not None or choice == "required":
            raise ToolRequestError(f"'{choice_param}' needs 'tools'", choice_param)
        return None
    names = [t.name for t in tools]
    if len(set(names)) != len(names):
        raise ToolRequestError("tool names must be unique", "tools")
    if named is not None:
        if named not in names:
            raise ToolRequestError(
                f"'{choice_param}' names {named!r}, which is not among the tools", choice_param
            )
        return ToolRequest(list(tools), "required", named, parallel=False)
    mode: ChoiceMode = "auto" if choice is None else choice  # type: ignore[assignment]
    # llama-server's default: one call per answer unless parallel calls are asked for.
    return ToolRequest(list(tools), mode, None, parallel=parallel is True)


def from_openai(req: ChatCompletionRequest) -> ToolRequest | None:
    """The tools of a chat request, its legacy `functions` and `function_call` included."""
    functions = [t.function for t in req.tools or []] + list(req.functions or [])
    tools = [
        Tool(
            fn.name,
            fn.description,
            fn.parameters if fn.parameters is not None else EMPTY_PARAMETERS,
        )
        for fn in functions
    ]
    choice: str | None = None
    named: str | None = None
    param = "tool_choice"
    if req.tool_choice is not None:
        if isinstance(req.tool_choice, str):
            choice = req.tool_choice
        else:
            named = req.tool_choice.function.name
    elif req.function_call is not None:
        param = "function_call"
        if isinstance(req.function_call, str):
            choice = req.function_call
        else:
            named = req.function_call.name
    return tool_request(tools, choice, named, req.parallel_tool_calls, choice_param=param)


def _arguments(text: str, param: str) -> dict[str, Any]:
    try:
        value = json.loads(text) if text.strip() else {}
    except json.JSONDecodeError as exc:
        raise ToolRequestError(f"'{param}' is not valid JSON: {exc.msg}", param) from exc
    if not isinstance(value, dict):
        raise ToolRequestError(f"'{param}' must be a JSON object", param)
    return value


def openai_messages(messages: Sequence[ChatMessage]) -> list[dict[str, Any]]:
    """Chat messages as the template reads them: tool calls with arguments as dicts."""
    out: list[dict[str, Any]] = []
    for i, m in enumerate(messages):
        msg: dict[str, Any] = {"role": m.role, "content": m.text()}
        if m.name:
            msg["name"] = m.name
        if m.role == "assistant" and (m.tool_calls or m.function_call is not None):
            items = []
            pairs = [
                (c.id, c.function, f"messages.{i}.tool_calls.{j}.function.arguments")
                for j, c in enumerate(m.tool_calls or [])
            ]
            if m.function_call is not None:
                pairs.append((None, m.function_call, f"messages.{i}.function_call.arguments"))
            for j, (call_id, fn, where) in enumerate(pairs):
                items.append(
                    {
                        "id": call_id or f"call_{i}_{j}",
                        "type": "function",
                        "function": {"name": fn.name, "arguments": _arguments(fn.arguments, where)},
                    }
                )
            msg["tool_calls"] = items
            if m.content is None:
                msg["content"] = None
        if m.role == "function":
            # The legacy function result: a tool message named for its function.
            msg["role"] = "tool"
            msg["tool_call_id"] = m.name or ""
        elif m.role == "tool":
            msg["tool_call_id"] = m.tool_call_id or ""
        if m.reasoning_content:
            msg["reasoning_content"] = m.reasoning_content
        out.append(msg)
    return out
