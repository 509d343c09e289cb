"""Tool-call syntaxes: which one a model writes, chosen from its chat template and vocabulary.

Each `ToolFormat` names the text that opens a call (its triggers), whether the
template renders tools itself, and whether a call may also be a bare JSON
object at the start of the answer. Parsing is in engine/tools/parse.py, the
grammars that hold calls to the tools' schemas in engine/tools/grammar.py
(docs/api.md, "Tool calling").
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

FormatName = Literal["hermes", "qwen3_coder", "glm45", "llama3", "mistral", "generic"]


@dataclass(frozen=True)
class ToolFormat:
    name: FormatName
    # Texts that open a call; the first is the one the grammar writes.
    triggers: tuple[str, ...]
    # The chat template renders `tools` and tool turns itself; otherwise
    # engine/tools/prompt.py puts them into the system turn as text.
    native: bool
    # A bare JSON object at the start of the answer is a call too (Llama 3.x, the fallback).
    bare_json: bool = False
    # Triggers that are single control tokens of this vocabulary (the grammar names them as tokens).
    special: frozenset[str] = frozenset()
    # Whether the template knows `<think>` reasoning.
    reasoning: bool = False


def detect_format(
    template: str, is_control: Callable[[str], bool] = lambda _text: False
) -> ToolFormat:
    """The tool-call syntax of a model, from its template source and its vocabulary.

    `is_control(text)` says whether `text` is one control token of the
    vocabulary. A template that never mentions `tools` gets the generic format:
    tools injected into the system turn, calls as `<tool_call>` JSON (or a bare
    JSON object).
    """
    native = "tools" in template
    reasoning = "<think>" in template

    def fmt(name: FormatName, triggers: tuple[str, ...], bare_json: bool = False) -> ToolFormat:
        special = frozenset(t for t in triggers if is_control(t))
        return ToolFormat(name, triggers, native, bare_json, special, reasoning)

    if not native:
        return fmt("generic", ("<tool_call>",), bare_json=True)
    if "<function=" in template and "<parameter=" in template:
        return fmt("qwen3_coder", ("<tool_call>",))
    if "<arg_key>" in template:
        return fmt("glm45", ("<tool_call>",))
    if "[TOOL_CALLS]" in template:
        return fmt("mistral", ("[TOOL_CALLS]",))
    if "<tool_call>" in template:
        return fmt("hermes", ("<tool_call>",))
    if "<|python_tag|>" in template or "<|eom_id|>" in template:
        return fmt("llama3", ("<|python_tag|>",), bare_json=True)
    return fmt("generic", ("<tool_call>",), bare_json=True)
