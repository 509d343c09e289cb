"""OpenAI-compatible request bodies: chat and text completions (docs/api.md).

Besides the fields the engine serves, two explicit lists say what happens to
the rest of OpenAI's fields: `REFUSED_FIELDS` get a 400 naming the field
(unless the value asks for nothing: false, empty, or the default), and
`IGNORED_FIELDS` are accepted and have no effect, as clients send them
routinely. Fields in neither list are ignored too (unknown fields).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Literal

from pydantic import Field

from engine.wire.base import WireModel

MAX_TOP_LOGPROBS = 20

# field -> (routes it is refused on, values that ask for nothing, why it is refused).
REFUSED_FIELDS: dict[str, tuple[frozenset[str], tuple[Any, ...], str]] = {
    "n": (frozenset({"chat", "completions"}), (1,), "one completion per request"),
    "best_of": (frozenset({"completions"}), (1,), "one completion per request"),
    "echo": (frozenset({"completions"}), (False,), "the prompt is not echoed"),
    "suffix": (frozenset({"completions"}), ("",), "no fill-in-the-middle"),
    "audio": (frozenset({"chat"}), (), "text only"),
    "modalities": (frozenset({"chat"}), ([], ["text"]), "text only"),
    "prediction": (frozenset({"chat"}), (), "predicted outputs are not supported"),
    "web_search_options": (frozenset({"chat"}), (), "no web search"),
}

# Accepted and without effect (so are unknown fields, and stream_options fields
# other than include_usage).
IGNORED_FIELDS = frozenset({"user", "metadata", "store", "service_tier", "safety_identifier"})


def refused_field(
    body: Mapping[str, Any], route: Literal["chat", "completions"]
) -> tuple[str, str] | None:
    """The first field of `body` the engine refuses on `route` and why, or None."""
    for name, (routes, no_ops, why) in REFUSED_FIELDS.items():
        if route not in routes or name not in body:
            continue
        value = body[name]
        if value is None or value is False or value in ("", [], {}):
            continue
        if any(value == v and type(value) is type(v) for v in no_ops):
            continue
        return name, f"'{name}' is not supported: {why}"
    return None


class SpeculativeOptions(WireModel):
    """Per-request speculation (`"speculative": {...}` or llama-server's flat keys)."""

    type: Literal["auto", "none", "ngram", "draft", "mtp"] = "auto"
    n_max: int = Field(default=8, ge=0, le=64)
    n_min: int = Field(default=0, ge=0, le=64)
    p_min: float = Field(default=0.0, ge=0.0, le=1.0)


class ContentPart(WireModel):
    type: str
    text: str | None = None


# OpenAI's rule for function names; it also keeps names safe inside call markup.
TOOL_NAME_PATTERN = r"^[A-Za-z0-9_.-]{1,64}$"


class FunctionDef(WireModel):
    """A tool's function: its name, what it does, and a JSON schema of its arguments."""

    name: str = Field(pattern=TOOL_NAME_PATTERN)
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class ToolDef(WireModel):
    type: Literal["function"]
    function: FunctionDef


class NamedFunction(WireModel):
    name: str


class NamedToolChoice(WireModel):
    """`tool_choice: {"type": "function", "function": {"name": ...}}`."""

    type: Literal["function"]
    function: NamedFunction


class FunctionCall(WireModel):
    """A call the assistant made: the function's name and its arguments as JSON text."""

    name: str
    arguments: str


class ToolCallIn(WireModel):
    """An assistant turn's tool call, sent back in the history."""

    id: str | None = None
    type: Literal["function"] = "function"
    function: FunctionCall


class ChatMessage(WireModel):
    # "function" is the legacy form of "tool" (a function's result).
    role: Literal["system", "user", "assistant", "tool", "developer", "function"]
    content: str | list[ContentPart] | None = None
    name: str | None = None
    tool_calls: list[ToolCallIn] | None = None
    tool_call_id: str | None = None
    # Legacy: the assistant's one function call.
    function_call: FunctionCall | None = None
    # An earlier answer's reasoning, for templates that show it again.
    reasoning_content: str | None = None

    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "".join(part.text or "" for part in self.content if part.type == "text")


class StreamOptions(WireModel):
    include_usage: bool = False


class JsonSchemaSpec(WireModel):
    """OpenAI's `response_format.json_schema`: the schema and its name."""

    name: str | None = None
    description: str | None = None
    # The schema is walked and checked by engine/structured/schema.py.
    schema_: dict[str, Any] | bool = Field(alias="schema")
    strict: bool | None = None


class ResponseFormat(WireModel):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaSpec | None = None
    # llama-server's form: a schema with `json_object`.
    schema_: dict[str, Any] | None = Field(default=None, alias="schema")

    def as_dict(self) -> dict[str, Any]:
        """The form engine/structured/schema.py compiles."""
        out: dict[str, Any] = {"type": self.type}
        if self.schema_ is not None:
            out["schema"] = self.schema_
        if self.json_schema is not None:
            out["json_schema"] = {"name": self.json_schema.name, "schema": self.json_schema.schema_}
        return out


class SamplingFields(WireModel):
    """Fields shared by chat and text completions."""

    model: str | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    max_tokens: int | None = None
    max_completion_tokens: int | None = None
    temperature: float | None = Field(default=None, ge=0.0, le=5.0)
    top_p: float | None = Field(default=None, ge=0.0, le=1.0)
    top_k: int | None = Field(default=None, ge=0)
    min_p: float | None = Field(default=None, ge=0.0, le=1.0)
    repeat_penalty: float | None = Field(default=None, gt=0.0, le=10.0)
    repeat_last_n: int | None = Field(default=None, ge=-1)
    frequency_penalty: float | None = Field(default=None, ge=-2.0, le=2.0)
    presence_penalty: float | None = Field(default=None, ge=-2.0, le=2.0)
    seed: int | None = None
    stop: str | list[str] | None = None
    n: int | None = None
    speculative: SpeculativeOptions | None = None
    response_format: ResponseFormat | None = None
    # Token id (as a string, OpenAI's form) -> bias added to its logit.
    logit_bias: dict[str, float] | None = None

    def stop_list(self) -> list[str]:
        if self.stop is None:
            return []
        return [self.stop] if isinstance(self.stop, str) else list(self.stop)

    def requested_max_tokens(self) -> int | None:
        return (
            self.max_completion_tokens
            if self.max_completion_tokens is not None
            else self.max_tokens
        )


class ChatCompletionRequest(SamplingFields):
    messages: list[ChatMessage] = Field(min_length=1)
    tools: list[ToolDef] | None = None
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: bool | None = None
    # The legacy forms of tools and tool_choice.
    functions: list[FunctionDef] | None = None
    function_call: Literal["none", "auto"] | NamedFunction | None = None
    logprobs: bool = False
    top_logprobs: int | None = Field(default=None, ge=0, le=MAX_TOP_LOGPROBS)

    def requested_logprobs(self) -> int | None:
        """None without logprobs, else how many alternatives per token."""
        return (self.top_logprobs or 0) if self.logprobs else None


class CompletionRequest(SamplingFields):
    prompt: str | list[str] | list[int]
    # The legacy form: an int, the number of alternatives per token.
    logprobs: int | None = Field(default=None, ge=0, le=MAX_TOP_LOGPROBS)

    def requested_logprobs(self) -> int | None:
        return self.logprobs
