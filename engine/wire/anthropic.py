"""Anthropic Messages API request bodies (`POST /v1/messages`, `/v1/messages/count_tokens`).

docs/api.md describes what is served: text, `tool_use`, `tool_result` and
`thinking` blocks, `system` as a string or as text blocks, tools with
`input_schema`, and `tool_choice` (auto, any, tool, none).
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field

from engine.wire.base import WireModel
from engine.wire.openai import TOOL_NAME_PATTERN


class ContentBlock(WireModel):
    """One block of a message; which fields apply depends on `type`."""

    type: str
    text: str | None = None
    # tool_use
    id: str | None = None
    name: str | None = None
    input: dict[str, Any] | None = None
    # tool_result
    tool_use_id: str | None = None
    content: str | list[ContentBlock] | None = None
    is_error: bool | None = None
    # thinking
    thinking: str | None = None
    signature: str | None = None


class Message(WireModel):
    role: Literal["user", "assistant"]
    content: str | list[ContentBlock]


class ToolSpec(WireModel):
    name: str = Field(pattern=TOOL_NAME_PATTERN)
    description: str | None = None
    input_schema: dict[str, Any]
    # Server tools ("web_search_20250305"...) carry a type; custom tools have none or "custom".
    type: str | None = None


class ToolChoice(WireModel):
    type: Literal["auto", "any", "tool", "none"]
    name: str | None = None
    disable_parallel_tool_use: bool | None = None


class ThinkingConfig(WireModel):
    type: Literal["enabled", "disabled", "adaptive"]
    budget_tokens: int | None = None


class CountTokensRequest(WireModel):
    model: str | None = None
    messages: list[Message] = Field(min_length=1)
    system: str | list[ContentBlock] | None = None
    tools: list[ToolSpec] | None = None
    tool_choice: ToolChoice | None = None
    thinking: ThinkingConfig | None = None


class MessagesRequest(CountTokensRequest):
    max_tokens: int = Field(ge=1)
    stop_sequences: list[str] | None = None
    stream: bool = False
    temperature: float | None = Field(default=None, ge=0.0, le=1.0)
    top_p: float | None = Field(default=None, ge=0.0, le=1.0)
    top_k: int | None = Field(default=None, ge=0)
