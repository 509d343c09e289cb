"""Tools and tool turns, made ready for a chat template.

Templates that take `tools` get them as OpenAI's objects, and assistant
tool calls with their arguments as dicts (what templates iterate and
`tojson`). Templates that know nothing of tools (the built-in SmolLM2 one
writes `'…' + message['content']`, which fails on a tool-call turn with null
content) get plain text instead: the tool list and how to call them in the
system turn, each call as a `<tool_call>` block in its assistant turn, and
each result as a `<tool_response>` block in a user turn.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

from engine.tools.formats import ToolFormat

TOOL_INSTRUCTIONS = (
    "You can call functions to help with the user's request. The functions are listed "
    "inside <tools></tools>, as JSON schemas:\n<tools>\n{tools}\n</tools>\n\n"
    "To call a function, answer with a JSON object holding its name and arguments inside "
    "<tool_call></tool_call> tags:\n"
    '<tool_call>\n{{"name": "function_name", "arguments": {{"argument": "value"}}}}\n</tool_call>\n'
    "The result comes back inside <tool_response></tool_response> tags."
)


def _call_text(call: dict[str, Any]) -> str:
    function = call.get("function", {})
    body = {"name": function.get("name"), "arguments": function.get("arguments", {})}
    return "<tool_call>\n" + json.dumps(body, ensure_ascii=False) + "\n</tool_call>"


def prepare_chat(
    fmt: ToolFormat | None,
    messages: Sequence[dict[str, Any]],
    tools: Sequence[dict[str, Any]] | None,
) -> tuple[list[dict[str, Any]], list[dict[str, Any]] | None]:
    """The messages and tools to hand the template."""
    has_tool_turns = any(m.get("tool_calls") or m.get("role") == "tool" for m in messages)
    if fmt is None or (not tools and not has_tool_turns):
        return list(messages), None
    if fmt.native:
        out = []
        for m in messages:
            if m.get("tool_calls") and m.get("content") is None:
                # Templates concatenate content without checking it.
                m = {**m, "content": ""}
            out.append(m)
        return out, list(tools) if tools else None
    return _injected(messages, tools), None


def _injected(
    messages: Sequence[dict[str, Any]], tools: Sequence[dict[str, Any]] | None
) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    for m in messages:
        role = m.get("role")
        content = m.get("content") or ""
        if role == "assistant" and m.get("tool_calls"):
            calls = "\n".join(_call_text(c) for c in m["tool_calls"])
            out.append(
                {"role": "assistant", "content": (content + "\n" if content else "") + calls}
            )
        elif role == "tool":
            block = f"<tool_response>\n{content}\n</tool_response>"
            if out and out[-1].get("role") == "user" and out[-1].get("_tool_results"):
                out[-1]["content"] += "\n" + block
            else:
                out.append({"role": "user", "content": block, "_tool_results": True})
        else:
            out.append({k: v for k, v in m.items() if k in ("role", "content", "name")})
    for m in out:
        m.pop("_tool_results", None)
    if tools:
        listing = "\n".join(json.dumps(t, ensure_ascii=False) for t in tools)
        text = TOOL_INSTRUCTIONS.format(tools=listing)
        if out and out[0].get("role") in ("system", "developer"):
            first = out[0]
            out[0] = {**first, "content": (first.get("content") or "") + "\n\n" + text}
        else:
            out.insert(0, {"role": "system", "content": text})
    return out
