"""The Anthropic Messages API on the engine's core: requests in, answers and events out.

`POST /v1/messages` runs on the same jobs, grammars and tool-call parser as
the OpenAI route (engine/serving/server.py); this module converts its blocks
to chat messages and a `ToolRequest`, and the parsed answer back to content
blocks (whole) or to Anthropic's stream events (docs/api.md).
"""

from __future__ import annotations

import json
import secrets
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from engine.tools.grammar import Tool
from engine.tools.parse import (
    ArgsDelta,
    CallEnd,
    CallStart,
    ContentDelta,
    ParsedOutput,
    ParseEvent,
    ReasoningDelta,
)
from engine.tools.request import ToolRequest, ToolRequestError, tool_request
from engine.wire.anthropic import ContentBlock, CountTokensRequest

# Anthropic's error types by HTTP status (https://docs.anthropic.com/en/api/errors).
ERROR_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    408: "timeout_error",
    413: "request_too_large",
    415: "invalid_request_error",
    429: "rate_limit_error",
    499: "api_error",
    500: "api_error",
    503: "overloaded_error",
}

STOP_REASONS = {"stop": "end_turn", "length": "max_tokens", "cancelled": "end_turn"}


def error_body(status: int, message: str) -> dict[str, Any]:
    return {
        "type": "error",
        "error": {"type": ERROR_TYPES.get(status, "api_error"), "message": message},
    }


def message_id() -> str:
    return "msg_" + secrets.token_hex(12)


def tool_use_id() -> str:
    return "toolu_" + secrets.token_hex(12)


def _text(content: str | list[ContentBlock] | None, where: str) -> str:
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    parts = []
    for i, block in enumerate(content):
        if block.type != "text":
            raise ToolRequestError(
                f"content block type '{block.type}' is not supported here: text only",
                f"{where}.{i}.type",
            )
        parts.append(block.text or "")
    return "".join(parts)


def chat_messages(req: CountTokensRequest) -> list[dict[str, Any]]:
    """The conversation as chat messages (OpenAI's roles; tool calls with dict arguments)."""
    out: list[dict[str, Any]] = []
    if req.system is not None:
        system = _text(req.system, "system")
        if system:
            out.append({"role": "system", "content": system})
    for i, m in enumerate(req.messages):
        where = f"messages.{i}.content"
        if isinstance(m.content, str):
            out.append({"role": m.role, "content": m.content})
            continue
        texts: list[str] = []
        calls: list[dict[str, Any]] = []
        reasoning: list[str] = []
        results: list[dict[str, Any]] = []
        for j, block in enumerate(m.content):
            if block.type == "text":
                texts.append(block.text or "")
            elif block.type == "tool_use" and m.role == "assistant":
                calls.append(
                    {
                        "id": block.id or tool_use_id(),
                        "type": "function",
                        "function": {"name": block.name or "", "arguments": block.input or {}},
                    }
                )
            elif block.type == "tool_result" and m.role == "user":
                text = _text(block.content, f"{where}.{j}.content")
                if block.is_error:
                    text = "Error: " + text
                results.append(
                    {"role": "tool", "tool_call_id": block.tool_use_id or "", "content": text}
                )
            elif block.type in ("thinking", "redacted_thinking") and m.role == "assistant":
                reasoning.append(block.thinking or "")
            else:
                raise ToolRequestError(
                    f"content block type '{block.type}' is not supported in a {m.role} message",
                    f"{where}.{j}.type",
                )
        out.extend(results)
        if m.role == "assistant":
            msg: dict[str, Any] = {"role": "assistant", "content": "".join(texts) or None}
            if calls:
                msg["tool_calls"] = calls
            elif msg["content"] is None:
                msg["content"] = ""
            if reasoning:
                msg["reasoning_content"] = "".join(reasoning)
            out.append(msg)
        elif texts or not results:
            out.append({"role": "user", "content": "".join(texts)})
    return out


def tools_of(req: CountTokensRequest) -> ToolRequest | None:
    tools = [
        Tool(t.name, t.description, t.input_schema)
        for t in req.tools or []
        if t.type in (None, "custom")
    ]
    if len(tools) != len(req.tools or []):
        raise ToolRequestError("server tools (web search...) are not supported", "tools")
    choice = req.tool_choice
    if choice is None:
        return tool_request(tools, None, None, True)
    if choice.type == "tool" and not choice.name:
        raise ToolRequestError("'tool_choice' of type 'tool' needs a 'name'", "tool_choice.name")
    mode = {"auto": "auto", "any": "required", "none": "none", "tool": None}[choice.type]
    return tool_request(
        tools,
        mode,
        choice.name if choice.type == "tool" else None,
        choice.disable_parallel_tool_use is not True,
    )


def _tool_input(arguments: str) -> dict[str, Any]:
    value = json.loads(arguments)
    return value if isinstance(value, dict) else {}


def stop_reason(finish: str, parsed_calls: bool, stop_sequence: str | None) -> str:
    if parsed_calls and finish == "stop":
        return "tool_use"
    if stop_sequence is not None:
        return "stop_sequence"
    return STOP_REASONS.get(finish, "end_turn")


def message_body(
    *,
    msg_id: str,
    model: str,
    parsed: ParsedOutput,
    finish: str,
    stop_sequence: str | None,
    input_tokens: int,
    output_tokens: int,
) -> dict[str, Any]:
    content: list[dict[str, Any]] = []
    if parsed.reasoning:
        content.append({"type": "thinking", "thinking": parsed.reasoning, "signature": ""})
    if parsed.content:
        content.append({"type": "text", "text": parsed.content})
    for call in parsed.calls:
        content.append(
            {
                "type": "tool_use",
                "id": call.id,
                "name": call.name,
                "input": _tool_input(call.arguments),
            }
        )
    return {
        "id": msg_id,
        "type": "message",
        "role": "assistant",
        "model": model,
        "content": content,
        "stop_reason": stop_reason(finish, bool(parsed.calls), stop_sequence),
        "stop_sequence": stop_sequence,
        "usage": {"input_tokens": input_tokens, "output_tokens": output_tokens},
    }


@dataclass
class EventWriter:
    """Turns parsed events into Anthropic's content block events, opening and closing blocks.

    A tool call is a `tool_use` block opened at its start, its arguments'
    pieces as `input_json_delta`s as they come, and closed at its end.
    """

    index: int = -1
    open_type: str | None = None
    calls: int = 0
    out: list[tuple[str, dict[str, Any]]] = field(default_factory=list)

    def _close(self) -> None:
        if self.open_type is not None:
            if self.open_type == "thinking":
                self._delta({"type": "signature_delta", "signature": ""})
            self.out.append(
                ("content_block_stop", {"type": "content_block_stop", "index": self.index})
            )
            self.open_type = None

    def _open(self, block: dict[str, Any]) -> None:
        self._close()
        self.index += 1
        self.open_type = block["type"]
        self.out.append(
            (
                "content_block_start",
                {"type": "content_block_start", "index": self.index, "content_block": block},
            )
        )

    def _delta(self, delta: dict[str, Any]) -> None:
        self.out.append(
            (
                "content_block_delta",
                {"type": "content_block_delta", "index": self.index, "delta": delta},
            )
        )

    def feed(self, events: Sequence[ParseEvent]) -> list[tuple[str, dict[str, Any]]]:
        for e in events:
            if isinstance(e, ReasoningDelta):
                if self.open_type != "thinking":
                    self._open({"type": "thinking", "thinking": ""})
                self._delta({"type": "thinking_delta", "thinking": e.text})
            elif isinstance(e, ContentDelta):
                if self.open_type != "text":
                    self._open({"type": "text", "text": ""})
                self._delta({"type": "text_delta", "text": e.text})
            elif isinstance(e, CallStart):
                self.calls += 1
                self._open({"type": "tool_use", "id": e.id, "name": e.name, "input": {}})
            elif isinstance(e, ArgsDelta) and self.open_type == "tool_use":
                self._delta({"type": "input_json_delta", "partial_json": e.text})
            elif isinstance(e, CallEnd) and self.open_type == "tool_use":
                self._close()
        out, self.out = self.out, []
        return out

    def finish(self) -> list[tuple[str, dict[str, Any]]]:
        self._close()
        out, self.out = self.out, []
        return out
